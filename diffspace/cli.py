"""Command line: `diffspace info | demo`. Bad arguments exit 2 with a one-line message."""

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
    from .schedules import SCHEDULES

    print(presets_table())
    print()
    print("schedules:        " + ", ".join(SCHEDULES))
    print("parameterizations: " + ", ".join(PARAMETERIZATIONS))
    return 0


def cmd_demo(args) -> int:
    from . import schedules as S
    from .plots import forward_process_figure
    from .presets import presets_table

    out = Path(args.out)
    print(presets_table())
    family = {
        "ddpm-linear": S.ddpm_linear(),
        "vp-sde": S.VPSDE(),
        "cosine": S.Cosine(),
        "ve": S.VE(),
        "edm": S.EDM(),
        "rectified-flow": S.RectifiedFlow(),
    }
    path = forward_process_figure(out / "forward_process.png", family, shown="ddpm-linear")
    print(f"\nwrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffspace", description="The design space of diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="{info,demo}", parser_class=_Parser)
    info = sub.add_parser("info", help="print the presets (Karras et al. 2022 Table 1 + DDPM + rectified flow), schedules, parameterizations")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the main job: run on the embedded default data and write the figures")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
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
