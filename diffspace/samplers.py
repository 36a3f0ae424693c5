"""Samplers and time grids, all in the scale-free space of Karras et al. (2022).

A denoiser is any callable ``D(x, sigma) -> x0_hat`` with ``x = z_t / alpha_t = x0 + sigma * eps``
and ``sigma`` a tensor of shape (batch,). Every sampler has the signature

    sampler(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> Tensor

where ``x`` is the noisy state at ``sigmas[0]`` (e.g. ``sigmas[0] * randn``), ``sigmas`` is a strictly
decreasing 1-D grid (normally ending in 0, see `get_sigmas`) and the result is the sample at
``sigmas[-1]``. ``callback(dict(i=, x=, sigma=, denoised=))`` is called once per step with the state
before the step. Randomness comes only from ``generator`` (on the device of ``x``); deterministic
samplers accept and ignore it. Unknown options raise TypeError naming the option, values outside
`OPTION_RULES` ValueError naming the value and what is allowed.

The probability-flow ODE in this space is (Karras et al. 2022, eq. 4 with sigma(t) = t, s(t) = 1)

    dx/dsigma = (x - D(x, sigma)) / sigma,       equivalently  dx/dlambda = D - x,  lambda = -log sigma,

and every step that lands on sigma = 0 is the denoising step x <- D(x, sigma) (the Euler step to 0),
unless a sampler's docstring says otherwise. Step coefficients are computed in float64 (Python
floats); the state keeps the dtype of ``x``.

A grid may start at sigma = inf (zero terminal SNR, Lin et al. 2024: a VP chain with alpha-bar_T = 0).
The scale-free state is infinite there, so by convention the state handed over holds the unit noise
eps = lim x / sigma (= z_T of the chain), and D(eps, inf) is the model's x0 from pure noise (the data
mean E[x0] for the exact denoiser; -v for v-prediction). Every sampler in SAMPLERS takes such a grid:
`step_from_infinity` takes the first step, the limit sigma -> inf of the common step
x_next = D + (sigma_down / sigma)(x - D) + sigma_up z with DDIM's sigma_up = eta sigma_1,
sigma_down = sqrt(1 - eta^2) sigma_1:

    x_1 = D(eps, inf) + sqrt(1 - eta^2) sigma_1 eps + eta sigma_1 z,

eta = the `eta` option of ddim, 1 for ddpm (its posterior q(x_1 | x_T, x0 = D) at alpha_T = 0;
Ho et al.'s variance 'beta' would put sigma_T^2 = beta_T = 1 there, sigma_up = sqrt(1 + sigma_1^2)),
0 for every other sampler (the limit of its first-order step: Heun-type corrections and the
stochastic samplers' own steps have no finite limit over an infinite step). Given a D(., inf) that
does not depend on eps, as the exact one, eta does not change the law of x_1: N(D, sigma_1^2 I).
The sampler then runs on the finite rest of the grid from (x_1, sigma_1) (multistep histories start
there); that first step costs one evaluation (`sampler_nfe(..., from_infinity=True)`).

Which one: `deis_pc` (defaults: order 4, rho = 7, lower_order_final=True) is the recommended
deterministic sampler: a tAB-DEIS predictor with a UniC-style corrector at no extra NFE. On the
EDM grid (rho = 7) with exact Gaussian-mixture denoisers (benchmarks/samplers.py: 2-D ring8, 64-D
image64) it had the lowest error at 10-20 NFE, ahead of `deis`, `ipndm`, `unipc`, `dpmpp_2m` /
`dpmpp_3m` and diffusers' EDM schedulers, and stays usable at 5 NFE; `heun` needs far more NFE for
the same error. Weak spots, measured: at 5 NFE on the 64-D mixture its sliced W2 is about twice
`deis`'s, and on a single Gaussian at 4-16 steps plain `deis` is more accurate.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple

import numpy as np
import torch

from .schedules import DiscreteVP, Schedule, VPSDE, RectifiedFlow, ddpm_linear, iddpm_sigmas

Tensor = torch.Tensor

__all__ = ["SAMPLERS", "GRIDS", "get_sampler", "sampler_nfe", "get_sigmas", "initial_state", "step_from_infinity"]


# -- shared helpers ---------------------------------------------------------------------------------
def _levels(sigmas) -> list[float]:
    """Validate a grid (1-D, >= 2 values, finite, strictly decreasing, last >= 0) -> Python floats."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least 2 values, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas must be finite (a grid starting at sigma = inf: call the sampler through SAMPLERS)")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing (from noise to data), got {s[:4].tolist()}...")
    if float(s[-1]) < 0:
        raise ValueError(f"sigmas must be >= 0, got last value {float(s[-1])}")
    return s.tolist()


def _denoise(denoiser, x: Tensor, sigma: float) -> Tensor:
    """D(x, sigma) with sigma broadcast to shape (batch,)."""
    return denoiser(x, x.new_full((x.shape[0],), sigma))


def _noise(x: Tensor, generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _report(callback, i: int, x: Tensor, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback(dict(i=i, x=x, sigma=sigma, denoised=denoised))


def _step(x: Tensor, denoised: Tensor, sigma: float, sigma_down: float, sigma_up: float = 0.0, generator=None):
    """The common step x_next = D + sigma_down * (x - D) / sigma + sigma_up * z, z ~ N(0, I).

    sigma_down = sigma_next, sigma_up = 0 is the Euler / DDIM(eta=0) / DPM-Solver++(1) step (exact
    for constant D); ancestral samplers pick (sigma_down, sigma_up) from their posterior.
    """
    x_next = denoised + (sigma_down / sigma) * (x - denoised)
    return x_next + sigma_up * _noise(x, generator) if sigma_up > 0 else x_next


def step_from_infinity(denoiser, eps: Tensor, sigma_next: float, eta: float = 0.0, generator=None, callback=None):
    """The first step of a grid that starts at sigma = inf (module docstring): from the unit noise eps,

        x_1 = D(eps, inf) + sqrt(1 - eta^2) sigma_1 eps + eta sigma_1 z,   z ~ N(0, I),

    the limit sigma -> inf of `_step` with DDIM's (sigma_down, sigma_up) (Song et al. 2021a, eq. 12;
    Lin et al. 2024, sec. 3.3: the sampler starts from pure noise at alpha-bar_T = 0). One evaluation,
    reported to the callback as step 0 at sigma = inf."""
    _check_options("ddim", dict(eta=eta))
    denoised = _denoise(denoiser, eps, math.inf)
    _report(callback, 0, eps, math.inf, denoised)
    x = denoised + math.sqrt(1 - eta**2) * sigma_next * eps
    return x + eta * sigma_next * _noise(eps, generator) if eta > 0 and sigma_next > 0 else x


PRIORS = ("sigma", "unit")


def initial_state(eps: Tensor, sigma_max: float, prior: str = "sigma") -> Tensor:
    """The state at a grid's first level sigma_max for the unit noise eps: sigma_max eps (prior 'sigma',
    Karras et al. 2022, Algorithm 1) or sqrt(1 + sigma_max^2) eps (prior 'unit': z_T = eps ~ N(0, I)
    as in Ho et al. 2020, Algorithm 2, divided by alpha_T of the VP chain); eps itself at sigma_max =
    inf (the convention of a zero-terminal-SNR start)."""
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r}; allowed: {', '.join(PRIORS)}")
    if math.isinf(sigma_max):
        return eps
    return (math.sqrt(1 + sigma_max**2) if prior == "unit" else sigma_max) * eps


def _starting_at_infinity(sampler, eta: float = 0.0):
    """`sampler` made to take a grid that starts at sigma = inf: `step_from_infinity` (with the
    sampler's own `eta` option if it has one, else `eta`), then the sampler on sigmas[1:]."""

    @functools.wraps(sampler)
    def run(denoiser, x, sigmas, *, generator=None, callback=None, **options):
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        if s.ndim != 1 or s.numel() < 2 or not math.isinf(float(s[0])):
            return sampler(denoiser, x, sigmas, generator=generator, callback=callback, **options)
        x = step_from_infinity(denoiser, x, float(s[1]), options.get("eta", eta), generator, callback)
        if s.numel() == 2:
            return x
        shifted = None if callback is None else (lambda info: callback({**info, "i": info["i"] + 1}))
        return sampler(denoiser, x, sigmas[1:], generator=generator, callback=shifted, **options)

    return run


class _TimeODE:
    """Karras et al. (2022) eq. 4 in a schedule's own time t, state x = s(t) * x~:

        dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x / s, sigma),

    sigma(t) = schedule.sigma_tilde(t), s(t) = schedule.alpha(t),
    sigma'(t) = (sigma_t' alpha_t - sigma_t alpha_t') / alpha_t^2. With schedule=None, t = sigma, s = 1.
    """

    def __init__(self, denoiser, schedule: Schedule | None):
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffspace Schedule or None, got {type(schedule).__name__}")
        self.denoiser, self.schedule = denoiser, schedule

    def times(self, sigmas: list[float]) -> list[float]:
        if self.schedule is None:
            return sigmas
        return self.schedule.t_from_sigma_tilde(torch.tensor(sigmas, dtype=torch.float64)).tolist()

    def scale(self, t: float) -> float:
        return 1.0 if self.schedule is None else float(self.schedule.alpha(torch.tensor(t, dtype=torch.float64)))

    def derivative(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """(dx/dt, D) at state x and time t."""
        if self.schedule is None:
            denoised = _denoise(self.denoiser, x, t)
            return (x - denoised) / t, denoised
        sch, tt = self.schedule, torch.tensor(t, dtype=torch.float64)
        alpha, dalpha, sig_t, dsig_t = (float(f(tt)) for f in (sch.alpha, sch.dalpha, sch.sigma, sch.dsigma))
        sigma = sig_t / alpha
        dsigma = (dsig_t * alpha - sig_t * dalpha) / alpha**2
        denoised = _denoise(self.denoiser, x / alpha, sigma)
        return (dsigma / sigma + dalpha / alpha) * x - (dsigma * alpha / sigma) * denoised, denoised


# -- ODE samplers: Euler and Heun (EDM Algorithm 1) ---------------------------------------------------
def euler(denoiser, x, sigmas, *, schedule=None, generator=None, callback=None):
    """Euler's method on the probability-flow ODE: x_{i+1} = x_i + (t_{i+1} - t_i) dx/dt(x_i, t_i).

    schedule=None integrates in sigma: x_{i+1} = x_i + (sigma_{i+1} - sigma_i)(x_i - D_i)/sigma_i
    (= DDIM eta=0 = DPM-Solver++(1)). A diffspace Schedule integrates Karras et al. (2022) eq. 4 in
    that schedule's own time, as in Table 1's VP (VPSDE, t-grid) and VE (SqrtVE, t = sigma^2) columns.
    Source: Karras et al. (2022) Algorithm 1 without the correction.
    """
    return _euler_heun(denoiser, x, sigmas, schedule, False, callback)


def heun(denoiser, x, sigmas, *, schedule=None, generator=None, callback=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1):

    x' = x_i + h d_i,  d_i = dx/dt(x_i, t_i),  h = t_{i+1} - t_i;  x_{i+1} = x_i + h (d_i + dx/dt(x', t_{i+1})) / 2,
    except on a step to sigma = 0, which stays an Euler step. NFE = 2N - 1 on a grid ending in 0.
    `schedule` as in `euler`.
    """
    return _euler_heun(denoiser, x, sigmas, schedule, True, callback)


def _euler_heun(denoiser, x, sigmas, schedule, second_order: bool, callback):
    levels = _levels(sigmas)
    ode = _TimeODE(denoiser, schedule)
    ts = ode.times(levels)
    x = x * ode.scale(ts[0])
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d, denoised = ode.derivative(x, t)
        _report(callback, i, x / ode.scale(t), levels[i], denoised)
        x_next = x + (t_next - t) * d
        if second_order and levels[i + 1] > 0:
            d_next, _ = ode.derivative(x_next, t_next)
            x_next = x + (t_next - t) * 0.5 * (d + d_next)
        x = x_next
    return x / ode.scale(ts[-1])


def flow_euler(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler on the rectified-flow ODE (Liu et al. 2023) in its own time t = sigma / (1 + sigma):

    z = x / (1 + sigma), velocity u = (z - D(x, sigma)) / t, z_{i+1} = z_i + (t_{i+1} - t_i) u_i;
    inputs and outputs are scale-free. This is `euler` with schedule=RectifiedFlow().
    """
    return euler(denoiser, x, sigmas, schedule=RectifiedFlow(), callback=callback)


def flow_heun(denoiser, x, sigmas, *, generator=None, callback=None):
    """Heun on the rectified-flow ODE in t = sigma / (1 + sigma): `heun` with schedule=RectifiedFlow()."""
    return heun(denoiser, x, sigmas, schedule=RectifiedFlow(), callback=callback)


# -- adaptive: Dormand-Prince 5(4) with error control -------------------------------------------------
# Dormand & Prince (1980); Hairer, Norsett & Wanner, Solving ODEs I (1993), Table II.5.2: nodes c,
# stages 2..6 (a), the 5th-order weights b (also the 7th stage's row: FSAL) and e = b - b^ (b^ the
# embedded 4th-order weights).
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


class ODESolution(NamedTuple):
    """What `dormand_prince` returns: y(t1), f(t1, y(t1)) (its last stage), the evaluations of f it
    spent, the accepted and rejected steps, and `error`: the sum over accepted steps of the absolute
    local error estimates, elementwise (shape of y)."""

    y: Tensor
    dy: Tensor
    nfe: int
    accepted: int
    rejected: int
    error: Tensor


def dormand_prince_step(f, t: float, y: Tensor, h: float, k1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the Dormand-Prince 5(4) pair on dy/dt = f(t, y) from (t, y), k1 = f(t, y):

        k_i = f(t + c_i h, y + h sum_{j<i} a_ij k_j),  y_new = y + h sum_i b_i k_i,  k7 = f(t + h, y_new),
        error = h sum_i (b_i - b^_i) k_i  (the 5th-order y_new minus the embedded 4th-order solution).

    Returns (y_new, error, k7); k7 is the next step's k1 (first same as last), so a step costs 6
    evaluations. Coefficients: Hairer, Norsett & Wanner (1993), Table II.5.2."""
    ks = [k1]
    for c, row in zip(_DP_C, _DP_A):
        ks.append(f(t + c * h, y + h * sum(a * k for a, k in zip(row, ks))))
    y_new = y + h * sum(b * k for b, k in zip(_DP_B, ks) if b)
    ks.append(f(t + h, y_new))
    return y_new, h * sum(e * k for e, k in zip(_DP_E, ks) if e), ks[-1]


def _norm(v: Tensor) -> float:
    """The largest over the batch (dim 0) of each sample's RMS over its other dims."""
    return float(v.double().reshape(len(v), -1).pow(2).mean(1).sqrt().max())


def check_tolerances(rtol, atol) -> None:
    """ValueError unless the error tolerances of `dormand_prince` are finite numbers > 0."""
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
            raise ValueError(f"{name}={tol!r} must be a finite number > 0")


def dormand_prince(f, y: Tensor, t0: float, t1: float, *, rtol: float, atol: float, on_step=None) -> ODESolution:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction) with `dormand_prince_step` under
    error control (Hairer, Norsett & Wanner 1993, sec. II.4):

    * error norm (eq. 4.11) per sample, the batch's largest deciding (the samples share their steps):
      err = max_b RMS_b((y_new - y^) / (atol + rtol max(|y|, |y_new|))), RMS_b over sample b's elements
      (dim 0 indexes the samples). So every sample meets the tolerance, whatever its batch-mates;
      torchdiffeq, scipy and k-diffusion's dpm_adaptive take one RMS over the whole batch instead,
      which lets a hard sample in a large batch go under-resolved (measured on ring8's PF-ODE
      likelihood at rtol = 1e-5, batches of 128 and 1024 points: the worst point off by 3.7e-3 to
      5.8e-3 nats that way, 3.1e-4 to 6.5e-4 with this norm, at 1.2x the NFE);
    * a step is accepted if err <= 1; the next step size either way (eq. 4.13, with q = 4, the lower order)
      h_new = h min(fac_max, max(0.2, 0.9 err^(-1/5))), fac_max = 10 (DOPRI5's value), 1 right after a rejection;
    * the first step size by the recipe "Starting step size" of sec. II.4 (one extra evaluation).

    on_step(i, t, y, dy, nfe) is called after the i-th accepted step with its starting point
    (dy = f(t, y)) and the evaluations spent so far. Raises FloatingPointError if f turns non-finite
    (the step size would shrink forever)."""
    check_tolerances(rtol, atol)
    direction = 1.0 if t1 >= t0 else -1.0
    dy = f(t0, y)
    if t0 == t1:
        return ODESolution(y, dy, 1, 0, 0, torch.zeros_like(y))
    scale = atol + rtol * y.abs()
    d0, d1 = _norm(y / scale), _norm(dy / scale)
    h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, abs(t1 - t0))
    d2 = _norm((f(t0 + direction * h0, y + direction * h0 * dy) - dy) / scale) / h0
    h = min(100 * h0, (0.01 / max(d1, d2)) ** (1 / 5) if max(d1, d2) > 1e-15 else max(1e-6, 1e-3 * h0))
    t, nfe, accepted, rejected, just_rejected = t0, 2, 0, 0, False
    error = torch.zeros_like(y)
    while direction * (t1 - t) > 0:
        last = h >= abs(t1 - t)
        step = t1 - t if last else direction * h
        y_new, local, dy_new = dormand_prince_step(f, t, y, step, dy)
        nfe += 6
        err = _norm(local / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if not math.isfinite(err):
            raise FloatingPointError(f"dormand_prince: non-finite error estimate at t={t:.6g} (the vector field diverged)")
        factor = 10.0 if err == 0 else 0.9 * err ** -0.2
        if err <= 1:
            if on_step is not None:
                on_step(accepted, t, y, dy, nfe)
            t, y, dy, error = (t1 if last else t + step), y_new, dy_new, error + local.abs()
            accepted += 1
            h = abs(step) * min(1.0 if just_rejected else 10.0, max(0.2, factor))
        else:
            rejected += 1
            h = abs(step) * max(0.2, min(1.0, factor))
        just_rejected = err > 1
    return ODESolution(y, dy, nfe, accepted, rejected, error)


def adaptive(denoiser, x, sigmas, *, rtol=1e-3, atol=None, generator=None, callback=None):
    """The probability-flow ODE by Dormand-Prince 5(4) with error control (`dormand_prince`) in
    lambda = -log sigma:

        dx/dlambda = D(x, e^-lambda) - x,   from lambda = -log sigmas[0] to -log sigma_min,

    sigma_min the grid's last positive value; only the grid's endpoints and whether it ends in 0
    matter (the solver picks its own steps). In lambda the linear part has unit rate, so the step
    size follows how fast D changes, not the 1/sigma of dx/dsigma = (x - D) / sigma that makes an
    explicit solver in sigma take steps ~ sigma near sigma_min (the lambda of DPM-Solver and of
    k-diffusion's dpm_adaptive). A grid ending in 0 ends with the denoising step x <- D(x, sigma_min),
    which costs nothing: D there is the last accepted step's 7th stage.

    rtol (default 1e-3) and atol (default: rtol; the state near the data is in data units, about 1
    per coordinate) enter `dormand_prince`'s per-sample error norm: the samples share their steps,
    and each meets the tolerance. NFE = 2 + 6 (accepted + rejected steps), known only after the
    run: `sampler_nfe` returns None; `callback` gets `nfe` (the evaluations so far) in its dict, once
    per accepted step (with the state before it) and once at the end at sigma_min (denoised = D
    there), whose `nfe` is the total (from a grid starting at sigma = inf, SAMPLERS' step from inf
    adds one evaluation more). Peers: score_sde's RK45 (scipy, rtol = atol = 1e-5), flow_matching's
    dopri5 (torchdiffeq).
    """
    atol = rtol if atol is None else atol
    check_tolerances(rtol, atol)
    levels = _levels(sigmas)
    positive = [s for s in levels if s > 0]
    field = lambda lam, y: _denoise(denoiser, y, math.exp(-lam)) - y  # noqa: E731
    report = None
    if callback is not None:
        report = lambda i, lam, y, dy, nfe: callback(dict(i=i, x=y, sigma=math.exp(-lam), denoised=dy + y, nfe=nfe))  # noqa: E731
    sol = dormand_prince(field, x, -math.log(positive[0]), -math.log(positive[-1]), rtol=rtol, atol=atol, on_step=report)
    denoised = sol.dy + sol.y
    if report is not None:
        report(sol.accepted, -math.log(positive[-1]), sol.y, sol.dy, sol.nfe)
    return denoised if levels[-1] == 0 else sol.y


# -- stochastic samplers ----------------------------------------------------------------------------
def edm_sde(denoiser, x, sigmas, *, S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0, generator=None, callback=None):
    """EDM stochastic sampler (Karras et al. 2022, Algorithm 2):

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0,
    sigma_hat = (1 + gamma_i) sigma_i,  x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z,
    then one Heun step from (x_hat, sigma_hat) to sigma_{i+1} (Euler on the step to 0).
    Defaults are the generic (S_churn = 0: plain Heun); the paper's tuned values are e.g.
    S_churn = 80, S_tmin = 0.05, S_tmax = 50, S_noise = 1.003 (ImageNet-64, Table 5).
    """
    _check_options("edm_sde", dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise))
    levels = _levels(sigmas)
    n = len(levels) - 1
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * _noise(x, generator)
        denoised = _denoise(denoiser, x, sigma_hat)
        _report(callback, i, x, sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = (x_next - _denoise(denoiser, x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


def ddpm(denoiser, x, sigmas, *, variance="beta", generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on the VP chain of the grid.

    alpha-bar_i = 1 / (1 + sigma_i^2), beta = 1 - alpha-bar_i / alpha-bar_{i-1}. Algorithm 2's
    z_{t-1} = (z_t - beta / sqrt(1 - alpha-bar_t) eps_hat) / sqrt(1 - beta) + sigma_t z, divided by
    sqrt(alpha-bar_{t-1}), is in scale-free form (eps_hat = (x - D) / sigma, s = sigma_i, s' = sigma_{i+1}):

        x_next = D + (s'^2 / s) (x - D) / s + sigma_up z,
        sigma_up^2 = (s^2 - s'^2)(1 + s'^2) / (1 + s^2)     (variance='beta', sigma_t^2 = beta_t: default)
        sigma_up^2 = s'^2 (s^2 - s'^2) / s^2                 (variance='beta_tilde', the posterior's)

    Ho et al. report both choices give similar samples. A learned variance (Nichol & Dhariwal 2021,
    eq. 15) is a callable variance(x, sigma) -> (D, v) used in place of the denoiser (one evaluation
    per step), v elementwise in [0, 1]: sigma_up^2 = exp(v log(beta's) + (1 - v) log(beta_tilde's)).
    No noise on the step to sigma = 0 (z = 0 at t = 1), so the variance at t = 1, where the bound's
    conventions differ (process.reverse_variance: 'beta' vs 'beta_plain'), plays no part here.
    """
    _check_options("ddpm", dict(variance=variance))
    learned = callable(variance)
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        if learned:
            denoised, v = variance(x, x.new_full((x.shape[0],), sigma))
        else:
            denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        gap = sigma**2 - sigma_next**2
        up2_beta, up2_tilde = gap * (1 + sigma_next**2) / (1 + sigma**2), sigma_next**2 * gap / sigma**2
        if learned and sigma_next > 0:
            up = torch.exp(0.5 * (v * math.log(up2_beta) + (1 - v) * math.log(up2_tilde)))
            x = _step(x, denoised, sigma, sigma_next**2 / sigma) + up * _noise(x, generator)
        else:
            up2 = up2_beta if variance == "beta" else up2_tilde
            x = _step(x, denoised, sigma, sigma_next**2 / sigma, math.sqrt(up2) if sigma_next > 0 else 0.0, generator)
    return x


def ddim(denoiser, x, sigmas, *, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021a, eq. 12) in scale-free form:

    sigma_eta = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a') (a = alpha-bar), divided by sqrt(a'), gives
    sigma_up = eta * s' * sqrt(s^2 - s'^2) / s,  sigma_down = sqrt(s'^2 - sigma_up^2),
    x_next = D + sigma_down (x - D) / s + sigma_up z.
    eta = 0 is Euler in sigma; eta = 1 is DDPM with the posterior variance (beta_tilde). 0 <= eta <= 1.
    """
    _check_options("ddim", dict(eta=eta))
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        sigma_up = eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma
        x = _step(x, denoised, sigma, math.sqrt(sigma_next**2 - sigma_up**2), sigma_up, generator)
    return x


def euler_maruyama(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler-Maruyama on the reverse SDE for sigma(t) = t (Song et al. 2021b eq. 6; Karras eq. 6):

    dx = -2 sigma score dsigma + sqrt(2 sigma) dW,  score = (D - x) / sigma^2, so
    x_next = x + 2 (s' - s)(x - D) / s + sqrt(2 s (s - s')) z.
    The last step to sigma = 0 is the deterministic denoising step x <- D (the EM step would
    return 2D - x there).
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            x = _step(x, denoised, sigma, 2 * sigma_next - sigma, math.sqrt(2 * sigma * (sigma - sigma_next)), generator)
    return x


def _langevin_corrector(denoiser, x, sigma, snr, generator):
    """Song et al. (2021b) Algorithm 4 (VE): g = score, eps = 2 (snr ||z|| / ||g||)^2,
    x <- x + eps g + sqrt(2 eps) z; norms are per-sample and averaged over the batch, as in their code."""
    grad = (_denoise(denoiser, x, sigma) - x) / sigma**2
    z = _noise(x, generator)
    grad_norm = grad.flatten(1).norm(dim=1).mean()
    noise_norm = z.flatten(1).norm(dim=1).mean()
    step = 2 * (snr * noise_norm / grad_norm) ** 2
    return x + step * grad + torch.sqrt(2 * step) * z


def pc(denoiser, x, sigmas, *, predictor="reverse_diffusion", snr=0.16, n_corrector=1, generator=None, callback=None):
    """Predictor-corrector sampling (Song et al. 2021b, Algorithm 2 (VE) with Algorithm 4's corrector).

    Predictor 'reverse_diffusion': x_next = x + (s^2 - s'^2) score + sqrt(s^2 - s'^2) z (= D +
    (s'^2 / s)(x - D) / s + ...), or 'euler' (the probability-flow ODE step). Then `n_corrector`
    Langevin steps at sigma_{i+1} with signal-to-noise ratio `snr` (0.16 is their CIFAR-10 VE value).
    The step to sigma = 0 is noise-free (reverse diffusion's mean is exactly D there) and uncorrected.
    """
    _check_options("pc", dict(predictor=predictor, snr=snr, n_corrector=n_corrector))
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if predictor == "euler" or sigma_next == 0:
            x = _step(x, denoised, sigma, sigma_next)
        else:
            x = _step(x, denoised, sigma, sigma_next**2 / sigma, math.sqrt(sigma**2 - sigma_next**2), generator)
        for _ in range(n_corrector if sigma_next > 0 else 0):
            x = _langevin_corrector(denoiser, x, sigma_next, snr, generator)
    return x


def langevin(denoiser, x, sigmas, *, eps=None, n_steps=100, final_denoise=True, generator=None, callback=None):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the positive sigmas:

    alpha_i = eps * sigma_i^2 / sigma_L^2;  n_steps times: x <- x + alpha_i / 2 * score(x, sigma_i) + sqrt(alpha_i) z,
    score = (D - x) / sigma_i^2. eps=None means eps = 0.2 sigma_L^2 (NCSN's 2e-5 at sigma_L = 0.01).
    final_denoise=True (default) ends with x <- D(x, sigma_L), Tweedie's denoising step of
    Jolicoeur-Martineau et al. (2021), so the output is at sigma = 0; False returns x at sigma_L.
    """
    _check_options("langevin", dict(eps=eps, n_steps=n_steps, final_denoise=final_denoise))
    levels = [s for s in _levels(sigmas) if s > 0]
    sigma_last = levels[-1]
    eps = 0.2 * sigma_last**2 if eps is None else eps
    for i, sigma in enumerate(levels):
        step = eps * sigma**2 / sigma_last**2
        for _ in range(n_steps):
            denoised = _denoise(denoiser, x, sigma)
            x = x + 0.5 * step * (denoised - x) / sigma**2 + math.sqrt(step) * _noise(x, generator)
        _report(callback, i, x, sigma, denoised)
    return _denoise(denoiser, x, sigma_last) if final_denoise else x


def mala(denoiser, x, sigmas, *, energy=None, eps=None, n_steps=100, final_denoise=True, generator=None, callback=None):
    """Annealed Metropolis-adjusted Langevin (MALA; Roberts & Tweedie 1996, Besag 1994) over the
    positive sigmas, with the step rule of `langevin` (alpha_i = eps sigma_i^2 / sigma_L^2, n_steps per
    level, eps=None: 0.2 sigma_L^2, final denoising step). Each step proposes the Langevin move

        x' = x + alpha/2 s(x) + sqrt(alpha) z,   s = (D - x) / sigma^2,   q(x' | x) = N(x'; x + alpha/2 s(x), alpha I),

    and keeps it with probability min(1, p(x') q(x | x') / (p(x) q(x' | x))), log p = -energy + const:

        log r = E(x) - E(x') - |x - x' - alpha/2 s(x')|^2 / (2 alpha) + |z|^2 / 2,

    else stays at x (per sample). `energy(x, sigma) -> (B,)` is the energy of the scale-free x at noise
    level sigma (an energy model's `Diffusion.energy`; for a mixture, -log_prob): the chain then
    leaves exp(-energy) invariant at every level, whatever the denoiser (it only shapes the
    proposals), with no step-size bias, unlike `langevin`. A constant per level in the energy
    cancels in r. Evaluations: D and E once at the start of each level and once per proposal, so
    levels (n_steps + 1) denoiser calls and as many energy calls; the final step reuses D at the
    last state. The callback gets, once per level after its steps, `acceptance`: the share of
    proposals kept.
    """
    if energy is None:
        raise ValueError("mala needs energy=callable(x, sigma) -> (B,) for the Metropolis-Hastings test "
                         "(an energy model's, parameterization 'energy'; for the exact mixture -log_prob)")
    _check_options("mala", dict(energy=energy, eps=eps, n_steps=n_steps, final_denoise=final_denoise))
    levels = [s for s in _levels(sigmas) if s > 0]
    sigma_last = levels[-1]
    eps = 0.2 * sigma_last**2 if eps is None else eps

    def evaluate(y: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
        """(D, score, energy in float64) at y."""
        s = y.new_full((y.shape[0],), sigma)
        d, e = denoiser(y, s), energy(y, s)
        if e.shape != y.shape[:1]:
            raise ValueError(f"energy(x, sigma) must return one value per sample, shape ({len(y)},); got {tuple(e.shape)}")
        return d, (d - y) / sigma**2, e.double()

    def sq_norm(v: Tensor) -> Tensor:
        return v.double().flatten(1).pow(2).sum(dim=1)

    for i, sigma in enumerate(levels):
        step = eps * sigma**2 / sigma_last**2
        denoised, score, e = evaluate(x, sigma)
        kept = 0.0
        for _ in range(n_steps):
            z = _noise(x, generator)
            proposal = x + 0.5 * step * score + math.sqrt(step) * z
            d_new, score_new, e_new = evaluate(proposal, sigma)
            log_r = e - e_new - sq_norm(x - proposal - 0.5 * step * score_new) / (2 * step) + sq_norm(z) / 2
            u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64, device=x.device)
            accept = torch.log(u) < log_r
            keep = accept.reshape(-1, *([1] * (x.ndim - 1)))
            x, denoised, score = (torch.where(keep, new, old) for new, old in
                                  ((proposal, x), (d_new, denoised), (score_new, score)))
            e = torch.where(accept, e_new, e)
            kept += float(accept.double().mean()) / n_steps
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, denoised=denoised, acceptance=kept))
    return denoised if final_denoise else x


# -- high-order deterministic solvers in lambda = -log sigma -------------------------------------------
def dpmpp_2s(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2S) (Lu et al. 2022, 'DPM-Solver++', Algorithm 1, r = 1/2), data prediction:

    h = lambda' - lambda, sigma_mid = sqrt(s s'), u = D + (sigma_mid / s)(x - D),
    x_next = D_mid + (s' / s)(x - D_mid), D_mid = D(u, sigma_mid). Step to sigma = 0: x <- D.
    NFE = 2N - 1.
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next > 0:
            sigma_mid = math.sqrt(sigma * sigma_next)
            denoised = _denoise(denoiser, _step(x, denoised, sigma, sigma_mid), sigma_mid)
        x = _step(x, denoised, sigma, sigma_next)
    return x


def dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, lambda = -log sigma:

    h_i = lambda_{i+1} - lambda_i, r = h_{i-1} / h_i, D' = (1 + 1/(2r)) D_i - D_{i-1} / (2r),
    x_{i+1} = D' + (sigma_{i+1} / sigma_i)(x_i - D'). First step first order (D' = D_0);
    the step to sigma = 0 is the first-order denoising step x <- D.
    """
    levels = _levels(sigmas)
    previous = previous_denoised = None  # sigma_{i-1} and D_{i-1}
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        d_prime = denoised
        if previous is not None and sigma_next > 0:
            r = math.log(previous / sigma) / math.log(sigma / sigma_next)
            d_prime = (1 + 0.5 / r) * denoised - (0.5 / r) * previous_denoised
        x = _step(x, d_prime, sigma, sigma_next)
        previous, previous_denoised = sigma, denoised
    return x


def dpmpp_3m(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(3M): the multistep third-order data-prediction update (Lu et al. 2022, DPM-Solver++
    sec. 4 / DPM-Solver eq. 3.x, Taylor form as in k-diffusion), lambda = -log sigma:

    x_{i+1} = D_i + e^{-h}(x_i - D_i) + phi_2 d1 - phi_3 d2,  phi_2 = 1 + expm1(-h)/h, phi_3 = phi_2/h - 1/2,
    d1_0 = (D_i - D_{i-1}) / r0, d1_1 = (D_{i-1} - D_{i-2}) / r1 (r0 = h_{i-1}/h, r1 = h_{i-2}/h),
    d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1) ~ h D',  d2 = 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 D''.
    The Taylor term of D'' is int_0^h e^{-(h-s)} s^2/2 ds D'' = -phi_3 h^2 D''. Note: the reference
    codes (DPM-Solver, k-diffusion, diffusers) use d2 = (d1_0 - d1_1) / (r0 + r1) ~ h^2 D'' / 2, which
    halves that term and makes their "3M" second order; here the factor 2 is restored (measured
    order 3, see tests). Warm-up: first step order 1, second order 2 (this start-up error caps the
    global order at 2 unless D is nearly constant at sigma_max, as it is at sigma = 80);
    the step to sigma = 0 is the denoising step x <- D.
    """
    levels = _levels(sigmas)
    history: list[tuple[float, Tensor]] = []  # (lambda, D), newest last
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        history = (history + [(-math.log(sigma), denoised)])[-3:]
        x_next = _step(x, denoised, sigma, sigma_next)
        if sigma_next > 0 and len(history) > 1:
            h = math.log(sigma / sigma_next)
            phi_2 = 1 + math.expm1(-h) / h
            (lam_1, den_1), (lam_0, den_0) = history[-2], history[-1]
            r0 = (lam_0 - lam_1) / h
            d1_0 = (den_0 - den_1) / r0
            if len(history) == 2:
                x_next = x_next + phi_2 * d1_0
            else:
                lam_2, den_2 = history[0]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = 2 * (d1_0 - d1_1) / (r0 + r1)
                x_next = x_next + phi_2 * d1 - (phi_2 / h - 0.5) * d2
        x = x_next
    return x


def _unipc_coefficients(rks: list[float], h: float, order: int, variant: str, corrector: bool) -> list[float]:
    """UniPC's rho coefficients (Zhao et al. 2023, Algorithms 1-2, data prediction):
    R_{k,m} = r_m^{k-1}, b_k = h_phi_k k! / B(h) with h_phi_1 = e^{-h} - 1 and
    h_phi_{k+1} = h_phi_k / (-h) - 1 / (k+1)!, B(h) = e^{-h} - 1 ('bh2') or -h ('bh1')."""
    hh = -h
    b_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[r ** (k - 1) for r in rks] for k in range(1, order + 1)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    if corrector:
        return [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    if order == 2:
        return [0.5]
    return torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()


def _unipc_update(x, history, sigma, sigma_next, order, variant, new_denoised=None):
    """One UniP (predictor) step, or with new_denoised = D at the target, one UniC (corrector) step,
    from (x, sigma) whose D is history[-1]; history holds (lambda, D) pairs, newest last."""
    h = math.log(sigma / sigma_next)
    lam_0, den_0 = history[-1]
    rks, diffs = [], []
    for lam_k, den_k in reversed(history[-order:-1]):
        rks.append((lam_k - lam_0) / h)
        diffs.append((den_k - den_0) / rks[-1])
    rks.append(1.0)
    x_next = _step(x, den_0, sigma, sigma_next)
    b_h = math.expm1(-h) if variant == "bh2" else -h
    if new_denoised is not None:
        diffs.append(new_denoised - den_0)
        rhos = _unipc_coefficients(rks, h, order, variant, corrector=True)
    elif order == 1:
        return x_next
    else:
        rhos = _unipc_coefficients(rks, h, order, variant, corrector=False)
    return x_next - b_h * sum(rho * diff for rho, diff in zip(rhos, diffs))


def unipc(denoiser, x, sigmas, *, order=3, variant="bh2", lower_order_final=True, generator=None, callback=None):
    """UniPC (Zhao et al. 2023): multistep UniP-p predictor + UniC corrector, data prediction,
    lambda = -log sigma, B(h) = expm1(-h) ('bh2', default) or -h ('bh1').

    UniP: x_{i+1} = D_i + (s'/s)(x_i - D_i) - B(h) sum_k rho_k (D_{i-k} - D_i) / r_k (r_k = (lambda_{i-k} - lambda_i)/h).
    UniC re-does the step with the new D_{i+1} (no extra NFE) and raises the order by one.
    Order ramps up 1, 2, .. at the start; `lower_order_final` caps it by the number of steps left
    on grids of fewer than 15 steps (as diffusers' UniPCMultistepScheduler does).
    The step to sigma = 0 uses the last noise prediction eps = (x_pred - D) / sigma on the corrected
    state: x <- x_corr - sigma eps (= D when the corrector changed nothing).
    """
    _check_options("unipc", dict(order=order, variant=variant, lower_order_final=lower_order_final))
    levels = _levels(sigmas)
    n_ode = len(levels) - 1 - (levels[-1] == 0)  # multistep steps between positive sigmas
    history: list[tuple[float, Tensor]] = []
    x_prev = step_order = None
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        x_corr = x
        if x_prev is not None:
            x_corr = _unipc_update(x_prev, history, levels[i - 1], sigma, step_order, variant, denoised)
        history = (history + [(-math.log(sigma), denoised)])[-order:]
        if sigma_next == 0:
            x = x_corr - (x - denoised)
            break
        step_order = min(order, len(history), n_ode - i if lower_order_final and n_ode < 15 else order)
        x_prev, x = x_corr, _unipc_update(x_corr, history, sigma, sigma_next, step_order, variant)
    return x


def ipndm(denoiser, x, sigmas, *, order=4, generator=None, callback=None):
    """iPNDM (Zhang & Chen 2023, DEIS paper, sec. 4 / App.): Adams-Bashforth with fixed coefficients
    on d = (x - D) / sigma in sigma, warm-up with lower orders:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * {d_i, (3d_i - d_{i-1})/2, (23d_i - 16d_{i-1} + 5d_{i-2})/12,
    (55d_i - 59d_{i-1} + 37d_{i-2} - 9d_{i-3})/24}[order - 1]. The step to sigma = 0 is x <- D.
    """
    _check_options("ipndm", dict(order=order))
    levels = _levels(sigmas)
    ds: list[Tensor] = []
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        ds = (ds + [(x - denoised) / sigma])[-order:]
        if sigma_next == 0:
            x = denoised
        else:
            coefficients = _ADAMS_BASHFORTH[len(ds) - 1]
            x = x + (sigma_next - sigma) * sum(c * d for c, d in zip(coefficients, reversed(ds)))
    return x


def _deis_weights(taus: list[float], sigma: float, sigma_next: float, rho: float) -> list[float]:
    """w_j = int_sigma^sigma_next L_j(sigma'^(1/rho)) dsigma' for the Lagrange basis L_j on the nodes
    taus, by 8-point Gauss-Legendre in tau (exact while len(taus) + rho <= 17 for integer rho)."""
    nodes, weights = _GAUSS_LEGENDRE
    a, b = sigma ** (1 / rho), sigma_next ** (1 / rho)
    tau = 0.5 * (b - a) * nodes + 0.5 * (a + b)
    w = 0.5 * (b - a) * weights * rho * tau ** (rho - 1)  # dsigma = rho tau^(rho-1) dtau
    basis = [math.prod(((tau - tm) / (tj - tm) for m, tm in enumerate(taus) if m != j), start=torch.ones_like(tau))
             for j, tj in enumerate(taus)]
    return [float((w * L).sum()) for L in basis]


def deis(denoiser, x, sigmas, *, order=4, rho=7.0, generator=None, callback=None):
    """tAB-DEIS (Zhang & Chen 2023, eq. 14/15) for d = (x - D) / sigma = dx/dsigma in the time
    tau = sigma^(1/rho): d is extrapolated by the Lagrange polynomial through the last `order` points
    (tau_j, d_j) and integrated exactly in sigma,

        x_{i+1} = x_i + sum_j w_j d_{i-j},  w_j = int_{sigma_i}^{sigma_{i+1}} L_j(s^(1/rho)) ds.

    rho = 7 makes tau the time in which the EDM grid is uniform (then the weights are close to
    iPNDM's fixed Adams-Bashforth ones); rho = 1 is variable-step Adams-Bashforth in sigma.
    Warm-up with lower orders; the step to sigma = 0 is the denoising step x <- D.
    `deis_pc` adds a corrector and lower orders at the end.
    """
    return _deis(denoiser, x, sigmas, order, rho, False, False, callback)


def deis_pc(denoiser, x, sigmas, *, order=4, rho=7.0, lower_order_final=True, generator=None, callback=None):
    """Multistep predictor-corrector: the tAB-DEIS predictor of `deis` plus a UniC-style corrector
    (Zhao et al. 2023, UniPC) that costs no evaluation. The recommended deterministic sampler.

    With d = dx/dsigma = (x - D) / sigma, tau = sigma^(1/rho) and weights w = exact integrals in sigma
    of the Lagrange basis polynomials in tau (as in `deis`):
    predictor (Adams-Bashforth, order p = `order`, nodes tau_i .. tau_{i-p+1}):
        x~_{i+1} = x_i + sum_{j<p} w_j d_{i-j};
    corrector (Adams-Moulton, order p + 1, the same nodes plus tau_{i+1}), with D_{i+1} = D(x~_{i+1},
    sigma_{i+1}) the step's one evaluation and the linear part of d_{i+1} taken at the corrected state:
        x_{i+1} = x_i + sum_{j<p} w'_j d_{i-j} + w'_p (x_{i+1} - D_{i+1}) / sigma_{i+1},
    solved for x_{i+1} (w'_p < 0, so this damps like implicit Euler where 1/sigma is stiff). D_{i+1}
    is kept and d_{i+1} = (x_{i+1} - D_{i+1}) / sigma_{i+1} enters the next steps, as UniPC keeps its
    data prediction while correcting the state. Orders ramp up 1, 2, .. from the first step; with
    `lower_order_final` (default) the predictor's order is also at most the number of steps left
    before sigma_min (1 on the last step), as DPM-Solver++ / UniPC do on short grids, here on every
    grid: near sigma_min D changes fastest relative to the step. This caps the asymptotic order at 2
    wherever D still varies at sigma_min (order p + 1 without it, see tests), which costs nothing
    measurable at 35-100 NFE on the EDM grid (benchmarks/samplers.py). The step to sigma = 0 is the
    denoising step x <- D (not corrected).
    """
    return _deis(denoiser, x, sigmas, order, rho, True, lower_order_final, callback)


def _deis(denoiser, x, sigmas, order, rho, corrector: bool, lower_order_final: bool, callback):
    _check_options("deis", dict(order=order, rho=rho))
    levels = _levels(sigmas)
    n_ode = len(levels) - 1 - (levels[-1] == 0)  # steps between positive sigmas
    history: list[tuple[float, Tensor]] = []  # (tau, d), newest last
    previous = None  # (x_i, sigma_i, the predictor's nodes) of the last step, for the corrector
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            return denoised
        tau = sigma ** (1 / rho)
        if corrector and previous is not None:  # x = x_old + sum_j w_j d_j + w (x - D) / sigma, solved for x
            x_old, sigma_old, nodes = previous
            *weights, w = _deis_weights([t for t, _ in nodes] + [tau], sigma_old, sigma, rho)
            x = (x_old + sum(wj * d for wj, (_, d) in zip(weights, nodes)) - (w / sigma) * denoised) / (1 - w / sigma)
        history = (history + [(tau, (x - denoised) / sigma)])[-order:]
        nodes = history[-min(len(history), n_ode - i):] if lower_order_final else history
        previous = (x, sigma, nodes)
        x = x + sum(w * d for w, (_, d) in zip(_deis_weights([t for t, _ in nodes], sigma, sigma_next, rho), nodes))
    return x


_ADAMS_BASHFORTH = [(1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)]
_GAUSS_LEGENDRE = tuple(torch.tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(8))


SAMPLERS = {
    "euler": euler,
    "heun": heun,
    "ddpm": ddpm,
    "ddim": ddim,
    "edm_sde": edm_sde,
    "euler_maruyama": euler_maruyama,
    "pc": pc,
    "langevin": langevin,
    "mala": mala,
    "dpmpp_2s": dpmpp_2s,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "ipndm": ipndm,
    "deis": deis,
    "deis_pc": deis_pc,
    "flow_euler": flow_euler,
    "flow_heun": flow_heun,
    "adaptive": adaptive,
}
SAMPLERS = {name: _starting_at_infinity(fn, eta=1.0 if name == "ddpm" else 0.0) for name, fn in SAMPLERS.items()}


def get_sampler(name: str):
    """The sampler function called `name` (one of SAMPLERS); ValueError listing the names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _real(low: float = 0.0, high: float = math.inf, *, low_open: bool = False, infinite: bool = False):
    """Test: a number (not a bool) in [low, high] ((low, high] with low_open), finite unless `infinite`."""
    def test(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return (math.isfinite(v) or infinite) and (v > low if low_open else v >= low) and v <= high
    return test


def _integer(low: int, high: int):
    return lambda v: not isinstance(v, bool) and isinstance(v, int) and low <= v <= high


def _one_of(*choices):
    return lambda v: isinstance(v, str) and v in choices


# The allowed values of every sampler option: option -> (test, what is allowed); (sampler, option)
# where one sampler differs. `_check_options` applies them, so `sampler_nfe` (and through it
# `sampling.plan`, before any training or sampling starts) and each sampler refuse a bad value.
OPTION_RULES = {
    "eta": (_real(0, 1), "a number in [0, 1]"),
    "S_churn": (_real(), "a finite number >= 0"),
    "S_tmin": (_real(), "a finite number >= 0"),
    "S_tmax": (_real(infinite=True), "a number >= 0 (inf: no upper limit)"),
    "S_noise": (_real(), "a finite number >= 0"),
    "rho": (_real(low_open=True), "a finite number > 0"),
    "snr": (_real(low_open=True), "a finite number > 0"),
    "eps": (lambda v: v is None or _real(low_open=True)(v), "a finite number > 0 (default: 0.2 sigma_min^2)"),
    "rtol": (_real(low_open=True), "a finite number > 0"),
    "atol": (lambda v: v is None or _real(low_open=True)(v), "a finite number > 0 (default: rtol)"),
    "n_corrector": (_integer(0, 10_000), "an integer in [0, 10000]"),
    "n_steps": (_integer(1, 10**6), "an integer in [1, 1000000]"),
    "order": (_integer(1, 4), "1, 2, 3 or 4"),
    ("unipc", "order"): (_integer(1, 3), "1, 2 or 3"),
    "variant": (_one_of("bh1", "bh2"), "'bh1' or 'bh2'"),
    "predictor": (_one_of("reverse_diffusion", "euler"), "'reverse_diffusion' or 'euler'"),
    "variance": (lambda v: callable(v) or _one_of("beta", "beta_tilde")(v),
                 "'beta', 'beta_tilde' or a callable (x, sigma) -> (D, v)"),
    "final_denoise": (lambda v: isinstance(v, bool), "true or false"),
    "lower_order_final": (lambda v: isinstance(v, bool), "true or false"),
    "energy": (lambda v: v is None or callable(v), "a callable (x, sigma) -> (B,)"),
    "schedule": (lambda v: v is None or isinstance(v, Schedule), "a diffspace Schedule or none"),
}


def _check_options(name: str, options: dict) -> None:
    """TypeError for an option `name` does not take; ValueError naming any value OPTION_RULES refuses."""
    allowed = set(inspect.signature(get_sampler(name)).parameters) - {"denoiser", "x", "sigmas", "generator", "callback"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"sampler {name!r} got unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    for key, value in options.items():
        test, what = OPTION_RULES.get((name, key)) or OPTION_RULES[key]
        if not test(value):
            raise ValueError(f"sampler {name!r}: option {key}={value!r} is not allowed; allowed: {what}")


def sampler_nfe(name: str, n_steps: int, /, *, from_infinity: bool = False, **options) -> int | None:
    """Exact number of denoiser calls of sampler `name` on a grid of n_steps + 1 sigmas ending in 0
    (from_infinity: the grid starts at sigma = inf, one call for that step, then the rest's count).

    One per step, except: heun, flow_heun, edm_sde, dpmpp_2s: 2 per step and 1 for the step to 0;
    pc: 1 + n_corrector per step, no corrector after the step to 0; langevin: n_steps per positive
    sigma (its option `n_steps`, not the grid's) plus 1 for the final denoising step; mala: n_steps + 1
    per positive sigma (the level's start and each proposal; as many calls of its `energy`; the final
    denoising step reuses the last); adaptive: None,
    not known before the run (it chooses its steps; its callback reports the count, see `adaptive`),
    after checking its tolerances.
    """
    _check_options(name, options)
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be >= 1")
    if from_infinity:
        rest = sampler_nfe(name, n_steps - 1, **options) if n_steps > 1 else 0
        return None if rest is None else 1 + rest
    if name == "adaptive":
        rtol, atol = options.get("rtol", 1e-3), options.get("atol")
        check_tolerances(rtol, rtol if atol is None else atol)
        return None
    if name in ("heun", "flow_heun", "edm_sde", "dpmpp_2s"):
        return 2 * n_steps - 1
    if name == "pc":
        return n_steps + (n_steps - 1) * options.get("n_corrector", 1)
    if name == "langevin":
        return n_steps * options.get("n_steps", 100) + int(options.get("final_denoise", True))
    if name == "mala":
        return n_steps * (options.get("n_steps", 100) + 1)
    return n_steps


# -- time grids -------------------------------------------------------------------------------------
def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def _fractions(n: int) -> Tensor:
    """i / (n - 1) for i = 0..n-1 (just [0] for n = 1)."""
    return torch.arange(n, dtype=torch.float64) / max(n - 1, 1)


def _check_range(low: float, high: float, what: str) -> None:
    if not 0 < low < high:
        raise ValueError(f"{what}: need 0 < min < max, got min={low}, max={high}")


def grid_edm(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) Table 1 'Ours': sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    _check_range(sigma_min, sigma_max, "edm grid")
    if rho <= 0:
        raise ValueError(f"rho={rho} must be > 0")
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _with_zero((a + _fractions(n) * (b - a)) ** rho)


def grid_vp(n: int, eps_s: float = 1e-3, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """Karras et al. (2022) Table 1 VP: t_i = 1 + i/(n-1) (eps_s - 1), sigma_i = VPSDE sigma~(t_i)."""
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s={eps_s} must lie in (0, 1)")
    return _with_zero(VPSDE(beta_d=beta_d, beta_min=beta_min).sigma_tilde(1 + _fractions(n) * (eps_s - 1)))


def grid_ve(n: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> Tensor:
    """Karras et al. (2022) Table 1 VE: t_i = sigma_i^2 = s_max^2 (s_min^2 / s_max^2)^(i/(n-1)) (geometric sigma)."""
    _check_range(sigma_min, sigma_max, "ve grid")
    return _with_zero(torch.sqrt(sigma_max**2 * (sigma_min**2 / sigma_max**2) ** _fractions(n)))


def grid_iddpm(n: int, M: int = 1000, j0: int = 8, C1: float = 0.001, C2: float = 0.008) -> Tensor:
    """Karras et al. (2022) Table 1 iDDPM: sigma_i = u_{floor(j0 + (M-1-j0)/(n-1) i + 1/2)}, u from iddpm_sigmas."""
    if not 0 <= j0 < M:
        raise ValueError(f"j0={j0} must lie in [0, M={M})")
    u = iddpm_sigmas(M, C1, C2)
    index = torch.floor(j0 + (M - 1 - j0) * _fractions(n) + 0.5).long()
    if n > M - j0:
        raise ValueError(f"n={n} steps need distinct u_j: at most M - j0 = {M - j0}")
    return _with_zero(u[index])


def grid_logsnr(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Uniform in log-SNR (= uniform in log sigma) from sigma_max to sigma_min (Lu et al. 2022's 'logSNR')."""
    _check_range(sigma_min, sigma_max, "logsnr grid")
    return _with_zero(torch.exp(math.log(sigma_max) + _fractions(n) * math.log(sigma_min / sigma_max)))


def grid_flow(n: int, t_min: float = 0.002 / 1.002, t_max: float = 80 / 81) -> Tensor:
    """Rectified flow: t uniform from t_max to t_min, sigma = t / (1 - t) (defaults: sigma 80 .. 0.002)."""
    if not 0 < t_min < t_max < 1:
        raise ValueError(f"flow grid: need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
    t = t_max + _fractions(n) * (t_min - t_max)
    return _with_zero(t / (1 - t))


def grid_ddpm(n: int, T: int = 1000, spacing: str = "trailing", schedule: DiscreteVP | None = None,
              offset: int = 0) -> Tensor:
    """A discrete DDPM chain's sigma~ at n of its T steps (indices 1..T as in Ho et al. 2020), spaced as
    in Lin et al. (2024, Table 2) and diffusers' `timestep_spacing` (their 0-based timestep is i - 1):
    'linspace' 1 + round(linspace(0, T - 1, n)), 'leading' 1 + j floor(T/n) + offset (diffusers'
    `steps_offset`, e.g. 1 for Stable Diffusion), 'trailing' round(T - j T/n) (default); n = T is the
    full chain. The chain is ddpm_linear(T) unless `schedule` (a DiscreteVP, whose T wins) is given."""
    chain = schedule if schedule is not None else ddpm_linear(T)
    T = chain.T
    if n > T:
        raise ValueError(f"n={n} steps exceed the chain's T={T}")
    j = torch.arange(n, dtype=torch.float64)
    if spacing == "linspace":
        steps = 1 + torch.flip(torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)), [0]) if n > 1 \
            else torch.tensor([float(T)])
    elif spacing == "leading":
        steps = torch.flip(1 + j * (T // n), [0]) + offset
        if not (0 <= offset and steps[0] <= T):
            raise ValueError(f"offset={offset} puts the first of {n} leading steps at {int(steps[0])}; allowed: 0 <= offset "
                             f"<= {T - int(steps[0] - offset)} on a chain of T={T}")
    elif spacing == "trailing":
        steps = torch.round(T - j * T / n)
    else:
        raise ValueError(f"spacing={spacing!r}: use 'linspace', 'leading' or 'trailing'")
    alpha_bar = chain.alphas_bar[steps.long()]
    return _with_zero(torch.sqrt(1 / alpha_bar - 1))


GRIDS = {
    "edm": grid_edm,
    "vp": grid_vp,
    "ve": grid_ve,
    "iddpm": grid_iddpm,
    "logsnr": grid_logsnr,
    "flow": grid_flow,
    "ddpm": grid_ddpm,
}


def get_sigmas(kind: str, n: int, **params) -> Tensor:
    """n + 1 decreasing float64 noise levels of grid `kind` (one of GRIDS), the last one 0.

    Parameters per kind are those of the grid_* functions (e.g. sigma_min, sigma_max, rho for 'edm').
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown grid kind {kind!r}; allowed: {', '.join(GRIDS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive number of steps")
    sigmas = GRIDS[kind](n, **params)
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"grid {kind!r} with n={n}, {params} is not strictly decreasing")
    return sigmas
