"""Minibatch OT coupling and offset noise (coupling.py), the loss with given noise, and their bad input.

Expected values come from independent computations: brute force over all n! pairings, hand-written
flow-matching targets, and Monte Carlo moments with their stated standard errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import perturb_
from diffspace.analytic import ring8
from diffspace.cli import main
from diffspace.config import ModelConfig, SampleConfig, load_config
from diffspace.coupling import draw_noise, offset_noise_shape, ot_permutation
from diffspace.evaluate import sliced_wasserstein
from diffspace.model import Diffusion
from diffspace.reflow import reflow
from diffspace.sampling import sample
from diffspace.train import train


def _brute_force(x: np.ndarray, eps: np.ndarray):
    """(min cost, argmin) of sum_i ||x_i - eps_p(i)||^2 over all permutations p, in float64."""
    costs = {p: sum(((x[i] - eps[j]) ** 2).sum() for i, j in enumerate(p)) for p in itertools.permutations(range(len(x)))}
    best = min(costs, key=costs.get)
    return costs[best], best


@pytest.mark.parametrize("shape", [(2,), (1, 2, 2)])
def test_ot_assignment_is_the_brute_force_optimum(shape):
    g = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        for _ in range(5):
            x, eps = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)
            pi = ot_permutation(x, eps)
            assert sorted(pi.tolist()) == list(range(n))  # a permutation
            best, argmin = _brute_force(x.reshape(n, -1).double().numpy(), eps.reshape(n, -1).double().numpy())
            cost = float(((x.double() - eps.double()[pi]) ** 2).sum())
            assert cost == pytest.approx(best, rel=1e-12, abs=1e-12)
            assert tuple(pi.tolist()) == argmin  # continuous draws: the optimum is unique


def test_ot_pairs_are_closer_than_independent_ones():
    """On ring8 batches of 256 the exact assignment cuts E||x - eps||^2 = E||x||^2 + d = 3.005
    to under a quarter (measured 0.49, 0.16x); the independent pairing of the same batches stays at it (3.003)."""
    x = ring8().sample(256 * 20, torch.Generator().manual_seed(1)).float()
    g = torch.Generator().manual_seed(2)
    ind, ot = [], []
    for batch in x.split(256):
        eps = draw_noise(batch, g)
        ind.append(float(((batch - eps) ** 2).sum(1).mean()))
        ot.append(float(((batch - eps[ot_permutation(batch, eps)]) ** 2).sum(1).mean()))
    expected = 1 + 0.05 ** 2 * 2 + 2  # E||x||^2 (radius 1, std 0.05 per coordinate) + E||eps||^2
    assert np.mean(ind) == pytest.approx(expected, abs=0.2)  # sd of ||x - eps||^2 ~ sqrt(8): se 0.04 over 5,120 pairs
    assert np.mean(ot) < 0.25 * np.mean(ind)


def test_ot_coupling_permutes_iid_noise_and_keeps_its_marginal():
    """draw_noise(..., 'ot') is the independent draw of the same generator, permuted; pooled over 80
    batches (20,480 vectors) its mean is 0 and covariance I within 5 standard errors (mean: 1/sqrt(N)
    = 0.007, variance: sqrt(2/N) = 0.010, covariance 0.007), fourth moment 3 (se sqrt(96/N) = 0.068)."""
    x = ring8().sample(256, torch.Generator().manual_seed(3)).float()
    for seed in range(3):
        ind = draw_noise(x, torch.Generator().manual_seed(seed), "independent")
        assert torch.equal(draw_noise(x, torch.Generator().manual_seed(seed), "ot"), ind[ot_permutation(x, ind)])
    eps = torch.cat([draw_noise(x, torch.Generator().manual_seed(seed), "ot") for seed in range(80)]).double()
    N = len(eps)
    assert eps.mean(0).abs().max() < 5 / math.sqrt(N)
    cov = eps.T @ eps / N
    assert (cov.diagonal() - 1).abs().max() < 5 * math.sqrt(2 / N)
    assert abs(float(cov[0, 1])) < 5 / math.sqrt(N)
    assert (eps ** 4).mean(0).sub(3).abs().max() < 5 * math.sqrt(96 / N)


def _flow_model(**options) -> Diffusion:
    cfg = ModelConfig(preset="rectified-flow", parameterization="flow", hidden=16, depth=1, **options)
    model = Diffusion.from_config(cfg, (2,))
    perturb_(model.network)
    return model


def test_the_loss_with_given_eps_uses_exactly_those_eps():
    """loss(x, t, eps) = ||F(z_t, t) - (eps - x)||^2 / d with z_t = (1 - t) x + t eps (flow matching,
    constant weight), whatever the generator; without eps the OT coupling pairs its draw as the brute
    force does, the labels (here: x's order) staying with x."""
    model = _flow_model()
    g = torch.Generator().manual_seed(4)
    x, eps, t = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g), torch.rand(6, generator=g)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    with torch.no_grad():
        expected = ((model.denoiser.predict(z, t, None) - (eps - x)) ** 2).mean(1)
        for seed in (0, 1):
            assert torch.allclose(model.loss(x, None, torch.Generator().manual_seed(seed), t=t, eps=eps), expected, atol=1e-6)
        ot = _flow_model(coupling="ot")
        ot.load_state_dict(model.state_dict())
        drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        paired = drawn[list(_brute_force(x.double().numpy(), drawn.double().numpy())[1])]
        assert torch.allclose(ot.loss(x, None, torch.Generator().manual_seed(7), t=t),
                              model.loss(x, None, torch.Generator(), t=t, eps=paired), atol=1e-6)


@pytest.mark.parametrize("shape, s", [((2, 2, 2), 0.5), ((3,), 1.0)])
def test_offset_noise_has_the_offset_covariance(shape, s):
    """Cov(eps) = I + s^2 [same channel]: images (C, H, W) = (2, 2, 2) share the offset within a
    channel, points (3,) across their coordinates. 40,000 draws: an entry of the sample covariance
    has se <= sqrt(2 (1 + s^2)^2 / N) = 0.014, the mean sqrt((1 + s^2) / N) <= 0.007; tolerances
    0.06 and 0.05."""
    x = torch.zeros((40_000, *shape))
    eps = draw_noise(x, torch.Generator().manual_seed(5), offset_noise=s).reshape(len(x), -1).double()
    assert offset_noise_shape(tuple(x.shape)) == ((40_000, 2, 1, 1) if len(shape) == 3 else (40_000, 1))
    channel = torch.arange(eps.shape[1]) // (eps.shape[1] // shape[0]) if len(shape) == 3 else torch.zeros(eps.shape[1])
    expected = torch.eye(eps.shape[1], dtype=torch.float64) + s ** 2 * (channel[:, None] == channel[None]).double()
    assert eps.mean(0).abs().max() < 0.05
    assert (eps.T @ eps / len(eps) - expected).abs().max() < 0.06


def test_training_with_offset_noise_and_ot_coupling_through_the_cli(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--steps", "6", "--out", str(out), "--quiet", "data.n=128",
                 "model.base_channels=8", "model.channel_mult=[1]", "model.num_blocks=1", "train.batch_size=16",
                 "model.offset_noise=0.1", "model.coupling=ot", "log.every=1", "log.n_samples=4", "sample.nfe=2"]) == 0
    losses = [float(row.split(",")[1]) for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert 'offset_noise = 0.1' in (out / "config.toml").read_text() and 'coupling = "ot"' in (out / "config.toml").read_text()


@pytest.mark.parametrize("override, words", [
    ("model.coupling=sinkhorn", ["coupling='sinkhorn'", "independent, ot"]),
    ("model.offset_noise=-0.1", ["offset_noise=-0.1", "allowed: [0, inf)"]),
    ("model.offset_noise=nan", ["offset_noise=nan", "finite"]),
])
def test_bad_coupling_and_offset_noise_exit_2_with_one_line(tmp_path, capsys, override, words):
    code = main(["train", "--data", "ring8", "--steps", "1", "--out", str(tmp_path / "r"), "--quiet", "data.n=300", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_ot_coupling_and_reflow_beat_independent_coupling_at_few_steps(tmp_path):
    """ring8, rectified flow, MLP 128 x 3, batch 256, 600 steps; sliced W2 of 2,000 flow_euler samples
    to fresh ring8 draws (noise floor 0.059). Measured: independent 1-RF 0.654 at NFE 1 and 2, OT 0.067
    at NFE 2, 2-RF (reflow of the 1-RF, 5,000 pairs at NFE 100, 600 steps) 0.091 at NFE 1; required:
    OT and 2-RF each below half the 1-RF's value (benchmarks/flow_coupling.py has the full table).
    About 90 s with one thread on a loaded 2-core machine."""
    base = ["data.spec=ring8", "model.preset=rectified-flow", "model.parameterization=flow", "model.hidden=128",
            "model.depth=3", "train.steps=600", "train.batch_size=256", "log.checkpoint_every=600", "log.every=100",
            "log.n_samples=16", "sample.nfe=4"]
    real = ring8().sample(2000, torch.Generator().manual_seed(9)).float()

    def sw2(model, nfe):
        return sliced_wasserstein(sample(model, 2000, SampleConfig(sampler="flow_euler", nfe=nfe, seed=3)).x, real)

    independent = train(load_config(None, base), tmp_path / "1rf", progress=False)["ema"]
    ot = train(load_config(None, [*base, "model.coupling=ot"]), tmp_path / "ot", progress=False)["ema"]
    two = reflow(tmp_path / "1rf", tmp_path / "2rf", pairs=5000, nfe=100, progress=False)["ema"]
    assert sw2(ot, 2) < 0.5 * sw2(independent, 2)
    assert sw2(two, 1) < 0.5 * sw2(independent, 1)
