"""Helpers shared by the tests."""

import contextlib
import io
import subprocess
import sys

import torch

from diffspace.sampling import Counted as Counting  # noqa: F401  (a denoiser that counts its calls)


def perturb_(net, std=0.1, seed=0):
    """Move every parameter of a net away from its (partly zero) init, so every input and the noise
    conditioning matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def non_blank_png(path) -> bool:
    """A figure that was drawn: at least 100 x 100 pixels with some contrast."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    return img.shape[0] >= 100 and img.shape[1] >= 100 and img.std() > 8


def run(*args) -> subprocess.CompletedProcess:
    """`diffspace ARGS` as a user types it, run in this process: `diffspace.cli.main`, the code behind
    `python -m diffspace`, without the two seconds a new interpreter and `import torch` cost. Returns
    what subprocess.run would (returncode, stdout, stderr); an exception the command line does not turn
    into an exit code fails the test with its traceback. Warnings go to pytest's summary, not stderr.
    The entry point itself, signals and torchrun need a new process: `run_process`."""
    from diffspace.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors (exit 2) and --help (exit 0)
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_process(*args, timeout=600) -> subprocess.CompletedProcess:
    """`python -m diffspace ARGS` in a new process, exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "diffspace", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def ok(r):
    """r, after checking it exited 0 (else its stderr is the failure)."""
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_line_error(r, *words):
    """r exited 2 with one line on stderr, no traceback, holding every word."""
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
