"""Training objectives: loss weightings, their conversion between parameterizations, the
weighted denoising loss, and the distributions of noise levels used during training.

Every objective in the lecture is one weighted regression (Ho et al. 2020, Algorithm 1,
generalised):

    L = E_{x, t ~ p(t), eps} [ w(t) || target - pred ||^2 ],   z_t = alpha_t x + sigma_t eps,

where `target` is the parameterization's target (parameterization.target), w(t) is a weighting
stated in some parameterization's loss space, and p(t) is the noise-level distribution. Because
every prediction error is a per-sample multiple of the x0 error (below), a weighting in one
space is a re-weighting in any other (`convert_weight`): the lecture's loss-weight table,
generalised to any schedule.
"""

from __future__ import annotations

import math
import statistics

import torch

from .parameterization import broadcast, check_parameterization, target
from .schedules import VPSDE, DiscreteVP, Schedule, as_tensor, checking, fmt, iddpm_sigmas, on_device

Tensor = torch.Tensor


# -- converting a weighting between loss spaces ---------------------------------------------------
def _error_scale(name: str, t, schedule: Schedule) -> tuple[Tensor, int]:
    """(c, m) with (pred - target) = alpha_t^m c (x0_hat - x) for parameterization `name` at fixed z_t;
    the factor alpha^m is kept apart so that ratios stay exact at alpha_t = 0 (zero SNR)."""
    check_parameterization(name)
    t = as_tensor(t)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    if name == "x0":
        return torch.ones_like(alpha), 0
    if name == "eps":
        return -1 / sigma, 1
    if name == "score":
        return 1 / sigma**2, 1
    if name == "energy":
        return -1 / sigma**2, 1
    if name == "v":
        return -(alpha**2 + sigma**2) / sigma, 0
    return schedule.dalpha(t) - schedule.dsigma(t) * alpha / sigma, 0  # flow


def convert_weight(w, src: str, dst: str, t, schedule: Schedule) -> Tensor:
    """Re-express a loss weight on parameterization `src` as one on `dst`:

        w_src ||src - src_hat||^2 = w_dst ||dst - dst_hat||^2   for the same prediction at z_t.

    With the x0 error d = x0_hat - x and z_t fixed, each error is k * d (from
    parameterization.to_x0 / from_x0):

        x0: 1     eps: -alpha/sigma     score: alpha/sigma^2     energy: -alpha/sigma^2
        v: -(alpha^2 + sigma^2)/sigma   flow: alpha' - sigma' alpha/sigma

    so w_dst = w_src k_src^2 / k_dst^2. For VP schedules this reproduces the lecture's table
    ("不同损失参数化之间本质是样本加权方式不同"; Salimans & Ho 2022, sec. 4; Kingma & Gao 2023), e.g. ||eps - eps_hat||^2 = (alpha^2/sigma^2) ||x - x_hat||^2, with one correction:
    the slide's eps-row / v-column entry reads 1/alpha^2, the right value is alpha^2, since
    eps_hat = sigma z + alpha v_hat gives ||eps - eps_hat||^2 = alpha^2 ||v - v_hat||^2.
    t must lie where sigma_t > 0. At alpha_t = 0 (zero terminal SNR, Lin et al. 2024) the eps,
    score and energy errors vanish (factor alpha): a weight converted into them from x0, v or flow
    would be infinite, and raises ValueError; every other conversion stays finite and exact
    (the alpha factors of eps, score and energy cancel among themselves).
    """
    if src == dst:  # k_src / k_dst = 1: w itself (broadcast to t), with no schedule evaluated
        check_parameterization(src)
        t = schedule.check_t(t)
        return as_tensor(w) * torch.ones_like(t, dtype=t.dtype if t.is_floating_point() else torch.float64)
    (c_src, m_src), (c_dst, m_dst) = _error_scale(src, t, schedule), _error_scale(dst, t, schedule)
    alpha = schedule.alpha(as_tensor(t))
    if m_dst > m_src and checking() and bool((alpha == 0).any()):
        raise ValueError(f"a {src}-space weight has no value in the {dst} loss space where alpha_t = 0 (zero SNR, "
                         f"t={fmt(as_tensor(t)[alpha == 0])}): the {dst} error vanishes there; allowed: x0, v, flow")
    return as_tensor(w) * (c_src / c_dst) ** 2 * alpha ** (2 * (m_src - m_dst))


# -- weightings w(t) -------------------------------------------------------------------------------
def constant_weight(t, schedule: Schedule) -> Tensor:
    """eps-space weight w = 1: L_simple = ||eps - eps_hat||^2 (Ho et al. 2020, eq. 14)."""
    t = as_tensor(t)
    return torch.ones_like(t, dtype=t.dtype if t.is_floating_point() else torch.float64)


def vlb_weight(t, schedule: DiscreteVP, variance: str = "beta") -> Tensor:
    """x0-space weight of DDPM's variational bound (Ho et al. 2020, eqs. 5-7), discrete index t = 1..T:

        w_t = alpha-bar_{t-1} beta_t^2 / (2 sigma_t^2 (1 - alpha-bar_t)^2),

    the squared x0-coefficient of the posterior mean mu~_t (eq. 7) over 2 sigma_t^2, where sigma_t^2 is
    the fixed reverse variance: variance="beta" (sigma_t^2 = beta_t) or "beta_tilde" (sigma_t^2 =
    (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t, eq. 7). In eps space (convert_weight) this is
    eq. 12's beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha-bar_t)), alpha_t = 1 - beta_t. For t >= 2 this
    makes L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) equal w_t ||x - x_hat||^2 + const; at t = 1
    it is the Gaussian decoder's -log p(x_0|x_1) + const (then beta_tilde_1 = 0 would give an infinite
    weight and is refused). Stated in x0 space it stays finite at beta_T = 1 (zero terminal SNR),
    where eq. 12's eps-space form is infinite.
    """
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"the VLB weight needs a DiscreteVP chain, got {schedule!r}")
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance={variance!r} is not allowed; use 'beta' or 'beta_tilde'")
    i = as_tensor(t)
    if checking() and bool((bad := (i != torch.round(i)) | (i < 1) | (i > schedule.T)).any()):
        raise ValueError(f"t={i[bad].flatten()[:3].tolist()} must be integer step indices in 1..{schedule.T}")
    if variance == "beta_tilde" and checking() and bool((i == 1).any()):
        raise ValueError("t=1 with variance='beta_tilde' has beta_tilde_1 = 0 (infinite weight); use t in 2..T or 'beta'")
    i = i.long()
    beta, abar = on_device(schedule, "betas", i.device)[i - 1], on_device(schedule, "alphas_bar", i.device)
    var = beta if variance == "beta" else (1 - abar[i - 1]) / (1 - abar[i]) * beta
    return abar[i - 1] * beta**2 / (2 * var * (1 - abar[i]) ** 2)


def snr_weight(t, schedule: Schedule) -> Tensor:
    """x0-space weight SNR(t) = alpha_t^2 / sigma_t^2 = exp(lambda_t): the same loss as eps-space
    weight 1, i.e. L_simple (Ho et al. 2020, eq. 14; Kingma & Gao 2023)."""
    return torch.exp(schedule.logsnr(t))


def min_snr_weight(t, schedule: Schedule, gamma: float = 5.0) -> Tensor:
    """x0-space weight min(SNR(t), gamma) (Hang et al. 2023, 'Efficient Diffusion Training via
    Min-SNR Weighting Strategy'; gamma = 5).
    In eps-space this is min(SNR, gamma) / SNR; in VP v-space min(SNR, gamma) / (SNR + 1), which is 0
    at zero SNR (not NaN: diffusers issue #9451; the eps-space form is 0 / 0 there)."""
    if not gamma > 0:
        raise ValueError(f"gamma={gamma} must be > 0")
    return torch.clamp(snr_weight(t, schedule), max=gamma)


def edm_weight(t, schedule: Schedule, sigma_data: float | None = None) -> Tensor:
    """x0-space weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on ||D - x||^2,
    sigma = sigma~(t) (Karras et al. 2022, Table 1 'Ours' and eq. 8: lambda c_out^2 = 1).
    sigma_data defaults to the schedule's `sigma_data` if it has one, else 0.5."""
    sigma_data = getattr(schedule, "sigma_data", 0.5) if sigma_data is None else sigma_data
    if not sigma_data > 0:
        raise ValueError(f"sigma_data={sigma_data} must be > 0")
    sigma = schedule.sigma_tilde(t)
    return 1 / sigma**2 + 1 / sigma_data**2  # = 1 / sigma_data^2 at sigma = inf


def inverse_sigma2_weight(t, schedule: Schedule) -> Tensor:
    """x0-space weight lambda(sigma) = 1 / sigma^2, sigma = sigma~(t) (Karras et al. 2022, Table 1,
    VP / VE / iDDPM columns; equals SNR(t) = eps-space weight 1)."""
    return schedule.sigma_tilde(t) ** -2


constant_weight.space = "eps"
vlb_weight.space = "x0"
snr_weight.space = "x0"
min_snr_weight.space = "x0"
edm_weight.space = "x0"
inverse_sigma2_weight.space = "x0"

WEIGHTINGS = {
    "constant": constant_weight,
    "vlb": vlb_weight,
    "snr": snr_weight,
    "min-snr": min_snr_weight,
    "edm": edm_weight,
    "inverse-sigma2": inverse_sigma2_weight,
}


def weighting(name: str, t, schedule: Schedule, space: str | None = None, defined_in: str | None = None,
              **kwargs) -> Tensor:
    """w(t) of the weighting `name` (one of WEIGHTINGS), stated in the loss space `defined_in`
    (default: the function's own `.space`), returned there or, if `space` is given, converted
    there with `convert_weight`. `defined_in` lets a preset say e.g. "constant 1 in flow space"
    (rectified flow) rather than L_simple's eps space. For "vlb" t is the discrete index 1..T and
    the conversion uses t / T."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; allowed: {', '.join(WEIGHTINGS)}")
    fn = WEIGHTINGS[name]
    w = fn(t, schedule, **kwargs)
    if space is None:
        return w
    t_cont = schedule.discrete_t(t) if fn is vlb_weight else t
    return convert_weight(w, check_parameterization(defined_in or fn.space), space, t_cont, schedule)


# -- the loss --------------------------------------------------------------------------------------
def diffusion_loss(pred: Tensor, x: Tensor, eps: Tensor, t, schedule: Schedule, parameterization: str,
                   weight=1.0) -> Tensor:
    """Per-sample weighted denoising loss (Ho et al. 2020, Algorithm 1 / eq. 14, generalised):

        L_i = w_i * mean_{non-batch dims} (pred - target)^2,

    target = parameterization.target(parameterization, x, eps, t, schedule), z_t = alpha_t x + sigma_t eps
    being the input the network saw. `weight` is a scalar or shape (B,) in that parameterization's
    loss space (see `weighting`, `convert_weight`). Returns shape (B,).
    """
    if pred.shape != x.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but x has shape {tuple(x.shape)}; they must match")
    err = (pred - target(parameterization, x, eps, t, schedule)) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return broadcast(weight, per_sample) * per_sample


# -- noise-level distributions p(t) ----------------------------------------------------------------
def _check_n(n) -> int:
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r} must be a positive integer number of samples")
    return n


class DiscreteUniform:
    """t = i / T with i ~ U{1, ..., T}, the step index of a DiscreteVP chain (Ho et al. 2020, Algorithm 1)."""

    def index(self, n: int, schedule: DiscreteVP, generator: torch.Generator | None = None, device=None) -> Tensor:
        """The integer step indices i in 1..T (int64, shape (n,))."""
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"discrete-uniform needs a DiscreteVP chain, got {schedule!r}")
        return torch.randint(1, schedule.T + 1, (_check_n(n),), generator=generator, device=device)

    def __call__(self, n: int, schedule: DiscreteVP, generator: torch.Generator | None = None, device=None) -> Tensor:
        i = self.index(n, schedule, generator, device)
        return schedule.discrete_t(i)


class Uniform:
    """t ~ U(eps, 1) in the schedule's own time (continuous-time diffusion; Song et al. 2021, eps = 1e-5)."""

    def __init__(self, eps: float = 1e-5):
        if not 0 <= eps < 1:
            raise ValueError(f"eps={eps} must lie in [0, 1)")
        self.eps = eps

    def __call__(self, n: int, schedule: Schedule, generator: torch.Generator | None = None, device=None) -> Tensor:
        if schedule.t_min != 0 or schedule.t_max != 1:
            raise ValueError(f"uniform t needs a schedule with time in [0, 1], got {schedule!r}")
        u = torch.rand(_check_n(n), generator=generator, dtype=torch.float64, device=device)
        return self.eps + (1 - self.eps) * u


class LogitNormal:
    """t = sigmoid(u), u ~ N(m, s^2) (Esser et al. 2024, SD3 eq. 19; m = 0, s = 1), for time in [0, 1]."""

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if not s > 0:
            raise ValueError(f"s={s} must be > 0")
        self.m, self.s = m, s

    def __call__(self, n: int, schedule: Schedule, generator: torch.Generator | None = None, device=None) -> Tensor:
        if schedule.t_min != 0 or schedule.t_max != 1:
            raise ValueError(f"logit-normal t needs a schedule with time in [0, 1], got {schedule!r}")
        u = torch.randn(_check_n(n), generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(self.m + self.s * u)


class _SigmaDistribution:
    """A law on the scale-free noise level sigma~, mapped to the schedule's time by t_from_sigma_tilde."""

    def sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        raise NotImplementedError

    def support(self) -> tuple[float, float]:
        """The lowest and highest sigma it draws; for an unbounded law its quantiles 1e-6 and 1 - 1e-6."""
        raise NotImplementedError

    def __call__(self, n: int, schedule: Schedule, generator: torch.Generator | None = None, device=None) -> Tensor:
        return schedule.t_from_sigma_tilde(self.sigma(n, generator, device))


def check_noise(noise, schedule: Schedule) -> None:
    """ValueError, where a model is built, if the schedule cannot reach a sigma law's support (e.g.
    iDDPM's levels, up to 2e4, on a VP schedule; the log-normal's, below VE's sigma_min = 0.02, on a VE
    schedule). The training step runs unchecked (schedules.unchecked): there t_from_sigma_tilde
    clamps to the schedule's range, which touches only the draws beyond an unbounded law's
    one-in-a-million quantiles."""
    if isinstance(noise, _SigmaDistribution):
        schedule.t_from_sigma_tilde(torch.tensor(noise.support(), dtype=torch.float64))


class VPNoise(_SigmaDistribution):
    """sigma^{-1}(sigma) ~ U(eps_t, 1) with the VP-SDE's sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    (Karras et al. 2022, Table 1 VP column: eps_t = 1e-5, beta_d = 19.9, beta_min = 0.1).
    On a VPSDE schedule with the same parameters this is t ~ U(eps_t, 1)."""

    def __init__(self, eps_t: float = 1e-5, beta_d: float = 19.9, beta_min: float = 0.1):
        if not 0 <= eps_t < 1:
            raise ValueError(f"eps_t={eps_t} must lie in [0, 1)")
        self.eps_t, self.vp = eps_t, VPSDE(beta_d=beta_d, beta_min=beta_min)

    def support(self) -> tuple[float, float]:
        return float(self.vp.sigma_tilde(self.eps_t)), float(self.vp.sigma_tilde(1.0))

    def sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        u = torch.rand(_check_n(n), generator=generator, dtype=torch.float64, device=device)
        return self.vp.sigma_tilde(self.eps_t + (1 - self.eps_t) * u)


class LogUniform(_SigmaDistribution):
    """ln sigma ~ U(ln sigma_min, ln sigma_max) (Karras et al. 2022, Table 1 VE column: 0.02, 100)."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def support(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        u = torch.rand(_check_n(n), generator=generator, dtype=torch.float64, device=device)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + (hi - lo) * u)


class LogNormal(_SigmaDistribution):
    """ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1 'Ours': P_mean = -1.2, P_std = 1.2)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):
        if not P_std > 0:
            raise ValueError(f"P_std={P_std} must be > 0")
        self.P_mean, self.P_std = P_mean, P_std

    def support(self) -> tuple[float, float]:
        z = -statistics.NormalDist().inv_cdf(1e-6)  # 4.75
        return math.exp(self.P_mean - z * self.P_std), math.exp(self.P_mean + z * self.P_std)

    def sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        u = torch.randn(_check_n(n), generator=generator, dtype=torch.float64, device=device)
        return torch.exp(self.P_mean + self.P_std * u)


class IDDPMNoise(_SigmaDistribution):
    """sigma = u_j, j ~ U{0, ..., M-1}, u_j from schedules.iddpm_sigmas (Karras et al. 2022, Table 1
    iDDPM column: M = 1000, C1 = 0.001, C2 = 0.008). u_0 is large (about 2e4 for the defaults), beyond
    the range of VP schedules, whose t_from_sigma_tilde then raises ValueError."""

    def __init__(self, M: int = 1000, C1: float = 0.001, C2: float = 0.008):
        if not (isinstance(M, int) and M >= 1):
            raise ValueError(f"M={M!r} must be a positive integer")
        self.M, self.u = M, iddpm_sigmas(M, C1, C2)

    def support(self) -> tuple[float, float]:
        return float(self.u[self.M - 1]), float(self.u[0])  # u_M = 0 is not drawn

    def sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        j = torch.randint(0, self.M, (_check_n(n),), generator=generator, device=device)
        return on_device(self, "u", j.device)[j]


class ImportanceSampler(torch.nn.Module):
    """i ~ p_i proportional to sqrt(E[L_i^2]) over the steps i = 1..T of a DiscreteVP chain, the loss
    reweighted by 1 / (T p_i) so its mean is unchanged (Nichol & Dhariwal 2021, section 3.3, eq. 18:
    'L_vlb with importance sampling'). E[L_i^2] is the mean square of the last `history` losses seen
    at step i; until every step has that many, i is drawn uniformly (weight 1); a share
    `uniform_prob` of p stays uniform. The history is a buffer, so checkpoints carry it and a
    resumed run continues exactly. Call `sample` for (t, weight), then `update(t, losses)`.
    """

    def __init__(self, T: int = 1000, history: int = 10, uniform_prob: float = 0.001):
        super().__init__()
        if not (isinstance(T, int) and T >= 1 and isinstance(history, int) and history >= 1):
            raise ValueError(f"T={T!r}, history={history!r} must be positive integers")
        if not 0 <= uniform_prob <= 1:
            raise ValueError(f"uniform_prob={uniform_prob} must lie in [0, 1]")
        self.T, self.uniform_prob = T, uniform_prob
        self.register_buffer("history", torch.zeros(T, history, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(T, dtype=torch.int64))

    def probabilities(self) -> Tensor:
        """p_i, i = 1..T (shape (T,)): uniform until warm, then sqrt(mean L_i^2) mixed with uniform."""
        warm = (self.count == self.history.shape[1]).all()  # a device value: chosen by where, not read back
        w = self.history.pow(2).mean(dim=1).sqrt()
        return torch.where(warm, (1 - self.uniform_prob) * w / w.sum() + self.uniform_prob / self.T, 1 / self.T)

    def sample(self, n: int, schedule: DiscreteVP, generator: torch.Generator | None = None, device=None):
        """(t = i / T, weight 1 / (T p_i)), each of shape (n,)."""
        if not (isinstance(schedule, DiscreteVP) and schedule.T == self.T):
            raise ValueError(f"importance sampling was set up for a DiscreteVP chain of T={self.T} steps, got {schedule!r}")
        p = self.probabilities()
        i = torch.multinomial(p, _check_n(n), replacement=True, generator=generator) + 1
        return schedule.discrete_t(i.to(device)), (1 / (self.T * p[i - 1])).to(device)

    def forward(self, n: int, schedule: DiscreteVP, generator: torch.Generator | None = None, device=None) -> Tensor:
        return self.sample(n, schedule, generator, device)[0]

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the (unweighted) per-sample losses at t = i / T in batch order: row i keeps the last
        `history` of its losses, oldest first. Vectorised, on the buffers' device (no read-back): the
        row's old entries followed by its new ones, in order, form a sequence of length count_i + m_i
        (m_i: the batch's losses at i), of which the last min(count_i + m_i, history) are kept."""
        T, H = self.history.shape
        i = torch.round(t.to(self.count.device) * T).long() - 1
        m = self.count.new_zeros(T).index_add_(0, i, torch.ones_like(i))  # not bincount: its size is read back
        new = losses.to(self.history).flatten()[torch.argsort(i, stable=True)]  # grouped by i, batch order kept
        start = torch.cumsum(m, 0) - m  # where row i's new losses begin in `new`
        total = self.count + m
        kept = total.clamp(max=H)
        slot = torch.arange(H, device=i.device)
        q = slot + (total - kept)[:, None]  # position in the row's sequence
        old = q < self.count[:, None]
        value = torch.where(old, self.history.gather(1, q.clamp(max=H - 1)),
                            new[(start[:, None] + q - self.count[:, None]).clamp(0, len(new) - 1)])
        self.history.copy_(torch.where(slot < kept[:, None], value, self.history))
        self.count.copy_(kept)


class Uncertainty(torch.nn.Module):
    """A learned log-variance u per noise level that weights the loss as a multi-task uncertainty
    (Kendall et al. 2018, multi-task uncertainty; Karras et al. 2024, EDM2, its config B and appendix):

        L = E_t [ w(t) ||target - pred||^2 / exp(u(t)) + u(t) ],

    whose minimum over u is u(t) = log E[w(t) ||target - pred||^2 | t]: the loss is rebalanced so
    that every noise level contributes equally, as the training goes. u is a linear function of fixed
    random Fourier features of c = -logsnr(t) / 8 (= ln(sigma) / 4, EDM's c_noise, for sigma(t) = t),
    zero at the start (the plain weighting). Returned per sample, shape (B,)."""

    def __init__(self, features: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g, dtype=torch.float64))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g, dtype=torch.float64))
        self.linear = torch.nn.Linear(features, 1, bias=False)
        torch.nn.init.zeros_(self.linear.weight)

    def forward(self, logsnr: Tensor) -> Tensor:
        c = (-logsnr.double() / 8).clamp(-20, 20)[:, None]  # zero SNR (logsnr = -inf) stays finite
        features = math.sqrt(2) * torch.cos(c * self.freqs + self.phases)
        return self.linear(features.to(self.linear.weight.dtype))[:, 0]

    def weigh(self, loss: Tensor, logsnr: Tensor) -> Tensor:
        """loss / exp(u) + u per sample."""
        u = self(logsnr).to(loss)
        return loss * torch.exp(-u) + u


NOISE_DISTRIBUTIONS = {
    "discrete-uniform": DiscreteUniform,
    "uniform": Uniform,
    "vp": VPNoise,
    "ve": LogUniform,
    "edm": LogNormal,
    "logit-normal": LogitNormal,
    "iddpm": IDDPMNoise,
    "importance": ImportanceSampler,
}


def noise_distribution(name: str, **kwargs):
    """Build the noise-level distribution `name` (one of NOISE_DISTRIBUTIONS) with its parameters;
    the result is called as dist(n, schedule, generator) -> t of shape (n,)."""
    if name not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"unknown noise distribution {name!r}; allowed: {', '.join(NOISE_DISTRIBUTIONS)}")
    return NOISE_DISTRIBUTIONS[name](**kwargs)
