"""Reflow (reflow.py, `diffspace reflow`): the pairs are the trained ODE's own, the new run starts from
the 1-RF weights, trains on the fixed pairs and resumes exactly; the straightness S against its
closed form; bad input exits 2 with one line."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffspace import checkpoint as ckpt
from diffspace.cli import main
from diffspace.config import SampleConfig, load_config
from diffspace.model import checkpoint_path, load_model
from diffspace.reflow import make_pairs, straightness
from diffspace.samplers import flow_euler, get_sigmas
from diffspace.sampling import plan
from diffspace.train import init_weights, train

TINY = ["--quiet", "model.hidden=32", "model.depth=2", "data.n=1000", "train.batch_size=64", "log.checkpoint_every=50",
        "log.n_samples=16", "sample.nfe=4"]


@pytest.fixture(scope="module")
def one_rf(tmp_path_factory):
    """A 1-RF model: ring8, rectified flow with the flow parameterization, 100 steps."""
    out = tmp_path_factory.mktemp("reflow") / "1rf"
    assert main(["train", "--data", "ring8", "--preset", "rectified-flow", "model.parameterization=flow",
                 "--steps", "100", "--out", str(out), *TINY]) == 0
    return out


def _tensors(run):
    return ckpt.load(ckpt.latest(run / "checkpoints"))[0]


def test_reflow_end_to_end_pairs_init_and_exact_resume(one_rf, tmp_path, capsys):
    out = tmp_path / "2rf"
    assert main(["reflow", str(one_rf), "--out", str(out), "--pairs", "100", "--steps", "50", "--nfe", "20",
                 "--quiet", "train.batch_size=32", "log.checkpoint_every=25"]) == 0
    assert "100 (noise, sample) pairs by euler at NFE 20" in capsys.readouterr().out
    with np.load(out / "pairs.npz") as z:
        x, eps = torch.from_numpy(z["x"]), torch.from_numpy(z["eps"])
    assert x.shape == eps.shape == (100, 2) and torch.isfinite(x).all()
    cfg = load_config(out / "config.toml")
    assert cfg.data.spec == str((out / "pairs.npz").resolve()) and cfg.train.steps == 50
    assert cfg.train.init == str(checkpoint_path(one_rf).resolve())
    # the pair is (eps, ODE(eps)): the run's euler (in sigma) from sigma_max eps equals flow_euler (in t)
    model = load_model(one_rf)[0]
    sigmas = plan(model.preset, SampleConfig(nfe=20)).sigmas
    assert sigmas[0] == pytest.approx(0.999 / 0.001)
    with torch.no_grad():
        assert torch.allclose(flow_euler(model, sigmas[0].item() * eps, sigmas), x, atol=1e-5)
    # the run's config alone (pairs file + init) reproduces it, and stopping + resuming is bit-identical
    train(load_config(out / "config.toml"), tmp_path / "again", stop_at=25, progress=False)
    train(None, tmp_path / "again", resume=True, progress=False)
    a, b = _tensors(out), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", "--resume", str(out), "--steps", "60", "--quiet"]) == 0
    assert ckpt.load(ckpt.latest(out / "checkpoints"))[1]["step"] == 60


def test_the_new_run_starts_from_the_1rf_weights(one_rf, tmp_path):
    model, cfg, _ = load_model(one_rf)
    fresh = type(model).from_config(cfg.model, (2,))
    init_weights(fresh, str(one_rf))
    source = _tensors(one_rf)
    assert all(torch.equal(v, source[f"ema.{k}"]) for k, v in fresh.state_dict().items())
    cfg.model.hidden, cfg.train.init, cfg.train.steps = 16, str(one_rf), 1
    with pytest.raises(ValueError, match="does not fit this run's model"):
        train(cfg, tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong" / "checkpoints").exists()


def test_pairs_are_seeded_and_independent_of_the_batching(one_rf):
    model = load_model(one_rf)[0]
    p = plan(model.preset, SampleConfig(nfe=8))
    eps, x = make_pairs(model, p, 50, seed=3)
    eps2, x2 = make_pairs(model, p, 50, seed=3, batch=7)
    assert torch.equal(eps, eps2) and torch.allclose(x, x2, atol=1e-6)
    assert not torch.equal(make_pairs(model, p, 50, seed=4)[0], eps)


def test_reflow_of_a_non_flow_run(tmp_path):
    """Any deterministic sampler makes pairs: an EDM run with its Heun solver."""
    edm = tmp_path / "edm"
    assert main(["train", "--data", "ring8", "--preset", "edm", "--steps", "10", "--out", str(edm), *TINY]) == 0
    assert main(["reflow", str(edm), "--out", str(tmp_path / "edm2"), "--pairs", "40", "--steps", "5", "--nfe", "5",
                 "--quiet", "train.batch_size=16"]) == 0
    with np.load(tmp_path / "edm2" / "pairs.npz") as z:
        x, eps = torch.from_numpy(z["x"]), torch.from_numpy(z["eps"])
    model = load_model(edm)[0]
    p = plan(model.preset, SampleConfig(nfe=5))
    assert p.sampler == "heun"
    with torch.no_grad():
        assert torch.allclose(x, make_pairs(model, p, 40, seed=0)[1]) and torch.isfinite(eps).all()


@pytest.mark.parametrize("args, words", [
    (["--pairs", "0"], ["--pairs=0", ">= 1"]),
    (["--pairs", "10"], ["leaves 9 training pairs", "train.batch_size=64"]),
    (["--sampler", "euler_maruyama"], ["'euler_maruyama'", "stochastic", "deterministic"]),
    (["--sampler", "nope"], ["'nope'", "allowed"]),
    (["model.coupling=ot", "train.stepz=3"], ["unknown option 'train.stepz'"]),
    (["model.hidden=16"], ["does not fit this run's model"]),
    (["model.offset_noise=-1"], ["offset_noise=-1.0", "allowed: [0, inf)"]),
])
def test_bad_reflow_input_exits_2_with_one_line(one_rf, tmp_path, capsys, args, words):
    out = tmp_path / "bad"
    code = main(["reflow", str(one_rf), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    assert not (out / "pairs.npz").exists()


def test_reflow_refuses_missing_runs_and_used_folders(one_rf, tmp_path, capsys):
    assert main(["reflow", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert main(["reflow", str(one_rf), "--out", str(one_rf)]) == 2  # holds checkpoints
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "neither a run folder" in err[0] and "train --resume" in err[1], err


# -- straightness ---------------------------------------------------------------------------------------
def test_straightness_is_zero_for_straight_paths():
    """Data at one point c: D = c for every x~, the flow's paths are the lines from c to the noise."""
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    x = 999.0 * torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    S = straightness(lambda z, s: c.expand_as(z), x, get_sigmas("flow", 10, t_min=1e-3, t_max=0.999))
    assert S.abs().max() < 1e-12


def test_straightness_of_a_gaussian_against_its_closed_form():
    """Data N(0, s^2 I): D = s^2 / (s^2 + sigma^2) x~, and the ODE from z(t0) = t0 eps is
    z(t) = z(t0) r(t), r = sqrt(v(t) / v(t0)), v = (1 - t)^2 s^2 + t^2, so per sample
    S = ||z(t0)||^2 [int_0^t0 r'^2 dt / t0 - ((1 - r(0)) / t0)^2] (scipy quad); Euler on 2,000 steps
    within 1 %."""
    s, t0 = 0.5, 0.999
    v = lambda t: (1 - t) ** 2 * s ** 2 + t ** 2  # noqa: E731
    dr = lambda t: (-2 * (1 - t) * s ** 2 + 2 * t) / (2 * math.sqrt(v(t) * v(t0)))  # noqa: E731
    factor = quad(lambda t: dr(t) ** 2, 0, t0, limit=200)[0] / t0 - ((1 - math.sqrt(v(0) / v(t0))) / t0) ** 2
    eps = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = get_sigmas("flow", 2000, t_min=1e-4, t_max=t0)
    S = straightness(lambda z, sigma: s ** 2 / (s ** 2 + sigma[:, None] ** 2) * z, sigmas[0].item() * eps, sigmas)
    expected = (t0 * eps).pow(2).sum(1) * factor
    assert factor > 0.1 and torch.allclose(S, expected, rtol=1e-2)
