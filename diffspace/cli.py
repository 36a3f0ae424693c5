"""Command line: `diffspace train | sample | eval | info | demo`. Bad arguments exit 2 with a one-line message."""

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

    if args.n < 2 or args.nfe < 0:
        raise ValueError(f"--n={args.n} must be >= 2 and --nfe={args.nfe} >= 0 (0: the sampler's default)")
    result = evaluate_run(args.run, n=args.n, sampler=args.sampler, nfe=args.nfe, seed=args.seed)
    text = markdown(result)
    print(text, end="")
    folder = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    atomic_write_text(folder / "eval.md", text)
    atomic_write_text(folder / "eval.json", json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffspace", description="The design space of diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval,info,demo}", parser_class=_Parser)
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
    ev.set_defaults(func=cmd_eval)
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
