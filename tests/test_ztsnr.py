"""Zero terminal SNR (Lin et al. 2024, 'Common diffusion noise schedules and sample steps are flawed'):
the rescaled chain, the preset, every sampler from sigma = inf, denoisers, weightings and conversions
at SNR 0. Expected values come from float64 numpy re-implementations of the papers' formulas, from
limits taken numerically at a large finite sigma, or from the exact Gaussian-mixture denoiser."""

import math

import numpy as np
import pytest
import torch

from diffspace import losses as L
from diffspace import parameterization as P
from diffspace import samplers, schedules as S
from diffspace.analytic import ring8
from diffspace.config import SampleConfig
from diffspace.evaluate import model_vlb, noise_floor, sliced_wasserstein
from diffspace.model import Diffusion
from diffspace.nn import MLP
from diffspace.precond import (ConditionedInput, Denoiser, EDMPrecond, FlowPrecond, ParameterizedDenoiser, VEPrecond,
                               VPPrecond, VPredPrecond)
from diffspace.presets import get_preset, presets_table
from diffspace.sampling import plan, sample

from conftest import perturb_, run

F64 = torch.float64
T = 1000
INF = math.inf


def lin_algorithm_1(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Algorithm 1 ('enforce_zero_terminal_snr'), as printed, in float64 numpy."""
    alphas = 1 - betas
    alphas_bar = np.cumprod(alphas)
    alphas_bar_sqrt = np.sqrt(alphas_bar)
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


LINEAR = np.linspace(1e-4, 0.02, T)  # Ho et al. 2020
SD_SCALED_LINEAR = np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2  # Stable Diffusion's, Lin et al. sec. 3.1
ZT_BETAS = lin_algorithm_1(LINEAR)
ZT_ABAR = np.concatenate([[1.0], np.cumprod(1 - ZT_BETAS)])  # i = 0..T
CHAIN = get_preset("ztsnr").training_schedule
DALPHA_1 = -T * math.sqrt(ZT_ABAR[T - 1])  # alpha'(t) on the last interval, where alpha is linear


# -- 1. the rescaled chain ---------------------------------------------------------------------------
@pytest.mark.parametrize("betas", [LINEAR, SD_SCALED_LINEAR], ids=["ddpm-linear", "sd-scaled-linear"])
def test_rescaling_is_lin_et_al_algorithm_1(betas):
    chain = S.rescale_zero_terminal_snr(S.DiscreteVP(betas))
    expected = lin_algorithm_1(betas)
    np.testing.assert_allclose(chain.betas.numpy(), expected, rtol=1e-9, atol=0)
    assert chain.betas[-1] == 1 and chain.zero_terminal_snr and chain.alphas_bar[-1] == 0
    np.testing.assert_allclose(chain.alphas_bar[1].item(), np.cumprod(1 - betas)[0], rtol=1e-12)  # the first kept
    snr = chain.alphas_bar[1:] / (1 - chain.alphas_bar[1:])
    assert bool((snr[1:] < snr[:-1]).all()) and snr[-1] == 0


def test_the_chain_before_rescaling_has_lin_et_al_terminal_snr():
    """Lin et al. (2024) sec. 3.1: Stable Diffusion's chain ends at sqrt(alpha-bar_T) = 0.068265, SNR 0.004682."""
    chain = S.DiscreteVP(SD_SCALED_LINEAR)
    assert math.sqrt(chain.alphas_bar[-1]) == pytest.approx(0.068265, abs=1e-6)
    assert float(torch.exp(chain.logsnr(1.0))) == pytest.approx(0.004682, abs=1e-6)


def test_cosine_chain_without_clipping_reaches_zero_snr():
    chain = S.Cosine().discrete(T, max_beta=1.0)
    assert chain.betas[-1] == 1 and chain.zero_terminal_snr and float(chain.logsnr(1.0)) == -INF
    assert S.Cosine().discrete(T).betas[-1] == pytest.approx(0.999)  # iDDPM's clipping keeps SNR > 0
    cos = S.Cosine()
    assert float(cos.alpha(1.0)) == 0 and float(cos.logsnr(1.0)) == -INF and float(cos.sigma_tilde(1.0)) == INF
    assert float(cos.dsigma(1.0)) == 0 and float(cos.t_from_sigma_tilde(INF)) == 1


def test_every_method_at_and_near_snr_zero():
    t = torch.tensor([0.5, (T - 1) / T, 0.9993, 0.99999, 1.0], dtype=F64)
    alpha = np.sqrt(np.interp(t.numpy() * T, np.arange(T + 1), ZT_ABAR))  # exact at the knots
    alpha[2:4] = math.sqrt(ZT_ABAR[T - 1]) * (T - T * t[2:4].numpy())  # alpha linear on the last interval
    np.testing.assert_allclose(CHAIN.alpha(t)[[0, 1, 4]].numpy(), alpha[[0, 1, 4]], rtol=1e-9)
    np.testing.assert_allclose(CHAIN.alpha(t)[2:4].numpy(), alpha[2:4], rtol=1e-9)
    assert float(CHAIN.logsnr(1.0)) == -INF and float(CHAIN.sigma_tilde(1.0)) == INF
    assert float(CHAIN.alpha(1.0)) == 0 and float(CHAIN.sigma(1.0)) == 1 and float(CHAIN.log_alpha_bar(1.0)) == -INF
    assert float(CHAIN.t_from_sigma_tilde(INF)) == 1 and float(CHAIN.t_from_logsnr(-INF)) == 1
    assert float(CHAIN.dlog_alpha_bar(1.0)) == -INF and float(CHAIN.dlogsnr(1.0)) == -INF
    assert float(CHAIN.dalpha(1.0)) == pytest.approx(DALPHA_1) and float(CHAIN.dsigma(1.0)) == 0
    for name in ("alpha", "sigma", "dalpha", "dsigma", "logsnr", "dlogsnr", "sigma_tilde", "log_alpha_bar", "dlog_alpha_bar"):
        assert not bool(getattr(CHAIN, name)(t).isnan().any()), name
    inside = t[:-1]  # the inverse is exact, also on the last interval
    np.testing.assert_allclose(CHAIN.t_from_sigma_tilde(CHAIN.sigma_tilde(inside)).numpy(), inside.numpy(), rtol=1e-12)
    h = 1e-7  # alpha' by central differences inside the last interval, sigma' and lambda' by hand from alpha
    fd = (CHAIN.alpha(t[2:4] + h) - CHAIN.alpha(t[2:4] - h)) / (2 * h)
    np.testing.assert_allclose(CHAIN.dalpha(t[2:4]).numpy(), fd.numpy(), rtol=1e-6)
    a = alpha[2:4]
    np.testing.assert_allclose(CHAIN.dsigma(t[2:4]).numpy(), -a * DALPHA_1 / np.sqrt(1 - a**2), rtol=1e-9)
    np.testing.assert_allclose(CHAIN.dlogsnr(t[2:4]).numpy(), 2 * DALPHA_1 / a / (1 - a**2), rtol=1e-9)  # (log a^2/(1-a^2))'
    left = CHAIN.alpha(torch.tensor([(T - 1) / T - 1e-12, (T - 1) / T + 1e-12], dtype=F64))
    assert float(left[0] - left[1]) == pytest.approx(0, abs=1e-12)  # continuous into the last interval


def test_only_the_last_beta_may_be_one():
    with pytest.raises(ValueError, match="only the last may be 1"):
        S.DiscreteVP([0.1, 1.0, 0.2])
    with pytest.raises(ValueError, match="T >= 2"):
        S.rescale_zero_terminal_snr(S.DiscreteVP([0.1]))
    assert S.rescale_zero_terminal_snr(CHAIN).betas[-1] == 1  # already zero: unchanged
    respaced = CHAIN.respaced(10)
    assert respaced.zero_terminal_snr and respaced.alphas_bar[-1] == 0


# -- 2. the preset -------------------------------------------------------------------------------------
def test_preset_grid_trailing_from_infinity():
    p = get_preset("ztsnr")
    for n in (1, 10, 35):
        got = samplers.get_sigmas(p.time_steps, n, **p.time_step_kwargs)
        steps = np.round(T - np.arange(n) * T / n).astype(int)  # Lin et al. Table 2, 'trailing'
        with np.errstate(divide="ignore"):
            expected = np.append(np.sqrt(1 / ZT_ABAR[steps] - 1), 0)
        assert got[0] == INF
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_preset_precond_is_v_prediction_and_edm_with_unit_sigma_data():
    p = get_preset("ztsnr")
    assert isinstance(p.precond, VPredPrecond) and p.solver == "ddim" and p.weighting_space == "v"
    sigma = torch.tensor([0.01, 0.5, 3.0, 200.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = p.precond(sigma)
    e_skip, e_out, e_in, _ = EDMPrecond(1.0)(sigma)  # the same but for the sign of F (EDM's F = -v)
    torch.testing.assert_close((c_skip, -c_out, c_in), (e_skip, e_out, e_in))
    torch.testing.assert_close(c_noise, T * CHAIN.t_from_sigma_tilde(sigma) - 1)  # the 0-based step index
    # a net that returns the exact v = alpha eps - sigma_t x of its input gives D = x, also at sigma = inf
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    alpha, sig_t = 1 / torch.sqrt(1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)
    v = alpha[:, None] * eps - sig_t[:, None] * x
    D = p.denoiser(lambda inp, cond: v)
    torch.testing.assert_close(D(x + sigma[:, None] * eps, sigma), x)
    torch.testing.assert_close(Denoiser(lambda inp, cond: -x, p.precond)(eps, INF), x)  # x0 = -v at SNR 0


def test_preset_column_renders():
    lines = presets_table().splitlines()
    col = lines[0].split("|").index(" ztsnr ")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    cells = {line.split("|")[1].strip(): line.split("|")[col].strip() for line in lines[2:]}
    assert cells["solver"] == "ddim" and cells["c_out"] == "-sigma/sqrt(sigma^2+1)" and "trailing" in cells["time steps"]


# -- 3. every sampler from sigma = inf ----------------------------------------------------------------
GRID = samplers.get_sigmas("ddpm", 100, **get_preset("ztsnr").time_step_kwargs)  # inf, ..., 0.033, 0
EDM_FROM_INF = torch.cat([torch.tensor([INF], dtype=F64), samplers.get_sigmas("edm", 24)])  # inf, 80, ..., 0.002, 0
GM = ring8()  # D(eps, inf) = E[x0] = 0: the exact limit
OPTIONS = {"langevin": dict(n_steps=3), "ddim": dict(eta=0.5), "edm_sde": dict(S_churn=20.0),
           "mala": dict(n_steps=3, energy=lambda x, s: -GM.log_prob(x, s))}


class Counted:
    def __init__(self, denoiser):
        self.denoiser, self.calls, self.first = denoiser, 0, None

    def __call__(self, x, sigma):
        self.calls += 1
        self.first = float(sigma[0]) if self.first is None else self.first
        return self.denoiser(x, sigma)


@pytest.fixture(scope="module")
def reference():
    """Fresh mixture samples and the noise floor of sliced W2 (128 projections) between two real sets of 2000."""
    return GM.sample(2000, torch.Generator().manual_seed(3)), noise_floor(GM.sample, 2000, n_proj=128)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_from_infinity_matches_the_mixture(name, reference):
    """From the unit noise at sigma = inf, then EDM's grid from 80 (24 levels), with the exact mixture
    denoiser: finite, the counted NFE, and sliced W2 to fresh mixture samples within 1.5x the noise
    floor (two real sets of 2000), pc within 4x; annealed Langevin and MALA (3 steps per level: far
    too few to mix, they are no ODE samplers) only finite."""
    n = 2000
    D = Counted(GM)
    seen = []
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = samplers.SAMPLERS[name](D, eps, EDM_FROM_INF, generator=torch.Generator().manual_seed(2), callback=seen.append,
                                **OPTIONS.get(name, {}))
    assert bool(torch.isfinite(x).all()) and D.first == INF and seen[0]["sigma"] == INF
    assert [s["i"] for s in seen[:2]] == [0, 1] and math.isfinite(seen[1]["sigma"])
    expected_nfe = samplers.sampler_nfe(name, len(EDM_FROM_INF) - 1, from_infinity=True, **OPTIONS.get(name, {}))
    assert expected_nfe is None or D.calls == expected_nfe
    real, floor = reference
    w2 = sliced_wasserstein(x, real, n_proj=128)
    assert name in ("langevin", "mala") or w2 < (4 if name == "pc" else 1.5) * floor, (w2, floor)


@pytest.mark.parametrize("name, options", [("euler", {}), ("ddim", dict(eta=0.5)), ("ddpm", dict(variance="beta_tilde"))])
def test_the_step_from_infinity_is_the_limit_of_the_finite_step(name, options):
    """The same sampler started at sigma = 1e9 with x = 1e9 eps gives the same samples up to O(1e-9):
    the first step is the limit of the sampler's own step (for ddpm: its posterior variance)."""
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    grid = samplers.get_sigmas("ddpm", 10, **get_preset("ztsnr").time_step_kwargs)
    far = torch.cat([torch.tensor([1e9], dtype=F64), grid[1:]])
    fn = samplers.SAMPLERS[name]
    at_inf = fn(GM, eps, grid, generator=torch.Generator().manual_seed(5), **options)
    near = fn(GM, 1e9 * eps, far, generator=torch.Generator().manual_seed(5), **options)
    torch.testing.assert_close(at_inf, near, rtol=0, atol=1e-6)


def test_first_step_rule_deterministic_and_ancestral():
    """x_1 = D(eps, inf) + sigma_1 eps for ODE samplers; D + sigma_1 z, z independent of eps, for ddpm."""
    eps = torch.randn(20000, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    sigma_1 = float(GRID[1])
    for name, independent in (("deis_pc", False), ("ddpm", True)):
        states = []
        samplers.SAMPLERS[name](GM, eps, GRID[:3], generator=torch.Generator().manual_seed(7), callback=states.append)
        x1 = states[1]["x"]
        if not independent:
            torch.testing.assert_close(x1, GM.mean + sigma_1 * eps)
        else:
            z = x1 / sigma_1
            assert abs(float((z * eps).mean())) < 0.03 and float(z.std()) == pytest.approx(1, abs=0.03)
    with pytest.raises(ValueError, match="finite"):
        samplers.euler(GM, eps, GRID)  # the bare function: only through SAMPLERS


# -- 4. denoisers at sigma = inf -----------------------------------------------------------------------
def test_mixture_denoiser_is_the_mean_at_infinity():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    torch.testing.assert_close(GM(x, INF), GM.mean.expand(5, 2))
    big = 1e7
    torch.testing.assert_close(GM(big * x, big), GM.mean.expand(5, 2), atol=1e-6, rtol=0)  # the limit
    mixed = GM(x, torch.tensor([INF, 0.0, 1.0, INF, 0.3], dtype=F64))
    torch.testing.assert_close(mixed[1:3], torch.stack([x[1], GM(x[2:3], 1.0)[0]]))
    with pytest.raises(ValueError, match="finite"):
        GM.score(x, INF)


@pytest.mark.parametrize("param", ["x0", "v", "flow"])
def test_parameterized_denoiser_at_infinity_feeds_pure_noise(param):
    """At sigma~ = inf the net sees z_T = sigma_T eps = eps at t = 1, and D is x0 from its prediction:
    x0 itself, -v (alpha = 0, sigma = 1), u / alpha'(1) (flow, alpha linear on the last interval)."""
    seen = {}
    g = torch.Generator().manual_seed(9)
    eps, out = torch.randn(3, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)

    def net(z, t):
        seen.update(z=z, t=t)
        return out

    D = ParameterizedDenoiser(net, param, CHAIN)(eps, INF)
    torch.testing.assert_close(seen["z"], eps)
    assert bool((seen["t"] == 1).all())
    expected = {"x0": out, "v": -out, "flow": out / DALPHA_1}[param]
    torch.testing.assert_close(D, expected)


@pytest.mark.parametrize("param", ["eps", "score", "energy"])
def test_eps_score_energy_refuse_snr_zero(param):
    eps = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=f"'{param}' does not determine x0 where alpha_t = 0"):
        P.to_x0(eps, param, eps, torch.ones(3, dtype=F64), CHAIN)
    with pytest.raises(ValueError, match="cannot give x0 at the zero terminal SNR"):
        Diffusion(MLP(2), get_preset("ztsnr"), param)


@pytest.mark.parametrize("precond", [VPPrecond(CHAIN), VEPrecond(), EDMPrecond()], ids=repr)
def test_preconditioners_without_a_limit_refuse_infinity(precond):
    with pytest.raises(ValueError, match="sigma=inf"):
        Denoiser(lambda x, c: x, precond)(torch.zeros(2, 2, dtype=F64), INF)


@pytest.mark.parametrize("precond", [VPredPrecond(CHAIN), FlowPrecond()], ids=repr)
def test_denoiser_at_infinity_is_the_limit(precond):
    """D(eps, inf) = lim_{S -> inf} D(S eps, S) (c_skip x~ -> (lim c_skip S) eps, c_in x~ -> (lim c_in S) eps),
    for a net smooth in its input and continuous in c_noise."""
    W = torch.randn(2, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    F = lambda inp, cond: torch.tanh(inp @ W) * (1 + cond[:, None] / 1000)  # noqa: E731
    eps = torch.randn(6, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    S_big = 1e8
    torch.testing.assert_close(Denoiser(F, precond)(eps, INF), Denoiser(F, precond)(S_big * eps, S_big), rtol=0, atol=1e-6)


def test_conditioned_input_at_snr_zero():
    p = get_preset("ztsnr")
    seen = {}
    net = ConditionedInput(lambda inp, cond: seen.update(inp=inp, cond=cond) or inp, p.precond, CHAIN)
    z = torch.randn(3, 2, dtype=F64)
    net(z, torch.ones(3, dtype=F64))
    torch.testing.assert_close(seen["inp"], z)  # c_in x~ -> eps = z_T
    torch.testing.assert_close(seen["cond"], torch.full((3,), T - 1.0, dtype=F64))


# -- 5. weightings and conversions at SNR 0 -------------------------------------------------------------
def snr_zero_weights():
    """Each weighting at t = 1 (i = T) of the rescaled chain, in each loss space, by hand: alpha = 0,
    sigma = 1, alpha' = DALPHA_1, sigma' = 0, SNR 0, sigma~ = inf; error scales (pred - target) = k (x0_hat - x):
    x0 1, v -1, flow alpha'; eps, score, energy 0 (None: no finite weight there unless stated in them)."""
    k2 = {"x0": 1.0, "v": 1.0, "flow": DALPHA_1**2}
    # vlb: abar_{T-1} beta_T^2 / (2 sigma_T^2 (1 - abar_T)^2) (Ho et al. eq. 7) with beta_T = sigma_T^2 = 1, abar_T = 0
    in_x0 = {"snr": 0.0, "min-snr": 0.0, "edm": 1 / 0.5**2, "inverse-sigma2": 0.0, "vlb": ZT_ABAR[T - 1] / 2}
    table = {(w, space): (val / k2[space] if space in k2 else None)
             for w, val in in_x0.items() for space in P.PARAMETERIZATIONS}
    for space in P.PARAMETERIZATIONS:  # L_simple: 1 in eps space, sigma^2 = 1 in score / energy, alpha^2 k^-2 = 0 else
        table["constant", space] = 1.0 if space in ("eps", "score", "energy") else 0.0
    return table


@pytest.mark.parametrize("space", P.PARAMETERIZATIONS)
@pytest.mark.parametrize("name", list(L.WEIGHTINGS))
def test_every_weighting_in_every_space_at_snr_zero(name, space):
    expected = snr_zero_weights()[name, space]
    t = torch.tensor([T], dtype=F64) if name == "vlb" else torch.ones(1, dtype=F64)
    if expected is None:
        with pytest.raises(ValueError, match="no value in the"):
            L.weighting(name, t, CHAIN, space=space)
        return
    w = L.weighting(name, t, CHAIN, space=space)
    assert bool(torch.isfinite(w).all())
    assert float(w) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("name", list(L.WEIGHTINGS))
def test_every_weighting_finite_along_the_whole_chain(name):
    i = torch.arange(1, T + 1, dtype=F64)
    t = i if name == "vlb" else i / T
    for space in ("x0", "v", "flow"):
        w = L.weighting(name, t, CHAIN, space=space)
        assert bool(torch.isfinite(w).all()), (name, space)


def test_min_snr_in_v_space_is_min_snr_gamma_over_snr_plus_one():
    """Hang et al. 2023 / diffusers #9451: min(SNR, gamma) / (SNR + 1) in v space, 0 (not NaN) at SNR 0."""
    snr = ZT_ABAR[1:] / (1 - ZT_ABAR[1:])
    w = L.weighting("min-snr", torch.arange(1, T + 1, dtype=F64) / T, CHAIN, space="v", gamma=5.0)
    np.testing.assert_allclose(w.numpy(), np.minimum(snr, 5.0) / (snr + 1), rtol=1e-9, atol=1e-300)
    assert float(w[-1]) == 0


def test_conversions_defined_at_snr_zero():
    """Every conversion out of x0, v and flow at t = 1 against the targets written out by hand
    (z = eps: x0 x, eps eps, score -eps, energy eps, v -x, flow alpha'(1) x); out of eps, score,
    energy: ValueError."""
    g = torch.Generator().manual_seed(12)
    x, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.ones(4, dtype=F64)
    exact = {"x0": x, "eps": eps, "score": -eps, "energy": eps, "v": -x, "flow": DALPHA_1 * x}
    for src in P.PARAMETERIZATIONS:
        for dst in P.PARAMETERIZATIONS:
            if src in ("eps", "score", "energy") and src != dst:
                with pytest.raises(ValueError, match="does not determine x0"):
                    P.convert(exact[src], src, dst, eps, t, CHAIN)
            else:
                torch.testing.assert_close(P.convert(exact[src], src, dst, eps, t, CHAIN), exact[dst], msg=(src, dst))


# -- 6. the model, the plan and sampling --------------------------------------------------------------
@pytest.mark.parametrize("param", ["precond", "x0", "v", "flow"])
def test_loss_and_gradient_finite_at_snr_zero(param):
    model = Diffusion(perturb_(MLP(2, hidden=16, depth=1)), get_preset("ztsnr"), param, shape=(2,))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(13))
    t = torch.tensor([1.0] * 4 + [0.001, 0.5, 0.999, 1.0], dtype=F64)
    loss = model.loss(x, None, torch.Generator().manual_seed(14), t=t)
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert float(loss[:4].min().detach()) > 0  # SNR 0 is trained: the v-weight there is 1, not 0


def test_plan_and_sample_on_the_preset():
    p = get_preset("ztsnr")
    default = plan(p, SampleConfig())
    assert default.sampler == "ddim" and default.nfe == 35 and len(default.sigmas) == 36 and default.sigmas[0] == INF
    heun = plan(p, SampleConfig(sampler="heun", nfe=10))  # 1 from inf, then Heun's 2 (n - 1) - 1
    assert heun.nfe == 10 and len(heun.sigmas) == 7
    assert plan(p, SampleConfig(sampler="ddpm")).nfe == T  # ancestral: the full chain
    model = Diffusion(perturb_(MLP(2, hidden=8, depth=1)), p, "v", shape=(2,)).eval()
    for cfg in (SampleConfig(), SampleConfig(sampler="heun", nfe=10), SampleConfig(sampler="dpmpp_2m", nfe=8)):
        s = sample(model, 16, cfg)
        assert bool(torch.isfinite(s.x).all()) and s.evaluations == s.plan.nfe
    adaptive = sample(model, 16, SampleConfig(sampler="adaptive"))  # one step from inf to sigma_{T-1}, then its own
    assert adaptive.plan.sigmas[0] == INF and adaptive.plan.sigmas[1] == CHAIN.sigma_tilde((T - 1) / T)
    assert bool(torch.isfinite(adaptive.x).all()) and adaptive.evaluations > 1


def test_cli_trains_and_samples_end_to_end(tmp_path):
    """200 training steps, then 200 samples at 10 NFE, through the command line."""
    out = tmp_path / "z"
    r = run("train", "--preset", "ztsnr", "--data", "ring8", "--steps", "200", "--out", str(out), "--quiet",
            "model.hidden=32", "model.depth=1", "train.batch_size=128", "model.parameterization=v", "log.n_samples=16")
    assert r.returncode == 0, r.stderr
    r = run("sample", str(out), "--n", "200", "--nfe", "10")
    assert r.returncode == 0, r.stderr
    x = np.load(out / "samples" / "sample.npz")["x"]
    assert x.shape == (200, 2) and np.isfinite(x).all() and 0.2 < x.std() < 3
    # every edit of a model whose grid starts at sigma = inf: the known coordinate kept, every output finite
    for args in (["--mask", "left"], ["--mask", "left", "--method", "repaint", "--jump-n-sample", "2"],
                 ["--mask", "right", "--method", "smc", "--particles", "4", "--nfe", "20"], ["--strength", "1"], ["--invert"]):
        r = run("edit", str(out), "--input", "ring8", "--n", "16", "--nfe", "10", *args, "--out", str(tmp_path / "e.png"))
        assert r.returncode == 0, (args, r.stderr)
        f = np.load(tmp_path / "e.npz")
        assert np.isfinite(f["x"]).all() and ("--mask" not in args or "known values changed: 0" in r.stdout), args


def test_model_vlb_at_zero_terminal_snr_is_the_limit():
    """The bound on the rescaled chain (respaced to 20 steps) equals, to 1e-6, the bound on the same
    chain with beta_T = 1 - 1e-12 (SNR_T ~ 1e-16): the step T term at SNR 0 is the limit, not NaN."""
    chain = CHAIN.respaced(20)
    near = S.DiscreteVP(torch.cat([chain.betas[:-1], torch.tensor([1 - 1e-12], dtype=F64)]))
    x = GM.sample(64, torch.Generator().manual_seed(15))
    at_zero, at_near = (model_vlb(GM, x, c, generator=torch.Generator().manual_seed(16)) for c in (chain, near))
    assert bool(torch.isfinite(at_zero).all())
    torch.testing.assert_close(at_zero, at_near, rtol=1e-6, atol=1e-6)
