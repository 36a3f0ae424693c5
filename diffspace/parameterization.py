"""What the network predicts, and exact conversions between the choices.

With z_t = alpha_t x + sigma_t eps (any schedule), each parameterization is defined by the
regression target it would have if x and eps were known:

    x0      x                                   (image denoising)
    eps     eps                                 (noise prediction, Ho et al. 2020)
    score   grad_z log q(z_t | x) = -eps / sigma_t            (Song & Ermon 2019; Vincent 2011)
    energy  grad_z E = -score = eps / sigma_t   (E the energy, p ~ exp(-E); LeCun et al. 2006)
    v       alpha_t eps - sigma_t x             (Salimans & Ho 2022, sec. 4)
    flow    dz_t/dt = alpha'_t x + sigma'_t eps (flow matching velocity, Lipman et al. 2023)

Every prediction is turned into x0-hat (the common hub) and from there into any other, so all
36 ordered pairs are exact. For variance preserving schedules (alpha^2 + sigma^2 = 1) the v-rows
reduce to the lecture's table (x0 = alpha z - sigma v); for rectified flow (alpha = 1 - t,
sigma = t) the flow rows reduce to u = eps - x, x0 = z - sigma u. The general forms below hold
for every schedule, including VE/EDM where alpha = 1.
"""

from __future__ import annotations

import torch

from .schedules import Schedule

Tensor = torch.Tensor

PARAMETERIZATIONS = ("x0", "eps", "score", "energy", "v", "flow")


def check_parameterization(name: str) -> str:
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; allowed: {', '.join(PARAMETERIZATIONS)}")
    return name


def broadcast(c: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample coefficients of shape (B,) (or a scalar) to broadcast against (B, ...)."""
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    if c.ndim == 0 or c.ndim == like.ndim:
        return c
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


def coefficients(schedule: Schedule, t, like: Tensor, derivatives: bool = False):
    """(alpha_t, sigma_t) [and (alpha'_t, sigma'_t)] shaped to broadcast against `like`."""
    out = [schedule.alpha(t), schedule.sigma(t)]
    if derivatives:
        out += [schedule.dalpha(t), schedule.dsigma(t)]
    return tuple(broadcast(c, like) for c in out)


def target(name: str, x: Tensor, eps: Tensor, t, schedule: Schedule) -> Tensor:
    """The regression target of parameterization `name` given the clean x and the noise eps."""
    check_parameterization(name)
    if name == "flow":
        alpha, sigma, dalpha, dsigma = coefficients(schedule, t, x, derivatives=True)
        return dalpha * x + dsigma * eps
    alpha, sigma = coefficients(schedule, t, x)
    if name == "x0":
        return x
    if name == "eps":
        return eps
    if name == "score":
        return -eps / sigma
    if name == "energy":
        return eps / sigma
    return alpha * eps - sigma * x  # v


def to_x0(pred: Tensor, name: str, z: Tensor, t, schedule: Schedule) -> Tensor:
    """x0-hat from a prediction of kind `name` at (z_t, t).

    eps:    x = (z - sigma eps) / alpha
    score:  x = (z + sigma^2 score) / alpha               (Tweedie's formula, Efron 2011)
    energy: x = (z - sigma^2 grad E) / alpha
    v:      x = (alpha z - sigma v) / (alpha^2 + sigma^2)
    flow:   x = (sigma u - sigma' z) / (alpha' sigma - alpha sigma')
            (from u = alpha' x + sigma' eps and eps = (z - alpha x) / sigma; the denominator is
             alpha sigma lambda'_t / 2, non-zero wherever the log-SNR is strictly monotone)

    At zero SNR (alpha_t = 0, Lin et al. 2024) x0, v (x = -v / sigma) and flow (x = u / alpha') still
    give x0; eps, score and energy do not (z = sigma eps holds no x): ValueError, never inf or NaN.
    """
    check_parameterization(name)
    if name == "x0":
        return pred
    if name == "flow":
        alpha, sigma, dalpha, dsigma = coefficients(schedule, t, z, derivatives=True)
        return _over(sigma * pred - dsigma * z, dalpha * sigma - alpha * dsigma, name)
    alpha, sigma = coefficients(schedule, t, z)
    if name == "eps":
        return _over(z - sigma * pred, alpha, name)
    if name == "score":
        return _over(z + sigma**2 * pred, alpha, name)
    if name == "energy":
        return _over(z - sigma**2 * pred, alpha, name)
    return (alpha * z - sigma * pred) / (alpha**2 + sigma**2)  # v


def _over(numerator: Tensor, denominator: Tensor, name: str) -> Tensor:
    """numerator / denominator of `to_x0`; ValueError where the denominator is 0 (x0 undetermined)."""
    if bool((denominator == 0).any()):
        why = "alpha' sigma = alpha sigma'" if name == "flow" else "alpha_t = 0: zero SNR, where x0, v and flow still do"
        raise ValueError(f"parameterization {name!r} does not determine x0 where {why}")
    return numerator / denominator


def from_x0(x0: Tensor, name: str, z: Tensor, t, schedule: Schedule) -> Tensor:
    """A prediction of kind `name` from x0-hat at (z_t, t): the target with eps = (z - alpha x0) / sigma."""
    check_parameterization(name)
    if name == "x0":
        return x0
    alpha, sigma = coefficients(schedule, t, z)
    eps = (z - alpha * x0) / sigma
    return target(name, x0, eps, t, schedule)


def convert(pred: Tensor, src: str, dst: str, z: Tensor, t, schedule: Schedule) -> Tensor:
    """Convert a prediction at (z_t, t) from parameterization `src` to `dst` (exact, any schedule)."""
    check_parameterization(src), check_parameterization(dst)
    if src == dst:
        return pred
    return from_x0(to_x0(pred, src, z, t, schedule), dst, z, t, schedule)


def score_from_energy(energy_fn, z: Tensor, t, create_graph: bool = False) -> Tensor:
    """score(z, t) = -grad_z E(z, t) for a scalar-per-sample energy network E (summed over the batch).
    A z already in a graph (z.requires_grad, e.g. a function of x whose divergence is taken) is kept
    in it, so with create_graph the score is differentiable in what z came from."""
    with torch.enable_grad():
        if not z.requires_grad:
            z = z.detach().requires_grad_(True)
        energy = energy_fn(z, t)
        (grad,) = torch.autograd.grad(energy.sum(), z, create_graph=create_graph)
    return -grad
