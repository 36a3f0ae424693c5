"""The command line through its real entry point (python -m diffspace)."""


import numpy as np
import pytest
from PIL import Image

from conftest import run as cli, run_process


def test_info_prints_every_preset():
    r = run_process("info")
    assert r.returncode == 0, r.stderr
    for name in ["ddpm", "vp", "ve", "iddpm", "edm", "rectified-flow", "c_skip", "c_noise", "x0, eps, score"]:
        assert name in r.stdout


def _assert_non_blank_png(path, min_size=(100, 100)):
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1], (path, img.shape)
    assert img.std() > 10, f"{path} looks blank"


@pytest.mark.slow  # CI runs the whole demo right after the suite (README command 1, .ci/run)
def test_demo_smoke_writes_every_figure_and_the_report(tmp_path):
    """The main job at 2% of its training steps (the full run is timed in the README/closing note)."""
    out = tmp_path / "run"
    r = run_process("demo", "--out", str(out), "--scale", "0.02", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "confident" in r.stdout and "sliced W2" in r.stdout
    report = (out / "report.md").read_text()
    for name in ("digits_samples.png", "digits_forward.png", "digits_reverse.png", "digits_loss.png",
                 "ring8_samples.png", "ring8_trajectories.png", "ring8_loss.png", "forward_process.png"):
        assert f"({name})" in report
        _assert_non_blank_png(out / name)
    assert (out / "digits" / "checkpoints").is_dir() and (out / "digits" / "metrics.csv").is_file()
    r2 = run_process("demo", "--out", str(out), "--scale", "0.02", "--quiet")  # idempotent: runs again in place
    assert r2.returncode == 0, r2.stderr


def test_train_sample_resume_through_the_entry_point(tmp_path):
    out = tmp_path / "run"
    r = run_process("train", "--data", "moons", "--steps", "20", "--out", str(out), "--quiet", "model.hidden=32",
            "model.depth=2", "data.n=500", "log.checkpoint_every=10", "sample.nfe=4")
    assert r.returncode == 0, r.stderr
    assert "step 20" in r.stdout
    for name in ("config.toml", "metrics.csv", "report.md", "loss.png", "samples/final.png"):
        assert (out / name).is_file(), name
    r = run_process("sample", str(out), "--n", "50", "--nfe", "6", "--sampler", "dpmpp_2m", "--seed", "3")
    assert r.returncode == 0, r.stderr
    x = np.load(out / "samples" / "sample.npz")["x"]
    assert x.shape == (50, 2) and np.isfinite(x).all()
    _assert_non_blank_png(out / "samples" / "sample.png")
    r = run_process("train", "--resume", str(out), "--steps", "30", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "step 30" in r.stdout
    config = tmp_path / "c.toml"
    config.write_text((out / "config.toml").read_text())
    r = run_process("train", str(config), "train.steps=5", "--out", str(tmp_path / "run2"), "--quiet")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, words", [
    (["nonsense"], ["invalid choice"]),
    (["demo", "--bogus"], ["unrecognized"]),
    (["train", "train.stepz=3"], ["unknown option 'train.stepz'", "allowed"]),
    (["train", "--preset", "nope", "--steps", "1"], ["unknown preset", "edm"]),
    (["train", "--data", "no/such/folder", "--steps", "1"], ["no/such/folder"]),
    (["train", "--steps", "x"], ["invalid int value"]),
    (["train", "--resume", "no/such/run"], ["no complete checkpoint"]),
    (["sample", "no/such/run"], ["no/such/run"]),
    (["sample", "no/such/run", "--n", "0"], ["--n=0"]),
])
def test_bad_arguments_name_what_is_allowed(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)  # in this process: the entry point itself is checked below
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_arguments_exit_2_with_one_line():
    """Through the real entry point (the cases above run in process)."""
    r = run_process("demo", "--bogus")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert run_process("info", "--help").returncode == 0


def test_eval_through_the_entry_point_writes_the_table_and_figures(tmp_path):
    out = tmp_path / "run"
    r = run_process("train", "--data", "ring8", "--steps", "20", "--out", str(out), "--quiet", "model.hidden=32",
            "model.depth=2", "data.n=600", "sample.nfe=4")
    assert r.returncode == 0, r.stderr
    r = run_process("eval", str(out), "--n", "300", "--nfe", "6", "--nll-samples", "8", "--vlb-steps", "0,20", "--pf-ode-steps", "4")
    assert r.returncode == 0, r.stderr
    text = (out / "eval.md").read_text()
    for words in ("sliced W2", "KL(model || data)", "VLB, 1000 steps", "VLB, 20 steps", "probability-flow ODE"):
        assert words in text, words
    for name in ("eval_samples.png", "eval_loss_per_level.png", "eval_reverse.png"):
        assert f"({name})" in text
        _assert_non_blank_png(out / name)
    assert run_process("eval", str(out), "--n", "1").returncode == 2
