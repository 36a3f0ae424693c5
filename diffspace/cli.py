"""Command line: `diffspace train | train-classifier | train-autoencoder | reflow | sample | edit | eval | export | compare |
phema | info | demo`.
Bad arguments exit 2 with a one-line message."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_info(args) -> int:
    from .parameterization import PARAMETERIZATIONS
    from .presets import presets_table
    from .samplers import GRIDS, SAMPLERS
    from .schedules import SCHEDULES

    print(presets_table())
    print()
    print("schedules:         " + ", ".join(SCHEDULES))
    print("parameterizations: " + ", ".join(PARAMETERIZATIONS))
    print("samplers:          " + ", ".join(SAMPLERS))
    print("time grids:        " + ", ".join(GRIDS))
    return 0


def cmd_phema(args) -> int:
    from .phema import reconstruct_run

    try:
        sigma_rels = [float(v) for v in args.sigma_rel.split(",") if v.strip()]
    except ValueError:
        sigma_rels = []
    if not sigma_rels or not all(0 < v < 0.5 for v in sigma_rels):
        raise ValueError(f"--sigma-rel={args.sigma_rel!r}: give a comma list of numbers in (0, 0.5), e.g. 0.05,0.1")
    if not Path(args.run).is_dir():
        raise ValueError(f"{args.run} is not a run folder")
    for r in reconstruct_run(Path(args.run), sigma_rels, args.step):
        print(f"sigma_rel {r['sigma_rel']:g} at step {r['step']}: {r['snapshots']} snapshot EMAs, profile error "
              f"{100 * r['error']:.2f}% -> {r['folder']}")
    return 0


MAX_DEMO_SCALE = 100


def cmd_demo(args) -> int:
    from .demo import run

    if not 0 < args.scale <= MAX_DEMO_SCALE:  # NaN fails this too
        raise ValueError(f"--scale={args.scale:g} is out of range; allowed: (0, {MAX_DEMO_SCALE}] (1: the full demo)")
    out = Path(args.out)
    r = run(out, scale=args.scale, progress=not args.quiet)
    d, ring = r["digits"], r["ring8"]
    print(f"digits: {100 * d['confident']:.1f}% confident (>= 80% needed), smallest class {100 * d['min_class_fraction']:.1f}% (>= 4%), "
          f"label agreement {100 * d['agreement']:.1f}%")
    g = r["guided"]
    print(f"digits, guided (w = {g['w']:g}): the feature net agrees with the requested class on {100 * g['agreement']:.1f}% of {g['n']}")
    print(f"ring8: sliced W2 {ring['sw2']:.4f} vs noise floor {ring['floor']:.4f} (ratio {ring['ratio']:.2f}, <= 2 needed)")
    print(f"done in {r['seconds']:.0f} s; report: {out / 'report.md'}")
    return 0


def cmd_train(args, kind: str = "diffusion") -> int:
    from . import distributed
    from .config import load_config
    from .train import train

    if args.resume:  # the run folder holds everything; only the number of steps may change
        if args.config or args.overrides or args.preset or args.data:
            raise ValueError("--resume continues a run with its own config; only --steps may be given with it")
        summary = train(None, Path(args.resume), resume=True, steps=args.steps, progress=not args.quiet)
    else:
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not Path(config).is_file():  # no file: the first override
            config, overrides = None, [config, *overrides]
        for key, value in (("model.preset", args.preset), ("data.spec", args.data), ("train.steps", args.steps)):
            if value is not None:
                overrides.append(f"{key}={value}")
        cfg = load_config(config, overrides)
        if kind != "diffusion":
            cfg.model.kind = kind
        summary = train(cfg, Path(args.out), progress=not args.quiet)
    if distributed.is_main():
        print(f"trained to step {summary['steps']} in {summary['seconds']:.1f} s -> {summary['run_dir']}")
        if kind == "autoencoder":
            from .train import autoencoder_quality, load_data

            psnr, std = autoencoder_quality(summary["ema"], load_data(summary["config"])[2])
            print(f"held-out reconstruction PSNR {psnr:.2f} dB; latent std {std:.4f} (data.encoder={summary['run_dir']} "
                  f"scales its latents to std 0.5)")
    return 0


MAX_SAMPLES = 100_000  # per call: the samples are held in memory at once


def check_count(flag: str, n: int, low: int) -> None:
    if not low <= n <= MAX_SAMPLES:
        raise ValueError(f"{flag}={n} is out of range; allowed: {low} .. {MAX_SAMPLES}")


def cmd_reflow(args) -> int:
    from .reflow import reflow

    r = reflow(Path(args.run), Path(args.out), pairs=args.pairs, steps=args.steps, nfe=args.nfe, sampler=args.sampler or "",
               seed=args.seed, overrides=args.overrides, progress=not args.quiet)
    spent = f"at NFE {r['plan'].nfe}" if r["plan"].nfe is not None else "on its own steps"
    print(f"{args.pairs} (noise, sample) pairs by {r['plan'].sampler} {spent} -> {r['pairs']}")
    print(f"trained to step {r['steps']} in {r['seconds']:.1f} s -> {r['run_dir']}")
    return 0


def sample_settings(args, base, data_too: bool = False):
    """The run's [sample] section with this command's sampling flags and --set sample.KEY=VALUE on top
    (data.KEY=VALUE items are left to the caller if data_too)."""
    from .config import Config, apply_overrides

    flags = [("sampler", args.sampler), ("nfe", args.nfe), ("seed", args.seed), ("classes", args.classes),
             ("guidance", args.guidance), ("guidance_interval", args.guidance_interval),
             ("guidance_rescale", args.guidance_rescale), ("guide_run", args.guide_run),
             ("classifier", args.classifier), ("classifier_scale", args.classifier_scale)]
    overrides = [f"sample.{key}={value}" for key, value in flags if value is not None]
    for item in args.set:
        if data_too and item.startswith("data."):
            continue
        if not item.startswith("sample."):
            raise ValueError(f"--set {item!r}: only sample.KEY=VALUE may be set here (a run's other settings are fixed)")
        overrides.append(item)
    return apply_overrides(Config(sample=copy.deepcopy(base)), overrides).sample


def _run_folder(run: str) -> Path:
    return Path(run) if Path(run).is_dir() else Path(run).parent


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from . import distributed
    from .evaluate import check_finite
    from .model import load_model
    from .plots import save_samples
    from .sampling import sample
    from .train import resolve_device

    check_count("--n", args.n, 1)
    device = resolve_device(args.device, "--device")
    model, cfg, _ = load_model(Path(args.run), device)
    acceptance = []  # mala's share of kept proposals, per noise level
    distributed.init(device)  # under torchrun: the chunks are shared out, rank 0 writes
    settings = sample_settings(args, cfg.sample)
    s = sample(model, args.n, settings, device=device,
               callback=lambda info: acceptance.append(info["acceptance"]) if "acceptance" in info else None)
    if not distributed.is_main():
        return 0
    x, labels = s.x.cpu(), None if s.labels is None else s.labels.cpu()
    check_finite(x, "nothing was written")
    out = Path(args.out) if args.out else _run_folder(args.run) / "samples" / "sample.png"
    save_samples(x, out, labels=labels)
    arrays = {"x": x.numpy(), **({"labels": labels.numpy()} if labels is not None else {}),
              "sampler": np.array(s.plan.sampler), "steps": np.array(s.steps if s.steps is not None else -1),
              "nfe": np.array(s.evaluations)}  # steps -1: the sampler chose its own (adaptive)
    np.savez(out.with_suffix(".npz"), **arrays)
    print(f"wrote {out} and {out.with_suffix('.npz')} ({s.describe()})")
    if s.plan.sampler in ("heun", "euler") and s.plan.nfe is not None and s.plan.nfe < 20:
        print(f"note: at {s.plan.nfe} NFE, --sampler deis_pc is the more accurate solver (benchmarks/README.md: "
              "samplers.py); heun and euler lose most at few steps")
    if settings.nfe and s.plan.nfe is not None and s.plan.nfe != settings.nfe:
        print(f"note: --nfe {settings.nfe} cannot be met exactly by {s.plan.sampler} on this grid; it spent "
              f"{s.plan.nfe}, the most that fits (e.g. heun: 2 per step, 1 on the last)")
    if acceptance:
        print(f"Metropolis-Hastings acceptance: mean {sum(acceptance) / len(acceptance):.3f} over {len(acceptance)} "
              f"noise levels (first {acceptance[0]:.3f}, last {acceptance[-1]:.3f})")
    return 0


def cmd_edit(args) -> int:
    import numpy as np
    import torch

    from . import edit, plots
    from .data import load
    from .model import load_model
    from .sampling import class_labels, guided_denoiser, plan
    from .train import load_data

    modes = [args.mask is not None, args.strength is not None, args.invert]
    if sum(modes) != 1:
        raise ValueError("edit needs exactly one of --mask (inpainting), --strength (SDEdit) or --invert (encode + decode)")
    check_count("--n", args.n, 1)
    check_count("--particles", args.particles, 1)
    model, cfg, _ = load_model(Path(args.run))
    if model.encoder.latent:
        raise ValueError(f"{args.run} is a latent run (data.encoder={cfg.data.encoder!r}); edit masks and noises pixels, "
                         "so it needs a pixel-space run")
    settings = sample_settings(args, cfg.sample)
    if args.mask is not None and args.method == "smc":  # SMC's weights assume its own step: DDPM's, posterior variance
        if args.sampler not in (None, "ddpm") or settings.options != cfg.sample.options:
            raise ValueError(f"--method smc steps by its own ancestral transition (DDPM's with the posterior variance); "
                             f"--sampler {args.sampler} and sampler options do not apply (leave them unset)")
        settings = dataclasses.replace(settings, sampler="ddpm", options={})
    p = plan(model.preset, settings)
    source = load_data(cfg)[2] if args.input == "held-out" else load(args.input)
    if source.shape != model.shape:
        raise ValueError(f"--input {args.input!r} holds samples of shape {source.shape}; the model's data are {model.shape}")
    source = source.subset(torch.randperm(len(source), generator=torch.Generator().manual_seed(settings.seed))[:args.n])
    y = source.x
    labels = class_labels(settings.classes, len(y), model.num_classes)
    D, _ = guided_denoiser(model, settings, labels)
    g = torch.Generator().manual_seed(settings.seed)
    out = Path(args.out) if args.out else _run_folder(args.run) / "samples" / "edit.png"
    arrays = {"input": y.numpy(), **({"source_labels": source.labels.numpy()} if source.labels is not None else {})}
    with torch.no_grad():
        if args.mask is not None:
            mask = edit.make_mask(args.mask, model.shape)
            mask = ~mask if args.invert_mask else mask
            if args.method == "smc":  # the network batch is inputs x particles: inputs in chunks that fit sample.batch
                ess, parts, chunk = [], [], max(1, settings.batch // args.particles)
                weak = load_model(settings.guide_run)[0] if settings.guide_run else None  # loaded once, not per chunk
                for k in range(0, len(y), chunk):  # each particle (rows b * P .. b * P + P - 1) has its input's label
                    rows = None if labels is None else labels[k:k + chunk].repeat_interleave(args.particles)
                    parts.append(edit.inpaint(guided_denoiser(model, settings, rows, weak=weak)[0], y[k:k + chunk], mask,
                                              p.sigmas, "ddpm", method="smc", particles=args.particles, generator=g,
                                              callback=lambda info: info["ess"] is None or ess.append(info["ess"])))
                x = torch.cat(parts)
                ess = torch.cat(ess) / args.particles
                method = (f"smc ({args.particles} particles per input, {len(p.sigmas) - 1} ancestral steps = "
                          f"{(len(p.sigmas) - 1) * args.particles} network evaluations per input; effective sample size "
                          f"below half the particles, so resampled, at {100 * float((ess < 0.5).double().mean()):.0f}% "
                          f"of the weighted steps)")
            else:
                x = edit.inpaint(D, y, mask, p.sigmas, p.sampler, method=args.method, jump_length=args.jump_length,
                                 jump_n_sample=args.jump_n_sample, reconstruction=args.reconstruction,
                                 sigma_data=model.preset.params.get("sigma_data", 0.5), generator=g, **p.options)
                method = args.method + (f" + reconstruction guidance {args.reconstruction:g}" if args.reconstruction else "")
            changed = int((x != y)[mask.expand_as(y)].sum())
            report = f"{method} inpainting, {int(mask.sum())} of {mask.numel()} values known; known values changed: {changed}"
            arrays["mask"] = mask.numpy()
            shown = torch.where(mask, y, torch.full_like(y, -1.0))
        elif args.strength is not None:
            x = edit.sdedit(D, y, p.sigmas, args.strength, p.sampler, generator=g, **p.options)
            start = float(p.sigmas[edit.sdedit_start(p.sigmas, args.strength)])
            report, shown = f"SDEdit from sigma {start:.4g} (strength {args.strength:g})", y
        else:
            z = edit.encode(D, y, p.sigmas)
            x = edit.decode(D, z, p.sigmas)
            rmse = float((x - y).pow(2).mean().sqrt())
            report = (f"probability-flow ODE encode + decode ({int(((p.sigmas > 0) & p.sigmas.isfinite()).sum()) - 1} Heun steps each way): round-trip RMSE "
                      f"{rmse:.3g} ({rmse / float(y.std()):.3g} of the data's std)")
            arrays["latent"], shown = z.numpy(), z.clamp(-3, 3) / 3
    from .evaluate import check_finite

    check_finite(x, "nothing was written")
    if source.labels is not None and args.mask is not None:
        from .evaluate import judge

        predict = judge(source)
        if predict is not None:
            agree = float((predict(x).cpu() == source.labels).double().mean())
            report += f"; the {source.name} judge recognises the source's class in {100 * agree:.1f}% of the outputs"
    arrays["x"] = x.numpy()
    if x.ndim == 4:
        out.parent.mkdir(parents=True, exist_ok=True)
        plots.image_grid(torch.cat([y[:16], shown[:16], x[:16]]), nrow=min(16, len(y)), scale=4).save(out)
    else:
        plots.save_samples(x, out, reference=y)
    np.savez(out.with_suffix(".npz"), **arrays)
    print(f"{report}\nwrote {out} (rows: input, what the model saw, output) and {out.with_suffix('.npz')}")
    return 0


def cmd_eval(args) -> int:
    import json

    import torch

    from . import distributed
    from .checkpoint import atomic_write_text
    from .config import apply_overrides
    from .diffusers_io import is_diffusers_folder
    from .evaluate import evaluate_model, markdown
    from .model import load_model
    from .samplers import check_tolerances
    from .train import resolve_device

    check_count("--n", args.n, 2)
    check_count("--nll-samples", args.nll_samples, 0)
    if (args.pf_ode_steps or 0) < 0:
        raise ValueError(f"--pf-ode-steps={args.pf_ode_steps} must be >= 0")
    if args.pf_ode_rtol is not None and args.pf_ode_steps is not None:
        raise ValueError(f"--pf-ode-rtol={args.pf_ode_rtol:g} sets the adaptive solver; --pf-ode-steps="
                         f"{args.pf_ode_steps} asks for fixed RK4 steps instead (give one of them)")
    pf_ode_rtol = 1e-5 if args.pf_ode_rtol is None else args.pf_ode_rtol
    check_tolerances(pf_ode_rtol, pf_ode_rtol)
    vlb_steps = tuple(int(k) for k in args.vlb_steps.split(",") if k.strip()) if args.vlb_steps else ()
    device = resolve_device(args.device, "--device")
    model, cfg, _ = load_model(args.run, device)
    data_items = [item for item in args.set if item.startswith("data.")]
    if data_items and not is_diffusers_folder(args.run):
        raise ValueError(f"--set {data_items[0]!r}: a run is measured against its own data; data.KEY=VALUE is for a "
                         "diffusers folder, which has none (default data.spec=digits)")
    cfg = apply_overrides(cfg, data_items)
    distributed.init(device)  # under torchrun: the samples' and the likelihood's chunks are shared out, rank 0 measures
    result = evaluate_model(model, cfg, args.run, n=args.n, sample_cfg=sample_settings(args, cfg.sample, data_too=True),
                            nll_samples=args.nll_samples, pf_ode_steps=args.pf_ode_steps, vlb_steps=vlb_steps,
                            inception=args.inception, vlb_variance=args.vlb_variance, pf_ode_rtol=pf_ode_rtol,
                            device=device)
    if result is None:  # another rank than 0: its share of the samples is with rank 0
        return 0
    result["model"] = model.cpu()  # the figures' few evaluations, beside the data, on the CPU
    folder = _run_folder(args.run)
    figures = eval_figures(result, folder)
    text = markdown(result) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    print(text, end="")
    atomic_write_text(folder / "eval.md", text)
    keep = ("run", "spec", "n", "sampling", "rows")
    atomic_write_text(folder / "eval.json", json.dumps({k: result[k] for k in keep}, indent=1))
    return 0


def eval_figures(result: dict, folder: Path) -> list[Path]:
    """The figures of `diffspace eval` in the run folder: samples (beside real data), the per-noise-level
    training loss, and the reverse process: 2-D paths over the data density, or the denoising sequence."""
    import math

    import torch

    from . import plots
    from .analytic import MIXTURES
    from .data import MIXTURE_SPECS
    from .evaluate import ode_sigma_range
    from .sampling import sample

    model, x, data = result["model"], result["samples"], result["data"]
    real = data.x[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:len(x)]]
    paths = [folder / "eval_samples.png", folder / "eval_loss_per_level.png", folder / "eval_reverse.png"]
    if data.kind == "points":
        plots.save_samples(x, paths[0], reference=real, labels=result["labels"])
    else:
        plots.samples_vs_data(x[:100], real[:100], paths[0])
    plots.loss_per_noise_level_figure({"EMA model": model}, model.encoder.encode(real[:256]), paths[1])
    if data.kind == "points" and x.shape[1] == 2:
        mixture = MIXTURES[MIXTURE_SPECS[data.name]]() if data.name in MIXTURE_SPECS else None
        # within the model's noise range (VE nets that predict in t: 0.02..100), less the factor sqrt(2)
        # by which the SDE panel's churn raises sigma (Karras et al. 2022, Algorithm 2)
        sigma_min, sigma_high = ode_sigma_range(model, sigma_max=math.inf)
        plots.reverse_trajectories(lambda z, s: model(z.float(), s.float()), paths[2], reference=real,
                                   log_density=mixture.log_prob if mixture is not None else None,
                                   sigma_min=sigma_min, sigma_max=min(80.0, sigma_high / math.sqrt(2)))
    elif data.kind == "images":
        snapshots = []
        sample(model, 6, result["sample_cfg"],
               callback=lambda s: snapshots.append((s["sigma"], model.encoder.decode(s["x"]), model.encoder.decode(s["denoised"]))))
        plots.reverse_snapshots(snapshots, paths[2])
    else:
        paths.pop()
    return paths


def cmd_export(args) -> int:
    from .diffusers_io import export

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new folder")
    print(f"wrote {export(args.run, out)} (DDPMPipeline.from_pretrained loads it)")
    return 0


def cmd_compare(args) -> int:
    from .compare import load_spec, run

    name = load_spec(args.spec)["name"]
    out = Path(args.out or f"runs/compare-{name}{'-quick' if args.quick else ''}")
    r = run(args.spec, out, quick=args.quick, progress=not args.quiet, overrides=args.set)
    print((out / "results.md").read_text(), end="")
    print(f"done in {r['seconds']:.0f} s; results: {out / 'results.md'}, figures in {out}")
    return 0


def add_train_arguments(p, out: str) -> None:
    p.add_argument("config", nargs="?", help="TOML config file (see configs/); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=500 model.preset=vp")
    p.add_argument("--preset", help="shortcut for model.preset (vp, ve, iddpm, edm, ddpm, rectified-flow)")
    p.add_argument("--data", help="shortcut for data.spec (digits, moons, ring8, ..., a folder or .npy/.npz)")
    p.add_argument("--steps", type=int, help="shortcut for train.steps")
    p.add_argument("--out", default=out, help=f"run folder (default: {out})")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


DEVICE_HELP = "auto (a GPU if there is one, else the CPU), cpu, cuda or cuda:N; under torchrun auto and cuda are cuda:LOCAL_RANK"


def add_sampling_arguments(p) -> None:
    """The sampling flags of sample / edit / eval: each sets one key of the run's [sample] section."""
    p.add_argument("--sampler", help="sampler name (default: the run's, else the preset's solver); see `info`")
    p.add_argument("--nfe", type=int, help="network evaluations per sample (0: 35, or the DDPM chain)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--class", dest="classes", metavar="K", help="class-conditional runs: K, a comma list, or all")
    p.add_argument("--guidance", type=float, metavar="W", help="guidance weight: CFG with --class, autoguidance with --guide-run (1: off)")
    p.add_argument("--guidance-interval", metavar="SIGMA_LO,SIGMA_HI", help="guide only at these noise levels")
    p.add_argument("--guidance-rescale", type=float, metavar="PHI", help="CFG rescale (Lin et al. 2024), 0..1")
    p.add_argument("--guide-run", metavar="RUN2", help="autoguidance: a weaker model of the same data")
    p.add_argument("--classifier", metavar="RUN", help="classifier guidance: a train-classifier run")
    p.add_argument("--classifier-scale", type=float, metavar="S", help="classifier guidance scale (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="sample.KEY=VALUE",
                   help="any [sample] key or sampler option, e.g. sample.eta=1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .edit import MASKS, METHODS
    from .process import REVERSE_VARIANCES

    p = _Parser(prog="diffspace", description="The design space of diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="{train,train-classifier,train-autoencoder,reflow,sample,edit,eval,export,compare,phema,info,demo}", parser_class=_Parser)
    tr = sub.add_parser("train", help="train a model from a TOML config and section.key=value overrides")
    add_train_arguments(tr, "runs/train")
    tr.set_defaults(func=cmd_train)
    tc = sub.add_parser("train-classifier", help="train a noise-conditional classifier p(y | x~, sigma) for classifier guidance")
    add_train_arguments(tc, "runs/classifier")
    tc.set_defaults(func=lambda args: cmd_train(args, kind="classifier"))
    ta = sub.add_parser("train-autoencoder", help="train a KL-regularised autoencoder for latent diffusion (then train data.encoder=RUN)")
    add_train_arguments(ta, "runs/autoencoder")
    ta.set_defaults(func=lambda args: cmd_train(args, kind="autoencoder"))
    rf = sub.add_parser("reflow", help="rectified flow's reflow: (noise, sample) pairs of a run's ODE, a new run trained on them")
    rf.add_argument("run", help="the run (folder or checkpoint) whose deterministic sampler makes the pairs")
    rf.add_argument("overrides", nargs="*", help="section.key=value for the new run, e.g. train.lr=1e-3")
    rf.add_argument("--out", required=True, help="the new run's folder (it holds pairs.npz, the pairs it trains on)")
    rf.add_argument("--pairs", type=int, default=10_000, help="number of (noise, sample) pairs (default 10000)")
    rf.add_argument("--steps", type=int, help="training steps of the new run (default: RUN's train.steps)")
    rf.add_argument("--nfe", type=int, default=100, help="network evaluations per pair (default 100)")
    rf.add_argument("--sampler", help="a deterministic sampler (default: RUN's, else the preset's solver)")
    rf.add_argument("--seed", type=int, default=0, help="seed of the pairs' noise (default 0)")
    rf.add_argument("--quiet", action="store_true", help="no progress bar")
    rf.set_defaults(func=cmd_reflow)
    sa = sub.add_parser("sample", help="sample from a run folder or checkpoint to a PNG grid and .npz (x, labels)")
    sa.add_argument("run", help="run folder, checkpoint (.json/.safetensors) or a diffusers save_pretrained folder")
    sa.add_argument("-n", "--n", type=int, default=64, help="number of samples")
    sa.add_argument("--out", help="PNG path (default: RUN/samples/sample.png)")
    sa.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_sampling_arguments(sa)
    sa.set_defaults(func=cmd_sample)
    ed = sub.add_parser("edit", help="inpaint (--mask), SDEdit (--strength) or encode + decode (--invert) given inputs")
    ed.add_argument("run", help="run folder or checkpoint")
    ed.add_argument("--input", required=True, help="inputs: held-out (the run's own test split), a .npz/.npy (key x), an image folder, or a data name (e.g. digits)")
    ed.add_argument("-n", "--n", type=int, default=16, help="number of inputs (a random subset, by --seed)")
    ed.add_argument("--mask", help=f"known region: {', '.join(MASKS)} (that half / the centre square) or MASK.npz (True = known)")
    ed.add_argument("--invert-mask", action="store_true", help="swap known and unknown (e.g. --mask center --invert-mask fills the centre)")
    ed.add_argument("--method", default="replace", choices=METHODS,
                    help="inpainting: replacement, RePaint or smc (replacement with particles: SMCDiff)")
    ed.add_argument("--particles", type=int, default=16, help="smc: particles per input (default 16; 1 = replacement)")
    ed.add_argument("--jump-length", type=int, default=10, help="RePaint: steps per segment (default 10)")
    ed.add_argument("--jump-n-sample", type=int, default=10, help="RePaint: times each segment is sampled (default 10)")
    ed.add_argument("--reconstruction", type=float, default=0.0, metavar="W",
                    help="inpainting: reconstruction guidance weight (Ho et al. 2022; 0: off)")
    ed.add_argument("--strength", type=float, help="SDEdit: noise the input to the level where the last strength x N steps begin")
    ed.add_argument("--invert", action="store_true", help="encode by the probability-flow ODE and decode back; report the error")
    ed.add_argument("--out", help="PNG path (default: RUN/samples/edit.png)")
    add_sampling_arguments(ed)
    ed.set_defaults(func=cmd_edit)
    ev = sub.add_parser("eval", help="measure a run's samples and likelihood, each next to its noise floor")
    ev.add_argument("run", help="run folder, checkpoint or a diffusers folder (then --set data.spec=... names its data)")
    ev.add_argument("-n", "--n", type=int, default=2000, help="number of samples (default 2000)")
    ev.add_argument("--nll-samples", type=int, default=256, help="held-out samples for the likelihood (0: skip it)")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--vlb-steps", default="0,100", help="chains for the VLB: 0 = full, K = respaced to K steps (default 0,100)")
    ev.add_argument("--pf-ode-steps", type=int, metavar="K",
                    help="probability-flow ODE NLL with K fixed RK4 steps instead of the adaptive solver (0: skip it)")
    ev.add_argument("--pf-ode-rtol", type=float, metavar="TOL",
                    help="rtol = atol of the adaptive (Dormand-Prince) probability-flow ODE NLL (default 1e-5)")
    ev.add_argument("--vlb-variance", default="beta", choices=REVERSE_VARIANCES,
                    help="fixed Sigma of the VLB: beta (Ho et al.'s code, beta~_2 at step 1; default), "
                         "beta_plain (beta_1 there), beta_tilde")
    ev.add_argument("--inception", help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth) for FID on images")
    add_sampling_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    ex = sub.add_parser("export", help="write a run as a diffusers DDPMPipeline folder (model.network=diffusers, preset ddpm or ztsnr)")
    ex.add_argument("run", help="run folder or checkpoint")
    ex.add_argument("out", help="the folder to write (new or empty)")
    ex.add_argument("--format", default="diffusers", choices=("diffusers",), help="the format (diffusers)")
    ex.set_defaults(func=cmd_export)
    cp = sub.add_parser("compare", help="train and measure a grid of runs from a spec (shipped: design-space, families, guidance, objectives)")
    cp.add_argument("spec", help="a shipped spec (design-space, families, guidance, objectives) or a TOML file like diffspace/specs/*.toml")
    cp.add_argument("--quick", action="store_true", help="the spec's [quick] sizes: a smoke run of the whole pipeline")
    cp.add_argument("--out", help="output folder (default: runs/compare-SPEC, runs/compare-SPEC-quick)")
    cp.add_argument("--quiet", action="store_true", help="no progress bars")
    cp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="an override on top of every run, e.g. sample.guidance=2 (repeatable)")
    cp.set_defaults(func=cmd_compare)
    ph = sub.add_parser("phema", help="post-hoc EMA (EDM2): EMA models of any sigma_rel from a run's train.phema snapshots")
    ph.add_argument("run", help="a run trained with train.phema=[...] and log.phema_every=K")
    ph.add_argument("--sigma-rel", required=True, help="comma list of sigma_rel in (0, 0.5), e.g. 0.05,0.1,0.15")
    ph.add_argument("--step", type=int, help="the training step to reconstruct at (default: the newest snapshot)")
    ph.set_defaults(func=cmd_phema)
    info = sub.add_parser("info", help="print the presets (Karras et al. 2022 Table 1 + DDPM + rectified flow), schedules, parameterizations")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the main job: run on the embedded default data and write the figures")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (e.g. 0.1 for a smoke run)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return p


SHARDED = ("train", "train-classifier", "train-autoencoder", "sample", "eval")  # the commands that share their work under torchrun


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow flags: train CFG --out R a.b=1
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command not in SHARDED and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"{args.command} runs as one process, not under torchrun (WORLD_SIZE="
                             f"{os.environ['WORLD_SIZE']}); these do: {', '.join(SHARDED)}")
        code = args.func(args)
        if "diffspace.distributed" in sys.modules:  # under torchrun the ranks leave together (rank 0 may still write)
            sys.modules["diffspace.distributed"].barrier()
        return code
    except ValueError as e:
        print(f"diffspace {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's answer (disk full, no permission, a file where a folder must be)
        print(f"diffspace {args.command}: error: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""), file=sys.stderr)
        return 2
    except RuntimeError as e:
        from . import distributed

        if not distributed.active():
            raise
        # under torchrun a collective fails when another process died: one line here, torchrun ends the job
        print(f"diffspace {args.command}: error: rank {distributed.rank()} lost another process of the job "
              f"({str(e).splitlines()[0][:200]}); the run folder keeps its last checkpoint (--resume continues it)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # train.Interrupted says what was saved; elsewhere nothing is half-written
        print(f"diffspace {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        if "diffspace.distributed" in sys.modules:  # a command that joined a torchrun process group leaves it
            sys.modules["diffspace.distributed"].close()
