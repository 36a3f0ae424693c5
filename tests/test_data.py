"""Data loading against independent computations: geometry of the 2-D sets, scikit-learn's raw digits,
images written here with Pillow, arrays written with numpy, and numpy's std for sigma_data."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffspace import analytic
from diffspace.data import GENERATORS, NAMES, Dataset, batch_indices, load


# -- 2-D generators and mixtures ---------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if n != "digits"])
def test_points_shape_dtype_and_determinism(name):
    a, b, c = load(name, n=500, seed=1), load(name, n=500, seed=1), load(name, n=500, seed=2)
    d = 64 if name.startswith("image64") else 2
    assert a.x.shape == (500, d) and a.x.dtype == torch.float32 and a.kind == "points" and a.shape == (d,)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert bool(torch.isfinite(a.x).all())
    assert len(load(name, seed=0)) == 10_000


def test_moons_geometry():
    ds = load("moons", n=4000)
    x, y = ds.x.double(), ds.labels
    assert ds.num_classes == 2 and set(y.tolist()) == {0, 1}
    assert x[:, 0].abs().max() < 1.5 + 0.3 and x[:, 1].abs().max() < 0.75 + 0.3
    centres = torch.tensor([[-0.5, -0.25], [0.5, 0.25]], dtype=torch.float64)  # each moon is on a unit circle
    r = (x - centres[y]).norm(dim=1)
    assert (r - 1).abs().max() < 0.3
    assert (x[y == 0, 1] > x[y == 0, 1].new_tensor(-0.25) - 0.3).all()  # upper moon: upper half of its circle


def test_swissroll_geometry():
    x = load("swissroll", n=4000).x.double()
    r = x.norm(dim=1)
    assert r.min() > 1 / 3 - 0.1 and r.max() < 1 + 0.1
    t = r * 4.5 * math.pi  # on the spiral, the angle of a point is its radius-parameter t (mod 2 pi)
    cos_err = (x[:, 0] * t.cos() + x[:, 1] * t.sin()) / r  # cos of the angle error; random points: mean 0
    assert cos_err.median() > 0.95 and (cos_err > 0).double().mean() > 0.99


def test_eight_gaussians_geometry():
    ds = load("8gaussians", n=4000)
    a = ds.labels.double() * 2 * math.pi / 8
    centres = math.sqrt(2) * torch.stack([a.cos(), a.sin()], 1)
    assert ds.num_classes == 8 and ds.labels.bincount().min() > 400
    assert (ds.x.double() - centres).norm(dim=1).max() < 0.6
    assert abs(ds.x.double().norm(dim=1).mean() - math.sqrt(2)) < 0.02


def test_checkerboard_on_dark_squares_only():
    x = load("checkerboard", n=4000).x.double()
    assert x.min() >= -1 and x.max() <= 1
    ij = ((x + 1) / 0.5).floor().clamp(0, 3).long()
    assert ((ij[:, 0] + ij[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in ij.tolist()}) == 8  # every dark cell is used
    gm = load("checkerboard-gm", n=20_000).x.double()  # the mixture matches the board's moments
    assert torch.allclose(gm.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.03)
    assert abs(load("checkerboard", n=20_000).sigma_data - analytic.checkerboard().sigma_data) < 0.01


def test_mixtures_match_analytic():
    x = load("ring8", n=4000, seed=3).x.double()
    assert (x.norm(dim=1) - 1).abs().max() < 0.3
    g = torch.Generator().manual_seed(3)
    assert torch.equal(x.float(), analytic.ring8().sample(4000, g).float())
    assert torch.equal(load("ring8-gm", n=50).x, load("ring8", n=50).x)
    assert abs(load("image64", n=5000).sigma_data - 0.5) < 0.02


# -- digits ------------------------------------------------------------------------------------------
def test_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.kind == "images" and ds.num_classes == 10
    assert ds.x.min() == -1 and ds.x.max() == 1
    assert set(ds.labels.tolist()) == set(range(10)) and ds.labels.dtype == torch.int64
    assert torch.equal(ds.labels, torch.from_numpy(raw.target).long())
    np.testing.assert_allclose(ds.x[:, 0].numpy(), raw.images / 8 - 1, atol=1e-7)
    up = load("digits", size=16)
    assert up.x.shape == (1797, 1, 16, 16) and up.x.min() >= -1 and up.x.max() <= 1
    # bilinear upsampling keeps the image's mean brightness
    assert torch.allclose(up.x.mean((1, 2, 3)), ds.x.mean((1, 2, 3)), atol=0.05)
    assert len(load("digits", n=100)) == 100
    # 17 grey levels x = k / 8 - 1; resizing interpolates them away, repeating channels does not
    assert ds.levels == 17 and torch.equal(torch.unique(ds.x), torch.arange(17) / 8 - 1)
    assert up.levels == 0 and load("digits", size=8).levels == 17 and load("digits", channels=3).levels == 17
    assert load("moons", n=10).levels == 0


def test_sigma_data_matches_numpy():
    for ds in (load("digits"), load("moons", n=1000)):
        assert ds.sigma_data == pytest.approx(float(ds.x.numpy().astype(np.float64).std()), rel=1e-6)


# -- folders -----------------------------------------------------------------------------------------
def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, fmt)


def test_folder_labels_rgb_and_scaling(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        for k in range(3):
            _save(tmp_path / cls / f"{k}.png", np.full((6, 5, 3), value))
    ds = load(tmp_path)
    assert ds.x.shape == (6, 3, 6, 5) and ds.kind == "images" and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted folder names: cat = 0, dog = 1
    assert (ds.x[:3] == -1).all() and (ds.x[3:] == 1).all()
    assert ds.name == tmp_path.name


def test_folder_grayscale_and_channels(tmp_path):
    for k in range(2):
        _save(tmp_path / f"{k}.png", np.full((4, 4), 128 + 50 * k))
    ds = load(tmp_path)
    assert ds.x.shape == (2, 1, 4, 4) and ds.labels is None and ds.num_classes == 0
    assert torch.allclose(ds.x[1, 0, 0, 0], torch.tensor(178 / 127.5 - 1))
    assert load(tmp_path, channels=3).x.shape == (2, 3, 4, 4)
    _save(tmp_path / "colour.png", np.zeros((4, 4, 3)))  # one colour image makes RGB the default
    assert load(tmp_path).x.shape == (3, 3, 4, 4)
    assert load(tmp_path, channels=1).x.shape == (3, 1, 4, 4)


def test_folder_resize_centre_crop(tmp_path):
    img = np.zeros((10, 20), dtype=np.uint8)  # H = 10, W = 20: the centre 10 columns are white
    img[:, 5:15] = 255
    _save(tmp_path / "wide.png", img)
    exact = load(tmp_path, size=10)  # no resampling, pure centre crop
    assert exact.x.shape == (1, 1, 10, 10) and (exact.x == 1).all()
    small = load(tmp_path, size=5)  # 20x10 -> 10x5 -> crop columns 2..7 (white at 2.5..7.5)
    assert small.x.shape == (1, 1, 5, 5)
    assert (small.x[..., 1:4] > 0.9).all() and small.x.mean() > 0.6
    _save(tmp_path / "tall.png", np.full((30, 6), 255))
    assert load(tmp_path, size=4).x.shape == (2, 1, 4, 4)


def test_folder_jpeg_and_png_mixed(tmp_path):
    _save(tmp_path / "a.png", np.full((8, 8, 3), 200))
    _save(tmp_path / "b.jpg", np.full((8, 8, 3), 200), "JPEG")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    ds = load(tmp_path)
    assert ds.x.shape == (2, 3, 8, 8)
    assert (ds.x[1] - ds.x[0]).abs().max() < 0.05  # JPEG of a flat colour is nearly exact


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing")
    _save(tmp_path / "good.png", np.zeros((4, 4)))
    (tmp_path / "broken.png").write_text("this is not a PNG")
    with pytest.raises(ValueError, match=r"unreadable.*broken\.png"):
        load(tmp_path)
    (tmp_path / "broken.png").unlink()
    _save(tmp_path / "big.png", np.zeros((6, 7)))
    with pytest.raises(ValueError, match=r"different sizes.*7x6.*size="):
        load(tmp_path)
    assert load(tmp_path, size=4).x.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        load(tmp_path, channels=2)
    with pytest.raises(ValueError, match="size"):
        load(tmp_path, size=0)
    _save(tmp_path / "cls" / "c.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="sub-folders"):
        load(tmp_path, size=4)


# -- arrays ------------------------------------------------------------------------------------------
def test_npy_shapes(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "points": (rng.normal(size=(7, 3)).astype(np.float32), (3,), "points"),
        "nhw": (rng.normal(size=(7, 5, 6)), (1, 5, 6), "images"),
        "nchw": (rng.normal(size=(7, 3, 5, 6)), (3, 5, 6), "images"),
        "nhwc": (rng.normal(size=(7, 5, 6, 3)), (3, 5, 6), "images"),
    }
    for name, (a, shape, kind) in cases.items():
        np.save(tmp_path / f"{name}.npy", a)
        ds = load(tmp_path / f"{name}.npy")
        assert ds.shape == shape and ds.kind == kind and len(ds) == 7 and ds.labels is None
    ds = load(tmp_path / "nhwc.npy")
    np.testing.assert_allclose(ds.x.numpy(), cases["nhwc"][0].transpose(0, 3, 1, 2), rtol=1e-6)
    np.testing.assert_allclose(load(tmp_path / "points.npy").x.numpy(), cases["points"][0])  # used as given


def test_uint8_scaling_and_npz_labels(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(6, 4, 4, 1), dtype=np.uint8)
    a[0, 0, 0, 0], a[0, 0, 1, 0] = 0, 255
    np.savez(tmp_path / "d.npz", x=a, labels=np.array([0, 1, 2, 0, 1, 2]))
    ds = load(tmp_path / "d.npz")
    assert ds.x.shape == (6, 1, 4, 4) and ds.x.min() == -1 and ds.x.max() == 1
    np.testing.assert_allclose(ds.x.numpy(), a.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2] and ds.num_classes == 3
    np.savez(tmp_path / "only.npz", data=np.zeros((5, 2)), y=np.arange(5))  # the only array + 'y' labels
    ds = load(tmp_path / "only.npz")
    assert ds.kind == "points" and ds.labels.tolist() == list(range(5)) and ds.num_classes == 5
    assert load(tmp_path / "d.npz", size=8).x.shape == (6, 1, 8, 8)


def test_array_errors(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        load(tmp_path / "flat.npy")
    bad = np.zeros((3, 2))
    bad[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN"):
        load(tmp_path / "nan.npy")
    np.save(tmp_path / "inf.npy", np.full((3, 2), np.inf))
    with pytest.raises(ValueError, match="finite"):
        load(tmp_path / "inf.npy")
    np.save(tmp_path / "c4.npy", np.zeros((3, 4, 5, 4)))
    with pytest.raises(ValueError, match=r"C in \{1, 3\}"):
        load(tmp_path / "c4.npy")
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((4, 2)), labels=np.arange(3))
    with pytest.raises(ValueError, match="labels have shape"):
        load(tmp_path / "mismatch.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope.npy")
    np.save(tmp_path / "points.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="images only"):
        load(tmp_path / "points.npy", size=4)
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="not numeric"):
        load(tmp_path / "strings.npy")


def test_spec_errors():
    with pytest.raises(ValueError, match=r"unknown data 'mnist'.*digits.*\.npz"):
        load("mnist")
    with pytest.raises(ValueError, match="n=0"):
        load("moons", n=0)
    with pytest.raises(ValueError, match="images only"):
        load("moons", size=8)


# -- split and batches -------------------------------------------------------------------------------
def _with_ids(ds: Dataset) -> Dataset:
    """The same dataset with x replaced by the sample index, to track samples."""
    return Dataset(torch.arange(len(ds), dtype=torch.float32)[:, None], ds.labels, ds.num_classes, ds.name)


@pytest.mark.parametrize("name", ["digits", "swissroll"])
def test_split(name):
    ds = _with_ids(load(name, n=1000))
    train, test = ds.split(0.2, seed=5)
    train2, test2 = ds.split(0.2, seed=5)
    assert torch.equal(test.x, test2.x) and torch.equal(train.x, train2.x)
    assert not torch.equal(test.x, ds.split(0.2, seed=6)[1].x)
    ids_train, ids_test = set(train.x[:, 0].tolist()), set(test.x[:, 0].tolist())
    assert not ids_train & ids_test and len(ids_train | ids_test) == 1000
    assert len(test) == 200 and len(train) == 800
    if ds.labels is not None:  # stratified: every class keeps its share
        share = test.labels.bincount(minlength=10) / ds.labels.bincount(minlength=10)
        assert (share - 0.2).abs().max() < 0.05
        assert torch.equal(train.labels, ds.labels[train.x[:, 0].long()])
    with pytest.raises(ValueError, match="test_fraction"):
        ds.split(1.0)


def test_batch_indices_epochs_drop_last_and_purity():
    per_epoch = [torch.cat([batch_indices(100, 25, 4 * e + j, seed=1) for j in range(4)]) for e in range(3)]
    for e in per_epoch:  # each epoch is a permutation of all samples
        assert sorted(e.tolist()) == list(range(100))
    assert not torch.equal(per_epoch[0], per_epoch[1])  # reshuffled every epoch
    seen = torch.cat([batch_indices(100, 30, j, seed=1) for j in range(3)])  # drop_last: 3 batches of 30
    assert len(set(seen.tolist())) == 90 and len(batch_indices(100, 30, 3, seed=1)) == 30
    assert torch.equal(batch_indices(100, 30, 3, seed=1)[:5], batch_indices(100, 30, 3, seed=1)[:5])
    assert not torch.equal(batch_indices(100, 25, 0, seed=1), batch_indices(100, 25, 0, seed=2))


def test_batch_indices_errors():
    with pytest.raises(ValueError, match=r"has 10 samples.*batch_size=32"):
        batch_indices(10, 32, 0, 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        batch_indices(10, 0, 0, 0)


def test_summary_and_len():
    ds = load("digits")
    s = ds.summary()
    assert "digits" in s and "1797" in s and "(1, 8, 8)" in s and "10 classes" in s and "sigma_data=" in s
    assert "\n" not in s and len(ds) == 1797
    assert set(GENERATORS) <= set(NAMES)
