"""The adaptive Dormand-Prince sampler's error versus NFE, against fixed-step solvers at the same NFE.

    python benchmarks/adaptive.py [--quick] [--n 2000] [--rtols 1e-2,1e-3] [--out FILE.md]

On the 2-D ring8 and the 64-D image64 mixtures of diffspace.analytic, driven by their exact denoiser,
every run starts from the same noise x_T = 80 z and ends at sigma = 0 (the denoising step at sigma_min
= 0.002). `adaptive` runs at each rtol (atol = rtol) from 80 to 0.002; its NFE is counted by a wrapper
around the denoiser (and checked against the sampler's own report, the callback's last `nfe`). Then
heun (EDM Algorithm 1, the baseline), deis_pc and dpmpp_2m run on the EDM grid (rho = 7) with the
largest step count whose NFE fits the adaptive run's, so each row compares at (about) equal cost;
a last block gives the fixed-step solvers at NFE 10 and 20, below what adaptive needs at any rtol.

Error = RMS distance to the converged probability-flow ODE solution from the same noise (scipy's
DOP853 at rtol 1e-9 in log-sigma time, then the denoising step; `benchmarks/samplers.py`'s cached
reference, whose self-convergence is printed), and the median over samples of each sample's RMS
error (the RMSE is dominated by the few samples near a boundary between modes, see samplers.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samplers as bench  # noqa: E402  (benchmarks/samplers.py: the reference solution, metrics, grid)

from diffspace.analytic import MIXTURES  # noqa: E402
from diffspace.samplers import SAMPLERS, get_sigmas, sampler_nfe  # noqa: E402

F64 = torch.float64
RTOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
QUICK_RTOLS = (1e-2, 1e-3, 1e-4)
FIXED = ("heun", "deis_pc", "dpmpp_2m")  # heun first: the baseline
LOW_NFES = (10, 20)


def adaptive_run(mixture, x_T: torch.Tensor, rtol: float) -> dict:
    denoiser, seen = bench.CountingDenoiser(mixture), []
    start = time.perf_counter()
    x = SAMPLERS["adaptive"](denoiser, x_T.clone(), get_sigmas("edm", 2, sigma_min=bench.SIGMA_MIN,
                             sigma_max=bench.SIGMA_MAX), rtol=rtol, callback=seen.append)
    seconds = time.perf_counter() - start
    if denoiser.calls != seen[-1]["nfe"]:
        raise RuntimeError(f"adaptive at rtol {rtol:g}: reports {seen[-1]['nfe']} NFE, counted {denoiser.calls}")
    accepted = len(seen) - 1
    return dict(x=x, nfe=denoiser.calls, accepted=accepted, rejected=(denoiser.calls - 2) // 6 - accepted, seconds=seconds)


def fixed_run(name: str, mixture, x_T: torch.Tensor, target: int) -> dict | None:
    """`name` on the EDM grid with the most steps whose NFE <= target (None if not even one fits)."""
    n, nfe = bench.steps_for_nfe(lambda k: sampler_nfe(name, k), target)
    if n == 0:
        return None
    denoiser = bench.CountingDenoiser(mixture)
    sigmas = get_sigmas("edm", n, sigma_min=bench.SIGMA_MIN, sigma_max=bench.SIGMA_MAX, rho=bench.RHO)
    x = SAMPLERS[name](denoiser, x_T.clone(), sigmas)
    assert denoiser.calls == nfe
    return dict(x=x, nfe=nfe)


def cell(run: dict | None, x_ref: torch.Tensor, target: int | None = None) -> str:
    if run is None:
        return "n/a"
    rmse, median = bench.errors(run["x"], x_ref)
    tag = "" if target is None or run["nfe"] == target else f" @{run['nfe']}"
    return f"{rmse:.2e} / {median:.1e}{tag}"


def mixture_report(name: str, n: int, rtols, seed: int, cache_dir: Path) -> str:
    mixture = MIXTURES[name]()
    x_T = bench.SIGMA_MAX * torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x_ref, drift, note = bench.reference(name, mixture, x_T, cache_dir)
    head = ["adaptive rtol", "NFE (accepted + rejected steps)", "adaptive", *(f"{f} at that NFE" for f in FIXED)]
    lines = [f"### {name} ({mixture.dim}-D, n = {n})", "",
             f"Reference: {note}; self-convergence RMS {drift:.1e}. Cells: RMSE / median sample error; "
             "'@k': the NFE a fixed-step solver ran (the most that fits).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rtol in rtols:
        run = adaptive_run(mixture, x_T, rtol)
        fixed = [cell(fixed_run(f, mixture, x_T, run["nfe"]), x_ref, run["nfe"]) for f in FIXED]
        lines.append(f"| {rtol:g} | {run['nfe']} ({run['accepted']} + {run['rejected']}) | {cell(run, x_ref)} | "
                     + " | ".join(fixed) + " |")
        print(f"  {name}: rtol {rtol:g} done ({run['seconds']:.1f} s)", file=sys.stderr, flush=True)
    for target in LOW_NFES:
        fixed = [cell(fixed_run(f, mixture, x_T, target), x_ref, target) for f in FIXED]
        lines.append(f"| - | {target} | - | " + " | ".join(fixed) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"n = 300, rtol {', '.join(map(str, QUICK_RTOLS))}")
    p.add_argument("--rtols", help=f"comma-separated rtols (default {','.join(map(str, RTOLS))})")
    p.add_argument("--n", type=int, help="samples per mixture (default 2000, --quick 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "diffspace-bench",
                   help="where reference ODE solutions are cached (shared with samplers.py)")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rtols = tuple(float(r) for r in args.rtols.split(",")) if args.rtols else QUICK_RTOLS if args.quick else RTOLS
    n = args.n or (300 if args.quick else 2000)
    start = time.perf_counter()
    parts = ["## adaptive (Dormand-Prince 5(4)) vs fixed-step solvers at the same NFE", ""]
    parts += [mixture_report(name, n, rtols, args.seed, args.cache_dir) + "\n" for name in ("ring8", "image64")]
    parts.append(f"Total time {time.perf_counter() - start:.0f} s (torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads).")
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
