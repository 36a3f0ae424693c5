"""Samplers and grids against exact denoisers, closed-form ODE solutions and formulas typed anew."""

import inspect
import math

import numpy as np
import pytest
import torch

from diffspace import samplers as S
from diffspace.analytic import ring8
from diffspace.evaluate import sliced_wasserstein
from diffspace.schedules import EDM, VPSDE, SqrtVE, ddpm_linear, iddpm_sigmas
from conftest import Counting

F64 = torch.float64
DETERMINISTIC = ["euler", "heun", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "deis_pc", "flow_euler", "flow_heun",
                 "adaptive"]
STOCHASTIC = {  # name -> options that make it stochastic
    "ddpm": {},
    "ddim": dict(eta=1.0),
    "edm_sde": dict(S_churn=40.0),
    "euler_maruyama": {},
    "pc": {},
    "langevin": dict(n_steps=3),
    "mala": dict(n_steps=3, energy=lambda x, sigma, mixture=ring8(): -mixture.log_prob(x, sigma)),  # ring8's exact energy
}


class Gaussian:
    """N(mu, diag(c)) data: exact denoiser mu + c / (c + sigma^2) (x - mu), and the probability-flow
    ODE solution x(sigma) = mu + sqrt((c + sigma^2) / (c + sigma0^2)) (x(sigma0) - mu)."""

    def __init__(self, mu, c):
        self.mu, self.c = torch.tensor(mu, dtype=F64), torch.tensor(c, dtype=F64)
        self.calls = 0

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        s2 = sigma[:, None] ** 2
        return self.mu + self.c / (self.c + s2) * (x - self.mu)

    def flow(self, x, sigma0, sigma):
        return self.mu + torch.sqrt((self.c + sigma**2) / (self.c + sigma0**2)) * (x - self.mu)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def error_at(name, gaussian, x0, sigmas, **options):
    out = S.SAMPLERS[name](gaussian, x0, sigmas, **options)
    exact = gaussian.flow(x0, float(sigmas[0]), float(sigmas[-1]))
    return float((out - exact).abs().max())


# -- convergence orders -------------------------------------------------------------------------------
ORDERS = {"euler": 1, "heun": 2, "dpmpp_2s": 2, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 4, "deis": 4,
          "flow_euler": 1, "flow_heun": 2}


def measured_order(name, steps=(64, 128, 256), sigma_max=1000.0, **options):
    """Slope of log(max error) vs log(steps) on a 2-D Gaussian, EDM grid sigma_max -> 0.05 (no step to 0).

    sigma_max >> data std, as in practice, so that the lower-order warm-up steps of the multistep
    methods (which cap the global order at 2 where D still varies at the start) do not dominate."""
    gaussian = Gaussian([0.3, -0.2], [0.25, 0.04])
    x0 = sigma_max * torch.randn(16, 2, generator=gen(0), dtype=F64)
    grids = [S.get_sigmas("edm", n, sigma_min=0.05, sigma_max=sigma_max)[:-1] for n in steps]
    errors = [error_at(name, gaussian, x0, sigmas, **options) for sigmas in grids]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("name", list(ORDERS))
def test_convergence_order(name):
    order = measured_order(name)
    assert abs(order - ORDERS[name]) < 0.3, f"{name}: measured order {order:.2f}, expected {ORDERS[name]}"


def test_ipndm_fixed_coefficients_are_second_order_on_a_non_uniform_grid():
    assert abs(measured_order("ipndm") - 2) < 0.3


@pytest.mark.parametrize("options, expected", [
    (dict(lower_order_final=False), 5),  # AB4 predictor + 5-node corrector
    (dict(order=3, lower_order_final=False), 4),
    ({}, 2),  # default: the first-order last step caps the order where D still varies at sigma_min
])
def test_deis_pc_convergence_order(options, expected):
    order = measured_order("deis_pc", **options)
    assert abs(order - expected) < 0.3, f"deis_pc {options}: measured order {order:.2f}, expected {expected}"


def test_deis_pc_two_steps_typed_anew():
    """Euler predictor, the implicit-in-x trapezoid corrector, then the 2-node AB predictor; weights are
    int L_j(s^(1/7)) ds by scipy quad, in sigma (no quadrature shared with the code)."""
    from scipy.integrate import quad

    gm, rho = ring8(), 7.0
    sigmas = torch.tensor([3.0, 1.0, 0.4], dtype=F64)
    x0 = 3 * torch.randn(8, 2, generator=gen(13), dtype=F64)
    D = lambda x, s: gm(x, torch.full((8,), s, dtype=F64))  # noqa: E731
    s0, s1, s2 = sigmas.tolist()
    t0, t1 = s0 ** (1 / rho), s1 ** (1 / rho)

    def w(a, b, lagrange):
        return quad(lambda s: lagrange(s ** (1 / rho)), a, b, epsabs=1e-14, epsrel=1e-13)[0]

    l0, l1 = (lambda t: (t - t1) / (t0 - t1)), (lambda t: (t - t0) / (t1 - t0))
    d0 = (x0 - D(x0, s0)) / s0
    x1_pred = x0 + (s1 - s0) * d0
    D1 = D(x1_pred, s1)
    w0, w1 = w(s0, s1, l0), w(s0, s1, l1)
    x1 = (x0 + w0 * d0 - w1 * D1 / s1) / (1 - w1 / s1)  # x1 = x0 + w0 d0 + w1 (x1 - D1) / s1
    torch.testing.assert_close(x1, x0 + w0 * d0 + w1 * (x1 - D1) / s1, rtol=1e-12, atol=1e-12)
    d1 = (x1 - D1) / s1
    x2 = x1 + w(s1, s2, l0) * d0 + w(s1, s2, l1) * d1
    torch.testing.assert_close(S.deis_pc(gm, x0, sigmas, lower_order_final=False), x2, rtol=1e-11, atol=1e-11)
    # with lower_order_final the last step is Euler from the corrected state
    torch.testing.assert_close(S.deis_pc(gm, x0, sigmas), x1 + (s2 - s1) * d1, rtol=1e-11, atol=1e-11)


def test_orders_with_the_schedule_option():
    assert abs(measured_order("euler", sigma_max=10.0, schedule=VPSDE()) - 1) < 0.3
    assert abs(measured_order("heun", sigma_max=10.0, schedule=SqrtVE()) - 2) < 0.3


def test_every_deterministic_sampler_hits_the_gaussian_flow_to_zero():
    """With the step to sigma = 0 (the denoising step), every ODE sampler approaches x(0) of the flow
    (up to the first-order last step from sigma_min = 0.002, and Euler's own first-order error).
    adaptive ignores the 200 steps: its error follows its rtol (1e-4 here; 2e-3 at the default 1e-3)."""
    gaussian = Gaussian([0.3, -0.2], [0.25, 0.04])
    x0 = 80 * torch.randn(32, 2, generator=gen(1), dtype=F64)
    for name in DETERMINISTIC:
        options = {"rtol": 1e-4} if name == "adaptive" else {}
        assert error_at(name, gaussian, x0, S.get_sigmas("edm", 200), **options) < (2e-2 if "euler" in name else 2e-3), name


# -- identities between samplers ----------------------------------------------------------------------
def test_ddim_eta0_is_euler_and_dpmpp_first_step():
    gaussian = Gaussian([0.3, -0.2], [0.25, 0.04])
    x0 = 80 * torch.randn(8, 2, generator=gen(2), dtype=F64)
    sigmas = S.get_sigmas("edm", 12)
    torch.testing.assert_close(S.ddim(gaussian, x0, sigmas), S.euler(gaussian, x0, sigmas), rtol=0, atol=1e-10)
    one_step = sigmas[[0, 1]]
    for name in ["dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "deis_pc"]:
        torch.testing.assert_close(S.SAMPLERS[name](gaussian, x0, one_step), S.euler(gaussian, x0, one_step))


def test_ddim_eta1_is_ddpm_with_posterior_variance():
    x0 = 80 * torch.randn(64, 2, generator=gen(3), dtype=F64)
    sigmas = S.get_sigmas("edm", 10)
    a = S.ddim(ring8(), x0, sigmas, eta=1.0, generator=gen(4))
    b = S.ddpm(ring8(), x0, sigmas, variance="beta_tilde", generator=gen(4))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_edm_sde_without_churn_is_heun():
    x0 = 80 * torch.randn(16, 2, generator=gen(5), dtype=F64)
    sigmas = S.get_sigmas("edm", 9)
    torch.testing.assert_close(S.edm_sde(ring8(), x0, sigmas), S.heun(ring8(), x0, sigmas), rtol=0, atol=0)


def test_flow_euler_is_the_rectified_flow_velocity_step():
    gm = ring8()
    x = 80 * torch.randn(16, 2, generator=gen(6), dtype=F64)
    sigmas = S.get_sigmas("edm", 7)
    out = S.flow_euler(gm, x, sigmas)
    ts = (sigmas / (1 + sigmas)).tolist()
    z = x / (1 + sigmas[0])
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        sigma = float(sigmas[i])
        u = (z - gm(z * (1 + sigma), torch.full((16,), sigma, dtype=F64))) / t
        z = z + (t_next - t) * u
    torch.testing.assert_close(out, z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_step_is_ho_algorithm_2(variance):
    """One step of Algorithm 2 in the VP variable z = sqrt(abar) x, with the same noise draw."""
    gm, B = ring8(), 8
    sigmas = torch.tensor([3.0, 1.2, 0.0], dtype=F64)
    x = 3 * torch.randn(B, 2, generator=gen(7), dtype=F64)
    abar, abar_prev = 1 / (1 + sigmas[0] ** 2), 1 / (1 + sigmas[1] ** 2)
    alpha, beta = abar / abar_prev, 1 - abar / abar_prev
    eps_hat = (x - gm(x, torch.full((B,), 3.0, dtype=F64))) / 3.0
    var = beta if variance == "beta" else (1 - abar_prev) / (1 - abar) * beta
    z = torch.randn(B, 2, generator=gen(0), dtype=F64)
    z_prev = (torch.sqrt(abar) * x - beta / torch.sqrt(1 - abar) * eps_hat) / torch.sqrt(alpha) + torch.sqrt(var) * z
    states = []
    S.ddpm(gm, x, sigmas, variance=variance, generator=gen(0), callback=lambda d: states.append(d["x"]))
    torch.testing.assert_close(states[1], z_prev / torch.sqrt(abar_prev), rtol=1e-12, atol=1e-12)


def test_ddpm_with_a_learned_variance():
    """Nichol & Dhariwal (2021, eq. 15): a callable (x, sigma) -> (D, v) replaces the denoiser; v = 1 is
    the beta step, v = 0 the beta_tilde step, v = 1/2 the geometric mean of their variances; one
    evaluation per step."""
    gm = ring8()
    sigmas = S.get_sigmas("edm", 5)
    x = 80 * torch.randn(8, 2, generator=gen(3), dtype=F64)
    for v, kind in ((1.0, "beta"), (0.0, "beta_tilde")):
        learned = Counting(lambda xx, s: (gm(xx, s), torch.full_like(xx, v)))
        out = S.ddpm(None, x, sigmas, variance=learned, generator=gen(4))
        torch.testing.assert_close(out, S.ddpm(gm, x, sigmas, variance=kind, generator=gen(4)), rtol=1e-12, atol=1e-12)
        assert learned.calls == 5
    s, s2 = 3.0, 1.2  # one step by hand at v = 1/2
    one = torch.tensor([s, s2, 0.0], dtype=F64)
    states = []
    S.ddpm(None, x[:, :] * s / 80, one, variance=lambda xx, sg: (gm(xx, sg), torch.full_like(xx, 0.5)),
           generator=gen(0), callback=lambda d: states.append(d["x"]))
    x0 = x * s / 80
    D = gm(x0, torch.full((8,), s, dtype=F64))
    up2 = math.sqrt((s**2 - s2**2) * (1 + s2**2) / (1 + s**2) * s2**2 * (s**2 - s2**2) / s**2)
    z = torch.randn(8, 2, generator=gen(0), dtype=F64)
    torch.testing.assert_close(states[1], D + (s2**2 / s**2) * (x0 - D) + math.sqrt(up2) * z, rtol=1e-12, atol=1e-12)


# -- the schedule option ------------------------------------------------------------------------------
def test_heun_with_edm_schedule_equals_plain_heun():
    x0 = 80 * torch.randn(16, 2, generator=gen(8), dtype=F64)
    sigmas = S.get_sigmas("edm", 9)
    torch.testing.assert_close(S.heun(ring8(), x0, sigmas, schedule=EDM()), S.heun(ring8(), x0, sigmas), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule, grid", [(VPSDE(), "vp"), (SqrtVE(), "ve")])
def test_euler_in_schedule_time_differs_but_converges(schedule, grid):
    gaussian = Gaussian([0.3, -0.2], [0.25, 0.04])
    coarse = S.get_sigmas(grid, 16)
    x0 = float(coarse[0]) * torch.randn(16, 2, generator=gen(9), dtype=F64)
    plain, timed = S.euler(gaussian, x0, coarse), S.euler(gaussian, x0, coarse, schedule=schedule)
    assert float((plain - timed).abs().max()) > 1e-3
    errors = []
    for n in (1024, 2048):
        fine = S.get_sigmas(grid, n)[:-1]  # to sigma_min: Euler's last step in t = sigma^2 only halves the noise
        exact = gaussian.flow(x0, float(fine[0]), float(fine[-1]))
        errors.append([float((out - exact).abs().max()) for out in (S.euler(gaussian, x0, fine), S.euler(gaussian, x0, fine, schedule=schedule))])
    for coarse_error, fine_error in zip(*errors):  # first-order convergence to the same flow
        assert fine_error < 2e-2 and 1.7 < coarse_error / fine_error < 2.3


# -- stochastic samplers reach the data distribution --------------------------------------------------
def distribution_check(name, sigmas, n=2000, seed=10, **options):
    gm = ring8()
    x0 = float(sigmas[0]) * torch.randn(n, 2, generator=gen(seed), dtype=F64)
    out = S.SAMPLERS[name](gm, x0, sigmas, generator=gen(seed + 1), **options)
    truth, other = gm.sample(n, gen(seed + 2)), gm.sample(n, gen(seed + 3))
    floor = sliced_wasserstein(truth, other, generator=gen(0))
    distance = sliced_wasserstein(out, truth, generator=gen(0))
    assert distance < 1.5 * floor, f"{name}: SW2 {distance:.4f} vs noise floor {floor:.4f}"


def test_ddpm_on_the_full_discrete_chain_reproduces_the_data():
    distribution_check("ddpm", S.get_sigmas("ddpm", 1000))


@pytest.mark.parametrize(
    "name, grid, n, options",
    [
        ("ddim", "edm", 100, dict(eta=1.0)),
        ("edm_sde", "edm", 40, dict(S_churn=40.0)),
        ("euler_maruyama", "edm", 100, {}),
        ("pc", "edm", 50, {}),
        ("langevin", "logsnr", 30, dict(n_steps=10)),
        ("ddpm", "edm", 100, dict(variance="beta_tilde")),
    ],
)
def test_stochastic_samplers_reach_the_data(name, grid, n, options):
    distribution_check(name, S.get_sigmas(grid, n, **({"sigma_min": 0.01} if grid == "logsnr" else {})), **options)


# -- determinism and NFE ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_determinism(name):
    x0 = 80 * torch.randn(16, 2, generator=gen(11), dtype=F64)
    sigmas = S.get_sigmas("edm", 6)
    options = STOCHASTIC.get(name, {})
    a = S.SAMPLERS[name](ring8(), x0, sigmas, generator=gen(1), **options)
    b = S.SAMPLERS[name](ring8(), x0, sigmas, generator=gen(1), **options)
    assert torch.equal(a, b)
    c = S.SAMPLERS[name](ring8(), x0, sigmas, generator=gen(2), **options)
    assert torch.equal(a, c) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", [name for name in S.SAMPLERS if name != "adaptive"])  # its own: test_adaptive.py
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_sampler_nfe_counts_denoiser_calls(name, n):
    options = STOCHASTIC.get(name, {})
    counter = Counting(ring8())
    steps = []
    S.SAMPLERS[name](counter, torch.randn(4, 2, dtype=F64), S.get_sigmas("edm", n), generator=gen(0),
                     callback=lambda d: steps.append(d["i"]), **options)
    assert counter.calls == S.sampler_nfe(name, n, **options)
    assert steps == list(range(len(steps))) and len(steps) >= 1


def test_callback_and_float32():
    seen = []
    x = 80 * torch.randn(4, 2, generator=gen(12))
    out = S.heun(ring8(), x, S.get_sigmas("edm", 5), callback=seen.append)
    assert out.dtype == torch.float32 and [d["i"] for d in seen] == list(range(5))
    assert seen[0]["sigma"] == 80.0 and seen[0]["denoised"].shape == (4, 2)


# -- grids --------------------------------------------------------------------------------------------
def check_grid(sigmas, n):
    assert sigmas.dtype == F64 and sigmas.shape == (n + 1,) and float(sigmas[-1]) == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("kind", list(S.GRIDS))
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_grid_shape(kind, n):
    check_grid(S.get_sigmas(kind, n), n)


def test_edm_grid_formula():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    expected = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    got = S.get_sigmas("edm", n)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13)
    assert got[0] == 80.0 and abs(float(got[-2]) - 0.002) < 1e-15


def test_vp_grid_formula():
    n, eps_s, bd, bmin = 12, 1e-3, 19.9, 0.1
    ts = [1 + i / (n - 1) * (eps_s - 1) for i in range(n)]
    expected = [math.sqrt(math.exp(0.5 * bd * t * t + bmin * t) - 1) for t in ts] + [0.0]
    np.testing.assert_allclose(S.get_sigmas("vp", n).numpy(), expected, rtol=1e-12)


def test_ve_grid_formula():
    n = 9
    expected = [math.sqrt(100.0**2 * (0.02**2 / 100.0**2) ** (i / (n - 1))) for i in range(n)] + [0.0]
    got = S.get_sigmas("ve", n)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert abs(float(got[0]) - 100) < 1e-12 and abs(float(got[-2]) - 0.02) < 1e-15


def test_iddpm_grid_uses_the_j0_rule():
    n, M, j0 = 10, 1000, 8
    u = iddpm_sigmas(M)
    index = [math.floor(j0 + (M - 1 - j0) / (n - 1) * i + 0.5) for i in range(n)]
    assert index[0] == 8 and index[-1] == 999
    np.testing.assert_array_equal(S.get_sigmas("iddpm", n).numpy(), u[index].tolist() + [0.0])


def test_logsnr_and_flow_grids():
    lam = -2 * torch.log(S.get_sigmas("logsnr", 8)[:-1])
    torch.testing.assert_close(torch.diff(lam), torch.full((7,), float(lam[1] - lam[0]), dtype=F64))
    sigmas = S.get_sigmas("flow", 8, t_min=0.1, t_max=0.9)
    t = sigmas[:-1] / (1 + sigmas[:-1])
    torch.testing.assert_close(t, torch.linspace(0.9, 0.1, 8, dtype=F64))


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ("linspace", [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]),
        ("leading", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("trailing", [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]),
    ],
)
def test_ddpm_grid_spacings_of_lin_et_al_table_2(spacing, expected):
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)  # abar[t - 1] for t = 1..1000
    want = [math.sqrt(1 / float(abar[t - 1]) - 1) for t in expected] + [0.0]
    np.testing.assert_allclose(S.get_sigmas("ddpm", 10, spacing=spacing).numpy(), want, rtol=1e-10)


def test_ddpm_full_chain():
    full = S.get_sigmas("ddpm", 1000)
    abar = ddpm_linear().alphas_bar
    np.testing.assert_allclose(full.numpy(), torch.sqrt(1 / abar.flip(0) - 1).numpy(), rtol=1e-12)


# -- bad input ----------------------------------------------------------------------------------------
OWN = {"denoiser", "x", "sigmas", "generator", "callback"}


def test_every_sampler_option_has_a_rule_that_takes_its_default_and_refuses_junk():
    for name in S.SAMPLERS:
        for key, param in inspect.signature(S.get_sampler(name)).parameters.items():
            if key in OWN:
                continue
            S._check_options(name, {key: param.default})  # the default is allowed
            for junk in ("bogus", float("nan"), [1]):
                with pytest.raises(ValueError, match=f"{name}.*{key}="):
                    S._check_options(name, {key: junk})


@pytest.mark.parametrize("name, options, ok", [
    ("edm_sde", dict(S_churn=-5), False), ("edm_sde", dict(S_churn=math.inf), False),
    ("edm_sde", dict(S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003), True), ("edm_sde", dict(S_tmax=math.inf), True),
    ("edm_sde", dict(S_noise=-1.0), False), ("ddim", dict(eta=1.0), True), ("ddim", dict(eta=1.01), False),
    ("unipc", dict(order=4), False), ("unipc", dict(order=3), True), ("deis", dict(order=4), True),
    ("deis_pc", dict(order=5), False), ("ipndm", dict(order=0), False), ("deis", dict(rho=0.0), False),
    ("pc", dict(n_corrector=True), False), ("pc", dict(n_corrector=0), True), ("pc", dict(snr=0.0), False),
    ("langevin", dict(n_steps=0), False), ("langevin", dict(eps=1e-5, n_steps=3), True),
    ("langevin", dict(final_denoise=1), False), ("adaptive", dict(rtol=-1e-3), False),
    ("adaptive", dict(rtol=1e-4, atol=1e-6), True), ("ddpm", dict(variance="beta_tilde"), True),
])
def test_option_values_checked_before_any_sampling(name, options, ok):
    """sampler_nfe (what sampling.plan calls before any work) accepts exactly the allowed values."""
    if ok:
        S.sampler_nfe(name, 4, **options)
    else:
        with pytest.raises(ValueError, match=f"option {next(iter(options))}="):
            S.sampler_nfe(name, 4, **options)


def test_bad_input():
    x, sigmas = torch.randn(4, 2, dtype=F64), S.get_sigmas("edm", 4)
    with pytest.raises(TypeError, match="S_churnn"):
        S.edm_sde(ring8(), x, sigmas, S_churnn=1.0)
    with pytest.raises(TypeError, match="bogus"):
        S.sampler_nfe("heun", 4, bogus=1)
    with pytest.raises(ValueError, match="unknown grid kind 'karras'"):
        S.get_sigmas("karras", 10)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.get_sampler("euler_a")
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.euler(ring8(), x, sigmas.flip(0))
    with pytest.raises(ValueError, match="positive number of steps"):
        S.get_sigmas("edm", 0)
    with pytest.raises(ValueError, match="0 < min < max"):
        S.get_sigmas("edm", 5, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="exceed"):
        S.get_sigmas("ddpm", 1001)
    with pytest.raises(ValueError, match="eta"):
        S.ddim(ring8(), x, sigmas, eta=2.0)
    with pytest.raises(ValueError, match="variance"):
        S.ddpm(ring8(), x, sigmas, variance="learned")


def test_unit_prior_is_ddpm_algorithm_2s_unit_noise_in_z():
    """prior 'unit': z_T = alpha_T x~ = eps ~ N(0, I) (Ho et al. 2020, Algorithm 2, line 1) with
    alpha_T = 1 / sqrt(1 + sigma_T^2) of the VP chain; 'sigma' is EDM's sigma_max eps; inf keeps eps."""
    from diffspace.samplers import initial_state

    eps = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = 157.0
    torch.testing.assert_close(initial_state(eps, sigma, "unit") / math.sqrt(1 + sigma**2), eps)
    torch.testing.assert_close(initial_state(eps, sigma), sigma * eps)
    assert initial_state(eps, math.inf, "unit") is eps
    with pytest.raises(ValueError, match="prior='vp'.*sigma, unit"):
        initial_state(eps, sigma, "vp")
