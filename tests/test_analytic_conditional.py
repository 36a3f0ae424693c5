"""Labels and conditioning of Gaussian mixtures against independent computations: scipy densities and
Bayes' rule by hand, the precision-form Gaussian posterior and conditional, autograd, Monte Carlo."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal as mvn

from diffspace.analytic import GaussianMixture, image_like64, ring8

F64 = torch.float64


def random_mixture(K=3, d=3, seed=0, diagonal=False) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=F64) + 0.2
    mu = 1.5 * torch.randn(K, d, generator=g, dtype=F64)
    if diagonal:
        return GaussianMixture(w, mu, torch.rand(K, d, generator=g, dtype=F64) * 0.5 + 0.1)
    A = 0.6 * torch.randn(K, d, d, generator=g, dtype=F64)
    return GaussianMixture(w, mu, A @ A.mT + 0.1 * torch.eye(d, dtype=F64))


def params(gm):
    """(w, mu, C) as numpy arrays, full covariances."""
    return gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy()


def points(gm, n=12, scale=0.7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return gm.sample(n, g) + scale * torch.randn(n, gm.dim, generator=g, dtype=F64)


def bayes_log_posterior(gm, x, sigma):
    """log p(k | x~) = log w_k + log N(x~; mu_k, C_k + sigma^2 I) - logsumexp, with scipy."""
    w, mu, C = params(gm)
    d = gm.dim
    lj = np.stack([np.log(w[k]) + np.atleast_1d(mvn(mu[k], C[k] + sigma**2 * np.eye(d)).logpdf(x.numpy()))
                   for k in range(gm.K)], -1)
    return lj - logsumexp(lj, axis=-1, keepdims=True)


MIXES = {"ring8": ring8, "full": random_mixture, "image64": lambda: image_like64(K=4)}


# -- sample(return_labels=True) -----------------------------------------------------------------------
@pytest.mark.parametrize("make", [ring8, random_mixture])
def test_sample_labels_same_draw_and_component_means(make):
    gm, n = make(), 40000
    x0 = gm.sample(n, torch.Generator().manual_seed(3))
    x, k = gm.sample(n, torch.Generator().manual_seed(3), return_labels=True)
    assert torch.equal(x, x0) and k.dtype == torch.int64 and k.shape == (n,)
    assert int(k.min()) >= 0 and int(k.max()) < gm.K
    w, mu, C = params(gm)
    freq = np.bincount(k.numpy(), minlength=gm.K) / n
    assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / n))
    for j in range(gm.K):
        xj = x[k == j].numpy()
        se = np.sqrt(np.diag(C[j]) / len(xj))
        assert np.all(np.abs(xj.mean(0) - mu[j]) < 5 * se), j


# -- log_posterior -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.7, 3.0])
def test_log_posterior_is_bayes_rule(sigma):
    gm = random_mixture()
    x = points(gm)
    lp = gm.log_posterior(x, sigma)
    assert lp.shape == (12, 3) and lp.dtype == F64
    np.testing.assert_allclose(lp.exp().sum(-1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lp.numpy(), bayes_log_posterior(gm, x, sigma), rtol=1e-8, atol=1e-10)


def test_log_posterior_per_sample_sigma_dtype_and_prior_limit():
    gm = random_mixture()
    x = points(gm, n=4)
    sig = torch.tensor([0.0, 0.2, 1.0, 5.0], dtype=F64)
    lp = gm.log_posterior(x, sig)
    for b in range(4):
        expect = bayes_log_posterior(gm, x[b : b + 1], float(sig[b]))[0]
        np.testing.assert_allclose(lp[b].numpy(), expect, rtol=1e-8, atol=1e-10)
    assert gm.log_posterior(x.float(), 0.5).dtype == torch.float32
    # sigma -> infinity: the noisy point carries no information, the posterior is the prior
    prior = np.broadcast_to(gm.weights.numpy(), (4, 3))
    np.testing.assert_allclose(gm.log_posterior(x, 1e5).exp().numpy(), prior, atol=1e-8)


# -- conditional_denoiser ------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5, 4.0])
def test_conditional_denoiser_is_gaussian_posterior_mean(sigma):
    """Posterior of x0 ~ N(mu, C) given x~ = x0 + sigma eps, in precision form (PRML eq. 2.116 with A = I):
    Sigma = (C^{-1} + I / sigma^2)^{-1}, mean = Sigma (C^{-1} mu + x~ / sigma^2)."""
    for gm in (random_mixture(), random_mixture(diagonal=True)):
        x = points(gm, n=6)
        labels = torch.tensor([0, 1, 2, 2, 1, 0])
        got = gm.conditional_denoiser(x, sigma, labels).numpy()
        w, mu, C = params(gm)
        for b, k in enumerate(labels.tolist()):
            if sigma == 0:
                expect = x[b].numpy()
            else:
                P = np.linalg.inv(C[k])
                S = np.linalg.inv(P + np.eye(gm.dim) / sigma**2)
                expect = S @ (P @ mu[k] + x[b].numpy() / sigma**2)
            np.testing.assert_allclose(got[b], expect, rtol=1e-9, atol=1e-12)


def test_conditional_denoiser_monte_carlo_regression():
    """Within a component E[x0 | x~] is affine in x~: least squares on (x~, x0) pairs recovers it."""
    gm, sigma, n = random_mixture(K=2, d=2, seed=4), 0.6, 200000
    g = torch.Generator().manual_seed(5)
    x0, k = gm.sample(n, g, return_labels=True)
    xt = x0 + sigma * torch.randn(n, 2, generator=g, dtype=F64)
    probe = gm.means + torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=F64)
    for j in range(2):
        X = np.c_[np.ones(int((k == j).sum())), xt[k == j].numpy()]
        coef, *_ = np.linalg.lstsq(X, x0[k == j].numpy(), rcond=None)
        fit = np.c_[np.ones(2), probe.numpy()] @ coef
        np.testing.assert_allclose(gm.conditional_denoiser(probe, sigma, j).numpy(), fit, atol=0.01)


@pytest.mark.parametrize("name", list(MIXES))
@pytest.mark.parametrize("sigma", [0.05, 0.4, 2.5])
def test_bayes_consistency_and_classifier_guidance(name, sigma):
    gm = MIXES[name]()
    x = points(gm, n=8, scale=0.3)
    B, K = x.shape[0], gm.K
    post = gm.log_posterior(x, sigma).exp()
    cond = torch.stack([gm.conditional_denoiser(x, sigma, torch.full((B,), k)) for k in range(K)], 1)  # (B, K, d)
    # Bayes: E[x0 | x~] = sum_k p(k | x~) E[x0 | x~, k]
    mixed = torch.einsum("bk,bkd->bd", post, cond).numpy()
    np.testing.assert_allclose(mixed, gm.denoiser(x, sigma).numpy(), rtol=1e-9, atol=1e-12)
    # classifier guidance: grad log p_sigma(x~ | k) = grad log p_sigma(x~) + grad log p(k | x~), then Tweedie
    D = gm.denoiser(x, sigma)
    for k in range(K):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gm.log_posterior(xr, sigma)[:, k].sum(), xr)
        np.testing.assert_allclose((D + sigma**2 * grad).numpy(), cond[:, k].numpy(), rtol=1e-8, atol=1e-10)


def test_component_is_the_single_gaussian():
    gm = random_mixture()
    x = points(gm, n=5)
    w, mu, C = params(gm)
    for k in range(gm.K):
        ck = gm.component(k)
        assert ck.K == 1 and ck.dim == gm.dim
        expect = mvn(mu[k], C[k] + 0.09 * np.eye(3)).logpdf(x.numpy())
        np.testing.assert_allclose(ck.log_prob(x, 0.3).numpy(), expect, rtol=1e-10)
        np.testing.assert_allclose(ck.denoiser(x, 0.3).numpy(), gm.conditional_denoiser(x, 0.3, k).numpy(), rtol=1e-10)


# -- condition -----------------------------------------------------------------------------------------
def log_conditional_by_hand(gm, mask, xK, xU):
    """log p(x_U | x_K) = log p(x) - log p_K(x_K); the marginal of a mixture is the mixture of marginals."""
    w, mu, C = params(gm)
    m = np.asarray(mask)
    x = np.zeros((len(xU), gm.dim))
    x[:, m], x[:, ~m] = xK, xU
    joint = logsumexp([np.log(w[k]) + mvn(mu[k], C[k]).logpdf(x) for k in range(gm.K)], axis=0)
    marg = logsumexp([np.log(w[k]) + mvn(mu[k][m], C[k][np.ix_(m, m)]).logpdf(xK) for k in range(gm.K)])
    return joint - marg


@pytest.mark.parametrize("mask", [[True, False, True], [False, True, False], [True, True, False]])
@pytest.mark.parametrize("diagonal", [False, True])
def test_condition_density_is_joint_over_marginal(mask, diagonal):
    gm = random_mixture(K=2, d=3, seed=7, diagonal=diagonal)
    m = torch.tensor(mask)
    full = torch.tensor([0.4, -0.8, 1.1], dtype=F64)
    cg = gm.condition(m, full)
    assert cg.dim == 3 - int(m.sum()) and cg.K == 2
    assert cg.U is None or not diagonal  # a diagonal mixture conditions to a diagonal one
    same = gm.condition(m, full[m])  # values given as the known coordinates only
    assert torch.equal(same.means, cg.means) and torch.equal(same.weights, cg.weights)
    xU = points(cg, n=7, scale=0.5)
    expect = log_conditional_by_hand(gm, mask, full[m].numpy(), xU.numpy())
    np.testing.assert_allclose(cg.log_prob(xU).numpy(), expect, rtol=1e-8)


def test_condition_single_gaussian_precision_form():
    """K = 1: p(x_U | x_K) = N(mu_U - Lam_UU^{-1} Lam_UK (x_K - mu_K), Lam_UU^{-1}), Lam = C^{-1}
    (the precision form, PRML eq. 2.73-2.75)."""
    gm = random_mixture(K=1, d=4, seed=2)
    m = np.array([False, True, False, True])
    xK = np.array([0.5, -1.0])
    cg = gm.condition(torch.tensor(m), torch.tensor(xK))
    mu, C = gm.means[0].numpy(), gm.covs[0].numpy()
    Lam = np.linalg.inv(C)
    S = np.linalg.inv(Lam[np.ix_(~m, ~m)])
    np.testing.assert_allclose(cg.means[0].numpy(), mu[~m] - S @ Lam[np.ix_(~m, m)] @ (xK - mu[m]), rtol=1e-9)
    np.testing.assert_allclose(cg.covs[0].numpy(), S, rtol=1e-9)
    np.testing.assert_allclose(cg.weights.numpy(), [1.0])


def test_condition_monte_carlo_moments_by_importance_sampling():
    """Mean and covariance of the conditional mixture's samples vs a self-normalised importance estimate
    with a broad Gaussian proposal q over x_U and target p(x_U, x_K) (scipy)."""
    gm = random_mixture(K=2, d=3, seed=11)
    w, mu, C = params(gm)
    m = np.array([True, False, False])
    xK = np.array([0.3])
    cg = gm.condition(torch.tensor(m), torch.tensor(xK))
    xs = cg.sample(100000, torch.Generator().manual_seed(0)).numpy()

    rng = np.random.default_rng(1)
    qm, qC = w @ mu[:, ~m], 4 * gm.covariance.numpy()[np.ix_(~m, ~m)] + np.eye(2)
    xU = rng.multivariate_normal(qm, qC, size=400000)
    x = np.zeros((len(xU), 3))
    x[:, m], x[:, ~m] = xK, xU
    logp = logsumexp([np.log(w[k]) + mvn(mu[k], C[k]).logpdf(x) for k in range(2)], axis=0)
    lw = logp - mvn(qm, qC).logpdf(xU)
    iw = np.exp(lw - lw.max())
    iw /= iw.sum()
    is_mean = iw @ xU
    is_cov = (iw[:, None] * (xU - is_mean)).T @ (xU - is_mean)
    np.testing.assert_allclose(xs.mean(0), is_mean, atol=0.02)
    np.testing.assert_allclose(np.cov(xs.T), is_cov, atol=0.03)
    np.testing.assert_allclose(cg.mean.numpy(), is_mean, atol=0.02)
    np.testing.assert_allclose(cg.covariance.numpy(), is_cov, atol=0.03)


# -- errors --------------------------------------------------------------------------------------------
def test_errors():
    gm = random_mixture()
    x = points(gm, n=3)
    for labels in (torch.tensor([0, 1, 3]), torch.tensor([0, -1, 1]), 3, torch.tensor([0.0, 1.0, 2.0]),
                   torch.tensor([0, 1]), torch.tensor([[0, 1, 2]])):
        with pytest.raises(ValueError, match="labels"):
            gm.conditional_denoiser(x, 0.5, labels)
    for k in (-1, 3, 1.0, True):
        with pytest.raises(ValueError, match="component"):
            gm.component(k)
    v = torch.zeros(3, dtype=F64)
    for mask in (torch.tensor([1, 0, 1]), torch.tensor([True, False]), torch.ones(3, dtype=torch.bool),
                 torch.zeros(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="mask"):
            gm.condition(mask, v)
    for values in (torch.zeros(2), torch.zeros(1, 3), torch.tensor([float("nan"), 0.0, 0.0])):
        with pytest.raises(ValueError, match="values"):
            gm.condition(torch.tensor([True, False, False]), values)
