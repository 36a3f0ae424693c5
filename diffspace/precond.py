"""Preconditioning: from a raw network to the project's one denoiser interface.

A denoiser maps the scale-free noisy sample and its noise level to an estimate of the data,

    D(x~, sigma~) -> x0_hat,     x~ = z_t / alpha_t = x + sigma~ eps,     sigma~ = sigma_t / alpha_t,

sigma~ a scalar or of shape (B,) (one level per sample). Two ways to build one:

* `Denoiser(F, precond)`: Karras et al. (2022, eq. 7 and Table 1)

      D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),

  with the preconditioners VP, VE, iDDPM and EDM of Table 1 (+ rectified flow in the same form).
* `ParameterizedDenoiser(net, parameterization, schedule)`: a network trained in the
  (z_t, t) form to predict x0, eps, score, energy, v or flow velocity on any schedule.

Both are exact re-writings of the same models: e.g. the VP preconditioner is the eps-predictor
on the VP-SDE schedule fed c_noise = (M - 1) t.

Zero SNR (sigma~ = inf, Lin et al. 2024): x~ is infinite there, and by the samplers' convention
(samplers module) the state handed over holds the unit noise eps = lim x~ / sigma~ instead (= z_T
of a VP chain with alpha-bar_T = 0). So a preconditioner returns at sigma = inf the limits of
c_skip sigma and c_in sigma (what multiplies eps) and of c_out and c_noise, and raises ValueError
where one diverges (the eps-predicting VP / iDDPM / VE columns: c_out = -+sigma; EDM: c_noise =
ln(sigma) / 4); `ParameterizedDenoiser` feeds z_t = sigma_t eps there.
"""

from __future__ import annotations

import functools
import math

import torch

from .parameterization import broadcast, check_parameterization, score_from_energy, to_x0
from .schedules import VPSDE, Schedule, VPSchedule, check_sigma, checking, iddpm_sigmas, on_device

Tensor = torch.Tensor


def per_sample(sigma, x: Tensor) -> Tensor:
    """sigma checked and made a (B,) tensor in x's dtype and device (a scalar is repeated)."""
    if isinstance(sigma, (int, float)):  # checked on the host, filled on x's device: no copy to it (a sync on a GPU)
        check_sigma(sigma)
        return torch.full(x.shape[:1], sigma, dtype=x.dtype, device=x.device)
    sigma = check_sigma(torch.as_tensor(sigma, dtype=x.dtype, device=x.device))
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != x.shape[:1]:
        raise ValueError(
            f"sigma has shape {tuple(sigma.shape)}; allowed: a scalar or ({x.shape[0]},) for x of shape {tuple(x.shape)}"
        )
    return sigma


# -- the preconditioners of Karras et al. (2022), Table 1 ------------------------------------------
class Preconditioner:
    """c_skip, c_out, c_in, c_noise of a noise level sigma (Karras et al. 2022, eq. 7, Table 1).

    `precond(sigma)` checks sigma and returns the four coefficients, each shaped like sigma;
    `formulas` holds them as text (the table's rows). Subclasses give `_coefficients` and, if they
    have one, `_at_infinity`: the limits (c_skip sigma, c_out, c_in sigma, c_noise) as sigma -> inf,
    returned where sigma = inf (the state there holds eps, see the module docstring).
    """

    formulas: dict[str, str] = {}

    def __call__(self, sigma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sigma = check_sigma(sigma)
        if not checking():  # schedules.unchecked(): nothing read back; the limits (if any) go where sigma = inf
            return self._coefficients(sigma) if self._limits is None else self._with_limits(sigma)
        if not bool(torch.isinf(sigma).any()):
            return self._coefficients(sigma)
        if self._limits is None:
            raise ValueError(f"sigma=inf (zero SNR) is not allowed with {self!r}: its c_out or c_noise diverges "
                             "there; allowed: a v-, x0- or flow-predicting preconditioner (e.g. the ztsnr preset)")
        return self._with_limits(sigma)

    @functools.cached_property
    def _limits(self) -> tuple[float, float, float, float] | None:
        """_at_infinity(), computed once."""
        return self._at_infinity()

    def _with_limits(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        at_inf = torch.isinf(sigma)
        finite = self._coefficients(torch.where(at_inf, torch.ones_like(sigma), sigma))
        return tuple(torch.where(at_inf, torch.full_like(c, lim), c) for c, lim in zip(finite, self._limits))

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _at_infinity(self) -> tuple[float, float, float, float] | None:
        """(c_skip sigma, c_out, c_in sigma, c_noise) as sigma -> inf; None where one diverges."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, Tensor) and k[0] != "_" and k != "formulas")
        return f"{type(self).__name__}({args})"


class VPPrecond(Preconditioner):
    """Table 1 VP column (Song et al. 2021, DDPM++): c_skip = 1, c_out = -sigma,
    c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^{-1}(sigma),

    sigma^{-1} the inverse of the schedule's sigma~(t); the default is the VP-SDE
    (beta_d = 19.9, beta_min = 0.1), M = 1000. Any variance-preserving schedule (e.g. a DDPM chain)
    may stand in: F is then its eps-predictor fed (M - 1) t. index=True feeds a discrete chain's
    0-based step index instead, c_noise = M sigma^{-1}(sigma) - 1 = i - 1 at step i = tM (M = T):
    the timestep that Ho et al.'s code and diffusers' UNet2DModel are given.
    """

    formulas = dict(c_skip="1", c_out="-sigma", c_in="1/sqrt(sigma^2+1)", c_noise="(M-1) sigma^-1(sigma)")

    def __init__(self, schedule: VPSchedule | None = None, M: int = 1000, index: bool = False):
        schedule = VPSDE() if schedule is None else schedule
        if not isinstance(schedule, VPSchedule):
            raise ValueError(f"schedule={schedule!r} is not allowed: VP preconditioning needs a variance-preserving one")
        self.schedule, self.M, self.index = schedule, M, index
        if index:
            self.formulas = {**self.formulas, "c_noise": "M sigma^-1(sigma) - 1 (step index i - 1)"}

    def _c_noise(self, t: Tensor) -> Tensor:
        return self.M * t - 1 if self.index else (self.M - 1) * t

    def _coefficients(self, sigma):
        one = torch.ones_like(sigma)
        return one, -sigma, 1 / torch.sqrt(sigma**2 + 1), self._c_noise(self.schedule.t_from_sigma_tilde(sigma))


class VPredPrecond(VPPrecond):
    """v-prediction (Salimans & Ho 2022, sec. 4) in the form of Table 1 on a VP schedule: F(z_t) predicts
    v = alpha_t eps - sigma_t x, and x = alpha_t z_t - sigma_t v with alpha_t = 1 / sqrt(1 + sigma^2),
    sigma_t = sigma alpha_t, z_t = alpha_t x~ gives

        c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1),  c_in = 1 / sqrt(sigma^2 + 1),
        c_noise = (M - 1) sigma^{-1}(sigma) as in VPPrecond (the schedule's own time; or its step index).

    The first three are EDM's with sigma_data = 1 but for the sign of F (EDM's F is -v); EDM's
    c_noise = ln(sigma) / 4 would diverge at sigma = inf, this one is M - 1 there. At zero SNR
    (sigma -> inf: c_skip sigma -> 0, c_out -> -1, c_in sigma -> 1) D = -F(eps): x0 = -v (Lin et al. 2024, sec. 3.2)."""

    formulas = dict(c_skip="1/(sigma^2+1)", c_out="-sigma/sqrt(sigma^2+1)", c_in="1/sqrt(sigma^2+1)",
                    c_noise="(M-1) sigma^-1(sigma)")

    def _coefficients(self, sigma):
        c_in = 1 / torch.sqrt(sigma**2 + 1)
        return c_in**2, -sigma * c_in, c_in, self._c_noise(self.schedule.t_from_sigma_tilde(sigma))

    def _at_infinity(self):
        return 0.0, -1.0, 1.0, float(self._c_noise(self.schedule.t_from_sigma_tilde(math.inf)))


class VEPrecond(Preconditioner):
    """Table 1 VE column (Song et al. 2021, NCSN++): c_skip = 1, c_out = sigma, c_in = 1,
    c_noise = ln(sigma / 2)."""

    formulas = dict(c_skip="1", c_out="sigma", c_in="1", c_noise="ln(sigma/2)")

    def _coefficients(self, sigma):
        one = torch.ones_like(sigma)
        return one, sigma, one, torch.log(sigma / 2)


class IDDPMPrecond(Preconditioner):
    """Table 1 iDDPM column (Nichol & Dhariwal 2021): c_skip = 1, c_out = -sigma,
    c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|,

    u_0 > ... > u_M = 0 from schedules.iddpm_sigmas(M, C1, C2) (M = 1000, C1 = 0.001, C2 = 0.008).
    """

    formulas = dict(c_skip="1", c_out="-sigma", c_in="1/sqrt(sigma^2+1)", c_noise="M-1-argmin_j abs(u_j - sigma)")

    def __init__(self, M: int = 1000, C1: float = 0.001, C2: float = 0.008):
        self.M, self.C1, self.C2, self.u = M, C1, C2, iddpm_sigmas(M, C1, C2)

    def _coefficients(self, sigma):
        j = torch.argmin((sigma.unsqueeze(-1) - on_device(self, "u", sigma.device, sigma.dtype)).abs(), dim=-1)
        return torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1), (self.M - 1 - j).to(sigma.dtype)


class EDMPrecond(Preconditioner):
    """Table 1 'Ours' (EDM) column, Karras et al. (2022) sec. 5 and appendix B.6:
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4; sigma_data = 0.5."""

    formulas = dict(
        c_skip="sigma_data^2/(sigma^2+sigma_data^2)",
        c_out="sigma sigma_data/sqrt(sigma^2+sigma_data^2)",
        c_in="1/sqrt(sigma^2+sigma_data^2)",
        c_noise="ln(sigma)/4",
    )

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data} is not allowed: it must be > 0")
        self.sigma_data = sigma_data

    def _coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        return c_skip, c_out, c_in, torch.log(sigma) / 4


class FlowPrecond(Preconditioner):
    """Rectified flow (Liu et al. 2023) in the form of Table 1: F(z_t, t) predicts u = eps - x on
    alpha_t = 1 - t, sigma_t = t, so t = sigma / (1 + sigma), z_t = x~ / (1 + sigma), x = z_t - t u:
    c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma), c_in = 1 / (1 + sigma), c_noise = sigma / (1 + sigma)."""

    formulas = dict(c_skip="1/(1+sigma)", c_out="-sigma/(1+sigma)", c_in="1/(1+sigma)", c_noise="t = sigma/(1+sigma)")

    def _coefficients(self, sigma):
        return 1 / (1 + sigma), -sigma / (1 + sigma), 1 / (1 + sigma), sigma / (1 + sigma)

    def _at_infinity(self):
        return 1.0, -1.0, 1.0, 1.0  # t = 1: z_1 = eps, x = z - u


# -- denoisers ---------------------------------------------------------------------------------------
class Denoiser(torch.nn.Module):
    """D(x~, sigma) = c_skip x~ + c_out F(c_in x~, c_noise) (Karras et al. 2022, eq. 7).

    F(x, noise_cond) is the raw network (any callable or module; noise_cond has shape (B,)),
    `precond` a Preconditioner. sigma: scalar or shape (B,).
    """

    def __init__(self, F, precond: Preconditioner):
        super().__init__()
        self.F, self.precond = F, precond

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        """Extra arguments (e.g. class labels) are passed on to F."""
        c_skip, c_out, c_in, c_noise = self.precond(per_sample(sigma, x))
        F = self.F(broadcast(c_in, x) * x, c_noise, *args, **kwargs)
        return broadcast(c_skip, x) * x + broadcast(c_out, x) * F


class ParameterizedDenoiser(torch.nn.Module):
    """D(x~, sigma~) of a network trained in the (z_t, t) form (DESIGN.md; Kingma et al. 2021):

        t = schedule.t_from_sigma_tilde(sigma~),  z_t = alpha_t x~,  pred = net(z_t, time_input(t)),
        D = parameterization.to_x0(pred, parameterization, z_t, t, schedule).

    `parameterization` is one of parameterization.PARAMETERIZATIONS; for "energy" the net returns
    the scalar energy E(z_t, t) per sample (shape (B,)) and its gradient grad_z E is used
    (parameterization.score_from_energy; graph kept when autograd is on). `time_input` maps t to
    what the net is fed (e.g. lambda t: 999 * t for DDPM-style nets); None feeds t itself.
    """

    def __init__(self, net, parameterization: str, schedule: Schedule, time_input=None):
        super().__init__()
        self.net, self.parameterization = net, check_parameterization(parameterization)
        self.schedule, self.time_input = schedule, time_input

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        """Extra arguments (e.g. class labels) are passed on to the net."""
        sigma = per_sample(sigma, x)
        t = self.schedule.t_from_sigma_tilde(sigma)
        # z_t = alpha_t x~; at sigma~ = inf (alpha_t = 0) x holds eps and z_t = sigma_t eps
        z = broadcast(torch.where(torch.isinf(sigma), self.schedule.sigma(t), self.schedule.alpha(t)), x) * x
        return to_x0(self.predict(z, t, *args, **kwargs), self.parameterization, z, t, self.schedule)

    def predict(self, z: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        """The network's prediction in its own parameterization at (z_t, t) (the training output)."""
        t_in = t if self.time_input is None else self.time_input(t)
        if self.parameterization == "energy":
            energy = lambda zz, tt: self.net(zz, tt, *args, **kwargs)
            return -score_from_energy(energy, z, t_in, create_graph=torch.is_grad_enabled())
        return self.net(z, t_in, *args, **kwargs)

    def energy(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        """The energy of the scale-free x~ at sigma~ (parameterization "energy"), shape (B,):

            E(x~) = E_net(alpha_t x~, t) = -log p(x~) + d log alpha_t + const,

        since p(x~) = alpha_t^d p_t(alpha_t x~) (x~ = z_t / alpha_t in d dimensions) and E_net = -log p_t
        + const. The extra d log alpha_t (0 for VE/EDM, alpha = 1) is constant at one noise level, so
        it cancels in a Metropolis-Hastings ratio at that level; -grad_x~ E = alpha_t (-grad_z E_net)
        is the score of x~, the one this denoiser's D uses."""
        if self.parameterization != "energy":
            raise ValueError(f"parameterization {self.parameterization!r} has no energy; only 'energy' nets give one")
        t = self.schedule.t_from_sigma_tilde(per_sample(sigma, x))
        z = broadcast(self.schedule.alpha(t), x) * x
        return self.net(z, t if self.time_input is None else self.time_input(t), *args, **kwargs)


class ConditionedInput(torch.nn.Module):
    """Feeds a raw network F the well-scaled input of a preconditioner, in the (z_t, t) form:

        net(z_t, t) = F(c_in(sigma~) z_t / alpha_t, c_noise(sigma~)),   sigma~ = sigma_t / alpha_t,

    so a net trained to predict eps, v, flow, ... on any schedule sees unit-variance inputs
    (Karras et al. 2022, sec. 5) and the preset's noise conditioning. For VP schedules
    c_in(sigma~) = alpha_t, i.e. F sees z_t itself. At alpha_t = 0 (zero SNR) c_in is the limit of
    c_in sigma~ (Preconditioner) and multiplies eps = z_t / sigma_t.
    """

    def __init__(self, F, precond: Preconditioner, schedule: Schedule):
        super().__init__()
        self.F, self.precond, self.schedule = F, precond, schedule

    def forward(self, z: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        _, _, c_in, c_noise = self.precond(per_sample(sigma / alpha, z))
        state = torch.where(alpha == 0, sigma, alpha)  # z_t / state: x~, or eps at zero SNR
        return self.F(broadcast(c_in / state, z) * z, c_noise, *args, **kwargs)
