"""Sampler accuracy versus NFE on Gaussian mixtures, whose ideal denoiser is exact.

    python benchmarks/samplers.py [--quick] [--nfe 5,10,20] [--samplers heun,unipc] [--n 2000] [--out FILE.md]

Every sampler starts from the same noise x_T = sigma_max * z (sigma_max = 80) and runs on the same
EDM grid (rho = 7, sigma_min = 0.002, then sigma = 0; Karras et al. 2022, eq. 5), driven by the exact
mixture denoiser D(x, sigma) = E[x0 | x] (diffspace.analytic). Because D is exact, the only error left
is the solver's, measured against

* the exact probability-flow ODE solution from the same noise: dx/du = x - D(x, e^u), u = log sigma
  (Karras et al. 2022, eq. 4 in log-sigma time), integrated from sigma_max to sigma_min by scipy's
  DOP853 at rtol = atol = 1e-9 as one system over the whole batch, followed by the denoising step
  x <- D(x, sigma_min) that every sampler's last step (sigma_min -> 0) also takes. So the reference
  is "the ODE solution at sigma_min, then denoised", not the ODE solution at sigma = 0 (they differ by
  O(sigma_min^2 / variance) of the data, e.g. ~4e-5 on ring8). Self-convergence (rtol 1e-11) is
  checked when the reference is first computed; references are cached in --cache-dir.
* the true distribution: sliced Wasserstein-2 distance (random unit projections, fixed seed) to
  fresh exact samples, next to its noise floor, the same distance between two independent exact
  sample sets of the same size. Stochastic samplers are judged by this alone (their RMSE is '-').

NFE is counted honestly: for a target NFE each sampler gets the largest number of steps whose
`sampler_nfe` does not exceed it (Heun: 2n - 1, so column 10 runs 9 evaluations, shown as '@9'), and
a counting wrapper checks the denoiser calls equal that number. EDM-Heun (Algorithm 1) is the
baseline: RMSE cells show the ratio to Heun's RMSE in the same column. diffusers' EDM schedulers
(Euler, DPM-Solver++ 2M and 3M) run in the same session as baselines when diffusers is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffspace.analytic import MIXTURES  # noqa: E402
from diffspace.samplers import SAMPLERS, get_sigmas, sampler_nfe  # noqa: E402
from diffspace.evaluate import sliced_wasserstein  # noqa: E402

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
NFES = (5, 6, 8, 10, 15, 20, 35, 50, 100)
QUICK_NFES = (5, 10, 20)
REF_RTOL, CHECK_RTOL = 1e-9, 1e-11
BASELINE = "heun"


@dataclass(frozen=True)
class Variant:
    """One row: a diffspace sampler with options, or one of diffusers' EDM schedulers (sampler=None)."""

    label: str
    sampler: str | None = None
    options: dict = field(default_factory=dict)
    stochastic: bool = False


VARIANTS = [
    Variant("euler", "euler"),
    Variant("ddim", "ddim"),
    Variant("flow_euler", "flow_euler"),
    Variant("heun", "heun"),
    Variant("flow_heun", "flow_heun"),
    Variant("dpmpp_2s", "dpmpp_2s"),
    Variant("dpmpp_2m", "dpmpp_2m"),
    Variant("dpmpp_3m", "dpmpp_3m"),
    Variant("ipndm", "ipndm"),
    Variant("deis", "deis"),
    Variant("deis(order=3)", "deis", dict(order=3)),
    Variant("deis_pc", "deis_pc"),
    Variant("deis_pc(lof=False)", "deis_pc", dict(lower_order_final=False)),
    Variant("unipc", "unipc"),
    Variant("unipc(bh1)", "unipc", dict(variant="bh1")),
    Variant("unipc(order=2)", "unipc", dict(order=2)),
    Variant("ddpm", "ddpm", stochastic=True),
    Variant("ddim(eta=1)", "ddim", dict(eta=1.0), stochastic=True),
    Variant("edm_sde(churn=40)", "edm_sde", dict(S_churn=40.0, S_tmin=0.05, S_tmax=50.0), stochastic=True),
    Variant("euler_maruyama", "euler_maruyama", stochastic=True),
    Variant("pc", "pc", stochastic=True),
    Variant("langevin(3/level)", "langevin", dict(n_steps=3), stochastic=True),
]
DIFFUSERS_VARIANTS = [
    Variant("diffusers EDMEuler"),
    Variant("diffusers DPM++2M", options=dict(solver_order=2)),
    Variant("diffusers DPM++3M", options=dict(solver_order=3)),
]


# -- the denoiser counter and the NFE matching -------------------------------------------------------
class CountingDenoiser:
    """Wraps D(x, sigma) and counts its calls (one call = one NFE, whatever the batch)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)


def steps_for_nfe(nfe_of, target: int) -> tuple[int, int]:
    """The largest step count n with nfe_of(n) <= target (nfe_of increasing), and nfe_of(n); (0, 0) if none."""
    n = 0
    while nfe_of(n + 1) <= target:
        n += 1
    return n, (nfe_of(n) if n else 0)


def nfe_function(variant: Variant):
    if variant.sampler is None:
        return lambda n: n  # diffusers: one model call per step
    return lambda n: sampler_nfe(variant.sampler, n, **variant.options)


# -- one run -------------------------------------------------------------------------------------------
@dataclass
class Run:
    nfe: int  # the NFE the step count promises
    calls: int  # the denoiser calls counted
    x: torch.Tensor
    seconds: float


def run_variant(variant: Variant, mixture, x_T: torch.Tensor, target: int, seed: int) -> Run | None:
    """Sample with `variant` at the largest NFE <= target from x_T; None if no step count fits."""
    n, nfe = steps_for_nfe(nfe_function(variant), target)
    if n == 0:
        return None
    denoiser = CountingDenoiser(mixture)
    start = time.perf_counter()
    if variant.sampler is None:
        x = run_diffusers(variant, mixture, denoiser, x_T, n)
    else:
        generator = torch.Generator().manual_seed(seed)
        sigmas = get_sigmas("edm", n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
        x = SAMPLERS[variant.sampler](denoiser, x_T.clone(), sigmas, generator=generator, **variant.options)
    return Run(nfe, denoiser.calls, x, time.perf_counter() - start)


# -- diffusers baselines ---------------------------------------------------------------------------------
def diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def make_scheduler(variant: Variant, sigma_data: float):
    """diffusers' EDM scheduler with our grid parameters and its own defaults otherwise
    (final_sigmas_type='zero', i.e. the last step goes to sigma = 0)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    common = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, sigma_data=sigma_data, prediction_type="epsilon")
    if "solver_order" in variant.options:
        return EDMDPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common, **variant.options)
    return EDMEulerScheduler(**common)


def run_diffusers(variant: Variant, mixture, denoiser, x_T: torch.Tensor, n: int) -> torch.Tensor:
    """The standard diffusers loop, with the model output chosen so that the scheduler's own
    precondition_outputs (denoised = c_skip x + c_out model_output) returns exactly D(x, sigma):
    model_output = (D - c_skip x) / c_out, c_skip and c_out read off the scheduler itself."""
    scheduler = make_scheduler(variant, mixture.sigma_data)
    scheduler.set_timesteps(n)
    one, zero = torch.ones((), dtype=F64), torch.zeros((), dtype=F64)
    x = x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        scheduler.scale_model_input(x, t)  # the network input c_in x: unused, called as a pipeline would
        c_skip = float(scheduler.precondition_outputs(one, zero, sigma))
        c_out = float(scheduler.precondition_outputs(zero, one, sigma))
        denoised = denoiser(x, torch.full((x.shape[0],), float(sigma), dtype=F64))
        x = scheduler.step((denoised - c_skip * x) / c_out, t, x).prev_sample
    return x.to(F64)


def diffusers_grid_difference(sigma_data: float, targets) -> tuple[float, list[float]]:
    """max |sigma_diffusers - sigma_ours| over the step counts used, and diffusers' final sigmas."""
    worst, finals = 0.0, set()
    for variant in DIFFUSERS_VARIANTS:
        for n in targets:
            scheduler = make_scheduler(variant, sigma_data)
            scheduler.set_timesteps(n)
            ours = get_sigmas("edm", n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
            worst = max(worst, float((scheduler.sigmas.to(F64) - ours).abs().max()))
            finals.add(float(scheduler.sigmas[-1]))
    return worst, sorted(finals)


# -- the exact reference -----------------------------------------------------------------------------
def ode_solution(mixture, x_T: torch.Tensor, rtol: float) -> torch.Tensor:
    """D(x(sigma_min), sigma_min), x(.) the probability-flow ODE dx/du = x - D(x, e^u), u = log sigma,
    from x(sigma_max) = x_T: one solve_ivp system of size batch * dim (DOP853, atol = rtol)."""
    shape = x_T.shape
    sigma_of = lambda u: torch.full((shape[0],), math.exp(u), dtype=F64)  # noqa: E731

    def rhs(u, y):
        x = torch.from_numpy(y).view(shape)
        return (x - mixture(x, sigma_of(u))).numpy().ravel()

    span = (math.log(SIGMA_MAX), math.log(SIGMA_MIN))
    sol = solve_ivp(rhs, span, x_T.numpy().ravel(), method="DOP853", rtol=rtol, atol=rtol, t_eval=[span[1]])
    if sol.status != 0:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    x_min = torch.from_numpy(sol.y[:, -1].copy()).view(shape)
    return mixture(x_min, sigma_of(span[1]))


def reference(name: str, mixture, x_T: torch.Tensor, cache_dir: Path) -> tuple[torch.Tensor, float, str]:
    """The exact reference (cached), its self-convergence RMS |ref(1e-9) - ref(1e-11)| and a note."""
    key = hashlib.sha1()
    for t in (mixture.weights, mixture.means, mixture.covs, x_T):
        key.update(t.contiguous().numpy().tobytes())
    key.update(repr((SIGMA_MIN, SIGMA_MAX, REF_RTOL, CHECK_RTOL)).encode())
    path = cache_dir / f"ref-{name}-n{x_T.shape[0]}-{key.hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["x"], saved["self_convergence"], f"cached in {path}"
    start = time.perf_counter()
    x_ref = ode_solution(mixture, x_T, REF_RTOL)
    seconds = time.perf_counter() - start
    tighter = ode_solution(mixture, x_T, CHECK_RTOL)
    drift = rms(x_ref - tighter)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(dict(x=x_ref, self_convergence=drift), path)
    return x_ref, drift, f"solved in {seconds:.1f} s (+ the rtol {CHECK_RTOL:g} check), saved to {path}"


# -- metrics -----------------------------------------------------------------------------------------
def rms(x: torch.Tensor) -> float:
    """Root mean square over all samples and coordinates."""
    return float(x.pow(2).mean().sqrt())


def errors(x: torch.Tensor, x_ref: torch.Tensor) -> tuple[float, float]:
    """RMSE over everything, and the median over samples of each sample's RMS error. On a mixture the
    RMSE is dominated by the few samples a solver sends to another component (the ODE's flow map is
    nearly discontinuous between modes), so it converges at about half the solver's order; the
    median shows the order itself."""
    return rms(x - x_ref), float((x - x_ref).pow(2).mean(dim=1).sqrt().median())


# -- one mixture -------------------------------------------------------------------------------------
@dataclass
class Cell:
    nfe: int
    rmse: float | None  # None for stochastic samplers, as is median
    median: float | None  # median over samples of the per-sample RMS error
    sw2: float
    seconds: float


@dataclass
class MixtureResult:
    name: str
    dim: int
    floor: float
    self_convergence: float
    reference_note: str
    cells: dict = field(default_factory=dict)  # (label, target) -> Cell
    nfe_errors: list = field(default_factory=list)


def evaluate_mixture(name: str, variants, targets, n: int, seed: int, n_proj: int, cache_dir: Path) -> MixtureResult:
    mixture = MIXTURES[name]()
    x_T = SIGMA_MAX * torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x_ref, drift, note = reference(name, mixture, x_T, cache_dir)
    true_a = mixture.sample(n, torch.Generator().manual_seed(seed + 1))
    true_b = mixture.sample(n, torch.Generator().manual_seed(seed + 2))
    sliced_w2 = lambda a, b: sliced_wasserstein(a, b, n_proj, torch.Generator().manual_seed(seed + 3))  # same directions
    result = MixtureResult(name, mixture.dim, sliced_w2(true_a, true_b), drift, note)
    for variant in variants:
        for target in targets:
            run = run_variant(variant, mixture, x_T, target, seed + 4)
            if run is None:
                continue
            if run.calls != run.nfe:
                result.nfe_errors.append(f"{variant.label} @ target {target}: sampler_nfe says {run.nfe}, counted {run.calls}")
            rmse, median = (None, None) if variant.stochastic else errors(run.x, x_ref)
            result.cells[variant.label, target] = Cell(run.calls, rmse, median, sliced_w2(run.x, true_a), run.seconds)
        print(f"  {name}: {variant.label} done", file=sys.stderr, flush=True)
    return result


# -- tables ------------------------------------------------------------------------------------------
def empirical_order(result: MixtureResult, label: str, targets, error: str) -> str:
    """-slope of log error ('rmse' or 'median') against log NFE (least squares) over the columns with NFE >= 20."""
    values = [(c.nfe, getattr(c, error)) for t in targets if t >= 20 and (c := result.cells.get((label, t)))]
    points = [(math.log(nfe), math.log(e)) for nfe, e in values if e and math.isfinite(e)]
    if len(points) < 2:
        return ""
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    slope = sum((px - mx) * (py - my) for px, py in points) / sum((px - mx) ** 2 for px, _ in points)
    return f"{-slope:.2f}"


def nfe_tag(cell: Cell, target: int) -> str:
    return "" if cell.nfe == target else f" @{cell.nfe}"


def rmse_cell(result: MixtureResult, label: str, target: int) -> str:
    cell = result.cells.get((label, target))
    if cell is None:
        return "n/a"
    if cell.rmse is None:
        return "-"
    base = result.cells.get((BASELINE, target))
    ratio = f" ({cell.rmse / base.rmse:.2f})" if base and base.rmse else ""
    return f"{cell.rmse:.2e}{ratio}{nfe_tag(cell, target)}"


def sw2_cell(result: MixtureResult, label: str, target: int) -> str:
    cell = result.cells.get((label, target))
    return "n/a" if cell is None else f"{cell.sw2 / result.floor:.2f}{nfe_tag(cell, target)}"


def time_cell(result: MixtureResult, label: str, target: int) -> str:
    cell = result.cells.get((label, target))
    return "n/a" if cell is None else f"{cell.seconds:.3f}"


def markdown_table(title: str, labels, targets, cell_text, extras=()) -> str:
    """A table with one row per label, one column per target and (name, label -> text) extra columns."""
    head = ["sampler"] + [str(t) for t in targets] + [name for name, _ in extras]
    lines = [f"#### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        row = [label] + [cell_text(label, t) for t in targets] + [text(label) for _, text in extras]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def mixture_report(result: MixtureResult, variants, targets) -> str:
    labels = [v.label for v in variants]
    deterministic = {v.label for v in variants if not v.stochastic}
    def order(error):
        return lambda label: empirical_order(result, label, targets, error) if label in deterministic else ""
    parts = [
        f"### {result.name} ({result.dim}-D)",
        "",
        f"Reference: {result.reference_note}; self-convergence RMS {result.self_convergence:.1e}"
        + ("" if result.self_convergence < 1e-6 else "  **WARNING: above 1e-6**")
        + f". SW2 noise floor: {result.floor:.4g}. '@k': the NFE actually run (k < target when no step count hits it).",
        "",
        markdown_table("RMSE to the exact ODE solution (ratio to heun in the same column); empirical order ="
                       " -slope of log error vs log NFE over NFE >= 20, of the RMSE and of the median sample error",
                       labels, targets, lambda label, t: rmse_cell(result, label, t),
                       [("order", order("rmse")), ("order (median)", order("median"))]),
        "",
        markdown_table("sliced W2 / noise floor (1 = as good as exact samples)", labels, targets,
                       lambda label, t: sw2_cell(result, label, t)),
        "",
        markdown_table("wall time [s]", labels, targets, lambda label, t: time_cell(result, label, t)),
    ]
    if result.nfe_errors:
        parts += ["", "**NFE MISMATCH** (counted denoiser calls differ from sampler_nfe):"]
        parts += [f"- {e}" for e in result.nfe_errors]
    return "\n".join(parts)


# -- targets -----------------------------------------------------------------------------------------
def ours_deterministic(variants) -> list[str]:
    return [v.label for v in variants if v.sampler is not None and not v.stochastic]


def best_deterministic(results, variants) -> str | None:
    """Our deterministic sampler with the smallest mean log RMSE over the NFE 10 and 20 columns."""
    scores = {}
    for label in ours_deterministic(variants):
        cells = [r.cells.get((label, t)) for r in results for t in (10, 20)]
        if all(c is not None and c.rmse and math.isfinite(c.rmse) for c in cells):
            scores[label] = sum(math.log(c.rmse) for c in cells) / len(cells)
    return min(scores, key=scores.get) if scores else None


def target_checks(results, variants):
    """(description, limit, value(label) -> float | None): pass when value <= limit."""
    low, high = results[0], results[-1]  # the 2-D and the 64-D mixture
    theirs = [v.label for v in variants if v.sampler is None]

    def rmse(result, label, target):
        cell = result.cells.get((label, target))
        return cell.rmse if cell else None

    def ratio_to(result, target, others):
        def value(label):
            base = [r for r in (rmse(result, o, target) for o in others) if r]
            mine = rmse(result, label, target)
            return mine / min(base) if mine is not None and base else None
        return value

    def sw2_ratio(label):
        cell = low.cells.get((label, 5))
        return cell.sw2 / low.floor if cell else None

    checks = [(f"{high.name} NFE 10: RMSE / heun's", 1 / 3, ratio_to(high, 10, [BASELINE])),
              (f"{high.name} NFE 20: RMSE / heun's", 1 / 2, ratio_to(high, 20, [BASELINE])),
              (f"{low.name} NFE 5: SW2 / floor", 3.0, sw2_ratio)]
    if theirs:
        checks += [(f"{r.name} NFE {t}: RMSE / best diffusers'", 0.8, ratio_to(r, t, theirs))
                   for r in results for t in (10, 20)]
    return checks


def target_lines(results, variants) -> list[str]:
    best = best_deterministic(results, variants)
    if best is None:
        return ["SKIP  targets need NFE 10 and 20 and at least one deterministic diffspace sampler"]
    lines = [f"best deterministic diffspace sampler (mean log RMSE at NFE 10 and 20 on both mixtures): {best}"]
    for text, limit, value in target_checks(results, variants):
        mine = value(best)
        passing = [label for label in ours_deterministic(variants) if (v := value(label)) is not None and v <= limit]
        verdict = "SKIP" if mine is None else "PASS" if mine <= limit else "FAIL"
        shown = "n/a" if mine is None else f"{mine:.3f}"
        lines.append(f"{verdict}  {text} = {shown} for {best}, need <= {limit:.3f}"
                     f"   (passing: {', '.join(passing) or 'none'})")
    if not any(v.sampler is None for v in variants):
        lines.append("SKIP  the diffusers comparisons: no diffusers rows")
    return lines


# -- main ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"n=300, NFE {','.join(map(str, QUICK_NFES))} (under a minute)")
    p.add_argument("--nfe", help=f"comma-separated target NFEs (default {','.join(map(str, NFES))})")
    p.add_argument("--samplers", help="comma-separated row labels to run (heun is always added as the baseline)")
    p.add_argument("--n", type=int, help="samples per mixture (default 2000, --quick 300)")
    p.add_argument("--mixture2d", default="ring8", choices=["ring8", "checkerboard"], help="the 2-D mixture")
    p.add_argument("--projections", type=int, default=500, help="random directions for sliced W2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baselines")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "diffspace-bench",
                   help="where reference ODE solutions are cached")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    return p.parse_args(argv)


def choose_variants(args) -> tuple[list[Variant], list[str]]:
    """The rows to run, and notes on the rows left out."""
    notes, variants = [], [v for v in VARIANTS if v.sampler in SAMPLERS]
    missing = [v.label for v in VARIANTS if v.sampler not in SAMPLERS]
    if missing:
        notes.append(f"not in diffspace.samplers.SAMPLERS, skipped: {', '.join(missing)}")
    version = diffusers_version()
    if args.no_diffusers:
        notes.append("diffusers baselines skipped (--no-diffusers)")
    elif version is None:
        notes.append("diffusers is not installed: its baseline rows are skipped (pip install diffusers)")
    else:
        variants += DIFFUSERS_VARIANTS
    if args.samplers:
        wanted = set(args.samplers.split(",")) | {BASELINE}
        unknown = wanted - {v.label for v in VARIANTS + DIFFUSERS_VARIANTS}
        if unknown:
            raise SystemExit(f"unknown sampler rows {sorted(unknown)}; known: {[v.label for v in VARIANTS + DIFFUSERS_VARIANTS]}")
        variants = [v for v in variants if v.label in wanted]
    return variants, notes


def main(argv=None) -> None:
    args = parse_args(argv)
    targets = tuple(int(t) for t in args.nfe.split(",")) if args.nfe else QUICK_NFES if args.quick else NFES
    n = args.n or (300 if args.quick else 2000)
    variants, notes = choose_variants(args)
    header = [
        "## diffspace samplers vs NFE on exact Gaussian-mixture denoisers",
        "",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers_version() or 'missing'};"
        f" n = {n} samples, seed {args.seed}, {args.projections} SW2 directions; EDM grid rho={RHO:g},"
        f" sigma {SIGMA_MAX:g} -> {SIGMA_MIN:g} -> 0 for every row; x_T = {SIGMA_MAX:g} z.",
    ]
    header += [f"Note: {note}" for note in notes]
    if any(v.sampler is None for v in variants):
        worst, finals = diffusers_grid_difference(MIXTURES[args.mixture2d]().sigma_data, targets)
        header.append(f"diffusers: EDM schedulers with their defaults (final_sigmas_type='zero', last sigma {finals};"
                      f" DPM: lower_order_final=True, euler_at_final=False), prediction_type='epsilon' fed"
                      f" (D - c_skip x) / c_out; their grid (float32) vs ours: max |d sigma| = {worst:.1e}.")
    print("\n".join(header), flush=True)
    start = time.perf_counter()
    results = []
    for name in (args.mixture2d, "image64"):
        results.append(evaluate_mixture(name, variants, targets, n, args.seed, args.projections, args.cache_dir))
        print("\n" + mixture_report(results[-1], variants, targets), flush=True)
    footer = ["", "### Targets", "", "```", *target_lines(results, variants), "```", "",
              f"total time {time.perf_counter() - start:.0f} s"]
    print("\n".join(footer), flush=True)
    if args.out:
        reports = [mixture_report(r, variants, targets) for r in results]
        args.out.write_text("\n\n".join(["\n".join(header), *reports, "\n".join(footer)]) + "\n")


if __name__ == "__main__":
    main()
