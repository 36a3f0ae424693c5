"""The adaptive Dormand-Prince sampler: its pair's orders against a closed-form flow, convergence to
an independent scipy solution of the probability-flow ODE on an exact mixture denoiser, the NFE it
reports against a counter, bad tolerances, and the plan / CLI around it."""

import math
import re

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffspace import samplers as S
from diffspace.analytic import ring8
from conftest import Counting

F64 = torch.float64


def gaussian():
    """N(mu, diag c): D = mu + c / (c + sigma^2) (x - mu); the flow x(s) = mu + sqrt((c + s^2) / (c + s0^2)) (x(s0) - mu)."""
    mu, c = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([0.25, 0.04], dtype=F64)
    denoiser = lambda x, sigma: mu + c / (c + sigma[:, None] ** 2) * (x - mu)  # noqa: E731
    flow = lambda x, s0, s: mu + torch.sqrt((c + s**2) / (c + s0**2)) * (x - mu)  # noqa: E731
    return denoiser, flow


def in_lambda(denoiser):
    """dx/dlambda = D(x, e^-lambda) - x, the field `adaptive` integrates."""
    return lambda lam, y: denoiser(y, torch.full((y.shape[0],), math.exp(-lam), dtype=y.dtype)) - y


def scipy_flow(denoiser, x, sigma_from, sigma_to):
    """The probability-flow ODE in u = log sigma, dx/du = x - D(x, e^u) (Karras et al. 2022, eq. 4 times
    sigma), by scipy's DOP853 at rtol = atol = 1e-10 as one system over the batch: an independent solution."""
    shape = x.shape

    def rhs(u, y):
        z = torch.from_numpy(y).view(shape)
        return (z - denoiser(z, torch.full((shape[0],), math.exp(u), dtype=F64))).numpy().ravel()

    span = (math.log(sigma_from), math.log(sigma_to))
    sol = solve_ivp(rhs, span, x.numpy().ravel(), method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.status == 0
    return torch.from_numpy(sol.y[:, -1].copy()).view(shape)


# -- the Dormand-Prince pair -----------------------------------------------------------------------------
def test_the_pair_has_local_orders_6_and_5_and_global_order_5():
    """One step of size h from a point of the exact Gaussian flow: the 5th-order solution's local error
    scales as h^6 and the error estimate (5th minus 4th order) as h^5; fixed steps over an interval
    converge at order 5."""
    denoiser, flow = gaussian()
    f = in_lambda(denoiser)
    x0 = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    lam0 = -math.log(3.0)
    hs = [0.4, 0.2, 0.1, 0.05]
    local, estimate = [], []
    for h in hs:
        y, error, k7 = S.dormand_prince_step(f, lam0, x0, h, f(lam0, x0))
        local.append(float((y - flow(x0, 3.0, math.exp(-lam0 - h))).abs().max()))
        estimate.append(float(error.abs().max()))
        torch.testing.assert_close(k7, f(lam0 + h, y), rtol=0, atol=0)  # FSAL: the last stage is f at the new point
    assert abs(np.polyfit(np.log(hs), np.log(local), 1)[0] - 6) < 0.3
    assert abs(np.polyfit(np.log(hs), np.log(estimate), 1)[0] - 5) < 0.3
    lam1, counts, errors = -math.log(0.05), [8, 16, 32, 64], []
    for n in counts:
        h, y = (lam1 - lam0) / n, x0
        k = f(lam0, y)
        for i in range(n):
            y, _, k = S.dormand_prince_step(f, lam0 + i * h, y, h, k)
        errors.append(float((y - flow(x0, 3.0, 0.05)).abs().max()))
    assert abs(-np.polyfit(np.log(counts), np.log(errors), 1)[0] - 5) < 0.4, errors


def test_dormand_prince_counts_its_evaluations_and_runs_either_way():
    """nfe = 2 (the first derivative and the starting-step probe) + 6 per attempted step, rejected
    ones included, counted; integrating back recovers the start."""
    denoiser, flow = gaussian()
    f = in_lambda(denoiser)
    calls = []
    counted = lambda lam, y: calls.append(lam) or f(lam, y)  # noqa: E731
    x0 = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    sol = S.dormand_prince(counted, x0, -math.log(80.0), -math.log(0.01), rtol=1e-6, atol=1e-6)
    assert len(calls) == sol.nfe == 2 + 6 * (sol.accepted + sol.rejected) and sol.rejected > 0
    assert torch.allclose(sol.y, flow(x0, 80.0, 0.01), rtol=0, atol=1e-5)
    torch.testing.assert_close(sol.dy, f(-math.log(0.01), sol.y))
    back = S.dormand_prince(f, sol.y, -math.log(0.01), -math.log(80.0), rtol=1e-8, atol=1e-8)
    assert torch.allclose(back.y, x0, rtol=1e-5, atol=1e-5)
    steps = []
    S.dormand_prince(f, x0, -math.log(80.0), -math.log(0.01), rtol=1e-3, atol=1e-3,
                     on_step=lambda i, t, y, dy, nfe: steps.append((i, t, nfe)))
    assert [i for i, _, _ in steps] == list(range(len(steps))) and steps[0][1] == -math.log(80.0)


# -- the sampler on an exact mixture denoiser ----------------------------------------------------------------
def test_adaptive_converges_to_the_scipy_solution_as_rtol_decreases():
    """ring8 with its exact denoiser, from sigma = 80 to 0.002 (a grid without the step to 0): the RMS
    error against scipy's solution falls with rtol, the median sample's error stays below 2 rtol (the
    RMS is dominated by the few samples near a boundary between modes, where the flow map is steep),
    and a tighter rtol costs more NFE. Measured, seeds 2 and 5: median 1.3e-3 at rtol 1e-3, 2.3e-7 at 1e-6."""
    mixture = ring8()
    x0 = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    reference = scipy_flow(mixture, x0, 80.0, 0.002)
    grid = torch.tensor([80.0, 0.002], dtype=F64)
    errors, nfes = [], []
    for rtol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        seen = []
        x = S.adaptive(mixture, x0, grid, rtol=rtol, callback=seen.append)
        per_sample = (x - reference).pow(2).mean(1).sqrt()
        errors.append(float(per_sample.pow(2).mean().sqrt()))
        nfes.append(seen[-1]["nfe"])
        assert float(per_sample.median()) < 2 * rtol, (rtol, float(per_sample.median()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a <= b for a, b in zip(nfes, nfes[1:])) and nfes[-1] > 2 * nfes[0], nfes


def test_only_the_grid_ends_matter_and_a_grid_ending_in_zero_denoises():
    mixture = ring8()
    x0 = 80 * torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    seen = []
    out = S.adaptive(mixture, x0, S.get_sigmas("edm", 2), callback=seen.append)
    torch.testing.assert_close(out, S.adaptive(mixture, x0, S.get_sigmas("edm", 40)), rtol=0, atol=0)
    at_min = S.adaptive(mixture, x0, S.get_sigmas("edm", 2)[:-1])
    assert seen[-1]["sigma"] == pytest.approx(0.002) and torch.equal(seen[-1]["x"], at_min)
    torch.testing.assert_close(out, mixture(at_min, torch.full((32,), 0.002, dtype=F64)))
    torch.testing.assert_close(seen[-1]["denoised"], out)
    assert [d["i"] for d in seen] == list(range(len(seen))) and seen[0]["sigma"] == pytest.approx(80.0)
    counter = Counting(mixture)  # one positive level: nothing to integrate, the denoising step alone
    torch.testing.assert_close(S.adaptive(counter, x0, S.get_sigmas("edm", 1)), mixture(x0, torch.full((32,), 80.0, dtype=F64)))
    assert counter.calls == 1


def test_the_nfe_it_reports_is_the_count_of_denoiser_calls():
    """The callback's last nfe equals a counting wrapper's calls (float32 state as a model gives it,
    too); sampler_nfe does not pretend to know it."""
    for dtype, rtol in ((F64, 1e-3), (F64, 1e-5), (torch.float32, 1e-4)):
        counter, seen = Counting(ring8()), []
        x = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(4)).to(dtype)
        out = S.adaptive(counter, x, S.get_sigmas("edm", 2), rtol=rtol, callback=seen.append)
        assert out.dtype == dtype and counter.calls == seen[-1]["nfe"] > 8
        assert [d["nfe"] for d in seen] == sorted(d["nfe"] for d in seen)
    assert S.sampler_nfe("adaptive", 10) is None
    assert list(S.SAMPLERS)[-1] == "adaptive"


@pytest.mark.parametrize("options", [dict(rtol=0.0), dict(rtol=-1e-3), dict(rtol=float("nan")), dict(rtol=math.inf),
                                     dict(atol=0.0), dict(atol=float("nan")), dict(rtol="1e-3")])
def test_bad_tolerances_fail_before_any_evaluation(options):
    counter = Counting(ring8())
    with pytest.raises(ValueError, match="rtol|atol"):
        S.adaptive(counter, torch.zeros(2, 2, dtype=F64), S.get_sigmas("edm", 2), **options)
    with pytest.raises(ValueError, match="rtol|atol"):
        S.sampler_nfe("adaptive", 1, **options)
    with pytest.raises(ValueError, match="rtol|atol"):
        S.dormand_prince(lambda t, y: y, torch.ones(2), 0.0, 1.0, rtol=options.get("rtol", 1e-3),
                         atol=options.get("atol", 1e-3))
    assert counter.calls == 0


def test_a_diverging_field_raises_instead_of_shrinking_forever():
    with pytest.raises(FloatingPointError, match="non-finite"):
        S.dormand_prince(lambda t, y: y / (1.0 - t), torch.ones(3, dtype=F64), 0.0, 2.0, rtol=1e-3, atol=1e-3)


# -- the plan, sampling.sample and the CLI -----------------------------------------------------------------
def test_plan_and_sample_report_the_nfe_spent():
    from diffspace.config import SampleConfig
    from diffspace.model import Diffusion
    from diffspace.nn import MLP
    from diffspace.presets import PRESETS, get_preset
    from diffspace.sampling import plan, sample

    for name, preset in PRESETS.items():  # the ends of the preset's own grid (the ddpm chain's full range)
        p = plan(preset, SampleConfig(sampler="adaptive"))
        steps = preset.params["T"] if preset.time_steps == "ddpm" else 50
        full = S.get_sigmas(preset.time_steps, steps, **preset.time_step_kwargs).tolist()
        ends = [full[0], full[-2], 0.0] if math.isfinite(full[0]) else [math.inf, full[1], full[-2], 0.0]  # inf: one step first
        assert p.nfe is None and p.sigmas.tolist() == ends, name
    with pytest.raises(ValueError, match="sample.nfe=10"):
        plan(get_preset("edm"), SampleConfig(sampler="adaptive", nfe=10))
    with pytest.raises(ValueError, match="rtol=-1"):
        plan(get_preset("edm"), SampleConfig(sampler="adaptive", options={"rtol": -1.0}))
    torch.manual_seed(0)
    model = Diffusion(MLP(2, hidden=16, depth=1), get_preset("edm"), shape=(2,)).eval()
    calls = []
    model.network.register_forward_hook(lambda *args: calls.append(1))
    seen = []
    s = sample(model, 8, SampleConfig(sampler="adaptive", options={"rtol": 1e-4}), callback=seen.append)
    assert s.evaluations == len(calls) == seen[-1]["nfe"] and s.plan.nfe is None
    assert f"NFE {len(calls)}" in s.describe()
    heun = sample(model, 8, SampleConfig(sampler="heun", nfe=9))
    assert heun.evaluations == heun.plan.nfe == 9


def test_cli_samples_with_adaptive_and_prints_the_nfe(tmp_path, capsys):
    from diffspace.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "ring8", "--preset", "edm", "--steps", "1", "--out", str(run), "--quiet",
                 "model.hidden=16", "model.depth=1", "data.n=200", "log.n_samples=4"]) == 0
    spent = {}
    for rtol in ("1e-2", "1e-5"):
        capsys.readouterr()
        assert main(["sample", str(run), "--n", "8", "--sampler", "adaptive", "--set", f"sample.rtol={rtol}"]) == 0
        out = capsys.readouterr().out
        spent[rtol] = int(re.search(r"sampler adaptive, NFE (\d+) spent on its own steps", out).group(1))
    assert 8 <= spent["1e-2"] < spent["1e-5"]
    assert main(["sample", str(run), "--sampler", "adaptive", "--set", "sample.rtol=0"]) == 2
    assert main(["sample", str(run), "--sampler", "adaptive", "--nfe", "20"]) == 2


def test_a_run_trained_with_the_adaptive_sampler_reports_it(tmp_path):
    from diffspace.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "ring8", "--preset", "edm", "--steps", "1", "--out", str(run), "--quiet",
                 "model.hidden=16", "model.depth=1", "data.n=200", "log.n_samples=4", "sample.sampler=adaptive"]) == 0
    report = (run / "report.md").read_text()
    assert "`adaptive` sampler, its own number of network evaluations" in report and "None" not in report
