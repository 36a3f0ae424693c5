"""Reflow (Liu, Gong & Liu 2023, 'Flow Straight and Fast', rectified flow k-RF): a trained flow's own
deterministic coupling (eps, ODE(eps)), trained on again, straightens its paths.

    reflow(RUN, RUN2)     eps ~ N(0, I) (seeded), x = ODE(eps) with RUN's model -> RUN2/pairs.npz;
                          then a new run in RUN2 on the fixed pairs, started from RUN's EMA weights
    straightness(D, x, sigmas)   Liu et al.'s S = int E ||dz/dt - (z_1 - z_0)||^2 dt along the ODE

The pair. `sampling.sample` starts at x~ = sigma_max eps (the scale-free state, sigma_max = sigmas[0]);
here eps is drawn first and that state passed to the sampler explicitly, so each pair is exactly
(eps, ODE(sigma_max eps)) as computed, not recovered by a division. With the rectified-flow preset,
sigma_max = t_max / (1 - t_max) = 999 (t_max = 0.999): the sampler starts at z = x~ / (1 + sigma_max) =
t_max eps, where the path z_t = (1 - t) x + t eps of the pair stands at t_max eps + (1 - t_max) x; the
two differ by 0.001 x, the part of the start that no sampler knows. The coupling eps -> x is
deterministic (one sample per noise), which is all that reflow needs.

Which runs. Any diffusion run whose sampler is deterministic: in the scale-free form every preset's
ODE is the same dx~/dsigma = (x~ - D) / sigma, and under a deterministic coupling the training path
x~ = x + sigma eps of the pair is a straight line in sigma for every preset (rectified flow's
z_t = (1 - t) x + t eps is the same line in t = sigma / (1 + sigma)). The new run keeps RUN's preset,
parameterization and network, and so trains on its own path. Reflow was measured here on the
rectified-flow preset only (benchmarks/flow_coupling.py). The sampler (RUN's [sample] one, or the
preset's solver) is checked to be deterministic before any pair is drawn; a stochastic one (ddpm,
edm_sde with churn, euler_maruyama, ...) makes no coupling of this kind and is refused, and so is a
class-conditional run (its pairs would need labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, SampleConfig, apply_overrides
from .model import build_model, checkpoint_path, load_model
from .samplers import SAMPLERS, flow_euler, initial_state
from .sampling import Plan, plan

Tensor = torch.Tensor

PAIRS_FILE = "pairs.npz"


@torch.no_grad()
def straightness(denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Per-sample straightness of the ODE paths from the scale-free x at sigmas[0], in rectified-flow
    coordinates z = x~ / (1 + sigma), t = sigma / (1 + sigma) (Liu et al. 2023, their S(Z)):

        S = 1 / (t_0 - t_N) int_{t_N}^{t_0} ||dz/dt - (z_0 - z_N) / (t_0 - t_N)||^2 dt,

    0 exactly when a path is a straight line at constant speed. The path is flow_euler's on `sigmas`:
    velocity u_i = (z_i - D_i) / t_i = (x~_i - (1 + sigma_i) D_i) / sigma_i held on [t_{i+1}, t_i], so
    (z_0 - z_N) / (t_0 - t_N) is the mean velocity and S the velocities' variance, weighted by the step
    lengths. Any denoiser: every model's ODE can be written in these coordinates."""
    steps = []
    end = flow_euler(denoiser, x, sigmas, callback=steps.append)
    t = [s["sigma"] / (1 + s["sigma"]) for s in steps] + [float(sigmas[-1] / (1 + sigmas[-1]))]
    weights = [t[i] - t[i + 1] for i in range(len(steps))]
    u = [(s["x"] - (1 + s["sigma"]) * s["denoised"]) / s["sigma"] for s in steps]
    mean = (x / (1 + float(sigmas[0])) - end) / (t[0] - t[-1])
    S = sum(w * (ui - mean).pow(2).reshape(len(x), -1).sum(1) for w, ui in zip(weights, u))
    return S / (t[0] - t[-1])


@torch.no_grad()
def check_deterministic(denoiser, p: Plan, x: Tensor) -> None:
    """ValueError unless the planned sampler's result from x is the same under two generators."""
    runs = [SAMPLERS[p.sampler](denoiser, x, p.sigmas.to(x.device), generator=torch.Generator(x.device).manual_seed(s),
                                **p.options) for s in (1, 2)]
    if not torch.equal(*runs):
        raise ValueError(f"sampler {p.sampler!r} (options {p.options or '{}'}) is stochastic; reflow needs a "
                         "deterministic ODE sampler, e.g. euler, heun, flow_euler, flow_heun, deis_pc")


@torch.no_grad()
def make_pairs(model, p: Plan, n: int, seed: int = 0, batch: int = 4096) -> tuple[Tensor, Tensor]:
    """(eps, x): eps ~ N(0, I) of shape (n, *model.shape) from torch.Generator().manual_seed(seed) (on
    the CPU, so the same on every device), x = the planned sampler from the state sigma_max eps (eps
    itself for a grid from sigma = inf), in batches of `batch` (the sampler is deterministic: the
    batching changes x only by float rounding)."""
    device = next(model.parameters()).device
    eps = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(seed))
    sigma_max = p.sigmas[0].item()
    x = torch.cat([SAMPLERS[p.sampler](model, initial_state(e.to(device), sigma_max), p.sigmas.to(device), **p.options).cpu()
                   for e in eps.split(batch)])  # model(x~, sigma): the unconditional denoiser
    return eps, x


def reflow_config(cfg: Config, out: Path, source: Path, steps: int | None, overrides=()) -> Config:
    """The new run's config: RUN's, on the pairs file of `out` (its full path, so `train --resume`
    finds it from anywhere), started from the `source` checkpoint; the noise's own coupling and offset
    are off (the pairs bring their noise); then `overrides`, then `steps`."""
    new = Config.from_dict(cfg.to_dict())
    new.data.spec, new.data.n, new.data.size, new.data.channels = str((out / PAIRS_FILE).resolve()), 0, 0, 0
    new.model.coupling, new.model.offset_noise = "independent", 0.0
    new.train.init = str(source.resolve())
    apply_overrides(new, overrides)
    if steps is not None:
        new.train.steps = steps
    return new


def write_pairs(model, out: Path, p: Plan, pairs: int, seed: int, source: Path, device="cpu") -> None:
    """make_pairs of `model` (checked deterministic first) on `device` -> out/pairs.npz, and
    out/pairs.json saying how they were made."""
    model.to(device)
    probe = torch.randn((2, *model.shape), generator=torch.Generator().manual_seed(seed)).to(device)
    check_deterministic(model, p, initial_state(probe, p.sigmas[0].item()))
    eps, x = make_pairs(model, p, pairs, seed)
    out.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:  # np.savez would append .npz to a path
            np.savez(f, x=x.numpy(), eps=eps.numpy())

    ckpt.atomic_write(out / PAIRS_FILE, write)
    ckpt.atomic_write_text(out / "pairs.json", json.dumps({
        "source": str(Path(source).resolve()), "n": pairs, "sampler": p.sampler, "nfe": p.nfe, "options": p.options,
        "seed": seed, "sigma_max": p.sigmas[0].item(),
        "pair": "eps ~ N(0, I) from torch.Generator().manual_seed(seed); x = sampler(D, sigma_max * eps)"},
        indent=1, default=repr))  # a preset's sampler options may hold a schedule


def check_pairs(cfg: Config, pairs: int) -> None:
    """ValueError unless `pairs` leave at least one training batch of the new run `cfg`."""
    if not 1 <= pairs <= 10**7:
        raise ValueError(f"--pairs={pairs} must be >= 1 (and at most 10,000,000)")
    n_train = pairs - round(cfg.data.test_fraction * pairs)
    if n_train < cfg.train.batch_size:
        raise ValueError(f"--pairs={pairs} leaves {n_train} training pairs (data.test_fraction={cfg.data.test_fraction:g}), "
                         f"fewer than train.batch_size={cfg.train.batch_size}")


def reflow(run: Path, out: Path, *, pairs: int = 10_000, steps: int | None = None, nfe: int = 100,
           sampler: str = "", seed: int = 0, overrides=(), progress: bool = True) -> dict:
    """Reflow of a run: `pairs` (noise, sample) pairs by its EMA model (sampler: RUN's [sample] one or
    the preset's solver, at `nfe`, noise seeded by `seed`) saved as out/pairs.npz (+ pairs.json: how they
    were made), then a new run trained in `out` on them (train.train; resume it with
    `diffspace train --resume OUT`). Every bad setting fails before the first pair is drawn. Returns
    train's summary with 'pairs' (the file) and 'plan' (the sampler used)."""
    from .train import init_weights, resolve_device, train

    from .config import MAX_NFE

    if not 1 <= nfe <= MAX_NFE:
        raise ValueError(f"--nfe={nfe} is out of range; allowed: 1 .. {MAX_NFE}")
    out = Path(out)
    if ckpt.latest(out / "checkpoints") is not None:
        raise ValueError(f"{out} already holds checkpoints; continue it with `diffspace train --resume {out}` or choose another folder")
    source = checkpoint_path(Path(run))
    model, cfg, _ = load_model(source)
    if model.num_classes:
        raise ValueError(f"{run} is class-conditional; reflow makes unconditional pairs only (train RUN without model.class_conditional)")
    new = reflow_config(cfg, out, source, steps, overrides)
    check_pairs(new, pairs)
    init_weights(build_model(new.model, model.shape), str(source))  # the new [model] settings and their fit to RUN
    p = plan(model.preset, SampleConfig(sampler=sampler or cfg.sample.sampler, nfe=nfe))
    write_pairs(model, out, p, pairs, seed, source, resolve_device(new.train.device))
    summary = train(new, out, progress=progress)
    return {**summary, "pairs": out / PAIRS_FILE, "plan": p}
