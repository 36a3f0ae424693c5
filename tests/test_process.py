"""Forward process, posteriors, KL/likelihood terms and the VLB, against independent computations."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy.stats import norm

from diffspace import parameterization as P
from diffspace import process as Q
from diffspace import schedules as S

F64 = torch.float64
SCHEDULES = {name: make() for name, make in S.SCHEDULES.items()}
VP = ["ddpm-linear", "vp-sde", "cosine"]


def times(schedule):
    """Pairs s < t inside the schedule's domain (EDM-like schedules: t is sigma or sigma^2)."""
    t = torch.tensor([0.05, 0.3, 0.6, 0.95, 1.0], dtype=F64)
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.7], dtype=F64)
    scale = 20.0 if schedule.t_max == math.inf else 1.0
    return s * scale, t * scale


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- forward process and posterior --------------------------------------------------------------
def test_q_sample_is_alpha_x_plus_sigma_eps_and_reproducible():
    sch = S.Cosine()
    x, t = rand(4, 3), torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=F64)
    z, eps = Q.q_sample(x, t, sch, generator=torch.Generator().manual_seed(3))
    z2, eps2 = Q.q_sample(x, t, sch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, z2) and torch.equal(eps, eps2)
    torch.testing.assert_close(z, sch.alpha(t)[:, None] * x + sch.sigma(t)[:, None] * eps, rtol=0, atol=1e-15)
    z3, eps3 = Q.q_sample(x, t, sch, eps=eps)
    assert eps3 is eps and torch.equal(z3, z)


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_is_normalised_product_of_the_two_gaussians(name):
    sch = SCHEDULES[name]
    s, t = times(sch)
    x, z_t = rand(5, 3, seed=1), rand(5, 3, seed=2)
    a_s, sg_s, a_t, sg_t = (c[:, None] for c in (sch.alpha(s), sch.sigma(s), sch.alpha(t), sch.sigma(t)))
    a_ts = a_t / a_s
    v_ts = sg_t**2 - a_ts**2 * sg_s**2
    # q(z_s | z_t, x) ∝ N(z_t; a_ts z_s, v_ts) N(z_s; a_s x, sg_s^2): add precisions, weight means
    prec = a_ts**2 / v_ts + 1 / sg_s**2
    mean = (a_ts * z_t / v_ts + a_s * x / sg_s**2) / prec
    var = (1 / prec).expand_as(mean).clone()
    # where sigma_s = 0 (s = 0 of most schedules) q(z_s | z_t, x) is the point mass at alpha_s x
    if sg_s[0] == 0:
        mean[0], var[0] = a_s[0] * x[0], 0.0
    got_mean, got_var = Q.posterior(x, z_t, s, t, sch)
    torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_var.expand_as(var), var, rtol=1e-9, atol=1e-15)
    a_ts_got, v_ts_got = Q.transition(sch, s, t)
    torch.testing.assert_close(a_ts_got, a_ts[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(v_ts_got, v_ts[:, 0], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", ["ddpm-linear", "ve", "rectified-flow"])
def test_posterior_by_monte_carlo_regression(name):
    """Draw z_s ~ q(z_s|x), z_t ~ q(z_t|z_s); least squares of z_s on (z_t, 1) estimates the
    linear conditional mean, the residual variance estimates the posterior variance."""
    sch = SCHEDULES[name]
    s, t, x, n = torch.tensor(0.3, dtype=F64), torch.tensor(0.6, dtype=F64), 0.7, 100_000
    g = torch.Generator().manual_seed(0)
    z_s = sch.alpha(s) * x + sch.sigma(s) * torch.randn(n, generator=g, dtype=F64)
    a_ts = sch.alpha(t) / sch.alpha(s)
    z_t = a_ts * z_s + torch.sqrt(sch.sigma(t) ** 2 - a_ts**2 * sch.sigma(s) ** 2) * torch.randn(n, generator=g, dtype=F64)
    A = torch.stack([z_t, torch.ones_like(z_t)], 1)
    coef = torch.linalg.lstsq(A, z_s[:, None]).solution[:, 0]
    resid_var = ((z_s - A @ coef) ** 2).sum() / (n - 2)
    se = torch.sqrt(torch.diag(resid_var * torch.linalg.inv(A.T @ A)))
    # the module's posterior at z_t = 0 and z_t = 1 gives intercept and slope
    mean, var = Q.posterior(torch.full((2,), x, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), s, t, sch)
    slope, intercept = mean[1] - mean[0], mean[0]
    assert abs(coef[0] - slope) < 4 * se[0]
    assert abs(coef[1] - intercept) < 4 * se[1]
    assert abs(resid_var - var) < 4 * var * math.sqrt(2 / n)


def test_posterior_rejects_s_not_before_t():
    sch = S.VPSDE()
    with pytest.raises(ValueError, match="s < t"):
        Q.posterior(rand(2, 1), rand(2, 1), torch.tensor([0.1, 0.5]), torch.tensor([0.4, 0.5]), sch)
    with pytest.raises(ValueError, match="s < t"):
        Q.transition(sch, 0.6, 0.2)


# -- DDPM chain ---------------------------------------------------------------------------------
def test_ddpm_posterior_matches_general_posterior_and_beta_tilde_below_beta():
    sch = S.ddpm_linear()
    i = torch.tensor([1, 2, 10, 500, 999, 1000])
    x0, x_t = rand(6, 4, seed=3), rand(6, 4, seed=4)
    mean, var = Q.ddpm_posterior(x0, x_t, i, sch)
    gmean, gvar = Q.posterior(x0, x_t, sch.discrete_t(i - 1), sch.discrete_t(i), sch)
    torch.testing.assert_close(mean, gmean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var.expand_as(gvar), gvar.expand_as(var), rtol=1e-9, atol=1e-15)
    bt, beta, abar = Q.beta_tilde(sch), sch.betas, sch.alphas_bar
    assert bt[0] == 0 and bool((bt[1:] < beta[1:]).all()) and bool((bt[1:] > 0).all())
    torch.testing.assert_close(bt[1:], (1 - abar[1:-1]) / (1 - abar[2:]) * beta[1:], rtol=1e-12, atol=0)


def test_reverse_variances():
    sch = S.ddpm_linear(T=50)
    assert torch.equal(Q.reverse_variance(sch, "beta_plain"), sch.betas)
    small, large = Q.reverse_variance(sch, "beta_tilde"), Q.reverse_variance(sch, "beta")
    assert torch.equal(small[1:], Q.beta_tilde(sch)[1:]) and small[0] == small[1]
    assert torch.equal(large[1:], sch.betas[1:]) and large[0] == small[1]  # Ho et al.'s code: beta~_2 at t = 1
    with pytest.raises(ValueError, match="reverse variance"):
        Q.reverse_variance(sch, "learned")
    with pytest.raises(ValueError, match="DiscreteVP"):
        Q.beta_tilde(S.VPSDE())
    with pytest.raises(ValueError, match="outside 1..50"):
        Q.ddpm_posterior(rand(1, 1), rand(1, 1), 0, sch)


# -- posterior means per parameterization -------------------------------------------------------
def lecture_table(x0, z, s, t, sch):
    """Rows of the lecture's slide "多种参数化方法" (posterior mean mu_theta(z_t; s, t)), typed from
    the slide, with the predictions formed from x0-hat by their definitions. The x0, eps, score
    and energy rows hold for every schedule; the v row only for VP schedules (alpha^2 + sigma^2 = 1)
    and the flow row only for rectified flow (alpha = 1 - t, sigma = t)."""
    a_s, sg_s, a_t, sg_t = (c[:, None] for c in (sch.alpha(s), sch.sigma(s), sch.alpha(t), sch.sigma(t)))
    a_ts = a_t / a_s
    v_ts = sg_t**2 - a_ts**2 * sg_s**2
    eps = (z - a_t * x0) / sg_t
    preds = {"x0": x0, "eps": eps, "score": -eps / sg_t, "energy": eps / sg_t, "v": a_t * eps - sg_t * x0, "flow": eps - x0}
    rows = {
        "x0": a_ts * sg_s**2 / sg_t**2 * z + a_s * v_ts / sg_t**2 * preds["x0"],
        "eps": z / a_ts - v_ts / (a_ts * sg_t) * preds["eps"],
        "score": z / a_ts + v_ts / a_ts * preds["score"],
        "energy": z / a_ts - v_ts / a_ts * preds["energy"],
        "v": (1 - v_ts) / a_ts * z - v_ts * a_s / sg_t * preds["v"],
        "flow": (sg_t - v_ts) / (a_ts * sg_t) * z - v_ts * a_s / sg_t * preds["flow"],
    }
    return preds, rows


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_mean_matches_lecture_table(name):
    sch = SCHEDULES[name]
    s, t = times(sch)
    s, t = s[1:4], t[1:4]  # alpha_t > 0 for the table's 1 / alpha_{t|s}
    x0, z = rand(3, 5, seed=5), rand(3, 5, seed=6)
    preds, rows = lecture_table(x0, z, s, t, sch)
    kinds = ["x0", "eps", "score", "energy"] + ["v"] * (name in VP) + ["flow"] * (name == "rectified-flow")
    for kind in kinds:
        got = Q.posterior_mean(preds[kind], kind, z, s, t, sch)
        torch.testing.assert_close(got, rows[kind], rtol=1e-9, atol=1e-10, msg=kind)


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_mean_of_every_parameterization_equals_x0_form(name):
    sch = SCHEDULES[name]
    s, t = times(sch)
    s, t = s[1:4], t[1:4]
    x0, z = rand(3, 5, seed=7), rand(3, 5, seed=8)
    expected = Q.posterior(x0, z, s, t, sch)[0]
    for kind in P.PARAMETERIZATIONS:
        pred = P.from_x0(x0, kind, z, t, sch)
        torch.testing.assert_close(Q.posterior_mean(pred, kind, z, s, t, sch), expected, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="unknown parameterization"):
        Q.posterior_mean(x0, "mu", z, s, t, sch)


# -- KL and decoder -----------------------------------------------------------------------------
def test_gaussian_kl_against_monte_carlo():
    m1, v1, m2, v2 = 0.3, 0.5, -0.4, 1.7
    n = 200_000
    x = m1 + math.sqrt(v1) * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    log_ratio = norm.logpdf(x.numpy(), m1, math.sqrt(v1)) - norm.logpdf(x.numpy(), m2, math.sqrt(v2))
    kl = Q.gaussian_kl(*(torch.tensor(v, dtype=F64) for v in (m1, v1, m2, v2)))
    assert abs(log_ratio.mean() - kl.item()) < 4 * log_ratio.std() / math.sqrt(n)
    differ = Q.gaussian_kl(rand(3), torch.full((3,), 0.2, dtype=F64), rand(3, seed=1), torch.full((3,), 0.2, dtype=F64))
    assert bool((differ > 0).all())
    m = rand(4)
    assert torch.equal(Q.gaussian_kl(m, m.exp(), m, m.exp()), torch.zeros(4, dtype=F64))


LEVELS = torch.arange(256, dtype=F64) * 2 / 255 - 1


@pytest.mark.parametrize(
    "mean,var",
    [(0.0, 0.1), (0.3, 1e-4), (0.3, 1e-12), (-1.0, 1e-6), (5.0, 1e-8), (-40.0, 1.0), (0.0, 1e6), (0.99, 1e-3)],
)
def test_decoder_bins_sum_to_one(mean, var):
    ll = Q.discretized_gaussian_log_likelihood(LEVELS, torch.tensor(mean, dtype=F64), torch.tensor(var, dtype=F64))
    assert abs(ll.exp().sum().item() - 1) < 1e-6


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_decoder_bins_of_any_quantization_sum_to_one_and_match_scipy(levels):
    """Digits have 17 grey levels: x = 2k/16 - 1, bins of half-width 1/16 (edge bins open)."""
    x = torch.arange(levels, dtype=F64) * 2 / (levels - 1) - 1
    mean, std = 0.1, 0.4
    ll = Q.discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=F64), torch.tensor(std**2, dtype=F64), levels)
    assert abs(ll.exp().sum().item() - 1) < 1e-12
    h = 1 / (levels - 1)
    hi = np.where(x.numpy() > 1 - h, np.inf, x.numpy() + h)
    lo = np.where(x.numpy() < -1 + h, -np.inf, x.numpy() - h)
    np.testing.assert_allclose(ll.exp().numpy(), norm.cdf(hi, mean, std) - norm.cdf(lo, mean, std), rtol=1e-10)
    with pytest.raises(ValueError, match="levels=1"):
        Q.discretized_gaussian_log_likelihood(x, x, x.exp(), 1)


def test_learned_variance_interpolates_beta_and_beta_tilde_in_log_space():
    """Nichol & Dhariwal (2021, eq. 15): v = 1 gives beta_t (beta_1 at t = 1, as in improved-diffusion),
    v = 0 beta~_t (beta~_2 at t = 1), v = 1/2 their geometric mean; elementwise."""
    sch = S.ddpm_linear(T=50)
    i = torch.tensor([1, 2, 30, 50])
    beta, tilde = Q.reverse_variance(sch, "beta_plain")[i - 1], Q.reverse_variance(sch, "beta_tilde")[i - 1]
    one, zero = torch.ones(4, 3, dtype=F64), torch.zeros(4, 3, dtype=F64)
    torch.testing.assert_close(Q.learned_variance(one, i, sch), beta[:, None].expand(4, 3), rtol=1e-12, atol=0)
    torch.testing.assert_close(Q.learned_variance(zero, i, sch), tilde[:, None].expand(4, 3), rtol=1e-12, atol=0)
    torch.testing.assert_close(Q.learned_variance(one / 2, i, sch), (beta * tilde).sqrt()[:, None].expand(4, 3), rtol=1e-12, atol=0)


def test_decoder_against_scipy_and_stable_in_tails():
    mean, std = 0.2, 0.3
    ll = Q.discretized_gaussian_log_likelihood(LEVELS, torch.tensor(mean, dtype=F64), torch.tensor(std**2, dtype=F64))
    x = LEVELS.numpy()
    upper = np.where(x > 1 - 1e-9, 1.0, norm.cdf(x + 1 / 255, mean, std))
    lower = np.where(x < -1 + 1e-9, 0.0, norm.cdf(x - 1 / 255, mean, std))
    np.testing.assert_allclose(ll.numpy(), np.log(upper - lower), rtol=1e-9)
    # far tails: finite, with finite gradients, and matching the tail asymptotics of the log-CDF
    mean = torch.tensor([0.9, -0.9, 0.0], dtype=F64, requires_grad=True)
    x = torch.tensor([-1.0, 1.0, LEVELS[60].item()])
    ll = Q.discretized_gaussian_log_likelihood(x.to(F64), mean, torch.tensor(1e-4, dtype=F64))
    ll.sum().backward()
    assert bool(torch.isfinite(ll).all()) and bool(torch.isfinite(mean.grad).all())
    expected = norm.logsf((0.9 - (-1 + 1 / 255)) / 0.01)  # log Phi(-(distance to the bin edge) / std)
    assert abs(ll[0].item() - expected) < 1e-9 * abs(expected)


# -- the bound ----------------------------------------------------------------------------------
def test_prior_term_of_ddpm_linear_is_negligible():
    """Ho et al. (2020, sec. 4): L_T ~ 1e-5 bits/dim. Uniform data on [-1, 1] stays below that;
    the worst case |x| = 1 is 0.5 abar_T / ln 2 ~ 3e-5 bits/dim."""
    sch = S.ddpm_linear()
    x = LEVELS.reshape(1, 256)
    abar = sch.alphas_bar[-1].item()
    per_dim = 0.5 * (abar * x**2 - abar - math.log1p(-abar))  # KL(N(a x, 1 - abar) || N(0, 1))
    nats = Q.prior_kl(x, sch)
    torch.testing.assert_close(nats, per_dim.sum(1), rtol=1e-10, atol=0)
    assert Q.bits_per_dim(nats, x).item() < 1e-5
    worst = Q.bits_per_dim(Q.prior_kl(torch.ones(1, 3, dtype=F64), sch), torch.ones(1, 3))
    assert worst.item() < 3e-5


def gaussian_chain(sch, m, s):
    """For x0 ~ N(m, s^2): the exact reverse transitions q(x_{t-1} | x_t) = N(a_t x_t + b_t, c_t),
    t = 1..T, from the joint Gaussian of (x_{t-1}, x_t)."""
    abar, beta = sch.alphas_bar, sch.betas
    mean = abar.sqrt() * m  # marginal means, index 0..T
    var = abar * s**2 + 1 - abar  # marginal variances
    cov = (1 - beta).sqrt() * var[:-1]  # Cov(x_{t-1}, x_t)
    gain = cov / var[1:]
    return gain, mean[:-1] - gain * mean[1:], var[:-1] - gain * cov, (mean[-1], var[-1])


def quadrature_vlb(sch, m, s, model_var_fn, nodes=4):
    """E over x0 ~ N(m, s^2), eps ~ N(0, 1) of the bound, exact by Gauss-Hermite quadrature (all
    terms are quadratic in (x0, eps)), with p_theta(x_{t-1}|x_t) = N(exact mean, model_var_fn)."""
    xi, w = hermegauss(nodes)
    w = w / w.sum()
    X, E = (torch.tensor(a, dtype=F64).reshape(-1) for a in np.meshgrid(xi, xi, indexing="ij"))
    W = torch.tensor(np.outer(w, w).reshape(-1), dtype=F64)
    x0 = (m + s * X).repeat(sch.T)[:, None]
    eps = E.repeat(sch.T)[:, None]
    i = torch.arange(1, sch.T + 1).repeat_interleave(len(X))
    abar_i = sch.alphas_bar[i][:, None]
    x_t = abar_i.sqrt() * x0 + (1 - abar_i).sqrt() * eps
    gain, shift, cvar, _ = gaussian_chain(sch, m, s)
    mean = gain[i - 1][:, None] * x_t + shift[i - 1][:, None]
    terms = Q.vlb_term(x0, x_t, i, mean, model_var_fn(cvar)[i - 1], sch, decoder="gaussian")
    prior = Q.prior_kl((m + s * X)[:, None], sch)
    return (W * prior).sum() + (W.repeat(sch.T) * terms).sum()


def test_gaussian_data_vlb_equals_entropy_plus_prior_mismatch():
    sch, m, s = S.ddpm_linear(), 0.3, 0.5
    H = 0.5 * math.log(2 * math.pi * math.e * s**2)
    exact = quadrature_vlb(sch, m, s, lambda cvar: cvar).item()
    _, _, _, (mT, vT) = gaussian_chain(sch, m, s)
    kl_T = Q.gaussian_kl(mT, vT, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)).item()
    assert abs(exact - H - kl_T) < 1e-9
    assert abs(exact - H) < 1e-3
    for kind in Q.REVERSE_VARIANCES:
        fixed = quadrature_vlb(sch, m, s, lambda cvar: Q.reverse_variance(sch, kind)).item()
        assert fixed > exact + 1e-6, kind


def test_quadrature_matches_monte_carlo_vlb():
    """The quadrature and the sampled bounds agree (ties `vlb`, `vlb_one_t` to the exact
    computation above); a short, weakly noising chain makes the prior term L_T ~ 0.1 nats."""
    sch, m, s, n = S.DiscreteVP(torch.linspace(0.01, 0.1, 20, dtype=F64)), 0.3, 0.5, 20_000
    gain, shift, _, _ = gaussian_chain(sch, m, s)
    beta = Q.reverse_variance(sch, "beta")
    model = lambda x_t, i: (gain[i - 1][:, None] * x_t + shift[i - 1][:, None], beta[i - 1])
    exact = quadrature_vlb(sch, m, s, lambda cvar: beta).item()
    x0 = m + s * rand(n, 1, seed=9)
    for estimate in (Q.vlb, Q.vlb_one_t):
        mc = estimate(x0, model, sch, generator=torch.Generator().manual_seed(1), decoder="gaussian")
        assert abs(mc.mean().item() - exact) < 4 * mc.std().item() / math.sqrt(n), estimate.__name__


def test_vlb_one_t_is_unbiased_for_vlb():
    sch = S.DiscreteVP(torch.linspace(0.02, 0.4, 20, dtype=F64))
    x0 = LEVELS[torch.tensor([[10, 128], [250, 60]])].repeat(10_000, 1)
    # a model that is badly off at the last step i = T: dropping any step from the draw shows
    def model(x_t, i):
        mean = 0.9 * x_t / (1 - sch.betas[i - 1][:, None]).sqrt() + 2.0 * (i == sch.T)[:, None]
        return mean, sch.betas[i - 1]

    full = Q.vlb(x0[:4000], model, sch, generator=torch.Generator().manual_seed(0))
    one = Q.vlb_one_t(x0, model, sch, generator=torch.Generator().manual_seed(1))
    se = math.sqrt(full.var().item() / len(full) + one.var().item() / len(one))
    assert abs(full.mean().item() - one.mean().item()) < 4 * se
    # and it is L_T + T L_{i-1} at the (x_i, i) it handed to the model
    seen = []
    one = Q.vlb_one_t(x0[:8], lambda x_t, i: seen.append((x_t, i)) or model(x_t, i), sch)
    (x_t, i), = seen
    torch.testing.assert_close(one, Q.prior_kl(x0[:8], sch) + sch.T * Q.vlb_term(x0[:8], x_t, i, *model(x_t, i), sch))
    bpd = Q.bits_per_dim(full, x0[:4000])
    torch.testing.assert_close(bpd, full / (2 * math.log(2)))


def test_vlb_term_gradients_are_finite_at_the_decoder_step():
    """At i = 1 the unused KL branch has var1 = 0; it must not poison the gradients."""
    sch = S.ddpm_linear(T=10)
    x0 = LEVELS.reshape(4, 64)
    mean = torch.zeros(4, 64, dtype=F64, requires_grad=True)
    var = torch.full((4,), 0.01, dtype=F64, requires_grad=True)
    for decoder in Q.DECODERS:
        Q.vlb_term(x0, x0 + 0.1, torch.tensor([1, 1, 2, 10]), mean, var, sch, decoder=decoder).sum().backward()
        assert bool(torch.isfinite(mean.grad).all()) and bool(torch.isfinite(var.grad).all()), decoder


def test_vlb_term_rejects_unknown_decoder():
    sch = S.ddpm_linear(T=10)
    with pytest.raises(ValueError, match="unknown decoder"):
        Q.vlb_term(rand(2, 1), rand(2, 1), 1, rand(2, 1), 1.0, sch, decoder="logistic")
