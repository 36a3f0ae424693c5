"""Sampling a model: one value, `config.SampleConfig` (sampler, NFE, sampler options, class labels,
guidance, seed), resolved once:

    plan(preset, cfg)           -> Plan: the sampler, its sigma grid, its options, the NFE it spends
    class_labels(cfg, n, K)     -> the labels of n samples ('3', '1,7', 'all' = equal shares, sorted)
    guided_denoiser(model, ...) -> D(x, sigma) for the sampler: the model at those labels, wrapped by
                                   guidance.py (classifier-free, autoguidance, classifier guidance)
    sample(model, n, cfg)       -> Samples(x, labels, plan, evaluations, guided)

Bad settings fail in `plan` / `class_labels` / `guided_denoiser` with a one-line ValueError,
before any network evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import distributed, guidance
from .config import SampleConfig
from .model import load_model
from .presets import Preset
from .samplers import SAMPLERS, get_sigmas, initial_state, sampler_nfe
from .schedules import unchecked

Tensor = torch.Tensor

DEFAULT_NFE = 35  # ODE solvers without an NFE: EDM's 18 Heun steps
# samplers that need far more: NCSN's annealed Langevin (Song & Ermon 2019: 10 levels x 100 steps,
# + the final denoising step) and score_sde's PC sampler (Song et al. 2021b: N = 1000 steps, one
# corrector step each but the last)
SAMPLER_NFE = {"langevin": 1001, "pc": 1999, "mala": 1010}  # mala: langevin's 10 levels x (100 proposals + 1)


class BudgetError(ValueError):
    """An NFE the sampler cannot spend: below one of its steps, or any NFE for a sampler that chooses
    its own steps (adaptive)."""


@dataclass(frozen=True)
class Plan:
    """A resolved sampler: name, grid (sigma_max -> 0, float64), options, and its denoiser calls per
    sample; nfe is None for a sampler that chooses its own steps (adaptive: the grid is just
    [sigma_max, sigma_min, 0], and `Samples.evaluations` is what it spent)."""

    sampler: str
    sigmas: Tensor
    options: dict
    nfe: int | None


def _most_steps(nfe_of, target: int) -> int:
    """The largest k in [1, 4 target + 1] with nfe_of(k) <= target (nfe_of non-decreasing in k,
    nfe_of(1) <= target), by bisection; the cap holds where a sampler's options make steps free."""
    cap = 4 * target + 1
    lo, hi = 1, 2
    while hi <= cap and nfe_of(hi) <= target:
        lo, hi = hi, 2 * hi
    if hi > cap:
        if nfe_of(cap) <= target:
            return cap
        hi = cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if nfe_of(mid) <= target else (lo, mid)
    return lo


def plan(preset: Preset, cfg: SampleConfig) -> Plan:
    """The preset's own solver and time steps unless cfg names others. nfe = 0 spends 35 evaluations
    for ODE solvers, the papers' budgets for langevin and pc (SAMPLER_NFE) and the full chain for
    DDPM; otherwise the most steps whose NFE fits (at least one step's worth). A grid that starts at
    sigma = inf (zero terminal SNR) is counted with its step from there (samplers.sampler_nfe)."""
    name = cfg.sampler or preset.solver
    if name not in SAMPLERS:
        raise ValueError(f"sample.sampler={name!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    if cfg.nfe < 0:
        raise ValueError(f"sample.nfe={cfg.nfe} must be >= 0 (0: the sampler's default)")
    options = {**preset.sampler_options(name), **cfg.options}
    try:
        counted_ahead = sampler_nfe(name, 1, **options) is not None
    except (TypeError, ValueError) as e:  # an unknown option or a bad value, named by the sampler
        raise ValueError(f"sample: {e}") from None
    infinite = math.isinf(get_sigmas(preset.time_steps, 1, **preset.time_step_kwargs)[0].item())
    if not counted_ahead:  # adaptive: its own steps between the ends of the preset's grid, counted by `sample`
        if cfg.nfe:
            raise BudgetError(f"sample.nfe={cfg.nfe}: sampler {name!r} chooses its own steps (set sample.rtol / "
                             "sample.atol instead); leave sample.nfe at 0")
        full = get_sigmas(preset.time_steps, preset.params["T"] if preset.time_steps == "ddpm" else 2,
                          **preset.time_step_kwargs)
        return Plan(name, full[[0, 1, -2, -1] if infinite else [0, -2, -1]], options, None)  # from inf: one step first
    if name == "ddpm" and preset.time_steps == "ddpm" and not cfg.nfe:
        steps = preset.params["T"]
    else:
        target = cfg.nfe or SAMPLER_NFE.get(name, DEFAULT_NFE)
        if sampler_nfe(name, 1, **options) > target:
            raise BudgetError(f"sample.nfe={target} is below one step of {name} ({sampler_nfe(name, 1, **options)} "
                             f"evaluations with options {options or '{}'}); raise sample.nfe or lower the sampler's steps")
        steps = _most_steps(lambda k: sampler_nfe(name, k, from_infinity=infinite, **options), target)
    sigmas = get_sigmas(preset.time_steps, steps, **preset.time_step_kwargs)
    return Plan(name, sigmas, options, sampler_nfe(name, steps, from_infinity=infinite, **options))


def class_labels(classes: str, n: int, num_classes: int, device="cpu") -> Tensor | None:
    """Labels of n samples: None for '' (unconditional); an int K, a comma list, or 'all' (every class),
    in equal shares, sorted, so a grid of n = k * len(classes) shows one row per class."""
    text = str(classes).strip()
    if not text:
        return None
    if not num_classes:
        raise ValueError(f"sample.classes={text!r}: this model is not class-conditional (train it with model.class_conditional=true)")
    if text == "all":
        chosen = list(range(num_classes))
    else:
        try:
            chosen = [int(c) for c in text.split(",") if c.strip()]
        except ValueError:
            chosen = None
        if not chosen or any(not 0 <= c < num_classes for c in chosen):
            raise ValueError(f"sample.classes={text!r}: allowed are class numbers 0..{num_classes - 1} "
                             "(one, a comma list) or 'all'")
    index = torch.arange(n) * len(chosen) // n
    return torch.tensor(chosen, dtype=torch.long)[index].to(device)


def _check_guide(guide, model, what: str) -> None:
    if guide.shape != model.shape:
        raise ValueError(f"{what} models data of shape {guide.shape}, the model {model.shape}")


def guided_denoiser(model, cfg: SampleConfig, labels: Tensor | None, device="cpu", weak=None):
    """D(x, sigma) of the model at `labels` with the guidance cfg asks for: classifier-free when
    guidance != 1 on labels, autoguidance with guide_run (or by `weak`, a guide model already in
    memory), classifier guidance with classifier (runs named in cfg are loaded here), clamped to
    [-clip_x0, clip_x0] if set. Returns (D, the outermost guidance wrapper or None)."""
    w, interval, phi = cfg.guidance, tuple(cfg.guidance_interval), cfg.guidance_rescale
    if interval and (len(interval) != 2 or not 0 <= interval[0] <= interval[1]):
        raise ValueError(f"sample.guidance_interval={list(interval)} must be [sigma_lo, sigma_hi] with 0 <= lo <= hi")
    if not 0 <= phi <= 1:
        raise ValueError(f"sample.guidance_rescale={phi} must lie in [0, 1]")
    wrapper = None
    D = lambda x, s: model(x, s, labels)  # noqa: E731
    if weak is None and cfg.guide_run:
        weak, _, _ = load_model(cfg.guide_run, device)
    if weak is not None:
        what = f"sample.guide_run={cfg.guide_run!r}" if cfg.guide_run else "the guide"
        _check_guide(weak, model, what)
        weak_labels = labels if weak.num_classes else None
        if weak_labels is not None and weak.num_classes != model.num_classes:
            raise ValueError(f"{what} has {weak.num_classes} classes, the model {model.num_classes}")
        D = wrapper = guidance.autoguidance(D, lambda x, s: weak(x, s, weak_labels), w, interval, phi)
    elif w != 1:
        if labels is None:
            raise ValueError(f"sample.guidance={w} needs class labels (sample.classes) for classifier-free guidance, "
                             "or sample.guide_run for autoguidance")
        D = wrapper = guidance.classifier_free(model, labels, model.num_classes, w, interval, phi)
    if cfg.classifier:
        if labels is None:
            raise ValueError("sample.classifier needs class labels (sample.classes) to guide towards")
        clf, _, _ = load_model(cfg.classifier, device, kind="classifier")
        _check_guide(clf, model, f"sample.classifier={cfg.classifier!r}")
        if int(labels.max()) >= clf.num_classes:
            raise ValueError(f"sample.classes asks for class {int(labels.max())}; the classifier knows {clf.num_classes}")
        D = wrapper = guidance.ClassifierGuidance(D, clf.log_prob, labels, cfg.classifier_scale, interval)
    if cfg.clip_x0:
        D = guidance.clip_x0(D, cfg.clip_x0)
    return D, wrapper


def describe_guidance(cfg: SampleConfig, auto: bool = False) -> str:
    """The labels and guidance of a sampling config in words ('' for plain sampling); auto: guided by
    a guide model in memory (sample's `guide`)."""
    parts = [f"classes {cfg.classes}"] if cfg.classes else []
    auto = auto or bool(cfg.guide_run)
    if auto:
        parts.append(f"autoguidance w={cfg.guidance:g}")
    elif cfg.guidance != 1:
        parts.append(f"CFG w={cfg.guidance:g}")
    if cfg.guidance_interval and (auto or cfg.guidance != 1 or cfg.classifier):
        parts.append("interval [" + ", ".join(f"{v:g}" for v in cfg.guidance_interval) + "]")
    if cfg.guidance_rescale:
        parts.append(f"rescale {cfg.guidance_rescale:g}")
    if cfg.classifier:
        parts.append(f"classifier scale {cfg.classifier_scale:g}")
    return ", ".join(parts)


@dataclass
class Samples:
    """x (n, *shape) at sigma = 0, their labels (or None), the plan, and what the denoiser spent:
    `evaluations` = the sampler's calls, counted (plan.nfe for one batch where the plan knows it),
    `guided` = those that also evaluated a guide (a doubled batch for CFG), `energies` = MALA's calls of
    the model's energy (a network forward each, beside the denoiser's)."""

    x: Tensor
    labels: Tensor | None
    plan: Plan
    evaluations: int
    guided: int
    guidance: str = ""  # describe_guidance of the config
    energies: int = 0

    @property
    def steps(self) -> int | None:
        """The steps of the planned grid (None for a sampler that chooses its own, adaptive)."""
        return len(self.plan.sigmas) - 1 if self.plan.nfe is not None else None

    def describe(self) -> str:
        spent = f"NFE {self.evaluations}" + (" spent on its own steps" if self.plan.nfe is None else "")
        steps = f"{self.steps} steps, " if self.steps is not None else ""
        text = f"sampler {self.plan.sampler}, {steps}{spent}" + (f", {self.guidance}" if self.guidance else "")
        if self.energies:
            text += f", and {self.energies} evaluations of the energy"
        if self.guided:
            text += f" (the guide evaluated too on {self.guided} of {self.evaluations} calls)"
        return text


class Counted:
    """A function of (x, sigma), a denoiser or an energy, that counts its calls."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma)


def stream_seed(seed: int, k: int) -> int:
    """The seed of independent stream k of `seed` (chunk k of a sampling run, rank k's dropout): the
    seed itself for k = 0 (so n <= batch draws what one batch always drew), a SplitMix64 mix of
    (seed, k) for the others."""
    if k == 0:
        return seed
    z = (seed + k * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


@torch.no_grad()
def sample(model, n: int, cfg: SampleConfig | None = None, *, device="cpu", callback=None,
           shape: tuple | None = None, shared: bool = True, guide=None) -> Samples:
    """n samples of a model (train.Diffusion) as cfg says, in chunks of cfg.batch: chunk k holds
    samples k * batch .. and has its own generator (stream_seed), so a sample does not depend on how
    many processes share the work. Under torchrun rank r computes chunks r, r + W, ..., and every
    rank gets all n (distributed.gather_chunks); shared=False: this process alone computes every chunk
    (rank 0's sample grids during training). `callback` sees each of this rank's chunks in turn (in
    the model's space: a latent run's samples alone are decoded to pixels). `guide`: the weak model of
    autoguidance (weight cfg.guidance) when it is in memory; else cfg.guide_run's is loaded once here."""
    cfg = cfg or SampleConfig()
    shape = tuple(shape or model.shape)
    if n < 1 or not shape:
        raise ValueError(f"sample: n={n} must be >= 1 and the data shape known (got {shape})")
    p = plan(model.preset, cfg)
    if p.sampler == "mala" and model.parameterization != "energy":
        raise ValueError(f"sample.sampler='mala' needs log p from an energy model (model.parameterization=energy); "
                         f"this one is {model.parameterization!r}: use langevin for an unadjusted chain")
    labels = class_labels(cfg.classes, n, model.num_classes, device)
    if guide is None and cfg.guide_run:
        guide, _, _ = load_model(cfg.guide_run, device)
    count = -(-n // cfg.batch)
    rank, world = (distributed.rank(), distributed.world_size()) if shared else (0, 1)
    done = [_sample_chunk(model, cfg, p, shape, k, min(n, (k + 1) * cfg.batch) - k * cfg.batch,
                          None if labels is None else labels[k * cfg.batch:(k + 1) * cfg.batch], device, callback, guide)
            for k in range(rank, count, world)]
    x = [chunk[0] for chunk in done]
    calls, guided, energies = (max((chunk[j] for chunk in done), default=0) for j in (1, 2, 3))  # per batch
    if world > 1:
        x = distributed.gather_chunks(x, count, cfg.batch, n, torch.empty((0, *shape), device=device))
        calls, guided, energies = distributed.most(calls), distributed.most(guided), distributed.most(energies)
    x = torch.cat(x)
    if getattr(model, "encoder", None) is not None:  # a latent run's samples in pixels (encoder.py; pixels: identity)
        x = model.encoder.decode(x)
    return Samples(x, labels, p, calls, guided, describe_guidance(cfg, auto=guide is not None), energies)


def _sample_chunk(model, cfg: SampleConfig, p: Plan, shape: tuple, k: int, n: int, labels, device, callback, guide):
    """(x, denoiser calls, guided calls, energy calls) of chunk k (n samples): x = sigma_max * N(0, I) from its
    generator (N(0, I) itself for a grid from sigma = inf), then the planned sampler on the guided denoiser."""
    D, wrapper = guided_denoiser(model, cfg, labels, device, guide)
    D = counted = Counted(D)  # what the sampler spent, also where the plan cannot know it (adaptive)
    options = dict(p.options)
    if p.sampler == "ddpm" and model.learned_variance and "variance" not in options:
        # the learned Sigma of the network's last call: its first len(x) rows are the model's own
        # (CFG batches [conditional; unconditional]; a guide model has its own head)
        options["variance"] = lambda x, s: (D(x, s), (model.head.v[:len(x)].to(x.dtype) + 1) / 2)
    if p.sampler == "mala" and "energy" not in options:  # log p of the model at the labels (checked above)
        options["energy"] = Counted(lambda x, s: model.energy(x, s, labels))
    g = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, k))
    x = initial_state(torch.randn((n, *shape), generator=g, device=device), p.sigmas[0].item(), model.preset.prior)
    with unchecked():  # the grid was checked once (plan); its levels need no check per call (a host-device sync each)
        x = SAMPLERS[p.sampler](D, x, p.sigmas.to(device), generator=g, callback=callback, **options)
    energy = options.get("energy")
    return x, counted.calls, wrapper.guided if wrapper is not None else 0, energy.calls if isinstance(energy, Counted) else 0
