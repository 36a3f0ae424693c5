"""Reliability (issue 13, part 1): divergence stops training with one line and never reaches a
checkpoint, the last good checkpoint survives, a model with non-finite weights is refused, and every
numeric option is range-checked when it is read."""

import json
import math

import numpy as np
import pytest
import torch

from diffspace import checkpoint as ckpt
from diffspace.cli import main
from diffspace.config import MAX_NFE, RANGES, load_config

TINY = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=32", "log.n_samples=4", "train.warmup=0"]


def _train(out, *extra):
    return main(["train", "--data", "ring8", "--preset", "edm", "--out", str(out), "--quiet", *TINY, *extra])


@pytest.mark.parametrize("bad", ["train.lr=1e30", "data"])
def test_divergence_stops_at_once_and_writes_no_checkpoint(tmp_path, capsys, bad):
    if bad == "data":  # finite data whose loss overflows float32
        np.save(tmp_path / "huge.npy", np.full((300, 2), 1e30, dtype=np.float32) * np.random.default_rng(0).standard_normal((300, 2)).astype(np.float32))
        code = main(["train", "--data", str(tmp_path / "huge.npy"), "--preset", "edm", "--out", str(tmp_path / "r"),
                     "--quiet", "--steps", "30", *TINY[:2], *TINY[3:]])
    else:
        code = _train(tmp_path / "r", "--steps", "30", bad)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "training diverged at step" in err and "no checkpoint was written" in err
    assert ckpt.list_checkpoints(tmp_path / "r" / "checkpoints") == []


def test_the_last_good_checkpoint_survives_a_later_divergence(tmp_path, capsys):
    out = tmp_path / "r"
    assert _train(out, "--steps", "20", "log.checkpoint_every=10", "log.keep=1") == 0
    # the same run continued with a learning rate that blows it up: edit the saved config's lr
    last = ckpt.latest(out / "checkpoints")
    state = json.loads(last.with_suffix(".json").read_text())
    state["config"]["train"]["lr"] = 1e30
    state["config"]["train"]["steps"] = 40
    last.with_suffix(".json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    # step 21's update (lr 1e30) throws the weights far out; step 22's loss shows it, before its update
    assert "training diverged at step 22: the loss is nan" in err and "the last checkpoint (step 20) is kept" in err
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["ckpt-00000020"]
    assert main(["sample", str(out), "--n", "4"]) == 0  # and it still samples


def test_a_checkpoint_with_non_finite_tensors_is_never_written_or_used(tmp_path, capsys):
    with pytest.raises(ValueError, match="not writing checkpoint ckpt-00000005: 1 tensors hold NaN"):
        ckpt.save(tmp_path / "c", 5, {"a": torch.tensor([1.0, float("nan")]), "rng": torch.zeros(3, dtype=torch.uint8)}, {})
    assert not list((tmp_path / "c").glob("*.safetensors"))
    out = tmp_path / "r"
    assert _train(out, "--steps", "5") == 0
    last = ckpt.latest(out / "checkpoints")
    tensors, state = ckpt.load(last)
    name = next(k for k in tensors if k.startswith("ema."))
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    from safetensors.torch import save_file  # a consistent checkpoint (step, checksum) of NaN weights

    digest = ckpt.checksum(tensors)
    save_file(tensors, str(last.with_suffix(".safetensors")), metadata={"step": str(state["step"]), "sha256": digest})
    last.with_suffix(".json").write_text(json.dumps({**state, "sha256": digest}))
    capsys.readouterr()
    for command in (["sample", str(out), "--n", "4"], ["eval", str(out), "--n", "50"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "weights hold NaN or inf" in err and err.count("\n") == 1


@pytest.mark.parametrize("override, words", [
    ("train.grad_clip=-1", "allowed: [0, inf)"), ("train.ema_decay=2", "allowed: [0, 1)"),
    ("train.lr_min_ratio=-1", "allowed: [0, 1]"), ("train.steps=-1", "allowed: [1, "), ("train.steps=0", "allowed: [1, "),
    ("log.checkpoint_every=-1", "allowed: [1, "), ("log.every=0", "allowed: [1, "), ("log.n_samples=0", "allowed: [1, 10000]"),
    ("train.lr=inf", "must be finite"), ("train.lr=nan", "must be finite"), ("train.lr=0", "allowed: (0, inf)"),
    ("sample.nfe=100000", f"allowed: [0, {MAX_NFE}]"), ("model.channel_mult=[1,0]", "(each entry)"),
    ("data.test_fraction=1", "allowed: [0, 1)"), ("model.label_dropout=-0.1", "allowed: [0, 1)"),
    ("train.ema_sigma_rel=0.5", "allowed: (0, 0.5)"),
])
def test_numeric_options_are_range_checked_before_any_work(tmp_path, capsys, override, words):
    key, value = override.split("=")
    assert _train(tmp_path / "r", override) == 2
    err = capsys.readouterr().err
    assert f"{key}=" in err and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()  # before the run folder is made


def test_every_range_is_met_by_the_defaults_and_a_toml_section_must_be_a_table(tmp_path):
    cfg = load_config()
    for key, (low, high, *_) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for v in value if isinstance(value, list) else [value]:
            assert low <= v <= high, key
    bad = tmp_path / "bad.toml"
    bad.write_text("train = 5\n")
    with pytest.raises(ValueError, match=r"train = 5 must be a \[train\] table"):
        load_config(bad)
    assert math.isinf(RANGES["train.lr"][1])


@pytest.mark.parametrize("device, words", [("bogus", "is not a device"), ("mps", "allowed: auto, cpu, cuda"),
                                           ("cuda:7", "CUDA devices")])
def test_a_bad_or_missing_device_is_one_line(tmp_path, capsys, device, words):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert _train(tmp_path / "r", f"train.device={device}") == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_take_a_device_and_refuse_a_bad_one_in_one_line(tmp_path, capsys, command):
    """--device auto (the default) is the GPU when there is one, here the CPU: the same samples as
    --device cpu; a name that is not a device, or a GPU this torch cannot see, is one line, exit 2,
    before anything is loaded or written."""
    run = tmp_path / "r"
    assert _train(run, "--steps", "3") == 0
    extra = ["--nll-samples", "4", "--vlb-steps", "10", "-n", "8"] if command == "eval" else ["-n", "8"]
    outputs = []
    for device in ("cpu", "auto"):
        target = ["--out", str(tmp_path / f"{device}.png")] if command == "sample" else []
        assert main([command, str(run), *extra, "--device", device, *target]) == 0
        outputs.append((tmp_path / f"{device}.npz").read_bytes() if command == "sample" else (run / "eval.json").read_text())
    assert outputs[0] == outputs[1]
    capsys.readouterr()
    for device, words in (("bogus", "--device='bogus' is not a device"), ("mps", "allowed: auto, cpu, cuda"),
                          ("cuda:7", "CUDA devices")):
        if device == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        assert main([command, str(run), *extra, "--device", device, "--out" if command == "sample" else "--set",
                     str(tmp_path / "bad.png") if command == "sample" else "sample.seed=1"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad.png").exists()


# -- checkpoints: verified, with fall-back ------------------------------------------------------------
def _three_checkpoints(out):
    assert _train(out, "--steps", "12", "log.checkpoint_every=4", "log.keep=5") == 0
    return ckpt.list_checkpoints(out / "checkpoints")


DAMAGE = {
    "truncated": lambda st, js: st.write_bytes(st.read_bytes()[: len(st.read_bytes()) // 2]),
    "empty": lambda st, js: st.write_bytes(b""),
    "header": lambda st, js: st.write_bytes(b"\xff" * 16 + st.read_bytes()[16:]),
    "64 flipped bytes": lambda st, js: st.write_bytes(
        (lambda b: b[: len(b) // 2] + bytes(x ^ 0xFF for x in b[len(b) // 2: len(b) // 2 + 64]) + b[len(b) // 2 + 64:])(st.read_bytes())),
    "json step edited": lambda st, js: js.write_text(json.dumps({**json.loads(js.read_text()), "step": 400})),
    "json garbage": lambda st, js: js.write_text("{not json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_passed_over(tmp_path, capsys, damage):
    out = tmp_path / "r"
    stems = _three_checkpoints(out)
    newest = stems[-1]
    DAMAGE[damage](newest.with_suffix(".safetensors"), newest.with_suffix(".json"))
    with pytest.raises(ckpt.Damaged, match=newest.name):
        ckpt.load(newest)
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "4"]) == 0
    err = capsys.readouterr().err
    assert newest.name in err and "using the older ckpt-00000008" in err
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # resumes from step 8, retrains 9-12
    assert json.loads(ckpt.latest(out / "checkpoints").with_suffix(".json").read_text())["step"] == 12
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "4"]) == 0 and "using the older" not in capsys.readouterr().err


def test_no_checkpoint_that_verifies_is_one_line_and_another_shape_names_what_differs(tmp_path, capsys):
    out = tmp_path / "r"
    for stem in _three_checkpoints(out):
        DAMAGE["empty"](stem.with_suffix(".safetensors"), None)
    capsys.readouterr()
    for command in (["sample", str(out), "--n", "4"], ["eval", str(out)], ["train", "--resume", str(out)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "no checkpoint in" in err and "verifies" in err and err.count("\n") == 1 and "Traceback" not in err
    from diffspace.model import Diffusion, build_model
    from diffspace.config import ModelConfig

    other = build_model(ModelConfig(preset="edm", hidden=24, depth=1), (2,))
    good = tmp_path / "g"
    _train(good, "--steps", "2")
    tensors, _ = ckpt.load(ckpt.latest(good / "checkpoints"))
    with pytest.raises(ValueError, match=r"shapes differ \(.*\(16, .* saved, \(24, .* here\).*hidden, depth"):
        ckpt.load_module(other, tensors, "ema")
    assert isinstance(other, Diffusion)


def test_stray_temporary_files_are_removed_and_metrics_truncated_on_resume(tmp_path):
    out = tmp_path / "r"
    stems = _three_checkpoints(out)
    for stem in stems[1:]:  # back to step 4, as after a crash that kept only the oldest
        stem.with_suffix(".json").unlink()
        stem.with_suffix(".safetensors").unlink()
    stray = out / "checkpoints" / ".ckpt-00000008.safetensors.x1y2.tmp"
    stray.write_bytes(b"half")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not stray.exists()
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_a_failed_write_leaves_no_orphan_and_one_line(tmp_path, monkeypatch, capsys):
    real = ckpt.atomic_write_text

    def disk_full(path, text):
        if str(path).endswith(".json") and "ckpt-" in str(path):
            raise OSError(28, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(ckpt, "atomic_write_text", disk_full)
    out = tmp_path / "r"
    assert _train(out, "--steps", "4") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True


def test_a_second_writer_is_refused_and_readers_are_not_blocked(tmp_path, capsys):
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    assert _train(out, "--steps", "4") == 0  # a checkpoint to read
    writer = subprocess.Popen([sys.executable, "-m", "diffspace", "train", "--resume", str(out), "--steps", "200000",
                               "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # up to 2 min on a busy machine
            if (out / ".lock").exists() and f"process {writer.pid}" in (out / ".lock").read_text():
                break
            assert writer.poll() is None, writer.stderr.read()
            time.sleep(0.1)
        else:
            pytest.fail("the writer never took the lock")
        capsys.readouterr()
        assert main(["train", "--resume", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {writer.pid}" in err and err.count("\n") == 1
        assert main(["sample", str(out), "--n", "4"]) == 0  # a reader
        writer.send_signal(__import__("signal").SIGTERM)
        assert writer.wait(timeout=60) == 130 and "stopped by SIGTERM" in writer.stderr.read()
    finally:
        writer.kill()
    assert main(["train", "--resume", str(out), "--quiet", "--steps", "5"]) == 0  # the lock died with its holder


@pytest.mark.parametrize("text, words", [
    ('run = 5\n[data.ring8]\n', "run = 5 must be an array of tables"),
    ('[data.ring8]\n[[run]]\nlabel = 5\n', "label = 5; it must be a str"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[eval]\nnfe = "abc"\n', "nfe = 'abc'; it must be a list of integers"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[eval]\nnfe = [10, -1]\n', "it must be a list of integers in [0, 10000]"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[eval]\nn = 1\n', "n = 1; it must be an integer number in [2, 100000]"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[eval.ring8]\npf_ode_rtol = "x"\n', "pf_ode_rtol = 'x'"),
    ('data = 3\n[[run]]\nlabel = "a"\n', "data = 3 must be a table"),
    ('[data]\nring8 = 3\n[[run]]\nlabel = "a"\n', "data.ring8 = 3 must be a table"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\nreflow_pairs = 10\n', "but no reflow"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[[run]]\nlabel = "b"\nreflow = "@a"\nreflow_nfe = 0\n', "reflow_nfe = 0; allowed: 1 .. 10000"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\nmeasure = "no"\n', "measure = 'no'; it must be a bool"),
])
def test_bad_specs_are_one_line_before_any_training(tmp_path, capsys, text, words):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert main(["compare", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# -- SIGKILL at random points, checkpoint writes included -------------------------------------------
KILL_RUN = ["--data", "ring8", "--preset", "edm", "--quiet", "--steps", "60", "model.hidden=32", "model.depth=2",
            "data.n=500", "train.batch_size=32", "log.n_samples=4", "log.checkpoint_every=3", "log.keep=2", "log.every=2"]


def _killed_then_resumed(out, delay, during_write, seed):
    """Start `diffspace train` in a subprocess, SIGKILL it (after `delay` s of training, or the
    moment a temporary checkpoint file appears), then resume it to the end in-process."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "diffspace", "train", "--out", str(out), *KILL_RUN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, killed_in_write = None, False
    try:
        while proc.poll() is None:
            folder = out / "checkpoints"
            if during_write and folder.is_dir() and any(folder.glob(".*.tmp")):
                proc.kill()
                killed_in_write = True
                break
            if t0 is None and folder.is_dir():
                t0 = time.time()
            if t0 is not None and not during_write and time.time() - t0 > delay:
                proc.kill()
                break
            time.sleep(0.0005 if during_write else 0.01)
    finally:
        proc.kill()
        proc.wait()
    if ckpt.latest(out / "checkpoints") is None:  # killed before its first checkpoint: start again
        assert main(["train", "--out", str(out), *KILL_RUN]) == 0
    else:
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
    return killed_in_write


def _kill_trials(tmp_path, trials):
    import random

    straight = tmp_path / "straight"
    assert main(["train", "--out", str(straight), *KILL_RUN]) == 0
    want, _ = ckpt.load(ckpt.latest(straight / "checkpoints"))
    rng, identical, in_write = random.Random(0), 0, 0
    for k in range(trials):
        out = tmp_path / f"k{k}"
        in_write += _killed_then_resumed(out, rng.uniform(0.0, 1.5), during_write=k % 3 == 2, seed=k)
        got, state = ckpt.load(ckpt.latest(out / "checkpoints"))
        assert state["step"] == 60 and not list((out / "checkpoints").glob(".*.tmp"))
        identical += got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
        steps = [int(li.split(",")[0]) for li in (out / "metrics.csv").read_text().splitlines()[1:]]
        assert steps == sorted(set(steps)), steps
    return identical, in_write


def test_sigkill_at_random_points_resumes_bit_identically(tmp_path):
    identical, _ = _kill_trials(tmp_path, 3)  # the third one aims at a checkpoint write (the slow test counts hits)
    assert identical == 3


@pytest.mark.slow
def test_sigkill_many_times_resumes_bit_identically(tmp_path):
    identical, in_write = _kill_trials(tmp_path, 30)
    print(f"SIGKILL trials: 30, bit-identical resumes: {identical}, killed while a checkpoint file was open: {in_write}")
    assert identical == 30 and in_write >= 1


@pytest.fixture
def small_disk(tmp_path):
    """A 1.9 MB tmpfs, where the machine allows mounting one (root on Linux); else the test is skipped."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1900k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_disk_full_is_one_line_and_leaves_the_earlier_checkpoints_loadable(small_disk, capsys):
    out = small_disk / "r"  # ~760 KB per checkpoint (MLP 64 x 2: model, EMA, two Adam moments): two fit
    code = main(["train", "--data", "ring8", "--preset", "edm", "--out", str(out), "--quiet", "--steps", "40",
                 "model.hidden=64", "model.depth=2", "data.n=300", "train.batch_size=32", "log.n_samples=4",
                 "log.checkpoint_every=5", "log.keep=10"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1, err
    stems = ckpt.list_checkpoints(out / "checkpoints")
    assert stems, "the first checkpoints fit"
    for stem in stems:
        ckpt.load(stem)  # every checkpoint that counts verifies
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert names == {f"{s.name}{x}" for s in stems for x in (".json", ".safetensors")}  # no orphan, no temporary file


def _bad_data(tmp_path, kind):
    path = tmp_path / "bad"
    if kind == "text file":
        path = tmp_path / "d.txt"
        path.write_text("1,2\n")
    elif kind == "empty array":
        path = tmp_path / "d.npy"
        np.save(path, np.zeros((0, 2), np.float32))
    elif kind == "nan array":
        path = tmp_path / "d.npy"
        np.save(path, np.full((100, 2), np.nan, np.float32))
    elif kind == "1-d array":
        path = tmp_path / "d.npy"
        np.save(path, np.zeros(100, np.float32))
    elif kind == "strings":
        path = tmp_path / "d.npy"
        np.save(path, np.array(["a", "b"]))
    elif kind == "npz without x":
        path = tmp_path / "d.npz"
        np.savez(path, y=np.zeros((100, 2)))
    elif kind == "not an npy":
        path = tmp_path / "d.npy"
        path.write_bytes(b"\x93NUMPY garbage")
    elif kind == "empty folder":
        path.mkdir()
    elif kind == "corrupt image":
        path.mkdir()
        (path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif kind == "missing":
        path = tmp_path / "nothing.npy"
    return path


@pytest.mark.parametrize("kind", ["text file", "empty array", "nan array", "1-d array", "strings", "npz without x",
                                  "not an npy", "empty folder", "corrupt image", "missing"])
def test_bad_data_is_one_line_before_any_work(tmp_path, capsys, kind):
    path = _bad_data(tmp_path, kind)
    code = main(["train", "--data", str(path), "--out", str(tmp_path / "r"), "--quiet", "--steps", "2", "train.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("override, words", [
    ("model.preset_params.sigma_dat=0.7", ["'sigma_dat'", "allowed: sigma_min, sigma_max, sigma_data"]),
    ("model.preset_params.sigma_data=-1", ["edm", "sigma_data"]),
    ("model.preset_params.P_std=nan", ["P_std", "finite"]),
    ("model.preset_params.P_std=wide", ["P_std", "finite"]),
    ("model.preset.sigma_data=1", ["unknown option 'model.preset.sigma_data'"]),
    ("train.lr_schedule=linear", ["train.lr_schedule='linear'", "cosine, inv-sqrt"]),
])
def test_bad_preset_numbers_and_lr_schedule_are_refused_before_any_work(tmp_path, capsys, override, words):
    assert _train(tmp_path / "r", override) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()


def test_preset_params_round_trip_through_toml_and_the_command_line(tmp_path):
    cfg = load_config(None, ["model.preset_params.sigma_data=0.75", "model.preset_params.P_mean=-1"])
    assert cfg.model.preset_params == {"sigma_data": 0.75, "P_mean": -1}
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert "preset_params = {sigma_data = 0.75, P_mean = -1}" in path.read_text()
    assert load_config(path).to_dict() == cfg.to_dict()
