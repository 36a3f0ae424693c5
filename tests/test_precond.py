"""Preconditioners and denoiser wrappers against Karras et al. (2022) Table 1, typed here from the paper."""

import math

import numpy as np
import pytest
import torch

from diffspace import precond as P
from diffspace import schedules as S

F64 = torch.float64


def tensor(values):
    return torch.tensor(values, dtype=F64)


SIGMAS = [0.002, 0.03, 0.5, 1.0, 2.5, 17.0, 80.0]
BETA_D, BETA_MIN, M = 19.9, 0.1, 1000  # Table 1 VP column
C1, C2 = 0.001, 0.008  # Table 1 iDDPM column
SIGMA_DATA = 0.5  # Table 1 EDM column


def vp_sigma(t):
    """Table 1 VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return np.sqrt(np.exp(0.5 * BETA_D * t**2 + BETA_MIN * t) - 1)


def vp_sigma_inv(s):
    """Solve beta_d t^2 / 2 + beta_min t = ln(1 + s^2) for t >= 0 (quadratic formula)."""
    return (-BETA_MIN + np.sqrt(BETA_MIN**2 + 2 * BETA_D * np.log1p(s**2))) / BETA_D


def iddpm_u():
    """Table 1 iDDPM: u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C1) - 1)."""
    abar = np.sin(0.5 * np.pi * np.arange(M + 1) / (M * (C2 + 1))) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C1) - 1)
    return u


def table1(name, s):
    """(c_skip, c_out, c_in, c_noise) of Table 1 at the numpy array s."""
    one = np.ones_like(s)
    if name == "vp":
        return one, -s, 1 / np.sqrt(s**2 + 1), (M - 1) * vp_sigma_inv(s)
    if name == "ve":
        return one, s, one, np.log(s / 2)
    if name == "iddpm":
        u = iddpm_u()
        return one, -s, 1 / np.sqrt(s**2 + 1), M - 1 - np.abs(u[None, :] - s[:, None]).argmin(1)
    if name == "edm":
        sd = SIGMA_DATA
        return sd**2 / (s**2 + sd**2), s * sd / np.sqrt(sd**2 + s**2), 1 / np.sqrt(s**2 + sd**2), np.log(s) / 4
    # rectified flow: t = sigma/(1+sigma), z = x~/(1+sigma), x = z - t (eps - x)
    return 1 / (1 + s), -s / (1 + s), 1 / (1 + s), s / (1 + s)


PRECONDS = {
    "vp": P.VPPrecond(),
    "ve": P.VEPrecond(),
    "iddpm": P.IDDPMPrecond(),
    "edm": P.EDMPrecond(),
    "flow": P.FlowPrecond(),
}


@pytest.mark.parametrize("name", PRECONDS)
def test_coefficients_equal_table1(name):
    s = np.array(SIGMAS)
    got = PRECONDS[name](tensor(s))
    for c_got, c_want in zip(got, table1(name, s)):
        assert c_got.shape == (len(s),)
        np.testing.assert_allclose(c_got.numpy(), c_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PRECONDS)
def test_ideal_raw_output_gives_back_x(name):
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(7, 3, 4, generator=g, dtype=F64), torch.randn(7, 3, 4, generator=g, dtype=F64)
    sigma = tensor(SIGMAS)
    x_noisy = x + sigma[:, None, None] * eps
    c_skip, c_out, c_in, c_noise = (c[:, None, None] for c in PRECONDS[name](sigma))
    seen = {}

    def F(inp, noise_cond):
        seen.update(inp=inp, noise_cond=noise_cond)
        return (x - c_skip * x_noisy) / c_out

    D = P.Denoiser(F, PRECONDS[name])(x_noisy, sigma)
    assert D.dtype == F64
    torch.testing.assert_close(D, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(seen["inp"], c_in * x_noisy, rtol=0, atol=0)
    assert seen["noise_cond"].shape == (7,)


def test_iddpm_c_noise_at_the_grid_is_the_index():
    u = tensor(iddpm_u())
    j = torch.arange(M)
    *_, c_noise = PRECONDS["iddpm"](u[:M])
    assert torch.equal(c_noise, (M - 1 - j).to(c_noise.dtype))


def test_vp_c_noise_inverts_the_vp_schedule():
    s = np.array(SIGMAS)
    *_, c_noise = PRECONDS["vp"](tensor(s))
    np.testing.assert_allclose(vp_sigma(c_noise.numpy() / (M - 1)), s, rtol=1e-10)


def test_scalar_sigma_is_repeated_per_sample():
    seen = {}

    def F(inp, noise_cond):
        seen["noise_cond"] = noise_cond
        return inp

    x = torch.ones(5, 2, dtype=F64)
    P.Denoiser(F, P.EDMPrecond())(x, 1.0)
    assert seen["noise_cond"].shape == (5,)
    torch.testing.assert_close(seen["noise_cond"], torch.zeros(5, dtype=F64))


# -- ParameterizedDenoiser -----------------------------------------------------------------------------
def times(schedule):
    if schedule.t_max == math.inf:
        return tensor([0.05, 0.4, 1.0, 3.0, 20.0])
    return tensor([0.02, 0.2, 0.5, 0.8, 0.97])


def true_target(kind, x, eps, t, schedule):
    """The regression target by its definition, at the time the net is given."""
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    da, ds = schedule.dalpha(t)[:, None], schedule.dsigma(t)[:, None]
    return {"x0": x, "eps": eps, "score": -eps / s, "v": a * eps - s * x, "flow": da * x + ds * eps}[kind]


@pytest.mark.parametrize("sched_name", S.SCHEDULES)
@pytest.mark.parametrize("kind", ["x0", "eps", "score", "v", "flow", "energy"])
def test_parameterized_denoiser_with_the_true_target_gives_back_x(sched_name, kind):
    schedule = S.SCHEDULES[sched_name]()
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(5, 6, generator=g, dtype=F64), torch.randn(5, 6, generator=g, dtype=F64)
    t = times(schedule)
    sigma = schedule.sigma(t) / schedule.alpha(t)
    x_noisy = x + sigma[:, None] * eps

    def net(z, t_net):
        torch.testing.assert_close(z, schedule.alpha(t_net)[:, None] * x_noisy, rtol=1e-12, atol=1e-12)
        if kind == "energy":  # E(z) = <eps / sigma_t, z>, so grad_z E = eps / sigma_t
            return (z * eps / schedule.sigma(t_net)[:, None]).sum(1)
        return true_target(kind, x, eps, t_net, schedule)

    D = P.ParameterizedDenoiser(net, kind, schedule)(x_noisy, sigma)
    torch.testing.assert_close(D, x, rtol=0, atol=1e-10)


def random_F(seed=3, dim=4):
    """A fixed, non-linear raw network F(x, noise_cond)."""
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(dim, dim, generator=g, dtype=F64), torch.randn(dim, generator=g, dtype=F64)
    return lambda inp, cond: torch.tanh(inp @ W + b * cond[:, None]) + 0.1 * cond[:, None]


@pytest.mark.parametrize(
    "precond, kind, schedule, time_input, sigma",
    [
        (P.VPPrecond(), "eps", S.VPSDE(), lambda t: (M - 1) * t, tensor(SIGMAS)),
        (P.VPPrecond(S.ddpm_linear(), M), "eps", S.ddpm_linear(), lambda t: (M - 1) * t, tensor(SIGMAS)),
        (P.FlowPrecond(), "flow", S.RectifiedFlow(), None, tensor(SIGMAS)),
        # iDDPM's u_j are the sigma~ of the clipped cosine chain at step M - j; c_noise = step - 1
        (P.IDDPMPrecond(), "eps", S.Cosine(C2).discrete(M, max_beta=1 - C1), lambda t: M * t - 1,
         tensor(iddpm_u()[[3, 100, 500, 900, 999]])),
    ],
    ids=["vp-sde", "vp-ddpm-chain", "flow", "iddpm"],
)
def test_preconditioner_equals_the_parameterized_model(precond, kind, schedule, time_input, sigma):
    F = random_F()
    x = torch.randn(len(sigma), 4, generator=torch.Generator().manual_seed(4), dtype=F64) * 3
    D_precond = P.Denoiser(F, precond)(x, sigma)
    D_param = P.ParameterizedDenoiser(F, kind, schedule, time_input=time_input)(x, sigma)
    torch.testing.assert_close(D_precond, D_param, rtol=1e-9, atol=1e-9)


def test_edm_effective_target_has_unit_variance():
    """Karras et al. (2022) appendix B.6: with x ~ N(0, sigma_data^2), c_in x~ and the F-target
    (x - c_skip x~) / c_out both have unit variance at every sigma."""
    g = torch.Generator().manual_seed(5)
    n = 100_000
    for s in [0.01, 0.2, 1.0, 5.0, 80.0]:
        x = SIGMA_DATA * torch.randn(n, generator=g, dtype=F64)
        x_noisy = x + s * torch.randn(n, generator=g, dtype=F64)
        c_skip, c_out, c_in, _ = P.EDMPrecond()(tensor(s))
        assert abs(((x - c_skip * x_noisy) / c_out).var().item() - 1) < 0.02
        assert abs((c_in * x_noisy).var().item() - 1) < 0.02


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_bad_sigma_is_a_value_error_naming_it(bad):
    x = torch.zeros(2, 3, dtype=F64)
    for make in (lambda: P.EDMPrecond()(tensor([1.0, bad])),
                 lambda: P.Denoiser(lambda a, c: a, P.VEPrecond())(x, tensor([1.0, bad])),
                 lambda: P.ParameterizedDenoiser(lambda z, t: z, "eps", S.EDM())(x, bad)):
        with pytest.raises(ValueError, match=r"sigma=(-0.5|nan) is invalid"):
            make()


def test_other_bad_input_is_a_value_error():
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="shape"):
        P.Denoiser(lambda a, c: a, P.VEPrecond())(x, torch.ones(3))
    with pytest.raises(ValueError, match="parameterization"):
        P.ParameterizedDenoiser(lambda z, t: z, "mu", S.EDM())
    with pytest.raises(ValueError, match="variance-preserving"):
        P.VPPrecond(S.VE())
    with pytest.raises(ValueError, match="sigma_data"):
        P.EDMPrecond(sigma_data=0)
