"""The columns of Karras et al. (2022), Table 1 (VP, VE, iDDPM + DDIM, EDM), plus DDPM (Ho et al. 2020),
rectified flow (Liu et al. 2023) and zero terminal SNR (Lin et al. 2024), each as data and as ready objects.

A `Preset` stores every number once in `params`; its schedules and preconditioner are built from
those numbers. Samplers, time-step grids, noise distributions and loss weightings are named by
strings (the names of samplers.SAMPLERS, samplers.GRIDS, losses.NOISE_DISTRIBUTIONS and
losses.WEIGHTINGS) with the names of their parameters in `params`, so this module needs only
schedules and precond. `presets_table()` prints them side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from . import schedules as S
from .losses import noise_distribution
from .precond import Denoiser, EDMPrecond, FlowPrecond, IDDPMPrecond, Preconditioner, VEPrecond, VPPrecond, VPredPrecond


@dataclass(frozen=True, eq=False)
class Preset:
    """One column of Karras et al. (2022), Table 1 (or DDPM / rectified flow in the same rows).

    name, reference      the preset's name and its paper
    params               every number of the column, stored once (read-only mapping)
    solver               sampler name ('euler', 'heun' for the ODE columns; 'ddpm' ancestral)
    time_steps           time-step rule (a samplers.GRIDS name); `time_step_kwargs` its parameters
    schedule             sampling schedule: schedule.sigma_tilde(t) is Table 1's sigma(t), alpha(t) its s(t)
    training_schedule    the (alpha_t, sigma_t) schedule the model is trained on
    precond              the Preconditioner (c_skip, c_out, c_in, c_noise)
    architecture         the network F of the paper
    noise                noise-level distribution (a losses.NOISE_DISTRIBUTIONS name); `noise_kwargs`
    weighting            loss weighting (a losses.WEIGHTINGS name); `weighting_kwargs`
    weighting_space      the loss space the weighting multiplies: 'x0' is Table 1's lambda(sigma)
                         on (D - x)^2, 'eps' DDPM's L_simple, 'flow' the flow-matching loss
    text                 the remaining rows as formulas (time steps, schedule, scaling, noise, weighting)
    solver_options       options the column gives a sampler, by sampler name: Table 1's VP and VE
                         columns integrate the ODE in their own time t (euler / heun `schedule=`)
    time_step_options    what the time-step rule takes beside numbers (the 'ddpm' grid's chain, spacing)
    prior                how a sampler starts (samplers.initial_state): 'sigma', x~ = sigma_max eps (EDM),
                         or 'unit', z_T ~ N(0, I) of a VP chain (DDPM's Algorithm 2)
    """

    name: str
    reference: str
    params: Mapping[str, float]
    solver: str
    time_steps: str
    time_step_params: tuple[str, ...]
    schedule: S.Schedule
    training_schedule: S.Schedule
    precond: Preconditioner
    architecture: str
    noise: str
    noise_params: tuple[str, ...]
    weighting: str
    weighting_params: tuple[str, ...]
    weighting_space: str
    text: Mapping[str, str]
    solver_options: Mapping[str, Mapping] = field(default_factory=lambda: MappingProxyType({}))
    time_step_options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    prior: str = "sigma"

    def __deepcopy__(self, memo) -> "Preset":
        return self  # immutable: a model copied for its EMA shares its preset

    def _pick(self, names: tuple[str, ...]) -> dict[str, float]:
        return {k: self.params[k] for k in names}

    @property
    def time_step_kwargs(self) -> dict[str, float]:
        """Parameters of the time-step rule, e.g. samplers.get_sigmas(p.time_steps, N, **p.time_step_kwargs)."""
        return {**self._pick(self.time_step_params), **self.time_step_options}

    @property
    def noise_kwargs(self) -> dict[str, float]:
        """Parameters of the noise distribution, e.g. losses.noise_distribution(p.noise, **p.noise_kwargs)."""
        return self._pick(self.noise_params)

    @property
    def weighting_kwargs(self) -> dict[str, float]:
        """Parameters of the loss weighting, e.g. losses.weighting(p.weighting, t, schedule, **p.weighting_kwargs)."""
        return self._pick(self.weighting_params)

    def sampler_options(self, sampler: str) -> dict:
        """The options this preset gives `sampler` (e.g. its time variable), {} for most."""
        return dict(self.solver_options.get(sampler, {}))

    def denoiser(self, F) -> Denoiser:
        """D(x~, sigma) = c_skip x~ + c_out F(c_in x~, c_noise) with this preset's preconditioner."""
        return Denoiser(F, self.precond)


def _vp(p: dict) -> Preset:
    vpsde = S.VPSDE(p["beta_d"], p["beta_min"], p["eps_s"], p["eps_t"])
    return Preset(
        "vp", "Song et al. 2021 (VP SDE); Karras et al. 2022, Table 1", MappingProxyType(dict(p)),
        solver="euler", time_steps="vp", time_step_params=("eps_s", "beta_d", "beta_min"),
        schedule=vpsde, training_schedule=vpsde, precond=VPPrecond(vpsde, p["M"]), architecture="DDPM++",
        noise="vp", noise_params=("eps_t", "beta_d", "beta_min"),
        weighting="inverse-sigma2", weighting_params=(), weighting_space="x0",
        text=MappingProxyType({
            "time steps": "t_i = 1 + i/(N-1) (eps_s - 1)",
            "schedule": "sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)",
            "scaling": "s(t) = 1/sqrt(exp(beta_d t^2/2 + beta_min t))",
            "noise": "sigma^-1(sigma) ~ U(eps_t, 1)",
            "weighting": "1/sigma^2",
        }),
        solver_options=_own_time(vpsde),
    )


def _own_time(schedule: S.Schedule) -> Mapping[str, Mapping]:
    """Euler and Heun in the column's own time t (Karras et al. 2022, Table 1's VP and VE rows)."""
    return MappingProxyType({name: MappingProxyType({"schedule": schedule}) for name in ("euler", "heun")})


def _ve(p: dict) -> Preset:
    sqrt_ve = S.SqrtVE()
    return Preset(
        "ve", "Song et al. 2021 (VE SDE); Karras et al. 2022, Table 1", MappingProxyType(dict(p)),
        solver="euler", time_steps="ve", time_step_params=("sigma_min", "sigma_max"),
        schedule=sqrt_ve, training_schedule=S.VE(p["sigma_min"], p["sigma_max"]), precond=VEPrecond(),
        architecture="NCSN++",
        noise="ve", noise_params=("sigma_min", "sigma_max"),
        weighting="inverse-sigma2", weighting_params=(), weighting_space="x0",
        text=MappingProxyType({
            "time steps": "t_i = sigma_max^2 (sigma_min^2/sigma_max^2)^(i/(N-1))",
            "schedule": "sigma(t) = sqrt(t)",
            "scaling": "s(t) = 1",
            "noise": "ln(sigma) ~ U(ln(sigma_min), ln(sigma_max))",
            "weighting": "1/sigma^2",
        }),
        solver_options=_own_time(sqrt_ve),
    )


def _iddpm(p: dict) -> Preset:
    u = S.iddpm_sigmas(p["M"], p["C1"], p["C2"])
    return Preset(
        "iddpm", "Nichol & Dhariwal 2021 + DDIM (Song et al. 2021); Karras et al. 2022, Table 1", MappingProxyType(dict(p)),
        solver="euler", time_steps="iddpm", time_step_params=("M", "j0", "C1", "C2"),
        schedule=S.EDM(sigma_min=float(u[p["M"] - 1]), sigma_max=float(u[0])),
        training_schedule=S.Cosine(p["C2"]).discrete(p["M"], max_beta=1 - p["C1"]),
        precond=IDDPMPrecond(p["M"], p["C1"], p["C2"]), architecture="DDPM",
        noise="iddpm", noise_params=("M", "C1", "C2"),
        weighting="inverse-sigma2", weighting_params=(), weighting_space="x0",
        text=MappingProxyType({
            "time steps": "u_floor(j0 + (M-1-j0)/(N-1) i + 1/2), u_M = 0, "
                          "u_(j-1) = sqrt((u_j^2+1)/max(abar_(j-1)/abar_j, C1) - 1), abar_j = sin^2(pi/2 j/(M(C2+1)))",
            "schedule": "sigma(t) = t",
            "scaling": "s(t) = 1",
            "noise": "sigma = u_j, j ~ U{0, M-1}",
            "weighting": "1/sigma^2 (+ L_vlb)",
        }),
    )


def _edm(p: dict) -> Preset:
    edm = S.EDM(p["sigma_min"], p["sigma_max"], p["sigma_data"], p["rho"])
    return Preset(
        "edm", "Karras et al. 2022, Table 1 'Ours'", MappingProxyType(dict(p)),
        solver="heun", time_steps="edm", time_step_params=("sigma_min", "sigma_max", "rho"),
        schedule=edm, training_schedule=edm, precond=EDMPrecond(p["sigma_data"]), architecture="any",
        noise="edm", noise_params=("P_mean", "P_std"),
        weighting="edm", weighting_params=("sigma_data",), weighting_space="x0",
        text=MappingProxyType({
            "time steps": "(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho",
            "schedule": "sigma(t) = t",
            "scaling": "s(t) = 1",
            "noise": "ln(sigma) ~ N(P_mean, P_std^2)",
            "weighting": "(sigma^2 + sigma_data^2)/(sigma sigma_data)^2",
        }),
    )


def _ddpm(p: dict) -> Preset:
    chain = S.ddpm_linear(p["T"], p["beta_start"], p["beta_end"])
    return Preset(
        "ddpm", "Ho et al. 2020", MappingProxyType(dict(p)),
        solver="ddpm", time_steps="ddpm", time_step_params=("T",),
        schedule=chain, training_schedule=chain, precond=VPPrecond(chain, p["T"], index=True), architecture="DDPM",
        noise="discrete-uniform", noise_params=(),
        weighting="constant", weighting_params=(), weighting_space="eps", prior="unit",
        text=MappingProxyType({
            "time steps": "all steps i = T..1, ancestral, variance beta_i",
            "schedule": "sigma(t) = sqrt(1/abar_(tT) - 1), abar_i = prod_(j<=i) (1 - beta_j), beta linear",
            "scaling": "s(t) = sqrt(abar_(tT))",
            "noise": "i ~ U{1, T}, t = i/T",
            "weighting": "1 on (eps - eps_hat)^2 (L_simple)",
        }),
    )


def _rectified_flow(p: dict) -> Preset:
    return Preset(
        "rectified-flow", "Liu et al. 2023; logit-normal t: Esser et al. 2024", MappingProxyType(dict(p)),
        solver="euler", time_steps="flow", time_step_params=("t_min", "t_max"),
        schedule=S.RectifiedFlow(), training_schedule=S.RectifiedFlow(), precond=FlowPrecond(), architecture="any",
        noise="logit-normal", noise_params=("m", "s"),
        weighting="constant", weighting_params=(), weighting_space="flow",
        text=MappingProxyType({
            "time steps": "t_i = t_max + i/(N-1) (t_min - t_max), sigma = t/(1-t)",
            "schedule": "sigma(t) = t/(1-t)",
            "scaling": "s(t) = 1-t",
            "noise": "t = sigmoid(u), u ~ N(m, s^2)",
            "weighting": "1 on (u - u_hat)^2, u = eps - x",
        }),
    )


def _ztsnr(p: dict) -> Preset:
    """Lin et al. (2024): DDPM's linear chain rescaled to zero terminal SNR (their Algorithm 1), sampled
    from pure noise at sigma = inf with trailing time steps (their Table 2) and DDIM, v-prediction.
    Weighting: constant on the v error, Lin et al.'s v loss; its x0-space weight 1 + SNR stays 1 at
    SNR 0, where the net must learn x0 = -v = E[x0 | pure noise] for the sampler's first step. (L_simple,
    constant on eps, puts x0-weight SNR = 0 there; min-SNR-v, min(SNR, 5) / (SNR + 1), also 0:
    neither would train that step.)"""
    chain = S.rescale_zero_terminal_snr(S.ddpm_linear(p["T"], p["beta_start"], p["beta_end"]))
    return Preset(
        "ztsnr", "Lin et al. 2024 (zero terminal SNR, v-prediction, trailing DDIM)", MappingProxyType(dict(p)),
        solver="ddim", time_steps="ddpm", time_step_params=("T",),
        time_step_options=MappingProxyType({"schedule": chain, "spacing": "trailing"}),
        schedule=chain, training_schedule=chain, precond=VPredPrecond(chain, p["T"], index=True), architecture="any",
        noise="discrete-uniform", noise_params=(),
        weighting="constant", weighting_params=(), weighting_space="v", prior="unit",
        text=MappingProxyType({
            "time steps": "trailing: i = round(T - j T/N), j = 0..N-1, from i = T (sigma = inf, x = eps)",
            "schedule": "sigma(t) = sqrt(1/abar_(tT) - 1), sqrt(abar) of the linear betas shifted to 0 at T, "
                        "scaled to keep abar_1",
            "scaling": "s(t) = sqrt(abar_(tT)), 0 at t = 1",
            "noise": "i ~ U{1, T} (i = T: SNR 0), t = i/T",
            "weighting": "1 on (v - v_hat)^2, v = alpha eps - sigma x (x0 space: 1 + SNR)",
        }),
    )


# Each column's numbers (Preset.params) as published; get_preset(name, params) changes some of them.
DEFAULT_PARAMS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "vp": MappingProxyType(dict(beta_d=19.9, beta_min=0.1, eps_s=1e-3, eps_t=1e-5, M=1000)),
    "ve": MappingProxyType(dict(sigma_min=0.02, sigma_max=100.0)),
    "iddpm": MappingProxyType(dict(C1=0.001, C2=0.008, M=1000, j0=8)),
    "edm": MappingProxyType(dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, P_mean=-1.2, P_std=1.2)),
    "ddpm": MappingProxyType(dict(T=1000, beta_start=1e-4, beta_end=0.02)),
    "rectified-flow": MappingProxyType(dict(t_min=1e-3, t_max=0.999, m=0.0, s=1.0)),
    "ztsnr": MappingProxyType(dict(T=1000, beta_start=1e-4, beta_end=0.02)),
})
_BUILDERS = {"vp": _vp, "ve": _ve, "iddpm": _iddpm, "edm": _edm, "ddpm": _ddpm, "rectified-flow": _rectified_flow, "ztsnr": _ztsnr}
PRESETS: Mapping[str, Preset] = MappingProxyType({name: build(DEFAULT_PARAMS[name]) for name, build in _BUILDERS.items()})


def get_preset(name: str, params: Mapping[str, float] | None = None) -> Preset:
    """The preset called `name` (one of PRESETS), with the numbers in `params` (a subset of its
    own, e.g. {"sigma_data": 0.75, "P_mean": -1.0} for EDM: model.preset_params) in place of the
    published ones; ValueError naming a parameter the preset does not have or a value it refuses."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    if not params:
        return PRESETS[name]
    defaults = DEFAULT_PARAMS[name]
    for key, value in params.items():
        if key not in defaults:
            raise ValueError(f"preset {name!r} has no parameter {key!r}; allowed: {', '.join(defaults)}")
        integer = isinstance(defaults[key], int)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (integer and value != int(value)):
            raise ValueError(f"model.preset_params.{key}={value!r} must be a finite {'integer' if integer else 'number'}")
    changed = {**defaults, **{k: (int(v) if isinstance(defaults[k], int) else float(v)) for k, v in params.items()}}
    try:
        preset = _BUILDERS[name](changed)
        noise_distribution(preset.noise, **preset.noise_kwargs)  # its numbers are checked here too (P_std > 0, ...)
        return preset
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"preset {name!r} with {dict(params)}: {e}") from None


ROWS = ("reference", "solver", "time steps", "schedule", "scaling", "architecture",
        "c_skip", "c_out", "c_in", "c_noise", "noise distribution", "loss weighting", "parameters")


def _cells(p: Preset) -> dict[str, str]:
    return {
        "reference": p.reference,
        "solver": p.solver,
        "time steps": p.text["time steps"],
        "schedule": p.text["schedule"],
        "scaling": p.text["scaling"],
        "architecture": p.architecture,
        **p.precond.formulas,
        "noise distribution": p.text["noise"],
        "loss weighting": p.text["weighting"],
        "parameters": ", ".join(f"{k}={v:g}" for k, v in p.params.items()),
    }


def presets_table() -> str:
    """A Markdown table: one column per preset, one row per row of Karras et al. (2022), Table 1."""
    cells = {name: _cells(p) for name, p in PRESETS.items()}
    lines = ["| | " + " | ".join(PRESETS) + " |", "|---" * (len(PRESETS) + 1) + "|"]
    lines += ["| " + row + " | " + " | ".join(cells[name][row] for name in PRESETS) + " |" for row in ROWS]
    return "\n".join(lines)
