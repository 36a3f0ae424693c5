"""Time to quality on the digits: diffspace's recipes against the diffusers recipe, at equal
training images and (about) equal parameters, judged in the digits feature net.

    python benchmarks/time_to_quality.py                    # 3 seeds, checkpoints at 1,200 / 2,400 / 3,600 steps
    python benchmarks/time_to_quality.py --quick            # 150 steps, one seed, n = 300: the script runs
    python benchmarks/time_to_quality.py --recipes diffusers@6e-3,edm,edm-sd --seeds 0,1,2 --budgets 1200,3600

Each recipe is a set of config overrides (RECIPES below) trained by `diffspace train`'s loop on
scikit-learn's 8x8 digits with batch 128, constant learning rate after 100 warm-up steps and the
power EMA (sigma_rel 0.10): both are independent of the run's length, so the run is paused at each
budget (train(stop_at=...)), measured, and resumed exactly; the checkpoint of step k is the run of k
steps. The peer, "diffusers", is diffusers' `train_unconditional` recipe as far as it concerns the
model: its UNet2DModel (model.network = "diffusers", the optional extra) with eps prediction on the
linear-beta DDPM chain, uniform t and L_simple (preset ddpm); `diffusers@LR` sets its learning rate
(sweep it with several `diffusers@...` entries; the table says which won). Not taken from the peer
script: its AdamW betas (0.95, 0.999) and weight decay 1e-6, its warm-up EMA and its cosine schedule;
both sides share the loop, so the comparison is about the recipe (network, preset, weighting, noise
levels, learning rate), not the optimiser.

At each budget a model is sampled with each of its recipe's samplers at about 10, 20 and 35 NFE
(sampling.plan: the largest step count that fits; the NFE used is printed); `n` samples (at most
the 898 of one half of the digits) are compared with one half of the real digits, and the noise
floor is the other half against it (evaluate.real_sets): FD in the feature net's features,
precision and recall (k = 3), and the share of confident samples. Per recipe and budget the table
gives, for every NFE column, the best sampler's FD as the mean over seeds with its spread (min-max),
and the excess over the floor; the last lines check issue 16's bar: the budget at which each
recipe's best mean FD first reaches the peer's best at the largest budget, and the ratio of excesses
(FD - floor) to the peer's at equal images. Training seconds are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diffspace, installed or not

COMMON = {"data.spec": "digits", "model.base_channels": 24, "model.channel_mult": [1, 2], "model.num_blocks": 1,
          "train.batch_size": 128, "train.warmup": 100, "log.every": 100, "log.keep": 1}
EDM = {"model.preset": "edm", "train.lr": 2e-3}
PEER_SAMPLERS, EDM_SAMPLERS = ("dpmpp_2m", "unipc"), ("deis_pc", "heun")
RECIPES = {  # name: (overrides, samplers tried at each NFE)
    "diffusers": ({"model.network": "diffusers", "model.preset": "ddpm", "train.lr": 6e-3}, PEER_SAMPLERS),
    "edm": (EDM, EDM_SAMPLERS),  # the demo's recipe before issue 16
    "edm-sd": ({**EDM, "model.preset_params": {"sigma_data": 0.75}}, EDM_SAMPLERS),  # the digits' own sigma_data (0.752)
    "edm-u": ({**EDM, "model.uncertainty": True}, EDM_SAMPLERS),  # EDM2's learned weighting
    "edm-mp": ({**EDM, "model.network": "mp", "train.lr": 1e-2}, EDM_SAMPLERS),  # EDM2's magnitude-preserving U-Net
    "edm-pmean": ({**EDM, "model.preset_params": {"P_mean": -0.6}}, EDM_SAMPLERS),  # fewer high noise levels
    "edm-isqrt": ({**EDM, "train.lr": 4e-3, "train.lr_schedule": "inv-sqrt", "train.lr_ref_steps": 600}, EDM_SAMPLERS),
}
NFES = (10, 20, 35)


def recipe(name: str) -> tuple[str, dict, tuple]:
    """(label, overrides, samplers) of 'name' or 'name@LR'."""
    base, _, lr = name.partition("@")
    if base not in RECIPES:
        raise SystemExit(f"unknown recipe {base!r}; allowed: {', '.join(RECIPES)} (optionally @LR)")
    overrides, samplers = RECIPES[base]
    return name, {**COMMON, **overrides, **({"train.lr": float(lr)} if lr else {})}, samplers


def config(overrides: dict, steps: int, seed: int):
    from diffspace.config import Config, set_option

    cfg = Config()
    for key, value in {**overrides, "train.steps": steps, "train.seed": seed, "log.checkpoint_every": steps}.items():
        set_option(cfg, key, value)
    return cfg


def measure(ema, n: int, samplers, real, net) -> dict:
    """{"nfe": (FD, sampler, nfe used, precision, recall, confident)} of the best sampler at each NFE."""
    from diffspace.config import SampleConfig
    from diffspace.features import digits_metrics
    from diffspace.sampling import sample

    best = {}
    for nfe in NFES:
        for sampler in samplers:
            s = sample(ema, n, SampleConfig(sampler=sampler, nfe=nfe, seed=7))
            m = digits_metrics(s.x.clamp(-1, 1), real, net)
            if str(nfe) not in best or m["FD_digits"] < best[str(nfe)][0]:
                best[str(nfe)] = (m["FD_digits"], sampler, s.plan.nfe, m["precision"], m["recall"], m["confident"])
    return best


def floor_spread(n: int, halvings: int = 10) -> float:
    """Standard deviation of the noise floor (FD of one random half of the real digits against the
    other, n each) over `halvings` random splits: how finely an FD near the floor is resolved."""
    from diffspace.data import load
    from diffspace.evaluate import real_sets
    from diffspace.features import digits_feature_net, digits_metrics

    net, data = digits_feature_net(), load("digits")
    floors = [digits_metrics(a, b, net)["FD_digits"] for a, b in (real_sets(data, n, seed=k) for k in range(1, halvings + 1))]
    return statistics.stdev(floors)


def spread(values) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="diffusers@3e-3,diffusers@6e-3,diffusers@1.2e-2,edm,edm-sd,edm-u")
    ap.add_argument("--budgets", default="1200,2400,3600", help="steps (of batch 128) at which to measure")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=898)
    ap.add_argument("--out", default="runs/time-to-quality")
    ap.add_argument("--report", action="store_true", help="only print the table of the runs already in --out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.budgets, args.seeds, args.n, args.recipes = "75,150", "0", 300, "diffusers@6e-3,edm"
    out = Path(args.out)
    if not args.report:
        run_all(args, out)
    report(out)


def run_all(args, out: Path) -> None:
    """Train and measure every (recipe, seed) into out/LABEL-seedS/ and its result, out/LABEL-seedS.json."""
    from diffspace.evaluate import real_sets
    from diffspace.features import digits_feature_net, digits_metrics
    from diffspace.train import load_data, train

    budgets, seeds = [int(b) for b in args.budgets.split(",")], [int(s) for s in args.seeds.split(",")]
    recipes = [recipe(r) for r in args.recipes.split(",")]
    net = digits_feature_net()
    data = load_data(config(recipes[0][1], 1, 0))[0]
    real, other = real_sets(data, args.n)
    floor = digits_metrics(other, real, net)["FD_digits"]
    n = min(args.n, len(real))
    print(f"digits: FD floor (real half against real half, n = {len(real)}): {floor:.2f}; samples per set: {n}")
    for label, overrides, samplers in recipes:
        for seed in seeds:
            run_dir, spent, result = out / f"{label}-seed{seed}", 0.0, {}
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists: remove it or pass another --out")
            cfg = config(overrides, budgets[-1], seed)
            for k, budget in enumerate(budgets):  # paused at each budget, measured, resumed exactly
                t0 = time.time()
                summary = train(cfg if k == 0 else None, run_dir, resume=k > 0, stop_at=budget, progress=False)
                spent += time.time() - t0
                result[budget] = {"seconds": spent, **measure(summary["ema"], n, samplers, real, net)}
                print(f"{label} seed {seed} {budget} steps ({spent:.0f} s): " + ", ".join(
                    f"{nfe}: {r[0]:.2f} {r[1]}@{r[2]}" for nfe, r in result[budget].items() if nfe != "seconds"), flush=True)
            params = sum(p.numel() for p in summary["model"].network.parameters())
            (out / f"{label}-seed{seed}.json").write_text(json.dumps(
                {"label": label, "seed": seed, "params": params, "floor": floor, "n": n, "batch": cfg.train.batch_size,
                 "threads": torch.get_num_threads(), "budgets": result}))


def report(out: Path) -> None:
    """The table of every out/*.json: per recipe and budget, means over the seeds it has."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))]
    if not runs:
        raise SystemExit(f"no results in {out}")
    labels = list(dict.fromkeys(r["label"] for r in runs))
    of = {label: [r for r in runs if r["label"] == label] for label in labels}
    budgets = sorted({int(b) for r in runs for b in r["budgets"]})
    floor, batch = runs[0]["floor"], runs[0]["batch"]
    nfes = [str(nfe) for nfe in NFES]
    print(f"\n| recipe | params | seeds | images | " + " | ".join(f"FD @{nfe} NFE (best sampler)" for nfe in NFES)
          + " | best FD - floor | precision | recall | confident | train s |")
    print("|---" * (10 + len(NFES)) + "|")
    best = {}  # (label, budget) -> mean over seeds of the best column's FD
    for label in labels:
        for budget in budgets:
            rs = [r["budgets"][str(budget)] for r in of[label] if str(budget) in r["budgets"]]
            if not rs:
                continue
            cells = []
            for nfe in nfes:
                rows = [r[nfe] for r in rs]
                cells.append(f"{spread([row[0] for row in rows])} ({statistics.mode(row[1] for row in rows)}@{rows[0][2]})")
            top = min(nfes, key=lambda nfe: statistics.mean(r[nfe][0] for r in rs))
            rows = [r[top] for r in rs]
            best[label, budget] = statistics.mean(row[0] for row in rows)
            print(f"| {label} | {of[label][0]['params'] / 1e6:.2f} M | {len(rs)} | {budget * batch:,} | " + " | ".join(cells)
                  + f" | {best[label, budget] - floor:.2f} | {spread([row[3] for row in rows])} | {spread([row[4] for row in rows])} "
                  f"| {spread([row[5] for row in rows])} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    print(f"\nnoise floor FD {floor:.2f} ({runs[0]['n']} real digits against {runs[0]['n']} others); cells: mean "
          f"(min-max) over the seeds; 'best FD': the NFE column with the lowest mean; {runs[0]['threads']} torch threads")
    resolution = floor_spread(runs[0]["n"])
    print(f"the floor over 10 random halvings of the digits: standard deviation {resolution:.2f}; an excess over the "
          f"floor below 2x that ({2 * resolution:.2f}) is not resolved, and no ratio is taken of it")
    peers = [label for label in labels if label.startswith("diffusers")]
    if not peers:
        return
    last = budgets[-1]
    peer = min((p for p in peers if (p, last) in best), key=lambda p: best[p, last])
    goal = best[peer, last]
    print(f"peer: {peer}, best mean FD {goal:.2f} at {last * batch:,} images (the best of {', '.join(peers)})")
    seconds = lambda label: statistics.mean(r["budgets"][str(last)]["seconds"] for r in of[label])
    for label in labels:
        if label in peers or (label, last) not in best:
            continue
        reach = next((b for b in budgets if best.get((label, b), math.inf) <= goal), None)
        ratios = [(best[label, b] - floor) / (best[peer, b] - floor) if best[peer, b] - floor > 2 * resolution else None
                  for b in budgets if (label, b) in best]
        half = reach is not None and reach <= last / 2
        within = all(r is None or r <= 0.6 for r in ratios)
        print(f"{label}: reaches {goal:.2f} at " + (f"{reach * batch:,} images ({reach / last:.2f}x)" if reach else
              "none of the budgets") + f" [{'PASS' if half else 'FAIL'} <= 0.5x]; excess over the floor / the peer's: "
              f"{', '.join('-' if r is None else f'{r:.2f}' for r in ratios)} [{'PASS' if within else 'FAIL'} <= 0.6x]; "
              f"training time {seconds(label) / seconds(peer):.2f}x the peer's")


if __name__ == "__main__":
    main()
