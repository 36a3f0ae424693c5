"""Guidance: wrappers that turn denoisers into a guided denoiser D(x, sigma) -> x0_hat for the
samplers, which do not change (the pattern of k-diffusion and EDM2).

A conditional denoiser is a callable D(x, sigma, labels); the label `null` (= num_classes) is the
unconditional model of classifier-free training (Ho & Salimans 2022). Every guidance of the
lecture's last chapter is one extrapolation of a denoiser D away from a guide D_g,

    D_w(x, sigma) = D_g + w (D - D_g),        (in x0 space; the same in eps or score space, since
                                               each is affine in D at fixed x and sigma)

* classifier-free guidance: D = D(., y), D_g = D(., null), both halves in one batched network call;
* autoguidance (Karras et al. 2024, 'Guiding a diffusion model with a bad version of itself'):
  D_g = a weaker model of the same data (fewer steps or a smaller net), labels or none;
* classifier guidance (Dhariwal & Nichol 2021): D + s sigma^2 grad_x log p(y | x, sigma), since
  D = x + sigma^2 grad log p_sigma(x) (Tweedie) and grad log p(x | y) = grad log p(x) + grad log p(y | x);

w = 1 is D itself, w = 0 the guide alone. An `interval` [sigma_lo, sigma_hi] applies the guidance
only at those noise levels (Kynkaanniemi et al. 2024, 'Applying guidance in a limited interval'),
in noise-level units, so it means the same for every preset; `rescale` phi is CFG rescale (Lin et
al. 2024, sec. 3.4): D_w <- phi D_w std(D) / std(D_w) + (1 - phi) D_w, the standard deviations over
each sample's values, here on the x0 predictions (diffusers applies it to its eps prediction).

Each wrapper counts what it spent: `evaluations` (calls the sampler made: its NFE times the
number of batches) and `guided` (of those, the ones that evaluated the guide too, i.e. a doubled
network batch for CFG, a second network for autoguidance, a classifier gradient for classifier
guidance).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _sigmas(sigma, x: Tensor) -> Tensor:
    """sigma as a (B,) tensor on x's device (a number is filled in there: no host-to-device copy,
    which on a GPU would wait for the queued work)."""
    if isinstance(sigma, (int, float)):
        return torch.full(x.shape[:1], sigma, dtype=x.dtype, device=x.device)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _interval(interval) -> tuple[float, float]:
    """(sigma_lo, sigma_hi), checked; everything (0, inf) when None or empty."""
    lo, hi = interval if interval else (0.0, math.inf)
    if not 0 <= lo <= hi:
        raise ValueError(f"guidance interval [{lo}, {hi}] must satisfy 0 <= sigma_lo <= sigma_hi")
    return lo, hi


def rescale(guided: Tensor, reference: Tensor, phi: float) -> Tensor:
    """CFG rescale (Lin et al. 2024, eq. 15-16): phi * guided * std(reference) / std(guided) + (1 - phi) * guided,
    std per sample over all its values."""
    dims = tuple(range(1, guided.ndim))
    factor = reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return guided * (phi * factor + (1 - phi))


class Guided:
    """D_w = D_g + w (D - D_g) where interval[0] <= sigma <= interval[1], D elsewhere (w = 1: D always).

    main(x, sigma) is D; guide(x, sigma) is D_g; pair(x, sigma) -> (D, D_g) evaluates both at once
    (default: one call each). A batch whose per-sample sigmas straddle the interval evaluates the pair
    for all and keeps D outside."""

    def __init__(self, main, guide, w: float, interval=None, phi: float = 0.0, pair=None):
        if not math.isfinite(w):
            raise ValueError(f"guidance weight w={w} must be finite")
        lo, hi = _interval(interval)
        if not 0 <= phi <= 1:
            raise ValueError(f"guidance rescale phi={phi} must lie in [0, 1]")
        self.main, self.guide, self.w, self.lo, self.hi, self.phi = main, guide, float(w), lo, hi, phi
        self.everywhere = lo == 0 and hi == math.inf  # no interval set: nothing to read back per call
        self.pair = pair or (lambda x, s: (main(x, s), guide(x, s)))
        self.evaluations = self.guided = 0

    def __call__(self, x: Tensor, sigma) -> Tensor:
        sigma = _sigmas(sigma, x)
        inside = (sigma >= self.lo) & (sigma <= self.hi)
        self.evaluations += 1
        if self.w == 1 or not (self.everywhere or bool(inside.any())):  # read back only for a set interval
            return self.main(x, sigma)
        self.guided += 1
        if self.w == 0 and (self.everywhere or bool(inside.all())):
            return self.guide(x, sigma)
        d, d_g = self.pair(x, sigma)
        out = d_g + self.w * (d - d_g)
        out = rescale(out, d, self.phi) if self.phi else out
        return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), out, d)


def classifier_free(denoiser, labels: Tensor, null: int, w: float, interval=None, phi: float = 0.0) -> Guided:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 in x0 space): D_w = D(., null) + w (D(., y) - D(., null)),
    the conditional and unconditional halves in one network call of twice the batch."""
    nulls = torch.full_like(labels, null)

    def pair(x, s):
        return denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([labels, nulls])).chunk(2)

    return Guided(lambda x, s: denoiser(x, s, labels), lambda x, s: denoiser(x, s, nulls), w, interval, phi, pair)


def autoguidance(denoiser, weak, w: float, interval=None, phi: float = 0.0) -> Guided:
    """Autoguidance (Karras et al. 2024, eq. 2): D_w = D_weak + w (D - D_weak), with D_weak a weaker model
    of the same data and conditioning (both denoisers D(x, sigma))."""
    return Guided(denoiser, weak, w, interval, phi)


class ClassifierGuidance:
    """D(x, sigma) + scale sigma^2 grad_x log p(y | x, sigma) (Dhariwal & Nichol 2021, Algorithm 1 in
    denoiser form). log_prob(x, sigma, labels) -> (B,) is a noise-conditional classifier's
    log-probability of the requested labels; scale = 1 turns p(x) into p(x | y) by Bayes' rule."""

    def __init__(self, denoiser, log_prob, labels: Tensor, scale: float = 1.0, interval=None):
        if not math.isfinite(scale):
            raise ValueError(f"classifier scale={scale} must be finite")
        self.denoiser, self.log_prob, self.labels, self.scale = denoiser, log_prob, labels, scale
        self.lo, self.hi = _interval(interval)
        self.everywhere = self.lo == 0 and self.hi == math.inf
        self.evaluations = self.guided = 0

    def __call__(self, x: Tensor, sigma) -> Tensor:
        sigma = _sigmas(sigma, x)
        d = self.denoiser(x, sigma)
        self.evaluations += 1
        inside = (sigma >= self.lo) & (sigma <= self.hi)
        if self.scale == 0 or not (self.everywhere or bool(inside.any())):
            return d
        self.guided += 1
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(xx, sigma, self.labels).sum(), xx)
        factor = (self.scale * sigma**2 * inside).reshape(-1, *([1] * (x.ndim - 1)))
        return d + factor.to(d.dtype) * grad.to(d.dtype)


def clip_x0(denoiser, c: float):
    """D(x~, sigma) clamped to [-c, c]: the data range of [-1, 1] images for c = 1 (Ho et al.'s sampler
    clips its x0 estimate, `clip_denoised`; diffusers' schedulers the same, `clip_sample`). Every
    sampler then steps with the clamped D (its eps follows from it; diffusers' DDIM keeps the
    unclamped eps, so the two differ where the clamp acts)."""
    return lambda x, sigma: denoiser(x, sigma).clamp(-c, c)
