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
  scale-free form), so known and generated parts harmonise.
* `sdedit`: SDEdit (Meng et al. 2022): noise the input to the grid level sigma(S) at which the last
  ceil(S N) of the N steps begin (S = strength in (0, 1], as diffusers' img2img), then sample back.
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

Tensor = torch.Tensor

MASKS = ("left", "right", "top", "bottom", "center")
METHODS = ("replace", "repaint")


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
    try:
        m = m.expand(shape) if m.ndim < len(shape) or m.shape == shape else None
    except RuntimeError:
        m = None
    if m is None:
        raise ValueError(f"mask file {path}: shape {tuple(arrays.shape)} does not fit samples of shape {shape}")
    return m.clone()


def known(denoiser, y: Tensor, mask: Tensor):
    """D'(x, sigma) = y where mask, D(x, sigma) elsewhere (mask broadcasts against y)."""
    return lambda x, sigma: torch.where(mask, y, denoiser(x, sigma))


def inpaint(denoiser, y: Tensor, mask: Tensor, sigmas: Tensor, sampler: str = "heun", *, method: str = "replace",
            jump_length: int = 10, jump_n_sample: int = 10, generator=None, callback=None, **options) -> Tensor:
    """Samples of the unknown part given y on the mask, by replacement or RePaint (see the module doc),
    with any sampler on the grid `sigmas` (sigma_max -> 0). Returns x with x[mask] == y[mask] exactly."""
    if method not in METHODS:
        raise ValueError(f"inpainting method={method!r}; allowed: {', '.join(METHODS)}")
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length={jump_length} and jump_n_sample={jump_n_sample} must be >= 1")
    mask = mask.to(y.device).expand_as(y)
    D, solve = known(denoiser, y, mask), SAMPLERS[sampler]
    levels = sigmas.tolist()
    x = torch.where(mask, y, torch.zeros_like(y)) + levels[0] * torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
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
                    x = x + math.sqrt(levels[i] ** 2 - levels[j] ** 2) * noise
    return torch.where(mask, y, x)


def sdedit_start(sigmas: Tensor, strength: float) -> int:
    """Index of the grid level SDEdit starts from: the last ceil(strength N) of the N steps remain."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength} must lie in (0, 1] (1: from pure noise)")
    n = len(sigmas) - 1
    return n - max(1, math.ceil(strength * n))


def sdedit(denoiser, y: Tensor, sigmas: Tensor, strength: float, sampler: str = "heun", *, generator=None,
           callback=None, **options) -> Tensor:
    """SDEdit (Meng et al. 2022): x = y + sigma(S) eps at sigma(S) = sigmas[sdedit_start], then the sampler
    down the rest of the grid."""
    grid = sigmas[sdedit_start(sigmas, strength):]
    x = y + float(grid[0]) * torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return SAMPLERS[sampler](denoiser, x, grid, generator=generator, callback=callback, **options)


def encode(denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma run upwards with Heun steps over the
    positive levels of `sigmas` (x taken as the state at the smallest one): the latent at the largest."""
    levels = sorted(s for s in sigmas.tolist() if s > 0)
    for s, s_next in zip(levels[:-1], levels[1:]):
        d = (x - denoiser(x, x.new_full((len(x),), s))) / s
        x_euler = x + (s_next - s) * d
        d_next = (x_euler - denoiser(x_euler, x.new_full((len(x),), s_next))) / s_next
        x = x + (s_next - s) * 0.5 * (d + d_next)
    return x


def decode(denoiser, z: Tensor, sigmas: Tensor) -> Tensor:
    """The inverse of `encode`: Heun (samplers.heun) down the same positive levels, to the smallest."""
    return heun(denoiser, z, sigmas[sigmas > 0])
