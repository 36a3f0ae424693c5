"""CIFAR-10's binary format (written here, tiny), random x-flips, and the two CIFAR-10 recipes for a
few steps at reduced width through the command line (issue 14, section 4)."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffspace.cli import main
from diffspace.data import load, random_hflip, read_cifar_binary

CONFIGS = Path(__file__).parent.parent / "configs"


def pixel(label, c, h, w, i):
    """The byte the test writes at channel c, row h, column w of record i (an independent formula)."""
    return (31 * c + 7 * h + 3 * w + 11 * i + label) % 256


def record(i: int, label: int) -> bytes:
    planes = [[pixel(label, c, h, w, i) for h in range(32) for w in range(32)] for c in range(3)]
    return bytes([label] + planes[0] + planes[1] + planes[2])  # label, then R, G, B planes row by row


@pytest.fixture
def cifar(tmp_path):
    """cifar-10-batches-bin/ with data_batch_1..2 (20 records each) and a test_batch, and its .tar.gz."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    labels = {}
    for b in (1, 2):
        rows = [(i, (i * 3 + b) % 10) for i in range(20 * (b - 1), 20 * b)]
        labels.update(rows)
        (folder / f"data_batch_{b}.bin").write_bytes(b"".join(record(i, y) for i, y in rows))
    (folder / "test_batch.bin").write_bytes(record(999, 9) * 5)
    (folder / "batches.meta.txt").write_text("airplane\nautomobile\n")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    return folder, archive, labels


def test_the_binary_records_are_read_as_written(cifar):
    folder, archive, labels = cifar
    for spec in (folder, archive, str(archive)):
        data = load(spec)
        assert data.x.shape == (40, 3, 32, 32) and data.x.dtype == torch.float32 and data.num_classes == 10
        assert data.labels.tolist() == [labels[i] for i in range(40)]  # batch 1 before batch 2, test_batch left out
        assert data.levels == 256 and float(data.x.min()) >= -1 and float(data.x.max()) <= 1
        for i, c, h, w in ((0, 0, 0, 0), (5, 1, 3, 31), (39, 2, 31, 0), (21, 0, 16, 17)):
            expected = pixel(labels[i], c, h, w, i) / 127.5 - 1
            assert abs(float(data.x[i, c, h, w]) - expected) < 1e-6, (i, c, h, w)
    one = read_cifar_binary(folder / "data_batch_2.bin")
    assert torch.equal(one.x, load(folder).x[20:])


@pytest.mark.parametrize("damage, words", [("truncated", "not a whole number of 3073-byte"), ("label", "CIFAR-10's are 0..9"),
                                           ("empty folder", "holds no CIFAR-10 training batches"), ("not gzip", "not a readable .tar.gz")])
def test_bad_binary_files_are_one_line_before_any_work(tmp_path, cifar, capsys, damage, words):
    folder, archive, _ = cifar
    if damage == "truncated":
        spec = folder / "data_batch_1.bin"
        spec.write_bytes(spec.read_bytes()[:-100])
    elif damage == "label":
        spec = tmp_path / "bad.bin"
        spec.write_bytes(b"\x0c" + record(0, 0)[1:])
    elif damage == "empty folder":
        spec = tmp_path / "empty.tar.gz"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("cifar-10-batches-bin/readme.html")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        spec.write_bytes(buf.getvalue())
    else:
        spec = tmp_path / "fake.tar.gz"
        spec.write_bytes(b"not gzip at all")
    capsys.readouterr()
    assert main(["train", "--data", str(spec), "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_random_hflip_mirrors_about_half_each_wholly_and_by_the_generator():
    x = torch.randn(4000, 3, 8, 8)
    y = random_hflip(x, torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each image is either kept or mirrored, never mixed
    assert abs(float(mirrored.double().mean()) - 0.5) < 4 * 0.5 / 4000**0.5  # Binomial(4000, 1/2) within 4 sd
    assert torch.equal(y, random_hflip(x, torch.Generator().manual_seed(0)))


def test_hflip_on_points_is_refused(tmp_path, capsys):
    assert main(["train", "--data", "ring8", "data.hflip=true", "--steps", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "data.hflip=true mirrors images" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["cifar10-ddpm", "cifar10-edm"])
def test_the_cifar10_recipes_train_a_few_steps_at_reduced_width(tmp_path, cifar, recipe):
    folder, archive, _ = cifar
    out = tmp_path / recipe
    small = ["model.base_channels=8", "model.num_blocks=1", "train.batch_size=8", "train.steps=3", "train.warmup=1",
             "log.n_samples=2", "log.checkpoint_every=3", "sample.nfe=3", "log.every=1"]
    assert main(["train", str(CONFIGS / f"{recipe}.toml"), f"data.spec={archive}", *small, "--out", str(out), "--quiet"]) == 0
    text = (out / "config.toml").read_text()
    assert "hflip = true" in text and "channels_last = true" in text and "bf16 = true" in text
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows)
    assert main(["sample", str(out), "-n", "2", "--out", str(tmp_path / f"{recipe}.png")]) == 0
    assert np.load(tmp_path / f"{recipe}.npz")["x"].shape == (2, 3, 32, 32)
