"""Evaluation: sliced W2 and its floor, the probability-flow ODE likelihood, dequantization."""

import math

import pytest
import torch

from diffspace.analytic import GaussianMixture
from diffspace.evaluate import dequantized_bits_per_dim, noise_floor, pf_ode_nll, sliced_wasserstein

F64 = torch.float64


def _gaussian(dim, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=F64) * shift
    s2 = (0.2 + torch.rand(dim, generator=g, dtype=F64)) ** 2
    return mu, s2


def _gaussian_denoiser(mu, s2):
    """E[x | x + sigma eps] for x ~ N(mu, diag s2): mu + s2 / (s2 + sigma^2) (x~ - mu)."""
    return lambda x, sigma: mu + s2 / (s2 + sigma[:, None] ** 2) * (x - mu)


def _true_nll(x, mu, s2, sigma):
    var = s2 + sigma ** 2
    return 0.5 * (((x - mu) ** 2 / var) + torch.log(2 * math.pi * var)).sum(1)


@pytest.mark.parametrize("dim", [1, 3, 16])
def test_pf_ode_nll_exact_divergence_on_gaussian_data(dim):
    """True NLL known in closed form. Centred data (as after scaling to [-1, 1]): every sample within
    1e-3 nats/dim; with a mean of 0.5 per dimension the N(0, sigma_max^2) prior is off by
    O(|mean| / sigma_max) per sample, and the average is still within 0.01 nats/dim."""
    for shift, tol_each, tol_mean in ((0.0, 1e-3, 1e-3), (0.5, 0.05, 0.01)):
        mu, s2 = _gaussian(dim, shift=shift)
        x = mu + s2.sqrt() * torch.randn(256, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
        nll = pf_ode_nll(_gaussian_denoiser(mu, s2), x, steps=48).nll
        err = (nll - _true_nll(x, mu, s2, 0.002)) / dim
        assert err.abs().max() < tol_each and err.mean().abs() < tol_mean, (shift, float(err.abs().max()))


def test_pf_ode_nll_on_a_mixture_matches_its_log_density():
    """Non-Gaussian: a 2-D mixture whose exact denoiser and density at sigma_min are known."""
    mixture = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]),
                              torch.tensor([[0.1, 0.2], [0.3, 0.1]]) ** 2)
    x = mixture.sample(32, torch.Generator().manual_seed(2)).to(F64)
    nll = pf_ode_nll(mixture.denoiser, x, steps=96).nll
    truth = -mixture.log_prob(x, sigma=0.002)
    assert ((nll - truth).abs() / 2).max() < 0.01


def test_hutchinson_estimator_is_unbiased():
    """Full-covariance Gaussian in 80 dimensions (above 64: the estimator is the default). The
    Jacobian of the field is not diagonal, so the estimates scatter, and their mean is the truth."""
    dim = 80
    g = torch.Generator().manual_seed(3)
    A = torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
    cov = 0.2 * A @ A.T + 0.05 * torch.eye(dim, dtype=F64)
    eye = torch.eye(dim, dtype=F64)
    denoiser = lambda x, sigma: x @ (cov @ torch.linalg.inv(cov + sigma[0] ** 2 * eye)).T  # E[x | x~], mean 0
    x = torch.linalg.cholesky(cov) @ torch.randn(dim, generator=g, dtype=F64)
    x = x.repeat(300, 1)
    truth = -torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=F64), cov + 0.002 ** 2 * eye).log_prob(x[0])
    nll = pf_ode_nll(denoiser, x, steps=24).nll
    se = nll.std() / math.sqrt(len(nll))
    assert nll.std() > 0.1  # probes differ between samples, so the estimates scatter ...
    assert (nll.mean() - truth).abs() < 4 * se + 1e-3 * dim  # ... around the truth
    exact = pf_ode_nll(denoiser, x[:1], steps=24, exact=True).nll
    assert (exact - truth).abs() / dim < 1e-3


def test_dequantized_bits_per_dim_of_a_uniform_density():
    """A density uniform on [-1, 1]^D puts 1/K of the mass in each of K bins: exactly log2 K bits/dim."""
    D, K = 5, 256
    nll_uniform = torch.tensor([D * math.log(2.0)])  # -log (1/2)^D
    assert float(dequantized_bits_per_dim(nll_uniform, D, 2.0 / K)) == pytest.approx(math.log2(K))


def test_sliced_wasserstein_of_shifted_gaussians():
    """SW2 between N(0, I) and N(m, I) samples: every 1-D projection is shifted by theta.m, so
    SW2^2 = E_theta (theta.m)^2 = |m|^2 / d; the noise floor is small and shrinks with n."""
    d, n = 4, 10_000
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    m = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert sliced_wasserstein(a, b + m, n_proj=500) == pytest.approx(float(m.norm()) / math.sqrt(d), rel=0.05)
    sample = lambda k, gen: torch.randn(k, d, generator=gen)
    assert noise_floor(sample, 4000) < noise_floor(sample, 250) < 0.2
    with pytest.raises(ValueError, match="equal-size"):
        sliced_wasserstein(a[:10], b[:11])


def test_energy_distance_of_shifted_gaussians_in_1d():
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| for N(0, 1) vs N(m, 1): X - Y ~ N(-m, 2) and
    E|N(mu, s^2)| = s sqrt(2/pi) exp(-mu^2 / 2 s^2) + mu (1 - 2 Phi(-mu / s))."""
    from diffspace.evaluate import energy_distance

    m, s = 0.7, math.sqrt(2.0)
    phi = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
    mean_abs = s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * (1 - 2 * phi)
    expected = 2 * mean_abs - 2 * s * math.sqrt(2 / math.pi)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 1, generator=g), torch.randn(4000, 1, generator=g)
    assert energy_distance(a, b + m) == pytest.approx(expected, rel=0.05)
    assert abs(energy_distance(a, b)) < 0.01


def _tiny_run(tmp_path, spec, **extra):
    from diffspace.config import Config, set_option
    from diffspace.train import train

    cfg = Config()
    options = {"data.spec": spec, "model.hidden": 32, "model.depth": 2, "model.base_channels": 8,
               "model.channel_mult": [1], "model.num_blocks": 1, "train.steps": 20, "train.batch_size": 32,
               "log.checkpoint_every": 20, "log.n_samples": 4, "sample.nfe": 3, **extra}
    for key, value in options.items():
        set_option(cfg, key, value)
    train(cfg, tmp_path / spec, progress=False)
    return tmp_path / spec


@pytest.mark.parametrize("spec, names", [
    ("ring8", ["sliced W2", "energy distance", "KL(model || data)", "VLB, 1000 steps", "nats/dim"]),
    ("moons", ["sliced W2", "energy distance", "nats/dim"]),
    ("digits", ["FD (digits features)", "precision", "recall", "classifier score", "confident share", "bits/dim"]),
])
def test_evaluate_run_reports_every_measure_with_its_floor(tmp_path, spec, names):
    from diffspace.config import SampleConfig
    from diffspace.evaluate import evaluate_run, markdown

    run = _tiny_run(tmp_path, spec, **({"data.n": 1000} if spec != "digits" else {}))
    result = evaluate_run(str(run), n=200, sample_cfg=SampleConfig(nfe=5), nll_samples=8, pf_ode_steps=6, vlb_steps=(0, 10))
    table = markdown(result)
    for name in names:
        assert name in table
    for name, value, floor in result["rows"]:
        assert math.isfinite(value), name
        if "NLL" not in name:
            assert floor is not None and math.isfinite(floor), name
    values = {name: value for name, value, _ in result["rows"]}
    means = [name for name in values if "NLL" in name and not name.endswith("standard error")]
    assert len(means) == 3  # the bound on 1000 and 10 steps, the ODE
    for name in means:  # 8 held-out samples: a standard error beside every likelihood
        assert 0 < values[f"{name}: standard error"] < 10 * abs(values[name]) + 1, name
    real_vs_real = {name: floor for name, _, floor in result["rows"]}
    if spec == "digits":  # two halves of the real digits: the feature net recognises them
        assert real_vs_real["confident share p >= 0.8 (higher)"] > 0.85
        assert real_vs_real["precision (higher)"] > 0.8


def test_likelihood_standard_error_is_the_sample_std_over_root_n():
    import statistics

    from diffspace.evaluate import _mean_and_standard_error

    per_sample = [2.0, 3.5, 2.5, 4.0, 3.0]
    rows = _mean_and_standard_error("NLL", torch.tensor(per_sample, dtype=torch.float64))
    assert rows[0] == ("NLL", statistics.mean(per_sample), None)
    assert rows[1][0] == "NLL: standard error"
    assert math.isclose(rows[1][1], statistics.stdev(per_sample) / math.sqrt(5), rel_tol=1e-12)
    assert _mean_and_standard_error("NLL", torch.tensor([2.0])) == [("NLL", 2.0, None)]


def test_real_sets_are_independent_and_of_one_size():
    from diffspace.data import load
    from diffspace.evaluate import real_sets

    a, b = real_sets(load("ring8", n=50), 300)
    assert a.shape == b.shape == (300, 2) and not torch.equal(a, b)
    digits = load("digits")
    a, b = real_sets(digits, 2000)
    assert a.shape == b.shape == (898, 1, 8, 8)
    rows = {tuple(r.tolist()) for r in torch.cat([a, b]).flatten(1)}
    assert len(rows) >= 2 * 898 - 20  # disjoint halves (the digits hold a few duplicate images)


# -- the variational bound of a model given as a denoiser ----------------------------------------------
def test_model_vlb_with_the_exact_denoiser_is_the_exact_reverse_chain():
    """For x0 ~ N(m, s^2) the true reverse step q(x_{i-1} | x_i) has mean a_i x_i + b_i (from the joint
    Gaussian, test_process.gaussian_chain), which equals the posterior mean at x0_hat = E[x0 | x_i];
    so model_vlb with the exact denoiser and Sigma = beta is process.vlb with that reverse step, draw
    for draw (the same generator), on the full chain and on a respaced one."""
    from test_process import gaussian_chain

    from diffspace import process as Q
    from diffspace import schedules as S
    from diffspace.evaluate import model_vlb

    m, s = 0.3, 0.5
    x = m + s * torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    D = _gaussian_denoiser(torch.tensor([m], dtype=F64), torch.tensor([s * s], dtype=F64))
    for chain in (S.ddpm_linear(T=200), S.ddpm_linear().respaced(20)):
        gain, shift, _, _ = gaussian_chain(chain, m, s)
        beta = Q.reverse_variance(chain, "beta")
        exact = lambda x_t, i: (gain[i - 1][:, None] * x_t + shift[i - 1][:, None], beta[i - 1])
        for decoder, levels in (("gaussian", 0), ("discretized", 17)):
            g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            got = model_vlb(D, x, chain, "beta", levels=levels, generator=g1)
            want = Q.vlb(x, exact, chain, generator=g2, decoder=decoder, levels=levels or 256)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        # a learned variance of v = 1 everywhere is beta_t at every step (beta_plain), v = 0 beta_tilde
        for v, kind in ((1.0, "beta_plain"), (0.0, "beta_tilde")):
            learned = lambda xx, sigma: (D(xx, sigma), torch.full_like(xx, v))
            a = model_vlb(D, x, chain, learned, generator=torch.Generator().manual_seed(3))
            b = model_vlb(D, x, chain, kind, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_bound_with_fixed_variance_beta_is_within_0_01_nats_per_dim_of_the_nll():
    """The expectation of the bound above (Sigma = beta_t at every step, "beta_plain"; exact mean), by
    Gauss-Hermite quadrature (test_process.quadrature_vlb: exact, every term is quadratic), exceeds the
    true NLL = entropy of N(m, s^2) by less than 0.01 nats/dim on the full DDPM chain; on a 100-step
    respacing the gap grows, and Sigma = beta_tilde is far worse for continuous data (its variance is
    too small near t = 0). Ho et al.'s code's "beta" (beta~_2 at t = 1) costs 0.1 nats/dim more on
    continuous data (test_likelihood_fidelity.py)."""
    from test_process import quadrature_vlb

    from diffspace import process as Q
    from diffspace import schedules as S

    m, s = 0.3, 0.5
    H = 0.5 * math.log(2 * math.pi * math.e * s * s)
    gaps = {}
    for name, chain in (("full", S.ddpm_linear()), ("respaced", S.ddpm_linear().respaced(100))):
        for kind in Q.REVERSE_VARIANCES:
            gaps[name, kind] = quadrature_vlb(chain, m, s, lambda cvar: Q.reverse_variance(chain, kind)).item() - H
    assert 0 < gaps["full", "beta_plain"] < 0.01, gaps
    assert gaps["full", "beta_plain"] < gaps["respaced", "beta_plain"] < gaps["respaced", "beta_tilde"], gaps
    assert gaps["full", "beta_tilde"] > 0.1, gaps


@pytest.mark.slow
def test_model_vlb_by_monte_carlo_on_gaussian_data():
    """The sampled bound of the exact denoiser (Sigma = beta_t at every step, full chain) against the
    true NLL of 2-D Gaussian data, 100k samples: within 0.01 nats/dim (about 70 s)."""
    from diffspace import schedules as S
    from diffspace.evaluate import model_vlb

    mu, s2 = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([0.25, 0.04], dtype=F64)
    x = mu + s2.sqrt() * torch.randn(100_000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    gap = (model_vlb(_gaussian_denoiser(mu, s2), x, S.ddpm_linear(), "beta_plain", generator=torch.Generator().manual_seed(1))
           - _true_nll(x, mu, s2, 0.0)) / 2
    assert abs(gap.mean().item()) + 3 * gap.std().item() / math.sqrt(len(gap)) < 0.015
    assert abs(gap.mean().item()) < 0.01


def test_sample_quality_of_sorted_conditional_samples_sees_every_class():
    """Real digits posing as class-conditional samples sorted by label (as sampling.class_labels gives
    them): the measures use a random subset, so no class is cut off, and the class measures equal
    what the real data gets."""
    from diffspace.data import load
    from diffspace.evaluate import sample_quality

    data = load("digits")
    order = torch.cat([(data.labels == c).nonzero()[:100, 0] for c in range(10)])  # 100 per class, sorted
    x, labels = data.x[order], data.labels[order]
    rows = {name: (value, floor) for name, value, floor in sample_quality(x, data, labels=labels)}
    assert rows["smallest class share (higher)"][0] > 0.03  # the first 898 would miss the 9s
    assert rows["label agreement (higher)"][0] > 0.97
    value, floor = rows[next(n for n in rows if n.startswith("FD per class"))]
    assert value < 2 * floor
