"""Gaussian mixtures against independent computations: scipy densities, autograd, Monte Carlo,
the closed-form Wiener filter, and sample moments."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from diffspace.analytic import MIXTURES, GaussianMixture, checkerboard, image_like64, ring8

F64 = torch.float64


def random_mixture(kind, K=3, d=4, seed=0) -> GaussianMixture:
    """kind: "diagonal", "full" (all eigenvalues distinct), "lowrank" (rank-2 plus isotropic)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=F64) + 0.2
    mu = 2 * torch.randn(K, d, generator=g, dtype=F64)
    if kind != "diagonal":
        A = torch.randn(K, d, d if kind == "full" else 2, generator=g, dtype=F64) * 0.5
        covs = A @ A.mT + 0.1 * torch.eye(d, dtype=F64)
    else:
        covs = torch.rand(K, d, generator=g, dtype=F64) * 0.5 + 0.05
    return GaussianMixture(w, mu, covs)


def full_covs(gm: GaussianMixture) -> np.ndarray:
    return gm.covs.numpy()


def points(gm, n=16, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return gm.sample(n, generator=g) + scale * torch.randn(n, gm.dim, generator=g, dtype=F64)


MIXES = ["diagonal", "full", "lowrank"]
SIGMAS = [0.0, 0.03, 0.5, 3.0, 100.0]


@pytest.mark.parametrize("kind", MIXES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_log_prob_matches_scipy(kind, sigma):
    gm = random_mixture(kind)
    x = points(gm, scale=max(sigma, 0.3))
    w, mu, C = gm.weights.numpy(), gm.means.numpy(), full_covs(gm)
    eye = np.eye(gm.dim)
    comps = [np.log(w[k]) + multivariate_normal(mu[k], C[k] + sigma**2 * eye).logpdf(x.numpy()) for k in range(gm.K)]
    ref = logsumexp(np.stack(comps, axis=-1), axis=-1)
    np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.1, 80.0])
def test_image_like64_log_prob_matches_scipy(sigma):
    gm = image_like64()
    x = points(gm, n=4, scale=max(sigma, 0.1))
    w, mu, C = gm.weights.numpy(), gm.means.numpy(), full_covs(gm)
    eye = np.eye(gm.dim)
    comps = [np.log(w[k]) + multivariate_normal(mu[k], C[k] + sigma**2 * eye).logpdf(x.numpy()) for k in range(gm.K)]
    ref = logsumexp(np.stack(comps, axis=-1), axis=-1)
    np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", MIXES)
def test_sample_moments(kind):
    gm = random_mixture(kind)
    n = 200_000
    xs = gm.sample(n, generator=torch.Generator().manual_seed(0)).numpy()
    # the mixture moment formulas, written independently: Cov = sum_k w_k (C_k + (mu_k - m)(mu_k - m)^T)
    w, mu, C = gm.weights.numpy(), gm.means.numpy(), full_covs(gm)
    m = w @ mu
    cov = np.einsum("k,kij->ij", w, C + np.einsum("ki,kj->kij", mu - m, mu - m))
    np.testing.assert_allclose(gm.mean.numpy(), m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gm.covariance.numpy(), cov, rtol=1e-12, atol=1e-12)
    assert gm.sigma_data == pytest.approx(math.sqrt(np.trace(cov) / gm.dim), rel=1e-12)
    # empirical moments within 5 standard errors
    emp_m = xs.mean(0)
    assert np.all(np.abs(emp_m - m) < 5 * np.sqrt(np.diag(cov) / n))
    dev = xs - emp_m
    prods = dev[:, :, None] * dev[:, None, :]
    se = prods.std(0) / math.sqrt(n)
    assert np.all(np.abs(prods.mean(0) - cov) < 5 * se)


@pytest.mark.parametrize("kind", MIXES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_is_autograd_gradient_of_log_prob(kind, sigma):
    gm = random_mixture(kind)
    x = points(gm, scale=max(sigma, 0.3)).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", MIXES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_denoiser_is_tweedie(kind, sigma):
    gm = random_mixture(kind)
    x = points(gm, scale=max(sigma, 0.3)).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
    x = x.detach()
    torch.testing.assert_close(gm.denoiser(x, sigma), x + sigma**2 * grad, rtol=1e-9, atol=1e-9 * max(1, sigma))
    torch.testing.assert_close(gm(x, sigma), gm.denoiser(x, sigma), rtol=0, atol=0)


@pytest.mark.parametrize("kind", MIXES)
def test_denoiser_matches_monte_carlo_posterior_mean(kind):
    """Self-normalised importance sampling: x0 ~ p, weights N(x~; x0, sigma^2 I)."""
    gm, sigma, n = random_mixture(kind), 0.7, 200_000
    x0 = gm.sample(n, generator=torch.Generator().manual_seed(3)).numpy()
    xt = points(gm, n=6, scale=sigma, seed=4)
    den = gm.denoiser(xt, sigma).numpy()
    for i, x in enumerate(xt.numpy()):
        logw = -0.5 * ((x - x0) ** 2).sum(1) / sigma**2
        w = np.exp(logw - logw.max())
        w /= w.sum()
        est = w @ x0
        se = np.sqrt((w[:, None] ** 2 * (x0 - est) ** 2).sum(0))  # delta-method standard error
        assert np.all(np.abs(den[i] - est) < 5 * se + 1e-12), (den[i], est, se)


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("sigma", [0.0, 0.1, 1.0, 30.0])
def test_single_gaussian_is_wiener_filter(sigma, rank):
    d = 4
    g = torch.Generator().manual_seed(5)
    A = torch.randn(d, rank, generator=g, dtype=F64)
    C, mu = A @ A.T + 0.2 * torch.eye(d, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    gm = GaussianMixture([1.0], mu[None], C[None])
    x = torch.randn(8, d, generator=g, dtype=F64) * 2
    wiener = mu + (x - mu) @ torch.linalg.solve(C + sigma**2 * torch.eye(d, dtype=F64), C).T
    torch.testing.assert_close(gm.denoiser(x, sigma), wiener, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MIXES)
def test_sigma_limits(kind):
    gm = random_mixture(kind)
    x = points(gm, scale=0.5)
    assert torch.equal(gm.denoiser(x, 0.0), x)
    torch.testing.assert_close(gm.denoiser(x, 1e-7), x, rtol=0, atol=1e-9)
    xt = points(gm, scale=1e3)
    d = gm.denoiser(xt, 1e3)
    assert torch.isfinite(d).all() and torch.isfinite(gm.log_prob(xt, 1e3)).all()
    torch.testing.assert_close(d, gm.mean.expand_as(d), rtol=0, atol=0.05)


@pytest.mark.parametrize("kind", MIXES)
def test_per_sample_sigma_equals_loop(kind):
    gm = random_mixture(kind)
    x = points(gm, n=7, scale=0.5)
    sig = torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=F64)
    for f in (gm.denoiser, gm.score, gm.log_prob):
        loop = torch.stack([f(x[i : i + 1], float(sig[i]))[0] for i in range(len(sig))])
        torch.testing.assert_close(f(x, sig), loop, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f(x, torch.full((7,), 0.3, dtype=F64)), f(x, 0.3), rtol=1e-12, atol=1e-12)


def test_float32_in_float32_out():
    gm = random_mixture("full")
    x = points(gm)
    for f in (gm.denoiser, gm.score, gm.log_prob):
        out = f(x.float(), torch.tensor(0.5))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, f(x, 0.5).float(), rtol=1e-5, atol=1e-5)


def test_ready_made_instances():
    assert set(MIXTURES) == {"ring8", "checkerboard", "image64"}
    r = ring8()
    assert (r.dim, r.K) == (2, 8)
    torch.testing.assert_close(r.means.norm(dim=1), torch.ones(8, dtype=F64))
    c = checkerboard()
    assert c.dim == 2 and c.K == 8 * 9
    im = image_like64()
    assert im.dim == 64 and 0.4 <= im.sigma_data <= 0.6 and im.U is not None
    assert image_like64(seed=0).means.equal(im.means) and not image_like64(seed=1).means.equal(im.means)
    for gm in (r, c, im):
        x = gm.sample(64, generator=torch.Generator().manual_seed(0))
        assert x.shape == (64, gm.dim) and torch.isfinite(gm.denoiser(x, 0.5)).all()


@pytest.mark.parametrize(
    "weights, means, covs, match",
    [
        ([1.0, -0.5], [[0.0], [1.0]], [[1.0], [1.0]], "weights"),
        ([0.0, 0.0], [[0.0], [1.0]], [[1.0], [1.0]], "weights"),
        ([[1.0, 1.0]], [[0.0], [1.0]], [[1.0], [1.0]], "weights"),
        ([1.0, 1.0], [[0.0], [1.0], [2.0]], [[1.0], [1.0]], "means"),
        ([1.0, 1.0], [[0.0], [1.0]], [[1.0, 1.0]], "covs"),
        ([1.0, 1.0], [[0.0], [1.0]], [[1.0], [0.0]], r"covs\[1\]"),
        ([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]], r"covs\[0\].*positive definite"),
        ([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]], r"covs\[0\].*symmetric"),
    ],
)
def test_bad_parameters_raise(weights, means, covs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(weights, means, covs)


def test_bad_inputs_raise():
    gm = ring8()
    x = torch.zeros(3, 2)
    for sigma in (-0.1, torch.tensor([0.1, -1.0, 0.2]), float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            gm.denoiser(x, sigma)
    with pytest.raises(ValueError, match="sigma"):
        gm.denoiser(x, torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        gm.denoiser(torch.zeros(3, 3), 0.1)


def test_low_rank_covariances_use_the_spiked_form():
    """rank-2-plus-isotropic covariances keep 2 eigen-directions per component (the fast path)."""
    assert random_mixture("lowrank")._on("cpu")["lam_r"].shape == (3, 2)
    assert image_like64()._on("cpu")["lam_r"].shape == (32, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gm = image_like64()
    x, sig = points(gm, n=32, scale=0.5), torch.rand(32, dtype=F64)
    for f in (gm.denoiser, gm.score, gm.log_prob):
        out = f(x.float().cuda(), sig.cuda())
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), f(x, sig).float(), rtol=1e-5, atol=1e-5)
    assert gm.sample(8, generator=torch.Generator("cuda").manual_seed(0)).device.type == "cuda"
