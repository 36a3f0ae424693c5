"""The command line through its real entry point (python -m diffspace)."""

import subprocess
import sys

import numpy as np
from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "diffspace", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_info_prints_every_preset():
    r = run("info")
    assert r.returncode == 0, r.stderr
    for name in ["ddpm", "vp", "ve", "iddpm", "edm", "rectified-flow", "c_skip", "c_noise", "x0, eps, score"]:
        assert name in r.stdout


def test_demo_writes_a_non_blank_forward_process_figure(tmp_path):
    r = run("demo", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    png = tmp_path / "run" / "forward_process.png"
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img.std() > 10 and (img < 128).mean() > 0.01  # ink on the canvas, not a blank page


def test_bad_arguments_exit_2_with_one_line():
    for args in (["nonsense"], ["demo", "--bogus"]):
        r = run(*args)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert run("--help").returncode == 0 and run("info", "--help").returncode == 0
