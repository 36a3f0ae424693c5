"""Post-hoc EMA (Karras et al. 2024): the profiles' inner products against quadrature, the
reconstruction of an EMA length that was also tracked directly, and `diffspace phema` end to end."""

import math

import pytest
import torch
from scipy.integrate import quad

from diffspace import checkpoint as ckpt
from diffspace.cli import main
from diffspace.phema import coefficients, combine, profile_dot
from diffspace.train import power_ema_decay, power_ema_gamma


@pytest.mark.parametrize("ga, ta, gb, tb", [(6.94, 1.0, 6.94, 1.0), (16.97, 0.7, 3.0, 1.0), (2.0, 3.0, 0.5, 1.5), (0.0, 1.0, 0.0, 2.0)])
def test_profile_dot_is_the_integral_of_the_profiles_product(ga, ta, gb, tb):
    p = lambda g, t, tau: (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0  # noqa: E731
    exact, _ = quad(lambda tau: p(ga, ta, tau) * p(gb, tb, tau), 0, min(ta, tb), epsabs=1e-13, epsrel=1e-11)
    assert profile_dot(ga, ta, gb, tb) == pytest.approx(exact, rel=1e-8)
    assert profile_dot(ga, ta, gb, tb) == pytest.approx(profile_dot(gb, tb, ga, ta), rel=1e-14)


def test_a_profile_among_the_snapshots_is_its_own_reconstruction():
    snaps = [(power_ema_gamma(s), t) for t in (100.0, 200.0, 300.0) for s in (0.05, 0.10)]
    x, error = coefficients(snaps, snaps[3])
    assert error < 1e-6 and abs(float(x[3]) - 1) < 1e-4 and float(x.abs().sum()) < 1 + 1e-3


def _tracked(steps, sigma_rels, every, dim=64, seed=0):
    """A random-walk weight sequence, its power EMAs (the training loop's update rule) at every
    sigma_rel, and snapshots of the first two every `every` steps."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.zeros(dim, dtype=torch.float64)
    ema = {s: theta.clone() for s in sigma_rels}
    snapshots, weights = [], []
    for t in range(1, steps + 1):
        theta = theta + torch.randn(dim, generator=g, dtype=torch.float64) + 0.01  # a drift, as training has
        for s in sigma_rels:
            ema[s].lerp_(theta, 1 - power_ema_decay(s, t))
        if t % every == 0:
            for s in sigma_rels[:2]:
                snapshots.append((power_ema_gamma(s), float(t)))
                weights.append({"w": ema[s].clone()})
    return theta, ema, snapshots, weights


@pytest.mark.parametrize("target", [0.07, 0.15])
def test_a_directly_tracked_ema_length_is_reconstructed_from_two_others(target):
    """sigma_rel 0.05 and 0.10 snapshotted every 100 of 4000 steps give the 0.07 and 0.15 EMAs to
    within 0.1% of their distance from the raw weights (measured 3.4e-5 and 4.6e-5)."""
    theta, ema, snapshots, weights = _tracked(4000, [0.05, 0.10, target], 100)
    x, profile_error = coefficients(snapshots, (power_ema_gamma(target), 4000.0))
    got = combine(weights, x)["w"]
    error = float((got - ema[target]).norm() / (ema[target] - theta).norm())
    assert error < 1e-3, (error, profile_error)
    assert profile_error < 0.02


def test_phema_end_to_end_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "ring8", "--steps", "400", "--quiet", "model.hidden=32", "model.depth=2", "data.n=2000",
                 "train.batch_size=64", "train.ema_sigma_rel=0.07", "train.phema=[0.05,0.1]", "log.phema_every=20",
                 "log.checkpoint_every=200", "--out", str(run)]) == 0
    assert len(ckpt.list_checkpoints(run / "phema")) == 20  # every snapshot kept (log.keep is for checkpoints)
    capsys.readouterr()
    assert main(["phema", str(run), "--sigma-rel", "0.07,0.05"]) == 0
    assert "sigma_rel 0.07 at step 400: 40 snapshot EMAs" in capsys.readouterr().out
    direct, _ = ckpt.load(ckpt.latest(run / "checkpoints"))
    for sigma_rel, key in (("0.07", "ema"), ("0.05", "phema0")):
        rebuilt, state = ckpt.load(ckpt.latest(run / f"phema-{sigma_rel}"))
        assert state["phema"]["step"] == 400
        names = [k[4:] for k in rebuilt if rebuilt[k].is_floating_point()]
        err = sum(float((rebuilt[f"ema.{n}"].double() - direct[f"{key}.{n}"].double()).pow(2).sum()) for n in names)
        spread = sum(float((direct[f"{key}.{n}"].double() - direct[f"model.{n}"].double()).pow(2).sum()) for n in names)
        assert math.sqrt(err / spread) < 5e-3, (sigma_rel, math.sqrt(err / spread))  # measured 3e-4 (0.07), 0 (0.05)
    assert main(["sample", str(run / "phema-0.07"), "-n", "8", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["phema", str(run), "--sigma-rel", "0.07", "--step", "200"]) == 0  # an earlier moment of training
    assert ckpt.load(ckpt.latest(run / "phema-0.07"))[1]["phema"]["step"] == 200


@pytest.mark.parametrize("argv, words", [
    (["--sigma-rel", "0.6"], "numbers in (0, 0.5)"), (["--sigma-rel", "x"], "numbers in (0, 0.5)"),
])
def test_phema_bad_input_is_one_line(tmp_path, capsys, argv, words):
    assert main(["phema", str(tmp_path), *argv]) == 2
    assert words in capsys.readouterr().err


def test_phema_needs_snapshots_and_an_interval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "ring8", "--steps", "3", "--quiet", "model.hidden=8", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["phema", str(run), "--sigma-rel", "0.1"]) == 2
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    assert main(["train", "--data", "ring8", "--steps", "3", "--quiet", "train.phema=[0.05]", "--out", str(tmp_path / "r2")]) == 2
    assert "needs log.phema_every >= 1" in capsys.readouterr().err
