"""Schedules against independent computations: finite differences, numpy products, the papers' formulas."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffspace import schedules as S


def all_schedules():
    return [
        S.ddpm_linear(),
        S.VPSDE(),
        S.Cosine(),
        S.Cosine().discrete(),
        S.VE(),
        S.EDM(),
        S.SqrtVE(),
        S.RectifiedFlow(),
    ]


def interior_times(schedule, n=9):
    """Times strictly inside the domain, off the knots of a discrete chain (finite differences ok)."""
    u = torch.linspace(0.05, 0.95, n, dtype=torch.float64) + 0.37e-3
    if schedule.t_max == math.inf:
        return 0.01 + 30 * u
    return u


@pytest.mark.parametrize("schedule", all_schedules(), ids=repr)
def test_derivatives_match_central_differences(schedule):
    t = interior_times(schedule)
    h = 1e-6 * torch.clamp(t, min=1.0)
    for f, df in [(schedule.alpha, schedule.dalpha), (schedule.sigma, schedule.dsigma), (schedule.logsnr, schedule.dlogsnr)]:
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", all_schedules(), ids=repr)
def test_logsnr_inverse_and_sigma_tilde(schedule):
    t = interior_times(schedule)
    lam = schedule.logsnr(t)
    torch.testing.assert_close(schedule.t_from_logsnr(lam), t, rtol=1e-10, atol=1e-12)
    # logsnr = log(alpha^2 / sigma^2), recomputed from alpha and sigma
    torch.testing.assert_close(lam, torch.log(schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2), rtol=1e-10, atol=1e-10)
    st = schedule.sigma_tilde(t)
    torch.testing.assert_close(st, torch.exp(-lam / 2), rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.t_from_sigma_tilde(st), t, rtol=1e-10, atol=1e-12)
    assert bool((torch.diff(lam) < 0).all()), "log-SNR must decrease with time"


@pytest.mark.parametrize("schedule", [S.ddpm_linear(), S.VPSDE(), S.Cosine(), S.Cosine().discrete()], ids=repr)
def test_variance_preserving(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)


def test_ddpm_linear_matches_discrete_chain():
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    alpha_bar = np.cumprod(1 - betas)  # Ho et al. 2020: alpha-bar_t = prod_{s<=t} (1 - beta_s)
    sch = S.ddpm_linear()
    np.testing.assert_allclose(sch.betas.numpy(), betas, rtol=1e-15)
    i = torch.arange(1, T + 1)
    np.testing.assert_allclose(sch.alpha_bar(sch.discrete_t(i)).numpy(), alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(sch.alphas_bar[1:].numpy(), alpha_bar, rtol=1e-12)
    assert float(sch.alpha(torch.tensor(0.0, dtype=torch.float64))) == 1.0
    # between knots: geometric interpolation of alpha-bar (linear in log alpha-bar)
    t = (torch.tensor([10.25, 500.5, 999.75], dtype=torch.float64)) / T
    k = np.floor(t.numpy() * T).astype(int)
    frac = t.numpy() * T - k
    expect = np.exp((1 - frac) * np.log(alpha_bar[k - 1]) + frac * np.log(alpha_bar[k]))
    np.testing.assert_allclose(sch.alpha_bar(t).numpy(), expect, rtol=1e-12)


def test_vp_sde_is_table1_vp_column():
    beta_d, beta_min = 19.9, 0.1
    sch = S.VPSDE()
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    e = torch.exp(0.5 * beta_d * t**2 + beta_min * t)
    torch.testing.assert_close(sch.sigma_tilde(t), torch.sqrt(e - 1), rtol=1e-12, atol=0)  # sigma(t)
    torch.testing.assert_close(sch.alpha(t), 1 / torch.sqrt(e), rtol=1e-12, atol=0)  # s(t)
    # Table 1's inverse: sigma^{-1}(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d
    sig = sch.sigma_tilde(t)
    inv = (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log(sig**2 + 1)) - beta_min) / beta_d
    torch.testing.assert_close(sch.t_from_sigma_tilde(sig), inv, rtol=1e-10, atol=0)


def test_cosine_schedule_and_its_clipping():
    s = 0.008
    f = lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2  # iDDPM eq. 17
    t = np.linspace(0, 0.99, 34)
    np.testing.assert_allclose(S.Cosine().alpha_bar(torch.tensor(t)).numpy(), f(t) / f(0), rtol=1e-12)
    chain = S.Cosine().discrete(T=1000, max_beta=0.999)
    i = np.arange(1, 1001)
    raw = 1 - f(i / 1000) / f((i - 1) / 1000)
    np.testing.assert_allclose(chain.betas.numpy(), np.minimum(raw, 0.999), rtol=1e-9)
    assert raw[-1] > 0.999 and chain.betas[-1].item() == pytest.approx(0.999)  # the clip acts at the end


def test_iddpm_sigmas_are_the_clipped_cosine_chain_read_backwards():
    u = S.iddpm_sigmas(M=1000)
    chain = S.Cosine().discrete(T=1000)
    j = torch.arange(1001)
    expect = torch.sqrt(1 / chain.alphas_bar[1000 - j] - 1)  # sigma~ = sqrt((1 - abar) / abar)
    torch.testing.assert_close(u, expect, rtol=1e-10, atol=1e-14)
    assert u[-1] == 0 and bool((torch.diff(u) < 0).all())


def test_ve_edm_flow_endpoints():
    ve = S.VE()
    assert ve.sigma(0.0).item() == pytest.approx(0.02) and ve.sigma(1.0).item() == pytest.approx(100.0)
    t = torch.tensor([0.5, 2.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(S.EDM().sigma_tilde(t), t)
    torch.testing.assert_close(S.SqrtVE().sigma_tilde(t), torch.sqrt(t))
    rf = S.RectifiedFlow()
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(rf.sigma_tilde(u), u / (1 - u))


@pytest.mark.parametrize("name", list(S.SCHEDULES))
def test_errors_name_the_bad_value(name):
    sch = S.get_schedule(name)
    bad_t = -0.5 if sch.t_max == math.inf else 1.5
    with pytest.raises(ValueError, match=rf"t={bad_t:g} is outside the time domain"):
        sch.alpha(bad_t)
    with pytest.raises(ValueError, match="nan"):
        sch.sigma(float("nan"))
    with pytest.raises(ValueError, match=r"sigma=-1 .*>= 0"):
        sch.t_from_sigma_tilde(-1.0)


def test_out_of_range_sigma_and_unknown_name():
    with pytest.raises(ValueError, match=r"sigma=500 .*outside the range of the ve"):
        S.VE().t_from_sigma_tilde(500.0)
    with pytest.raises(ValueError, match=r"unknown schedule 'nope'.*allowed: ddpm-linear"):
        S.get_schedule("nope")
    with pytest.raises(ValueError, match="betas"):
        S.DiscreteVP([0.1, 1.2])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(S.SCHEDULES)),
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    u=st.floats(0.02, 0.98),
)
def test_shapes_and_dtypes_are_preserved(name, shape, dtype, u):
    sch = S.get_schedule(name)
    t = torch.full(shape, u * (20 if sch.t_max == math.inf else 1), dtype=dtype)
    for f in (sch.alpha, sch.sigma, sch.dalpha, sch.dsigma, sch.logsnr, sch.sigma_tilde):
        out = f(t)
        assert out.shape == t.shape and out.dtype == dtype
    back = sch.t_from_logsnr(sch.logsnr(t))
    assert back.shape == t.shape and back.dtype == dtype
    torch.testing.assert_close(back, t, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-5)


def test_respaced_chain_keeps_alpha_bar_at_the_kept_steps():
    """Nichol & Dhariwal (2021, sec. 4): the respaced chain's betas, 1 - abar_k / abar_{k-1}, multiply
    back to the original abar at the kept steps; K = T is the chain itself."""
    sch = S.ddpm_linear()
    torch.testing.assert_close(sch.respaced(1000).betas, sch.betas, rtol=1e-12, atol=0)
    r = sch.respaced(10)
    kept = np.round(np.linspace(1, 1000, 10)).astype(int)
    np.testing.assert_allclose(np.cumprod(1 - r.betas.numpy()), sch.alphas_bar.numpy()[kept], rtol=1e-12)
    assert r.T == 10 and sch.respaced(1).T == 1
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="K="):
            sch.respaced(bad)


def test_chain_from_sigmas_has_those_noise_levels():
    sigmas = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    chain = S.DiscreteVP.from_sigmas(sigmas)
    abar = 1 / (1 + sigmas.numpy() ** 2)  # alpha-bar = 1 / (1 + sigma~^2)
    np.testing.assert_allclose(np.cumprod(1 - chain.betas.numpy()), abar, rtol=1e-12)
    torch.testing.assert_close(chain.sigma_tilde(chain.discrete_t(torch.arange(1, 5))), sigmas, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        S.DiscreteVP.from_sigmas(torch.tensor([-0.1, 1.0]))
