"""Noise schedules: the coefficients of z_t = alpha_t * x + sigma_t * eps.

Every family in the lecture is one `Schedule`: alpha(t), sigma(t), their time derivatives,
the log signal-to-noise ratio logsnr(t) = log(alpha_t^2 / sigma_t^2) and its inverse
t(logsnr). The scale-free noise level of Karras et al. (2022) is

    sigma_tilde(t) = sigma_t / alpha_t = exp(-logsnr(t) / 2),

and `t_from_sigma_tilde` inverts it; this is the bridge to the denoiser interface D(x~, sigma~).

Time is continuous in [0, 1] except for `EDM`, whose time *is* sigma (t in [0, inf)).
Each formula is computed in the dtype of its input; pass float64 for reference values.
Plain Python numbers become float64 tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

Tensor = torch.Tensor


def as_tensor(t, dtype=torch.float64) -> Tensor:
    """Tensors pass through unchanged; numbers and sequences become `dtype` tensors."""
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=dtype)


_CHECKS = contextvars.ContextVar("diffspace_checks", default=True)


@contextlib.contextmanager
def unchecked():
    """Inside this block the value checks of t, sigma and the other math inputs are skipped.

    Each check reads a tensor back to the host (`bool(bad.any())`); on a GPU that waits for every
    queued kernel, so the host cannot run ahead and the GPU idles while the next kernels are
    launched. The training loop's t are right by construction (drawn from the noise distribution)
    and pass some 16 checks per step, one of them between the forward and the backward pass: it
    runs the step in this block, where the checks' masks are not even computed (a few kernels
    each). Everywhere else bad input still gets its error.
    """
    token = _CHECKS.set(False)
    try:
        yield
    finally:
        _CHECKS.reset(token)


def checking() -> bool:
    """False inside `unchecked()`."""
    return _CHECKS.get()


def on_device(owner, name: str, device: torch.device, dtype: torch.dtype | None = None, make=None) -> Tensor:
    """owner.<name>, a constant tensor (a chain's knots, iDDPM's levels), or make() (a constant derived
    from the owner, under that name), on `device` (in `dtype`): copied there once and kept on the owner.
    Copying it at every call would be a host-to-device transfer each time, and on a GPU each such
    copy waits for all queued work (a host-device sync)."""
    copies = owner.__dict__.setdefault("_device_copies", {})
    key = (name, torch.device(device), dtype)
    if key not in copies:
        copies[key] = (make() if make else getattr(owner, name)).to(device=device, dtype=dtype)
    return copies[key]


def fmt(values: Tensor) -> str:
    """The first few values of a tensor, for error messages."""
    v = values.detach().flatten()
    shown = ", ".join(f"{x:.6g}" for x in v[:3].tolist())
    return shown + (", ..." if v.numel() > 3 else "")


def check_sigma(sigma) -> Tensor:
    """sigma as a tensor (numbers become float64); ValueError if any value is negative or NaN."""
    s = as_tensor(sigma)
    if checking() and bool((bad := torch.isnan(s) | (s < 0)).any()):
        raise ValueError(f"sigma={fmt(s[bad])} is invalid: a noise level must be >= 0")
    return s


class Schedule:
    """Base class: subclasses give alpha, sigma, dalpha, dsigma, logsnr and t_from_logsnr.

    Attributes `t_min`, `t_max` bound the time domain; any t outside it, or NaN, raises ValueError.
    """

    name = "schedule"
    t_min = 0.0
    t_max = 1.0

    # -- domain -------------------------------------------------------------------------------
    def check_t(self, t) -> Tensor:
        t = as_tensor(t)
        if checking() and bool((bad := torch.isnan(t) | (t < self.t_min) | (t > self.t_max)).any()):
            raise ValueError(
                f"t={fmt(t[bad])} is outside the time domain [{self.t_min:g}, {self.t_max:g}] "
                f"of the {self.name} schedule"
            )
        return t

    # -- the coefficients (subclasses) ----------------------------------------------------------
    def alpha(self, t) -> Tensor:
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def dalpha(self, t) -> Tensor:
        """d alpha_t / dt."""
        raise NotImplementedError

    def dsigma(self, t) -> Tensor:
        """d sigma_t / dt."""
        raise NotImplementedError

    def logsnr(self, t) -> Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2) (Kingma et al. 2021, VDM eq. 2)."""
        t = self.check_t(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def _t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Unchecked inverse of `logsnr` (subclasses)."""
        raise NotImplementedError

    def t_from_logsnr(self, logsnr) -> Tensor:
        """Inverse of `logsnr`; raises ValueError where lambda lies outside the schedule's range."""
        lam = as_tensor(logsnr)
        return self._check_t_result(self._t_from_logsnr(lam), "logsnr", lam)

    # -- derived ------------------------------------------------------------------------------
    def dlogsnr(self, t) -> Tensor:
        """d lambda_t / dt = 2 (alpha'_t / alpha_t - sigma'_t / sigma_t)."""
        t = self.check_t(t)
        return 2 * (self.dalpha(t) / self.alpha(t) - self.dsigma(t) / self.sigma(t))

    def sigma_tilde(self, t) -> Tensor:
        """Karras et al. (2022) noise level sigma~ = sigma_t / alpha_t = exp(-lambda_t / 2)."""
        t = self.check_t(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_tilde(self, sigma_tilde) -> Tensor:
        """Inverse of `sigma_tilde`; sigma~ must be >= 0."""
        s = check_sigma(sigma_tilde)
        return self._check_t_result(self._t_from_logsnr(-2 * torch.log(s)), "sigma", s)

    def _check_t_result(self, t: Tensor, what: str, value: Tensor) -> Tensor:
        tol = 1e-9 * max(1.0, abs(self.t_max) if math.isfinite(self.t_max) else 1.0)
        if checking() and bool((bad := torch.isnan(t) | (t < self.t_min - tol) | (t > self.t_max + tol)).any()):
            raise ValueError(
                f"{what}={fmt(value[bad])} is outside the range of the {self.name} schedule "
                f"(t would be {fmt(t[bad])}, allowed [{self.t_min:g}, {self.t_max:g}])"
            )
        return t.clamp(self.t_min, self.t_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPSchedule(Schedule):
    """Variance preserving: alpha_t^2 + sigma_t^2 = 1, so everything follows from
    alpha-bar_t = alpha_t^2 = sigmoid(lambda_t). Subclasses give log alpha-bar and its derivative."""

    def log_alpha_bar(self, t) -> Tensor:
        raise NotImplementedError

    def dlog_alpha_bar(self, t) -> Tensor:
        raise NotImplementedError

    def alpha_bar(self, t) -> Tensor:
        return torch.exp(self.log_alpha_bar(t))

    def alpha(self, t) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def dalpha(self, t) -> Tensor:
        return 0.5 * self.alpha(t) * self.dlog_alpha_bar(t)

    def dsigma(self, t) -> Tensor:
        # sigma^2 = 1 - alpha^2  =>  sigma sigma' = -alpha alpha' (0 where alpha = 0, e.g. at zero terminal SNR)
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)

    def logsnr(self, t) -> Tensor:
        """lambda = log(alpha-bar / (1 - alpha-bar)), written without cancellation."""
        la = self.log_alpha_bar(t)
        return la - torch.log(-torch.expm1(la))

    def dlogsnr(self, t) -> Tensor:
        # d/dt [la - log(1 - e^la)] = la' / (1 - e^la)
        la = self.log_alpha_bar(t)
        return self.dlog_alpha_bar(t) / (-torch.expm1(la))


class DiscreteVP(VPSchedule):
    """A discrete DDPM chain beta_1..beta_T and its exact continuous interpolation.

    Ho et al. (2020) eq. 4: alpha-bar_i = prod_{j<=i} (1 - beta_j), i = 0..T (alpha-bar_0 = 1).
    Continuous time t = i / T hits every alpha-bar_i exactly; between knots log alpha-bar is
    linear in t:  log alpha-bar(t) = log alpha-bar_{i-1} + (tT - i + 1) log(1 - beta_i).
    So q(z_t | x) at t = i/T is exactly DDPM's q(x_i | x_0), and the continuous schedule is
    monotone with derivative T log(1 - beta_i) on the i-th interval.

    Zero terminal SNR (Lin et al. 2024; `rescale_zero_terminal_snr`): the last beta may be 1, so
    alpha-bar_T = 0, logsnr(1) = -inf, sigma_tilde(1) = inf and t_from_sigma_tilde(inf) = 1. log alpha-bar
    cannot be linear into -inf, so on that last interval alpha itself is linear,
    alpha(t) = alpha_{T-1} (T - tT): continuous, strictly decreasing, alpha' = -T alpha_{T-1}, and the
    inverse stays exact; every method is finite there or exactly -inf / inf where the value is.
    """

    name = "discrete-vp"

    def __init__(self, betas, name: str | None = None):
        betas = as_tensor(betas).to(torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        bad = (betas <= 0) | (betas > 1) | ((betas == 1) & (torch.arange(betas.numel()) < betas.numel() - 1))
        if checking() and bool(bad.any()):
            raise ValueError(f"betas={fmt(betas[bad])} must lie in (0, 1); only the last may be 1 (zero terminal SNR)")
        self.betas = betas
        self.T = betas.numel()
        self.zero_terminal_snr = bool(betas[-1] == 1)
        self.log_one_minus_beta = torch.log1p(-betas)
        # knots L_i = log alpha-bar_i, i = 0..T
        self.log_alpha_bars = torch.cat([betas.new_zeros(1), torch.cumsum(self.log_one_minus_beta, 0)])
        if name:
            self.name = name

    @property
    def alphas_bar(self) -> Tensor:
        """alpha-bar_i for i = 0..T (index 0 is the clean data, alpha-bar_0 = 1)."""
        return torch.exp(self.log_alpha_bars)

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Index i in 1..T of the interval holding t, and the offset tT - (i - 1) in [0, 1]."""
        u = t.to(torch.float64) * self.T
        i = torch.clamp(torch.ceil(u), 1, self.T).long()
        return i, u - (i - 1)

    def _on_last(self, i: Tensor, linear, other: Tensor) -> Tensor:
        """`linear` where the interval index i is the last one of a zero-terminal-SNR chain (alpha is
        linear there), `other` elsewhere; `other` itself for any other chain (no kernel spent on it).
        `linear` is a function, called only for a zero-terminal-SNR chain."""
        return torch.where(i == self.T, linear(), other) if self.zero_terminal_snr else other

    def log_alpha_bar(self, t) -> Tensor:
        t = self.check_t(t)
        i, frac = self._segment(t)
        knots = on_device(self, "log_alpha_bars", t.device)
        out = knots[i - 1] + frac * on_device(self, "log_one_minus_beta", t.device)[i - 1]
        out = self._on_last(i, lambda: knots[self.T - 1] + 2 * torch.log1p(-frac), out)  # alpha linear
        return out.to(t.dtype)

    def dlog_alpha_bar(self, t) -> Tensor:
        t = self.check_t(t)
        i, frac = self._segment(t)
        out = self._on_last(i, lambda: -2 * self.T / (1 - frac), self.T * on_device(self, "log_one_minus_beta", t.device)[i - 1])
        return out.to(t.dtype)

    def dalpha(self, t) -> Tensor:
        """alpha' = alpha (log alpha-bar)' / 2, on the last interval of a zero-terminal-SNR chain
        -T alpha_{T-1} (also at t = 1, where the product would be 0 * inf)."""
        t = self.check_t(t)
        i, _ = self._segment(t)
        linear = -self.T * math.exp(0.5 * float(self.log_alpha_bars[self.T - 1]))  # a number: no copy to t's device
        return self._on_last(i, lambda: linear, super().dalpha(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        la = torch.nn.functional.logsigmoid(lam.to(torch.float64))  # log alpha-bar
        knots = on_device(self, "log_alpha_bars", lam.device)  # decreasing
        # interval i with knots[i-1] >= la >= knots[i]
        i = torch.searchsorted(-knots, -la.contiguous(), right=False).clamp(1, self.T)
        t = ((i - 1) + (la - knots[i - 1]) / on_device(self, "log_one_minus_beta", lam.device)[i - 1]) / self.T
        t = self._on_last(i, lambda: (self.T - torch.exp(0.5 * (la - knots[self.T - 1]))) / self.T, t)
        return t.to(lam.dtype)

    @classmethod
    def from_log_alpha_bars(cls, log_alpha_bars, name: str | None = None) -> "DiscreteVP":
        """The chain with log alpha-bar_i given for i = 1..K (strictly decreasing, < 0):
        beta_i = 1 - alpha-bar_i / alpha-bar_{i-1}, alpha-bar_0 = 1 (Ho et al. 2020, eq. 4 read backwards)."""
        la = torch.cat([torch.zeros(1, dtype=torch.float64), as_tensor(log_alpha_bars).to(torch.float64)])
        return cls(-torch.expm1(la[1:] - la[:-1]), name=name)

    @classmethod
    def from_sigmas(cls, sigmas, name: str | None = None) -> "DiscreteVP":
        """The chain whose steps i = 1..K have the scale-free noise levels sigma~_i (increasing, > 0):
        alpha-bar_i = 1 / (1 + sigma~_i^2). Any model, whatever its schedule, is a denoiser
        D(x~, sigma~), and so has a DDPM-style bound on this chain (Kingma et al. 2021: the discrete
        bound depends on the SNRs of the steps only)."""
        s = check_sigma(sigmas).to(torch.float64)
        return cls.from_log_alpha_bars(-torch.log1p(s**2), name=name)

    def respaced(self, K: int) -> "DiscreteVP":
        """K of the T steps, i_k = round(1 + (T - 1)(k - 1) / (K - 1)), k = 1..K, as a chain of its own
        with beta_k = 1 - alpha-bar_{i_k} / alpha-bar_{i_{k-1}}, so alpha-bar is kept exactly at the kept
        steps (Nichol & Dhariwal 2021, sec. 4, 'respacing'; K = T gives the chain back)."""
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= self.T:
            raise ValueError(f"K={K!r} steps are not allowed: need an integer in 1..T={self.T}")
        idx = torch.round(torch.linspace(1, self.T, K, dtype=torch.float64)).long() if K > 1 else torch.tensor([self.T])
        return DiscreteVP.from_log_alpha_bars(self.log_alpha_bars[idx], name=f"{self.name}-respaced-{K}")

    def discrete_t(self, i) -> Tensor:
        """Continuous time t = i / T of the discrete step index i in 0..T."""
        return as_tensor(i).to(torch.float64) / self.T

    def __repr__(self) -> str:
        return f"DiscreteVP(T={self.T}, name={self.name!r})"


def ddpm_linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
    """DDPM's linear betas (Ho et al. 2020, sec. 4: beta_1 = 1e-4 to beta_T = 0.02, T = 1000)."""
    if T < 1:
        raise ValueError(f"T={T} must be a positive number of steps")
    return DiscreteVP(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), name="ddpm-linear")


def rescale_zero_terminal_snr(chain: DiscreteVP) -> DiscreteVP:
    """Lin et al. (2024), 'Common diffusion noise schedules and sample steps are flawed', Algorithm 1:
    sqrt(alpha-bar_i), i = 1..T, shifted so that the last is 0 and scaled so that the first is unchanged,

        sqrt(alpha-bar_i)' = sqrt(alpha-bar_1) (sqrt(alpha-bar_i) - sqrt(alpha-bar_T)) / (sqrt(alpha-bar_1) - sqrt(alpha-bar_T)),

    and beta_i = 1 - alpha-bar_i' / alpha-bar_{i-1}': beta_T = 1, alpha-bar_T = 0, SNR 0 at t = 1 (z_T = eps
    holds no signal, as the sampler's pure-noise start assumes)."""
    if not isinstance(chain, DiscreteVP) or chain.T < 2:
        raise ValueError(f"chain={chain!r}: zero terminal SNR rescaling needs a DiscreteVP chain of T >= 2 steps")
    a = torch.exp(0.5 * chain.log_alpha_bars[1:])
    a = a[0] * (a - a[-1]) / (a[0] - a[-1])
    return DiscreteVP.from_log_alpha_bars(2 * torch.log(a), name=f"{chain.name}-zero-snr")


class VPSDE(VPSchedule):
    """Song et al. (2021) VP-SDE with linear beta(t) = beta_min + t * beta_d.

    log alpha-bar(t) = -(beta_d t^2 / 2 + beta_min t); in Karras et al. (2022, Table 1, VP column):
    sigma~(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), s(t) = alpha_t = 1 / sqrt(e^{...}).
    Sampling uses t in [eps_s, 1] (eps_s = 1e-3), training t ~ U(eps_t, 1) (eps_t = 1e-5).
    """

    name = "vp-sde"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, eps_t: float = 1e-5):
        if beta_d < 0 or beta_min <= 0:
            raise ValueError(f"beta_d={beta_d}, beta_min={beta_min}: need beta_d >= 0 and beta_min > 0")
        self.beta_d, self.beta_min, self.eps_s, self.eps_t = beta_d, beta_min, eps_s, eps_t

    def log_alpha_bar(self, t) -> Tensor:
        t = self.check_t(t)
        return -(0.5 * self.beta_d * t**2 + self.beta_min * t)

    def dlog_alpha_bar(self, t) -> Tensor:
        t = self.check_t(t)
        return -(self.beta_d * t + self.beta_min)

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        g = torch.nn.functional.softplus(-lam)  # -log alpha-bar = log(1 + e^{-lambda})
        t = 2 * g / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * g))  # stable root
        return t

    def __repr__(self) -> str:
        return f"VPSDE(beta_d={self.beta_d}, beta_min={self.beta_min})"


class Cosine(VPSchedule):
    """Cosine schedule of Nichol & Dhariwal (2021, iDDPM eq. 17):

    alpha-bar(t) = f(t) / f(0),  f(t) = cos^2(pi/2 * (t + s) / (1 + s)),  s = 0.008.

    The continuous form reaches alpha-bar(1) = 0 (lambda = -inf). iDDPM's clipping acts on the
    discrete chain: beta_i = min(1 - alpha-bar(i/T) / alpha-bar((i-1)/T), max_beta), max_beta
    = 0.999; `discrete()` returns that chain as a `DiscreteVP`, with max_beta = 1 the unclipped
    chain, whose beta_T = 1: zero terminal SNR (Lin et al. 2024).
    """

    name = "cosine"

    def __init__(self, s: float = 0.008):
        if s < 0:
            raise ValueError(f"s={s} must be >= 0")
        self.s = s

    def _theta(self, t):
        return 0.5 * math.pi * (t + self.s) / (1 + self.s)

    def _cos0(self):
        return math.cos(0.5 * math.pi * self.s / (1 + self.s))

    def alpha(self, t) -> Tensor:
        """cos(theta(t)) / cos(theta(0)), written as sin(pi/2 (1 - t) / (1 + s)) / cos(theta(0)): exactly 0 at t = 1."""
        t = self.check_t(t)
        return torch.sin(0.5 * math.pi * (1 - t) / (1 + self.s)) / self._cos0()

    def log_alpha_bar(self, t) -> Tensor:
        return 2 * torch.log(self.alpha(t))

    def dlog_alpha_bar(self, t) -> Tensor:
        """2 alpha' / alpha = -pi tan(theta) / (1 + s): -inf at t = 1."""
        return 2 * self.dalpha(t) / self.alpha(t)

    def dalpha(self, t) -> Tensor:
        t = self.check_t(t)
        return -torch.sin(self._theta(t)) * 0.5 * math.pi / (1 + self.s) / self._cos0()

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        alpha = torch.sqrt(torch.sigmoid(lam))
        t = torch.arccos(alpha * self._cos0()) * 2 * (1 + self.s) / math.pi - self.s
        return t

    def discrete(self, T: int = 1000, max_beta: float = 0.999) -> DiscreteVP:
        """iDDPM's discrete chain (their `betas_for_alpha_bar`), betas clipped at max_beta."""
        i = torch.arange(1, T + 1, dtype=torch.float64)
        ratio = self.alpha_bar(i / T) / self.alpha_bar((i - 1) / T)
        return DiscreteVP(torch.clamp(1 - ratio, max=max_beta), name="cosine-discrete")

    def __repr__(self) -> str:
        return f"Cosine(s={self.s})"


class VE(Schedule):
    """Variance exploding (Song et al. 2021, NCSN++): alpha_t = 1,
    sigma_t = sigma_min * (sigma_max / sigma_min)^t, t in [0, 1], sigma 0.02..100."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t) -> Tensor:
        return torch.ones_like(self.check_t(t))

    def sigma(self, t) -> Tensor:
        t = self.check_t(t)
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def dalpha(self, t) -> Tensor:
        return torch.zeros_like(self.check_t(t))

    def dsigma(self, t) -> Tensor:
        return self.sigma(t) * self._log_ratio

    def logsnr(self, t) -> Tensor:
        return -2 * torch.log(self.sigma(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        t = (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio
        return t

    def __repr__(self) -> str:
        return f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class EDM(Schedule):
    """Karras et al. (2022), Table 1 'Ours': sigma(t) = t, s(t) = 1, so alpha_t = 1, sigma_t = t.

    Time is the noise level itself, t in [0, inf); `sigma_min`, `sigma_max` (0.002, 80) bound the
    sampling grid, `sigma_data` (0.5) is the data's standard deviation used by preconditioning.
    """

    name = "edm"
    t_max = math.inf

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max or sigma_data <= 0:
            raise ValueError(
                f"sigma_min={sigma_min}, sigma_max={sigma_max}, sigma_data={sigma_data}: "
                "need 0 < sigma_min < sigma_max and sigma_data > 0"
            )
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho

    def alpha(self, t) -> Tensor:
        return torch.ones_like(self.check_t(t))

    def sigma(self, t) -> Tensor:
        return self.check_t(t).clone()

    def dalpha(self, t) -> Tensor:
        return torch.zeros_like(self.check_t(t))

    def dsigma(self, t) -> Tensor:
        return torch.ones_like(self.check_t(t))

    def logsnr(self, t) -> Tensor:
        return -2 * torch.log(self.check_t(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        return torch.exp(-0.5 * lam)

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, sigma_data={self.sigma_data})"


class SqrtVE(Schedule):
    """Karras et al. (2022), Table 1 VE column: sigma(t) = sqrt(t), s(t) = 1, t in [0, inf).

    The same noise levels as `VE`, but time is the variance t = sigma^2; the Euler ODE sampler of
    the VE column steps in this time variable.
    """

    name = "ve-sqrt-t"
    t_max = math.inf

    def alpha(self, t) -> Tensor:
        return torch.ones_like(self.check_t(t))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(self.check_t(t))

    def dalpha(self, t) -> Tensor:
        return torch.zeros_like(self.check_t(t))

    def dsigma(self, t) -> Tensor:
        return 0.5 / self.sigma(t)

    def logsnr(self, t) -> Tensor:
        return -torch.log(self.check_t(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam)


def iddpm_sigmas(M: int = 1000, C1: float = 0.001, C2: float = 0.008) -> Tensor:
    """The noise levels u_0 > u_1 > ... > u_M = 0 of Karras et al. (2022), Table 1 iDDPM column.

    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha-bar_{j-1} / alpha-bar_j, C1) - 1),
    alpha-bar_j = sin^2(pi/2 * j / (M (C2 + 1))). These are the sigma~ of iDDPM's clipped cosine
    chain read backwards (u_j = sigma~ at DDPM step M - j). float64, shape (M + 1,).
    """
    j = torch.arange(M + 1, dtype=torch.float64)
    alpha_bar = torch.sin(0.5 * math.pi * j / (M * (C2 + 1))) ** 2
    u = torch.zeros(M + 1, dtype=torch.float64)
    for k in range(M, 0, -1):
        u[k - 1] = torch.sqrt((u[k] ** 2 + 1) / torch.clamp(alpha_bar[k - 1] / alpha_bar[k], min=C1) - 1)
    return u


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching with the straight path (Liu et al. 2023; Lipman et al. 2023):
    alpha_t = 1 - t, sigma_t = t, so lambda_t = 2 log((1 - t) / t) and t = sigmoid(-lambda / 2)."""

    name = "rectified-flow"

    def alpha(self, t) -> Tensor:
        return 1 - self.check_t(t)

    def sigma(self, t) -> Tensor:
        return self.check_t(t).clone()

    def dalpha(self, t) -> Tensor:
        return -torch.ones_like(self.check_t(t))

    def dsigma(self, t) -> Tensor:
        return torch.ones_like(self.check_t(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * lam)


SCHEDULES = {
    "ddpm-linear": ddpm_linear,
    "vp-sde": VPSDE,
    "cosine": Cosine,
    "ve": VE,
    "edm": EDM,
    "rectified-flow": RectifiedFlow,
    "ve-sqrt-t": SqrtVE,
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name: one of SCHEDULES."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
