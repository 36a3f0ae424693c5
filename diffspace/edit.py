"""Inpainting and editing on the denoiser interface: wrappers around a denoiser and drivers around
any sampler of samplers.SAMPLERS, which do not change.

* `inpaint(..., method="replace")`: the known values y (mask True) are imposed on the denoiser's
  output, D'(x, sigma) = m y + (1 - m) D(x, sigma). A sampler run on D' carries the known
  coordinates of its state as a sample of the forward process q(x~ | y) at every noise level (for a
  point mass at y every sampler is exact), so the network always sees the known part at the right
  noise level: the replacement (imputation) method of Song et al. (2021, 'Score-based generative
  modeling through SDEs', appendix I.2).
* `inpaint(..., method="repaint")`: RePaint (Lugmayr et al. 2022): the same wrapper, but the grid is
  walked in segments of `jump_length` steps, each sampled `jump_n_sample` times, the state noised
  back up between times, x <- x + sqrt(sigma_i^2 - sigma_j^2) z (the forward process in the
  scale-free form), so known and generated parts harmonise. The sampler runs on each segment as
  on a grid of its own: multistep solvers restart their history there, and edm_sde's churn
  S_churn / N counts the segment's steps.
* `inpaint(..., method="smc")`: replacement made asymptotically exact by sequential Monte Carlo
  (SMCDiff, Trippe et al. 2023, 'Diffusion probabilistic modeling of protein backbones in 3D for the
  motif-scaffolding problem', Algorithm 2): one forward path of the known part per input,
  x~_K(sigma_i) = x~_K(sigma_{i+1}) + sqrt(sigma_i^2 - sigma_{i+1}^2) z from x~_K(0) = y, shared by its
  `particles` particles; each particle's unknown part takes the model's ancestral step (DDPM's with the
  posterior variance, `_ancestral`) and is weighted by the model's density of the path's next known
  values, p(x~_K(sigma_{i+1}) | x_i); particles are resampled (`systematic_resample`) when the effective
  sample size falls below `ess_threshold` of them, and one is drawn per input at the end. One particle is
  replacement with DDPM's posterior-variance step; as the particles grow the output tends to the
  model's own conditional law (Trippe et al., Theorem 1), which plain replacement misses.
* `sdedit`: SDEdit (Meng et al. 2022): noise the input to the grid level sigma(S) at which the last
  ceil(S N) of the N steps begin (S = strength in (0, 1]), then sample back.
* `encode` / `decode`: the deterministic probability-flow ODE (DDIM inversion; Song et al. 2021a,
  sec. 4.3) from sigma_min up to sigma_max with Heun steps, and back down on the same grid; the
  round-trip error measures the ODE discretisation.

The known values of an inpainted output equal the input exactly (pasted at the end).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .samplers import SAMPLERS, heun

MAX_REPAINT_STEPS = 100_000  # steps x resamplings of one RePaint run (RePaint's own: 250 x 10)

Tensor = torch.Tensor

MASKS = ("left", "right", "top", "bottom", "center")
METHODS = ("replace", "repaint", "smc")


def make_mask(spec: str, shape: tuple) -> Tensor:
    """The known region of one sample (bool, `shape`): a name of MASKS (images (C, H, W): that half is
    known, or the centre square of half the side; points (d,): left / right = the first / last half of
    the coordinates), or a .npy / .npz file of 0/1 or bool values (True = known) shaped like the data,
    like one image (H, W), or like one sample's values."""
    shape = tuple(shape)
    if spec in MASKS:
        if len(shape) == 1:
            if spec not in ("left", "right"):
                raise ValueError(f"mask {spec!r} needs images; for points (d,) use left or right")
            m = torch.zeros(shape, dtype=torch.bool)
            half = shape[0] // 2
            m[:half] = True
            return m if spec == "left" else ~m
        if len(shape) != 3:
            raise ValueError(f"named masks need (C, H, W) images or (d,) points, got shape {shape}")
        _, h, w = shape
        m = torch.zeros(shape, dtype=torch.bool)
        if spec == "left":
            m[..., : w // 2] = True
        elif spec == "right":
            m[..., w // 2:] = True
        elif spec == "top":
            m[:, : h // 2] = True
        elif spec == "bottom":
            m[:, h // 2:] = True
        else:
            m[:, h // 4: h - h // 4, w // 4: w - w // 4] = True
        return m
    path = Path(spec)
    if path.suffix.lower() not in (".npy", ".npz") or not path.is_file():
        raise ValueError(f"mask {spec!r}: allowed are {', '.join(MASKS)} or an existing .npy / .npz file")
    import numpy as np

    arrays = np.load(path)
    if path.suffix.lower() == ".npz":
        keys = list(arrays.keys())
        arrays = arrays["mask"] if "mask" in keys else arrays[keys[0]] if len(keys) == 1 else None
        if arrays is None:
            raise ValueError(f"mask file {path}: needs an array 'mask' (or a single array), got {keys}")
    m = torch.from_numpy(np.asarray(arrays))
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"mask file {path}: values must be 0/1 or bool (True = known)")
    m = m.bool()
    image_like = len(shape) == 3 and tuple(m.shape) in (shape[1:], (1, *shape[1:]))  # one mask for every channel
    if tuple(m.shape) != shape and not image_like:
        allowed = f"{shape}" + (f", {shape[1:]} or {(1, *shape[1:])}" if len(shape) == 3 else "")
        raise ValueError(f"mask file {path}: shape {tuple(m.shape)} does not fit samples of shape {shape}; allowed: {allowed}")
    m = m.expand(shape).clone()
    if bool(m.all()) or not bool(m.any()):
        raise ValueError(f"mask file {path}: every value is {'known' if bool(m.all()) else 'unknown'}; nothing to inpaint")
    return m


def _noised(y, sigma: float, noise: Tensor) -> Tensor:
    """y + sigma noise, the forward process in scale-free form; at sigma = inf the unit noise itself, the state of
    a zero-terminal-SNR grid's start, where nothing of y is left (samplers.initial_state)."""
    return noise if math.isinf(sigma) else y + sigma * noise


def known(denoiser, y: Tensor, mask: Tensor):
    """D'(x, sigma) = y where mask, D(x, sigma) elsewhere (mask broadcasts against y)."""
    return lambda x, sigma: torch.where(mask, y, denoiser(x, sigma))


def reconstruction_guided(denoiser, y: Tensor, mask: Tensor, weight: float, sigma_data: float = 0.5):
    """Reconstruction guidance (Ho et al. 2022, 'Video diffusion models', eq. 7): the unknown part of D
    is moved along the gradient of the Gaussian likelihood of the known values,

        D'(x, sigma) = D + weight * sigma^2 grad_x log N(y_K; D_K(x, sigma), r^2),
        r^2 = sigma^2 sigma_data^2 / (sigma^2 + sigma_data^2)   (the posterior variance of Gaussian data),

    i.e. D - weight (sigma^2 + sigma_data^2) / (2 sigma_data^2) grad_x ||y_K - D_K||^2; the known part is y
    (replacement). One backward pass through the network per call."""
    def guided(x: Tensor, sigma) -> Tensor:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            d = denoiser(xx, sigma)
            (grad,) = torch.autograd.grad(((y - d) * mask).pow(2).sum(), xx)
        s2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return torch.where(mask, y, d.detach() - weight * (s2 + sigma_data**2) / (2 * sigma_data**2) * grad)

    return guided


def inpaint(denoiser, y: Tensor, mask: Tensor, sigmas: Tensor, sampler: str = "heun", *, method: str = "replace",
            jump_length: int = 10, jump_n_sample: int = 10, reconstruction: float = 0.0, sigma_data: float = 0.5,
            particles: int = 16, ess_threshold: float = 0.5, generator=None, callback=None, **options) -> Tensor:
    """Samples of the unknown part given y on the mask, by replacement, RePaint or SMC (see the module doc),
    replacement and RePaint optionally with reconstruction guidance of that weight (`reconstruction_guided`),
    with any sampler on the grid `sigmas` (sigma_max -> 0); SMC steps with `_ancestral` (sampler 'ddpm' with
    the posterior variance). Returns x with x[mask] == y[mask] exactly."""
    if method not in METHODS:
        raise ValueError(f"inpainting method={method!r}; allowed: {', '.join(METHODS)}")
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length={jump_length} and jump_n_sample={jump_n_sample} must be >= 1")
    steps = len(sigmas) - 1
    if method == "repaint" and steps * jump_n_sample > MAX_REPAINT_STEPS:
        raise ValueError(f"RePaint would take {steps} steps x jump_n_sample={jump_n_sample} = {steps * jump_n_sample} "
                         f"sampler steps per input, above {MAX_REPAINT_STEPS}; lower --jump-n-sample or --nfe")
    if not (math.isfinite(reconstruction) and reconstruction >= 0):
        raise ValueError(f"reconstruction={reconstruction} must be a finite weight >= 0 (0: off)")
    mask = mask.to(y.device).expand_as(y)
    if method == "smc":
        if sampler != "ddpm" or options or reconstruction:
            raise ValueError(f"method='smc' steps by its own ancestral transition (sampler 'ddpm' with the posterior "
                             f"variance), which its weights assume; got sampler={sampler!r}, options {options or '{}'}, "
                             f"reconstruction={reconstruction}")
        return torch.where(mask, y, smc(denoiser, y, mask, sigmas, particles, ess_threshold, generator, callback))
    D = reconstruction_guided(denoiser, y, mask, reconstruction, sigma_data) if reconstruction else known(denoiser, y, mask)
    solve = SAMPLERS[sampler]
    levels = sigmas.tolist()
    x = _noised(torch.where(mask, y, torch.zeros_like(y)), levels[0], torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype))
    if method == "replace":
        x = solve(D, x, sigmas, generator=generator, callback=callback, **options)
    else:
        n = len(levels) - 1
        for i in range(0, n, jump_length):
            j = min(i + jump_length, n)
            for r in range(jump_n_sample):
                x = solve(D, x, sigmas[i:j + 1], generator=generator, callback=callback, **options)
                if r + 1 < jump_n_sample:  # jump back up from sigma_j to sigma_i
                    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = _noised(x, math.sqrt(levels[i] ** 2 - levels[j] ** 2), noise)
    return torch.where(mask, y, x)


def _ancestral(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(r, v) of the ancestral step x_next ~ N(D + r (x - D), v I): the forward process's posterior
    q(x~_next | x~, x0 = D) in scale-free form, r = sigma_next^2 / sigma^2, v = sigma_next^2 (sigma^2 - sigma_next^2) /
    sigma^2 (samplers.ddpm with variance='beta_tilde'; DDIM with eta = 1); from sigma = inf, (0, sigma_next^2)
    (samplers.step_from_infinity with eta = 1)."""
    if math.isinf(sigma):
        return 0.0, sigma_next**2
    return sigma_next**2 / sigma**2, sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2


def systematic_resample(weights: Tensor, generator=None) -> Tensor:
    """Systematic resampling (Kitagawa 1996) of each row of normalised weights (B, P): one uniform u per row,
    the indices at the cumulative weights' positions (k + u) / P, k = 0..P-1. Particle j is kept
    floor(P w_j) or ceil(P w_j) times, P w_j on average. Returns indices (B, P)."""
    B, P = weights.shape
    u = torch.rand(B, 1, generator=generator, dtype=weights.dtype, device=weights.device)
    positions = (u + torch.arange(P, dtype=weights.dtype, device=weights.device)) / P
    return torch.searchsorted(weights.cumsum(-1).contiguous(), positions.contiguous()).clamp_max(P - 1)


def smc(denoiser, y: Tensor, mask: Tensor, sigmas: Tensor, particles: int, ess_threshold: float = 0.5,
        generator=None, callback=None) -> Tensor:
    """SMC-corrected replacement (module doc; Trippe et al. 2023, Algorithm 2): y, mask (B, ...) -> one sample
    (B, ...) per input; its known part is the path's value at the grid's last level (y when that is 0).
    The step to sigma = 0 is the model's mean D and carries no weight (its density is a point mass).
    `callback` gets i, x (the B * particles states), sigma, denoised and ess (B,) after each step's weighting
    (None on the unweighted last step)."""
    if not (isinstance(particles, int) and 1 <= particles <= 100_000):
        raise ValueError(f"particles={particles} must be an integer in [1, 100000]")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold={ess_threshold} must lie in [0, 1] (resample when ESS < it x particles)")
    levels = sigmas.tolist()
    B, P, shape = len(y), particles, tuple(y.shape[1:])
    noise = lambda *lead: torch.randn(*lead, *shape, generator=generator, device=y.device, dtype=y.dtype)
    path = [y]  # the known part's forward path, from the last level up (one per input, shared by its particles)
    for s_hi, s_lo in zip(levels[-2::-1], levels[:0:-1]):
        path.append(_noised(path[-1], math.sqrt(s_hi**2 - s_lo**2), noise(B)))
    path = path[::-1]
    known = mask.expand(B, *shape)[:, None]
    x = torch.where(known, path[0][:, None], _noised(0.0, levels[0], noise(B, P)))  # (B, P, ...)
    log_w = torch.zeros(B, P, dtype=torch.float64, device=y.device)  # float64: large terms at small sigma
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = denoiser(x.flatten(0, 1), x.new_full((B * P,), sigma)).reshape(x.shape)
        r, v = _ancestral(sigma, sigma_next)
        mean = denoised + r * (x - denoised)
        if v > 0:
            gap = torch.where(known, path[i + 1][:, None] - mean, torch.zeros_like(mean))
            log_w = log_w - gap.flatten(2).double().pow(2).sum(-1) / (2 * v)
            x = torch.where(known, path[i + 1][:, None], mean + math.sqrt(v) * noise(B, P))
        else:
            x = torch.where(known, path[i + 1][:, None], mean)
        w = torch.softmax(log_w, dim=-1)
        ess = 1 / w.pow(2).sum(-1)
        if callback is not None:
            callback(dict(i=i, x=x.flatten(0, 1), sigma=sigma, denoised=denoised.flatten(0, 1), ess=ess if v > 0 else None))
        low = ess < ess_threshold * P
        if v > 0 and bool(low.any()):
            index = systematic_resample(w, generator)
            picked = torch.gather(x, 1, index.reshape(B, P, *[1] * len(shape)).expand_as(x))
            x = torch.where(low.reshape(B, 1, *[1] * len(shape)), picked, x)
            log_w = torch.where(low[:, None], torch.zeros_like(log_w), log_w)
    pick = torch.multinomial(torch.softmax(log_w, dim=-1), 1, generator=generator)[:, 0]
    return x[torch.arange(B, device=y.device), pick]


def sdedit_start(sigmas: Tensor, strength: float) -> int:
    """Index of the grid level SDEdit starts from: the last ceil(strength N) of the N steps remain (at least
    one; diffusers' img2img keeps int(strength N))."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength} must lie in (0, 1] (1: from pure noise)")
    n = len(sigmas) - 1
    return n - max(1, math.ceil(round(strength * n, 9)))  # round: 0.28 * 25 = 7.000000000000001 is 7 steps


def sdedit(denoiser, y: Tensor, sigmas: Tensor, strength: float, sampler: str = "heun", *, generator=None,
           callback=None, **options) -> Tensor:
    """SDEdit (Meng et al. 2022): x = y + sigma(S) eps at sigma(S) = sigmas[sdedit_start], then the sampler
    down the rest of the grid."""
    grid = sigmas[sdedit_start(sigmas, strength):]
    x = _noised(y, float(grid[0]), torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype))
    return SAMPLERS[sampler](denoiser, x, grid, generator=generator, callback=callback, **options)


def encode(denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma run upwards with Heun steps over the
    positive finite levels of `sigmas` (x taken as the state at the smallest one): the latent at the largest."""
    levels = sorted(s for s in sigmas.tolist() if 0 < s < math.inf)
    for s, s_next in zip(levels[:-1], levels[1:]):
        d = (x - denoiser(x, x.new_full((len(x),), s))) / s
        x_euler = x + (s_next - s) * d
        d_next = (x_euler - denoiser(x_euler, x.new_full((len(x),), s_next))) / s_next
        x = x + (s_next - s) * 0.5 * (d + d_next)
    return x


def decode(denoiser, z: Tensor, sigmas: Tensor) -> Tensor:
    """The inverse of `encode`: Heun (samplers.heun) down the same positive levels, to the smallest."""
    return heun(denoiser, z, sigmas[(sigmas > 0) & sigmas.isfinite()])
