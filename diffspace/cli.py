"""Command line: `diffspace train | sample | eval | compare | info | demo`. Bad arguments exit 2 with a one-line message."""

from __future__ import annotations

import argparse
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


def cmd_demo(args) -> int:
    from .demo import run

    out = Path(args.out)
    r = run(out, scale=args.scale, progress=not args.quiet)
    d, ring = r["digits"], r["ring8"]
    print(f"digits: {100 * d['confident']:.1f}% confident (>= 80% needed), smallest class {100 * d['min_class_fraction']:.1f}% (>= 4%)")
    print(f"ring8: sliced W2 {ring['sw2']:.4f} vs noise floor {ring['floor']:.4f} (ratio {ring['ratio']:.2f}, <= 2 needed)")
    print(f"done in {r['seconds']:.0f} s; report: {out / 'report.md'}")
    return 0


def cmd_train(args) -> int:
    from .train import load_config, train

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
        summary = train(load_config(config, overrides), Path(args.out), progress=not args.quiet)
    print(f"trained to step {summary['steps']} in {summary['seconds']:.1f} s -> {summary['run_dir']}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .plots import save_samples
    from .train import load_model, sample

    if args.n < 1 or args.nfe < 0:
        raise ValueError(f"--n={args.n} must be >= 1 and --nfe={args.nfe} >= 0 (0: the sampler's default)")
    model, cfg, info = load_model(Path(args.run))
    g = torch.Generator().manual_seed(args.seed)
    x = sample(model, args.n, tuple(info["shape"]), g, args.sampler, args.nfe)
    out = Path(args.out) if args.out else (Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent) / "samples" / "sample.png"
    save_samples(x, out)
    np.savez(out.with_suffix(".npz"), x=x.numpy())
    print(f"wrote {out} and {out.with_suffix('.npz')}")
    return 0


def cmd_eval(args) -> int:
    import json

    from .checkpoint import atomic_write_text
    from .evaluate import evaluate_run, markdown

    if args.n < 2 or args.nfe < 0 or args.nll_samples < 0 or args.pf_ode_steps < 0:
        raise ValueError(f"--n={args.n} must be >= 2, --nfe={args.nfe} >= 0 (0: the sampler's default), "
                         f"--nll-samples={args.nll_samples} and --pf-ode-steps={args.pf_ode_steps} >= 0")
    vlb_steps = tuple(int(k) for k in args.vlb_steps.split(",") if k.strip()) if args.vlb_steps else ()
    result = evaluate_run(args.run, n=args.n, sampler=args.sampler, nfe=args.nfe, seed=args.seed,
                          nll_samples=args.nll_samples, pf_ode_steps=args.pf_ode_steps, vlb_steps=vlb_steps,
                          inception=args.inception)
    folder = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    figures = eval_figures(result, folder)
    text = markdown(result) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    print(text, end="")
    atomic_write_text(folder / "eval.md", text)
    keep = ("run", "spec", "n", "sampler", "nfe", "rows")
    atomic_write_text(folder / "eval.json", json.dumps({k: result[k] for k in keep}, indent=1))
    return 0


def eval_figures(result: dict, folder: Path) -> list[Path]:
    """The figures of `diffspace eval` in the run folder: samples (beside real data), the per-noise-level
    training loss, and the reverse process: 2-D paths over the data density, or the denoising sequence."""
    import torch

    from . import plots
    from .analytic import MIXTURES
    from .data import MIXTURE_SPECS
    from .train import sample

    model, x, data = result["model"], result["samples"], result["data"]
    real = data.x[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:len(x)]]
    paths = [folder / "eval_samples.png", folder / "eval_loss_per_level.png", folder / "eval_reverse.png"]
    if data.kind == "points":
        plots.save_samples(x, paths[0], reference=real)
    else:
        plots.samples_vs_data(x[:100], real[:100], paths[0])
    plots.loss_per_noise_level_figure({"EMA model": model}, real[:256], paths[1])
    if data.kind == "points" and x.shape[1] == 2:
        mixture = MIXTURES[MIXTURE_SPECS[data.name]]() if data.name in MIXTURE_SPECS else None
        plots.reverse_trajectories(lambda z, s: model(z.float(), s.float()), paths[2], reference=real,
                                   log_density=mixture.log_prob if mixture is not None else None)
    elif data.kind == "images":
        snapshots = []
        sample(model, 6, data.shape, torch.Generator().manual_seed(0), result["sampler"], result["nfe"],
               callback=lambda s: snapshots.append((s["sigma"], s["x"].clone(), s["denoised"].clone())))
        plots.reverse_snapshots(snapshots, paths[2])
    else:
        paths.pop()
    return paths


def cmd_compare(args) -> int:
    from .compare import load_spec, run

    name = load_spec(args.spec)["name"]
    out = Path(args.out or f"runs/compare-{name}{'-quick' if args.quick else ''}")
    r = run(args.spec, out, quick=args.quick, progress=not args.quiet)
    print((out / "results.md").read_text(), end="")
    print(f"done in {r['seconds']:.0f} s; results: {out / 'results.md'}, figures in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffspace", description="The design space of diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval,compare,info,demo}", parser_class=_Parser)
    tr = sub.add_parser("train", help="train a model from a TOML config and section.key=value overrides")
    tr.add_argument("config", nargs="?", help="TOML config file (see configs/); defaults if omitted")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=500 model.preset=vp")
    tr.add_argument("--preset", help="shortcut for model.preset (vp, ve, iddpm, edm, ddpm, rectified-flow)")
    tr.add_argument("--data", help="shortcut for data.spec (digits, moons, ring8, ..., a folder or .npy/.npz)")
    tr.add_argument("--steps", type=int, help="shortcut for train.steps")
    tr.add_argument("--out", default="runs/train", help="run folder (default: runs/train)")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)
    sa = sub.add_parser("sample", help="sample from a run folder or checkpoint to a PNG grid and .npz")
    sa.add_argument("run", help="run folder or checkpoint (.json/.safetensors)")
    sa.add_argument("--sampler", default="", help="sampler name (default: the preset's solver); see `info`")
    sa.add_argument("--nfe", type=int, default=0, help="network evaluations (default: 35, or the DDPM chain)")
    sa.add_argument("--n", type=int, default=64, help="number of samples")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", help="PNG path (default: RUN/samples/sample.png)")
    sa.set_defaults(func=cmd_sample)
    ev = sub.add_parser("eval", help="measure a run's samples and likelihood, each next to its noise floor")
    ev.add_argument("run", help="run folder or checkpoint")
    ev.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    ev.add_argument("--sampler", default="", help="sampler name (default: the preset's solver)")
    ev.add_argument("--nfe", type=int, default=0, help="network evaluations (default: 35, or the DDPM chain)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--nll-samples", type=int, default=256, help="held-out samples for the likelihood (0: skip it)")
    ev.add_argument("--vlb-steps", default="0,100", help="chains for the VLB: 0 = full, K = respaced to K steps (default 0,100)")
    ev.add_argument("--pf-ode-steps", type=int, default=32, help="RK4 steps of the probability-flow ODE NLL (0: skip it)")
    ev.add_argument("--inception", help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth) for FID on images")
    ev.set_defaults(func=cmd_eval)
    cp = sub.add_parser("compare", help="train and measure a grid of runs from a spec (shipped: objectives, design-space)")
    cp.add_argument("spec", help="a shipped spec (objectives, design-space) or a TOML file like diffspace/specs/*.toml")
    cp.add_argument("--quick", action="store_true", help="the spec's [quick] sizes: a smoke run of the whole pipeline")
    cp.add_argument("--out", help="output folder (default: runs/compare-SPEC, runs/compare-SPEC-quick)")
    cp.add_argument("--quiet", action="store_true", help="no progress bars")
    cp.set_defaults(func=cmd_compare)
    info = sub.add_parser("info", help="print the presets (Karras et al. 2022 Table 1 + DDPM + rectified flow), schedules, parameterizations")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the main job: run on the embedded default data and write the figures")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (e.g. 0.1 for a smoke run)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:
        print(f"diffspace {args.command}: error: {e}", file=sys.stderr)
        return 2
