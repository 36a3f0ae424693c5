"""The forward process q(z_t | x), its posterior q(z_s | z_t, x), and the variational bound.

Continuous time (any schedule): z_t = alpha_t x + sigma_t eps, and for s < t the forward
transition q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2) of Kingma et al. (2021, VDM eq. 3-6).
Discrete DDPM chain (a `schedules.DiscreteVP`, step index i = 1..T, t = i / T): the posterior
of Ho et al. (2020, eq. 6-7), the fixed reverse variances (sec. 3.2), the discretized decoder
(eq. 13) and the bound L_T + sum L_{t-1} + L_0 (eq. 5; Sohl-Dickstein et al. 2015).

Per-sample results (KL terms, NLLs, the bound) are in nats, summed over all non-batch dims.
"""

from __future__ import annotations

import math

import torch

from .parameterization import broadcast, coefficients, to_x0
from .schedules import DiscreteVP, Schedule, as_tensor, checking, fmt, on_device

Tensor = torch.Tensor

REVERSE_VARIANCES = ("beta", "beta_plain", "beta_tilde")
DECODERS = ("discretized", "gaussian")


# -- continuous time ----------------------------------------------------------------------------
def q_sample(x: Tensor, t, schedule: Schedule, eps: Tensor | None = None, generator=None):
    """(z_t, eps) with z_t = alpha_t x + sigma_t eps, eps ~ N(0, I) unless given
    (Kingma et al. 2021, VDM eq. 1; Ho et al. 2020, eq. 4)."""
    alpha, sigma = coefficients(schedule, t, x)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return alpha * x + sigma * eps, eps


def transition(schedule: Schedule, s, t) -> tuple[Tensor, Tensor]:
    """(alpha_{t|s}, sigma_{t|s}^2) of q(z_t | z_s) for s < t (Kingma et al. 2021, VDM eq. 3-4):

        alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.

    The variance is computed as sigma_t^2 (1 - e^{lambda_t - lambda_s}) (the same quantity, since
    alpha_{t|s}^2 sigma_s^2 / sigma_t^2 = SNR_t / SNR_s), which has no cancellation when s ~ t.
    """
    s, t = as_tensor(s), as_tensor(t)
    if checking() and bool((bad := ~(s < t)).any()):
        s_bad, t_bad = torch.broadcast_tensors(s, t)
        raise ValueError(f"s={fmt(s_bad[bad])}, t={fmt(t_bad[bad])}: the posterior needs s < t")
    alpha_ts = schedule.alpha(t) / schedule.alpha(s)
    sigma2_ts = -schedule.sigma(t) ** 2 * torch.expm1(schedule.logsnr(t) - schedule.logsnr(s))
    return alpha_ts, sigma2_ts


def posterior(x: Tensor, z_t: Tensor, s, t, schedule: Schedule) -> tuple[Tensor, Tensor]:
    """(mean, var) of q(z_s | z_t, x) for s < t (Kingma et al. 2021, VDM eq. 5-6):

        mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x,
        var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
    """
    alpha_ts, sigma2_ts = (broadcast(c, z_t) for c in transition(schedule, s, t))
    alpha_s, sigma_s = coefficients(schedule, s, z_t)
    sigma2_t = broadcast(schedule.sigma(t), z_t) ** 2
    mean = alpha_ts * sigma_s**2 / sigma2_t * z_t + alpha_s * sigma2_ts / sigma2_t * x
    return mean, sigma2_ts * sigma_s**2 / sigma2_t


def posterior_mean(pred: Tensor, kind: str, z_t: Tensor, s, t, schedule: Schedule) -> Tensor:
    """mu_theta(z_t; s, t): the posterior mean with x replaced by x0-hat = to_x0(pred) (lecture,
    slide "多种参数化方法"; Kingma et al. 2021, VDM eq. 27). `kind` is any of
    parameterization.PARAMETERIZATIONS; the lecture's rows per kind are this x0 form rewritten,
    its v row only for VP schedules and its flow row only for rectified flow; this form holds for all."""
    return posterior(to_x0(pred, kind, z_t, t, schedule), z_t, s, t, schedule)[0]


# -- the discrete DDPM chain --------------------------------------------------------------------
def _check_chain(schedule) -> DiscreteVP:
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"schedule={schedule!r} is not a discrete chain; allowed: a schedules.DiscreteVP")
    return schedule


def _check_index(i, schedule: DiscreteVP) -> Tensor:
    i = torch.as_tensor(i)
    if checking() and bool((bad := (i < 1) | (i > schedule.T)).any()):
        raise ValueError(f"step i={fmt(i[bad])} is outside 1..{schedule.T}")
    return i.long()


def beta_tilde(schedule: DiscreteVP) -> Tensor:
    """beta~_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t for t = 1..T, shape (T,)
    (Ho et al. 2020, eq. 7); beta~_1 = 0."""
    one_minus_abar = -torch.expm1(_check_chain(schedule).log_alpha_bars)
    return one_minus_abar[:-1] / one_minus_abar[1:] * schedule.betas


def reverse_variance(schedule: DiscreteVP, kind: str) -> Tensor:
    """The fixed reverse variances sigma_t^2, t = 1..T, of Ho et al. (2020, sec. 3.2), sigma_t^2 =
    beta_t or beta~_t, with the value at t = 1 (the decoder p(x_0 | x_1)'s) as Ho et al.'s code sets it:

    * "beta": beta~_2 at t = 1, beta_t for t >= 2: their code's 'fixedlarge' (diffusion_utils_2.py,
      "to get a better decoder log likelihood"; improved-diffusion's FIXED_LARGE), the default of their
      CIFAR-10 script (scripts/run_cifar.py), whose bits/dim evaluation computes the bound with it:
      the convention of the paper's reported bounds, and so the default here;
    * "beta_plain": beta_t for every t, beta_1 at t = 1: sec. 3.2's text taken literally. On continuous
      data (a Gaussian decoder) it is the tighter one, as beta_1 ~ Var(x_0 | x_1) there;
    * "beta_tilde": beta~_t, with beta~_2 at t = 1 (beta~_1 = 0 would make the decoder degenerate):
      their code's 'fixedsmall' (`posterior_log_variance_clipped`), improved-diffusion's FIXED_SMALL.
    """
    if kind not in REVERSE_VARIANCES:
        raise ValueError(f"unknown reverse variance {kind!r}; allowed: {', '.join(REVERSE_VARIANCES)}")
    betas = _check_chain(schedule).betas
    if kind == "beta_plain":
        return betas
    first = beta_tilde(schedule)[1:2] if schedule.T > 1 else betas[:1]
    return torch.cat([first, (betas if kind == "beta" else beta_tilde(schedule))[1:]])


def reverse_variance_on(schedule: DiscreteVP, kind: str, device) -> Tensor:
    """reverse_variance(schedule, kind) on `device`, copied there once (schedules.on_device)."""
    return on_device(schedule, f"reverse variance {kind}", device, make=lambda: reverse_variance(schedule, kind))


def learned_variance(v: Tensor, i, schedule: DiscreteVP) -> Tensor:
    """A learned reverse variance at steps i: Sigma = exp(v log beta_t + (1 - v) log beta~_t), v in
    [0, 1] elementwise, interpolating the two fixed choices in log space (Nichol & Dhariwal 2021,
    eq. 15); beta~ is `reverse_variance`'s (beta~_2 at t = 1), beta_t is beta_1 at t = 1 as in
    improved-diffusion (so v = 1 is "beta_plain")."""
    i = _check_index(i, _check_chain(schedule))
    log_beta = on_device(schedule, "log betas", v.device, make=lambda: torch.log(schedule.betas))
    log_tilde = on_device(schedule, "log beta_tilde", v.device, make=lambda: torch.log(reverse_variance(schedule, "beta_tilde")))
    log_beta, log_tilde = broadcast(log_beta[i - 1], v), broadcast(log_tilde[i - 1], v)
    return torch.exp(v * log_beta + (1 - v) * log_tilde)


def ddpm_posterior(x0: Tensor, x_t: Tensor, i, schedule: DiscreteVP) -> tuple[Tensor, Tensor]:
    """(mu~_t, beta~_t) of q(x_{t-1} | x_t, x_0) at step t = i (Ho et al. 2020, eq. 6-7):

        mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) x_t.
    """
    i = _check_index(i, _check_chain(schedule))
    abar, betas = on_device(schedule, "alphas_bar", x_t.device), on_device(schedule, "betas", x_t.device)
    abar_t, abar_prev, beta = (broadcast(c, x_t) for c in (abar[i], abar[i - 1], betas[i - 1]))
    mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)
    return mean, broadcast(on_device(schedule, "beta_tilde", x_t.device, make=lambda: beta_tilde(schedule))[i - 1], x_t)


# -- likelihood terms ---------------------------------------------------------------------------
def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, var1) || N(mean2, var2)), arguments are variances (not logs):

        KL = 1/2 [log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1].

    The log-ratio is taken as a difference of logs, so the gradient in (mean2, var2) stays finite
    even where var1 = 0 (the point-mass posterior at DDPM step 1).
    """
    return 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def gaussian_nll(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Elementwise -log N(x; mean, var) = 1/2 [log(2 pi var) + (x - mean)^2 / var]."""
    return 0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def _log_diff_ndtr(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, evaluated in the tail closer to the interval."""
    upper = a > 0  # interval right of 0: use Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    a, b = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor, levels: int = 256) -> Tensor:
    """Elementwise log p(x) of the discretized Gaussian decoder (Ho et al. 2020, eq. 13).

    x holds data quantized to `levels` values scaled to [-1, 1], x = 2k / (levels - 1) - 1 (8-bit
    images: levels = 256, bin half-width 1/255; scikit-learn's digits: 17 grey levels). Each value
    owns the bin [x - h, x + h], h = 1 / (levels - 1), and the edge bins extend to -inf (x = -1) and
    +inf (x = 1):

        p(x) = Phi((x + h - mean) / std) - Phi((x - h - mean) / std).

    Computed as a log-difference of log-CDFs in the nearer tail, so it stays finite for bins far
    out in either tail.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels={levels!r} is not allowed: the number of quantization levels must be an integer >= 2")
    half = 1 / (levels - 1)
    std = torch.sqrt(var)
    lower = torch.where(x < -1 + half, -math.inf, (x - half - mean) / std)
    upper = torch.where(x > 1 - half, math.inf, (x + half - mean) / std)
    return _log_diff_ndtr(lower, upper)


def _per_sample(values: Tensor) -> Tensor:
    return values.flatten(1).sum(1)


def prior_kl(x0: Tensor, schedule: DiscreteVP) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, q(x_T | x_0) = N(sqrt(abar_T) x_0, 1 - abar_T)
    (Ho et al. 2020, eq. 5)."""
    alpha, sigma = coefficients(_check_chain(schedule), 1.0, x0)
    return _per_sample(gaussian_kl(alpha * x0, sigma**2, torch.zeros_like(x0), torch.ones_like(x0)))


def vlb_term(x0: Tensor, x_t: Tensor, i, model_mean: Tensor, model_var, schedule: DiscreteVP,
             decoder: str = "discretized", levels: int = 256) -> Tensor:
    """L_{i-1} per sample for steps i (an int or shape (B,)) (Ho et al. 2020, eq. 5):

        i >= 2:  KL(q(x_{i-1} | x_i, x_0) || N(model_mean, model_var)),
        i = 1:   -log p(x_0 | x_1), with p the discretized decoder over `levels` values (eq. 13)
                 or, with decoder="gaussian", the continuous density N(x_0; model_mean, model_var).

    model_var is a scalar, per sample (B,) or elementwise (a learned diagonal variance).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; allowed: {', '.join(DECODERS)}")
    i = _check_index(i, _check_chain(schedule))
    model_var = broadcast(model_var, x0)
    q_mean, q_var = ddpm_posterior(x0, x_t, i, schedule)
    kl = _per_sample(gaussian_kl(q_mean, q_var, model_mean, model_var))
    if decoder == "gaussian":
        nll = _per_sample(gaussian_nll(x0, model_mean, model_var))
    else:
        nll = -_per_sample(discretized_gaussian_log_likelihood(x0, model_mean, model_var, levels))
    return torch.where(i == 1, nll, kl)


def vlb(x0: Tensor, model_fn, schedule: DiscreteVP, generator=None, decoder: str = "discretized",
        levels: int = 256) -> Tensor:
    """The bound L_T + sum_{i=2}^T L_{i-1} + L_0 per sample, in nats (Ho et al. 2020, eq. 5;
    Sohl-Dickstein et al. 2015), each term at its own x_i ~ q(x_i | x_0).

    `model_fn(x_i, i)` returns (mean, var) of p_theta(x_{i-1} | x_i); i is a (B,) long tensor.
    """
    total = prior_kl(x0, schedule)
    for step in range(schedule.T, 0, -1):
        i = torch.full(x0.shape[:1], step, dtype=torch.long, device=x0.device)
        total = total + _sampled_term(x0, i, model_fn, schedule, generator, decoder, levels)
    return total


def vlb_one_t(x0: Tensor, model_fn, schedule: DiscreteVP, generator=None, decoder: str = "discretized",
              levels: int = 256) -> Tensor:
    """Unbiased one-step estimate of `vlb`: L_T + T L_{i-1} with i ~ U{1, ..., T} per sample
    (Ho et al. 2020, eq. 5 with the sum over t replaced by T times a uniform draw)."""
    i = torch.randint(1, _check_chain(schedule).T + 1, x0.shape[:1], generator=generator, device=x0.device)
    return prior_kl(x0, schedule) + schedule.T * _sampled_term(x0, i, model_fn, schedule, generator, decoder, levels)


def _sampled_term(x0, i, model_fn, schedule, generator, decoder, levels) -> Tensor:
    x_t, _ = q_sample(x0, schedule.discrete_t(i), schedule, generator=generator)
    mean, var = model_fn(x_t, i)
    return vlb_term(x0, x_t, i, mean, var, schedule, decoder, levels)


def bits_per_dim(nats: Tensor, x: Tensor) -> Tensor:
    """Per-sample nats -> bits per dimension: nats / (D ln 2), D = number of dims of one sample."""
    return nats / (x[0].numel() * math.log(2))
