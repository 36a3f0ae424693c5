"""Time to quality on the digits: diffspace's recipes against the diffusers recipe, at equal
training images and (about) equal parameters, judged in the digits feature net.

    python benchmarks/time_to_quality.py                    # the README's table: 3 seeds, 900 / 1,800 / 3,600 steps
    python benchmarks/time_to_quality.py --judge held-out --out runs/ttq-held-out   # judged on unseen digits only
    python benchmarks/time_to_quality.py --quick            # 150 steps, one seed, n = 300: the script runs
    python benchmarks/time_to_quality.py --recipes diffusers@3e-3,edm,edm-sd --seeds 0,1 --budgets 900,1800
    python benchmarks/time_to_quality.py --lean RUN...      # the share of samples nearest a held-out digit
    python benchmarks/time_to_quality.py --recipes edm-u+ag --judge held-out   # autoguided by its own earlier EMA

Each recipe is a set of config overrides (RECIPES below) trained by `diffspace train`'s loop on
scikit-learn's 8x8 digits with batch 128 (a recipe may set a batch that divides 128: the budgets
count images, 128 per step of a budget, so it takes more steps), constant learning rate after 100 warm-up steps and power
EMAs of sigma_rel 0.05, 0.10 and 0.20 (the run's EMA and two train.phema trackers): all are
independent of the run's length, so the run is paused at each budget (train(stop_at=...)), measured,
and resumed exactly; the checkpoint of step k is the run of k steps. The peer, "diffusers", is
diffusers' `train_unconditional` recipe as far as it concerns the model: its UNet2DModel
(model.network = "diffusers", the optional extra) with eps prediction on the linear-beta DDPM chain,
uniform t and L_simple (preset ddpm); `diffusers@LR` sets its learning rate (sweep it with several
`diffusers@...` entries; the table says which won). Not taken from the peer script: its AdamW betas
(0.95, 0.999) and weight decay 1e-6, its warm-up EMA and its cosine schedule; both sides share the
loop and the EMA choice, so the comparison is about the recipe (network, preset, weighting, noise
levels, learning rate), not the optimiser. A recipe name ending in "+ag" is also sampled with
autoguidance by the same run's EMAs at half the images (measure, 1): no extra training images, and
at most the same network evaluations per sample (an autoguided step spends two).

At each budget (measure): the EMA length is chosen by FD at 35 NFE (EDM2's post-hoc choice, from
three lengths); that EMA is sampled with each of its recipe's samplers at about 10, 20 and 35 NFE
(sampling.plan: the largest step count that fits; the NFE used is printed); `n` samples (at most the
898 of one half of the digits) are compared with one half of the real digits (evaluate.real_sets):
FD in the feature net's features, precision and recall (k = 3), and the share of confident samples.
Then the best column is measured again, resolved: --sets fresh sample sets, set k against the k-th
random halving of the real digits minus that halving's own floor (real half against real half), the
"paired excess" over the floor, with its sampling error. The table gives means over the training
seeds with their spread (min-max); the last lines check issue 16's bar on the paired excess: the
budget at which each recipe first reaches the peer's excess at the largest budget, and the ratio of
excesses to the peer's at equal images (to the peer at its best final rate, and to the peer's best
rate at each budget). Training seconds are measured in the same run.

Judged against all the digits, a model that leans toward its training digits can score below the
floor of two independent real halves (held_out_share measures the lean). `--judge held-out` trains
every recipe on a stratified half of the digits (data.test_fraction = 0.5) and judges against the
other half only; the floor of n samples is then c / n (c from the halvings) plus the held-out set's
own share, half the FD between the two stratified halves, and copying training digits cannot beat it.
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

BATCH = 128  # the budgets are steps of this batch: images = BATCH x budget, whatever a recipe's own batch
COMMON = {"data.spec": "digits", "model.base_channels": 24, "model.channel_mult": [1, 2], "model.num_blocks": 1,
          "train.batch_size": 128, "train.warmup": 100, "train.phema": [0.05, 0.2], "log.every": 100, "log.keep": 1}
EDM = {"model.preset": "edm", "train.lr": 2e-3}
PEER_SAMPLERS, EDM_SAMPLERS = ("dpmpp_2m", "unipc", "edm_sde"), ("deis_pc", "heun", "edm_sde")
# EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) with churn between their ImageNet-64 S_tmin and S_tmax
# (Table 5); S_churn = 5 from a sweep on one digits model (benchmarks/README.md: 2 / 5 / >= 10 gave FD 1.75 / 1.68 / 1.97
# at 35 NFE, deis_pc 1.80; within the spread of two sample sets)
SAMPLER_OPTIONS = {"edm_sde": {"S_churn": 5, "S_tmin": 0.05, "S_tmax": 50.0}}


def phigh_isqrt(ref: int = 600, **preset) -> dict:
    """edm-u with P_mean -0.6 (and any other preset numbers) and EDM2's inverse-sqrt decay from step ref."""
    return {**EDM, "model.uncertainty": True, "model.preset_params": {"P_mean": -0.6, **preset},
            "train.lr_schedule": "inv-sqrt", "train.lr_ref_steps": ref}


RECIPES = {  # name: (overrides, samplers tried at each NFE)
    "diffusers": ({"model.network": "diffusers", "model.preset": "ddpm", "train.lr": 6e-3}, PEER_SAMPLERS),
    "edm": (EDM, EDM_SAMPLERS),  # the demo's recipe before issue 16
    "edm-sd": ({**EDM, "model.preset_params": {"sigma_data": 0.75}}, EDM_SAMPLERS),  # the digits' own sigma_data (0.752)
    "edm-u": ({**EDM, "model.uncertainty": True}, EDM_SAMPLERS),  # EDM2's learned weighting
    "edm-ua": ({**EDM, "model.uncertainty": True, "model.augment": 0.15}, EDM_SAMPLERS),  # + non-leaking augmentation
    "edm-u64": ({**EDM, "model.uncertainty": True, "train.batch_size": 64}, EDM_SAMPLERS),  # twice the steps of half the batch
    "edm-ud": ({**EDM, "model.uncertainty": True, "model.dropout": 0.1}, EDM_SAMPLERS),  # + dropout (DDPM's CIFAR-10 value)
    "edm-mp": ({**EDM, "model.network": "mp", "train.lr": 1e-2}, EDM_SAMPLERS),  # EDM2's magnitude-preserving U-Net
    "edm-u-plow": ({**EDM, "model.uncertainty": True, "model.preset_params": {"P_mean": -1.6}}, EDM_SAMPLERS),  # fewer high noise levels
    "edm-u-phigh": ({**EDM, "model.uncertainty": True, "model.preset_params": {"P_mean": -0.6}}, EDM_SAMPLERS),  # more
    "edm-u-phigher": ({**EDM, "model.uncertainty": True, "model.preset_params": {"P_mean": -0.2}}, EDM_SAMPLERS),
    # P_std: EDM2's pixel ImageNet-64 presets (Karras et al. 2024: P_mean -0.8, P_std 1.6)
    "edm-u-px64": ({**EDM, "model.uncertainty": True, "model.preset_params": {"P_mean": -0.8, "P_std": 1.6}}, EDM_SAMPLERS),
    "edm-isqrt": ({**EDM, "train.lr": 4e-3, "train.lr_schedule": "inv-sqrt", "train.lr_ref_steps": 600}, EDM_SAMPLERS),
    # the demo's recipe with EDM2's inverse-sqrt decay, lr 2e-3 / sqrt(step / ref) after step ref: from 600 ("isqrt"),
    # 1.6e-3 / 1.2e-3 / 8e-4 at the three budgets; from 300, 1.15e-3 / 8.2e-4 / 5.8e-4; from 150, 8.2e-4 / 5.8e-4 / 4.1e-4
    **{f"edm-u-phigh-isqrt{'' if ref == 600 else ref}": (phigh_isqrt(ref), EDM_SAMPLERS) for ref in (600, 300, 150)},
    # the same (from 600) with the digits' own sigma_data (0.752; the preset's 0.5), or a narrower noise distribution
    "edm-u-phigh-isqrt-sd": (phigh_isqrt(sigma_data=0.75), EDM_SAMPLERS),
    "edm-u-phigh-isqrt-pstd1": (phigh_isqrt(P_std=1.0), EDM_SAMPLERS),
}
NFES = (10, 20, 35)  # network evaluations per sample (an autoguided step costs two)
GUIDE_EMAS, GUIDE_WEIGHTS = (0.10, 0.20), (1.5, 2.0, 2.5)  # '+ag': the guide's EMA (sigma_rel) and w, chosen post hoc


def recipe(name: str) -> tuple[str, dict, tuple, bool]:
    """(label, overrides, samplers, autoguided) of 'name', 'name@LR' or either + '+ag'."""
    bare, ag, rest = name.partition("+ag")
    base, _, lr = bare.partition("@")
    if base not in RECIPES or rest:
        raise SystemExit(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)} (optionally @LR, then optionally +ag)")
    overrides, samplers = RECIPES[base]
    return name, {**COMMON, **overrides, **({"train.lr": float(lr)} if lr else {})}, samplers, bool(ag)


def halvings(data, n: int, net, sets: int) -> tuple[list, float]:
    """`sets` random halvings of the digits (evaluate.real_sets, seeds 0..sets-1), each as (one half, the
    other half's FD against it), and FD's bias constant c: two real sets of n are about c (1 / n + 1 / n) apart."""
    from diffspace.evaluate import real_sets
    from diffspace.features import digits_metrics

    halves = [(a, digits_metrics(b, a, net)["FD_digits"]) for a, b in (real_sets(data, n, seed=k) for k in range(sets))]
    return halves, statistics.mean(f for _, f in halves) * n / 2


def config(overrides: dict, steps: int, seed: int):
    from diffspace.config import Config, set_option

    cfg = Config()
    for key, value in {**overrides, "train.steps": steps, "train.seed": seed, "log.checkpoint_every": steps,
                       "log.phema_every": steps}.items():
        set_option(cfg, key, value)
    return cfg


def emas(summary, run_dir: Path) -> dict:
    """{sigma_rel: EMA model} at this checkpoint: the run's own EMA (sigma_rel 0.10) and its
    train.phema trackers, each itself the power EMA of its sigma_rel (no reconstruction needed)."""
    import copy

    from diffspace import checkpoint as ckpt

    _, tensors, state = ckpt.load_latest(run_dir / "checkpoints")
    out = {state["config"]["train"]["ema_sigma_rel"]: summary["ema"]}
    for j, sigma_rel in enumerate(state["config"]["train"]["phema"]):
        out[sigma_rel] = copy.deepcopy(summary["ema"])
        ckpt.load_module(out[sigma_rel], tensors, f"phema{j}")
    return dict(sorted(out.items()))


def measure(models: dict, n: int, samplers, real, net, halves, digits, floor_of, guides=None) -> dict:
    """The EMA length, the best sampler at each NFE, and the paired excess of the best column.

    1. The EMA (of `models`, by sigma_rel) with the lowest FD at 35 NFE of samplers[0] (sample seed 7).
       With `guides` (the same run's EMAs at half the images: autoguidance, Karras et al. 2024, with a
       guide that costs no training images of its own), that EMA guided by each guide EMA in GUIDE_EMAS
       with each w in GUIDE_WEIGHTS is tried at 35 network evaluations too, and the best of those and
       the unguided one is kept ("guide": [guide sigma_rel, w] or None).
    2. For that EMA, {"nfe": (FD, sampler, evaluations, precision, recall, confident)} of the best
       sampler at each number of network evaluations against `real` (the same sample set of seed 7);
       with guides, unguided and with the kept guide ("sampler+ag" in the table).
    3. The excess over the floor, paired: len(halves) fresh sample sets of n (seed 11), set k against
       the real half a_k of the k-th random halving (a_k, b_k), minus that halving's floor FD(b_k, a_k);
       "excess" is the mean over k and "excess_se" its standard error. Pairing each set with its own
       floor removes the reference half's noise, and the fresh sets remove the choice in 1-2 from it.
    4. "excess_all": all those sets at once against all the real `digits`, minus floor_of(N), the floor
       of N samples against them (from FD's 1 / N bias; Chong & Forsyth 2020 show FID linear in 1 / N).
       Less sampling noise; the real set is the same for every recipe."""
    from diffspace.config import SampleConfig
    from diffspace.features import digits_metrics
    from diffspace.sampling import sample

    measured = {}  # (sigma_rel, guide, sampler, nfe) -> (metrics, evaluations) of the sample set of seed 7, each drawn once

    def draw(sigma_rel, guide, sampler, nfe, size, seed):
        """size samples of EMA sigma_rel, unguided (guide None) or autoguided (guide (sigma_rel, w)), in at
        most nfe network evaluations each: an autoguided step evaluates the model and its guide."""
        options = SAMPLER_OPTIONS.get(sampler, {})
        if guide is None:
            return sample(models[sigma_rel], size, SampleConfig(sampler=sampler, nfe=nfe, seed=seed, options=options))
        cfg = SampleConfig(sampler=sampler, nfe=nfe // 2, seed=seed, guidance=guide[1], options=options)
        return sample(models[sigma_rel], size, cfg, guide=guides[guide[0]])

    def metrics(sigma_rel, guide, sampler, nfe):
        if (sigma_rel, guide, sampler, nfe) not in measured:
            s = draw(sigma_rel, guide, sampler, nfe, n, seed=7)
            measured[sigma_rel, guide, sampler, nfe] = digits_metrics(s.x.clamp(-1, 1), real, net), s.evaluations + s.guided
        return measured[sigma_rel, guide, sampler, nfe]

    fd = lambda sigma_rel, guide: metrics(sigma_rel, guide, samplers[0], NFES[-1])[0]["FD_digits"]  # noqa: E731
    sigma_rel = min(models, key=lambda s: fd(s, None))
    tried = [None] + ([(g, w) for g in GUIDE_EMAS for w in GUIDE_WEIGHTS] if guides else [])
    guide, best = min(tried, key=lambda g: fd(sigma_rel, g)), {}
    for nfe in NFES:
        for sampler in samplers:
            for g in dict.fromkeys([guide, None]):
                m, used = metrics(sigma_rel, g, sampler, nfe)
                if str(nfe) not in best or m["FD_digits"] < best[str(nfe)][0]:
                    best[str(nfe)] = (m["FD_digits"], sampler + ("+ag" if g else ""), used, m["precision"], m["recall"], m["confident"])
    _, name, used = min(best.values())[:3]
    sampler, column_guide = name.removesuffix("+ag"), guide if name.endswith("+ag") else None
    x = draw(sigma_rel, column_guide, sampler, used, n * len(halves), seed=11).x.clamp(-1, 1)
    excess = [digits_metrics(x[k * n:(k + 1) * n], a, net)["FD_digits"] - floor for k, (a, floor) in enumerate(halves)]
    excess_all = digits_metrics(x, digits, net)["FD_digits"] - floor_of(len(x))
    return {**best, "ema": sigma_rel, "guide": list(column_guide) if column_guide else None, "paired": [name, used],
            "excess": statistics.mean(excess),
            "excess_se": statistics.stdev(excess) / math.sqrt(len(excess)), "excess_all": excess_all}


def held_out_share(x, train_set, test_set) -> float:
    """Share of samples x whose nearest digit (in pixels) among all of them is a held-out one (the
    run's test split). Fresh draws of the digits' law give len(test) / (len(train) + len(test)), 10 %;
    a model that leans toward its training digits gives less. (Its FD against sets that hold those
    digits can then fall below the floor of two independent real sets.)"""
    ref = torch.cat([train_set.x.flatten(1), test_set.x.flatten(1)]).double()
    return float((torch.cdist(x.flatten(1).double(), ref).argmin(1) >= len(train_set)).double().mean())


def lean(runs: list[str]) -> None:
    """held_out_share of 898 samples (seed 3, 20 NFE, deis_pc or the peer's dpmpp_2m) of each run's latest EMA."""
    from diffspace.config import SampleConfig
    from diffspace.model import load_model
    from diffspace.sampling import sample
    from diffspace.train import load_data

    for run in runs:
        model, cfg, _ = load_model(Path(run))
        _, train_set, test_set = load_data(cfg)
        sampler = PEER_SAMPLERS[0] if cfg.model.network == "diffusers" else EDM_SAMPLERS[0]
        x = sample(model, 898, SampleConfig(sampler=sampler, nfe=20, seed=3)).x.clamp(-1, 1)
        print(f"{run}: the nearest digit is a held-out one for {held_out_share(x, train_set, test_set):.3f} of 898 "
              f"samples (fresh digits: {len(test_set) / (len(train_set) + len(test_set)):.3f})")


def spread(values) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="diffusers@1.5e-3,edm-u")
    ap.add_argument("--budgets", default="900,1800,3600", help="steps of batch 128 (128 images each) at which to measure")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=898)
    ap.add_argument("--sets", type=int, default=8, help="sample sets (and real halvings) of the paired excess")
    ap.add_argument("--judge", choices=("halves", "held-out"), default="halves",
                    help="halves: train on 90 %% of the digits, judge against random halves of all of them; held-out: "
                         "train on half of the digits (data.test_fraction = 0.5), judge against the other half only")
    ap.add_argument("--out", default="runs/time-to-quality")
    ap.add_argument("--report", action="store_true", help="only print the table of the runs already in --out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lean", nargs="+", metavar="RUN", help="only print held_out_share (the lean toward the training digits) of these run folders")
    args = ap.parse_args()
    if args.quick:
        args.budgets, args.seeds, args.n, args.sets, args.recipes = "75,150", "0", 300, 3, "diffusers@6e-3,edm"
    if args.lean:
        return lean(args.lean)
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
    if args.judge == "held-out":
        recipes = [(label, {**overrides, "data.test_fraction": 0.5}, *rest) for label, overrides, *rest in recipes]
    net = digits_feature_net()
    data, train_set, test_set = load_data(config(recipes[0][1], 1, 0))
    real, other = real_sets(data, args.n)
    floor = digits_metrics(other, real, net)["FD_digits"]
    n = min(args.n, len(real))
    halves, c = halvings(data, n, net, args.sets)
    floors = [f for _, f in halves]
    print(f"digits: FD floor (real half against real half, n = {n}): {floor:.2f}; over {args.sets} random halvings "
          f"{statistics.mean(floors):.2f} (s.d. {statistics.stdev(floors):.2f})")
    floor_of = lambda size, n_real=len(data): c * (1 / size + 1 / n_real)  # N samples against all the digits
    if args.judge == "held-out":  # one reference for every set, the held-out digits
        real, n, data = test_set.x, min(args.n, len(test_set)), test_set
        floor = digits_metrics(train_set.x, real, net)["FD_digits"]
        # N fresh digits against them: c / N from the samples, and the reference's own share, half the FD of the
        # two stratified halves (less than c / 898: stratified halves hold the same share of each class)
        floor_of = lambda size: c / size + floor / 2
        halves = [(real, floor_of(n))] * args.sets
        print(f"held-out judge: {len(train_set)} training digits, {len(real)} held out; the training digits against "
              f"them: FD {floor:.2f}; the floor of n = {n} samples, c / n + {floor:.2f} / 2 = {halves[0][1]:.2f}")
    for label, overrides, samplers, autoguided in recipes:
        for seed in seeds:
            run_dir, spent, result = out / f"{label}-seed{seed}", 0.0, {}
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists: remove it or pass another --out")
            batch = overrides["train.batch_size"]
            if BATCH % batch:
                raise SystemExit(f"{label}: train.batch_size={batch} must divide {BATCH} (the budgets are steps of {BATCH})")
            steps = lambda budget: budget * BATCH // batch  # equal images: a smaller batch takes more steps
            cfg = config(overrides, steps(budgets[-1]), seed)
            pauses = sorted(set(budgets) | ({b // 2 for b in budgets} if autoguided else set()))
            kept = {}  # autoguided: {pause: its EMAs}, the guides of the budget twice as long (else empty)
            for k, pause in enumerate(pauses):  # paused at each budget, measured, resumed exactly
                t0 = time.time()
                summary = train(cfg if k == 0 else None, run_dir, resume=k > 0, stop_at=steps(pause), progress=False)
                spent += time.time() - t0
                models = emas(summary, run_dir)
                if autoguided:
                    kept[pause] = models
                if pause not in budgets:
                    continue
                budget, guides = pause, kept.get(pause // 2)
                r = result[budget] = {"seconds": spent, **measure(models, n, samplers, real, net, halves, data.x, floor_of, guides)}
                guided = f", guided by its EMA {r['guide'][0]} of {budget // 2 * BATCH:,} images at w {r['guide'][1]}" if r["guide"] else ""
                print(f"{label} seed {seed} {budget * BATCH:,} images ({spent:.0f} s), EMA {r['ema']}{guided}: " + ", ".join(
                    f"{nfe}: {r[str(nfe)][0]:.2f} {r[str(nfe)][1]}@{r[str(nfe)][2]}" for nfe in NFES)
                    + f"; paired excess {r['excess']:.2f} +- {r['excess_se']:.2f}, against all {r['excess_all']:.2f}", flush=True)
            params = sum(p.numel() for p in summary["model"].network.parameters())
            (out / f"{label}-seed{seed}.json").write_text(json.dumps(
                {"label": label, "seed": seed, "params": params, "floor": floor, "floors": floors, "c": c, "n": n, "judge": args.judge, "batch": BATCH,
                 "threads": torch.get_num_threads(), "budgets": result}))


def report(out: Path) -> None:
    """The table of every out/*.json: per recipe and budget, means over the seeds it has; then issue 16's bar,
    judged by each of the two excesses over the floor (measure, 3 and 4)."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))]
    if not runs:
        raise SystemExit(f"no results in {out}")
    labels = list(dict.fromkeys(r["label"] for r in runs))
    of = {label: [r for r in runs if r["label"] == label] for label in labels}
    budgets = sorted({int(b) for r in runs for b in r["budgets"]})
    floor, batch, nfes = runs[0]["floor"], runs[0]["batch"], [str(nfe) for nfe in NFES]
    print(f"\n| recipe | params | seeds | images | " + " | ".join(f"FD @{nfe} NFE" for nfe in NFES)
          + " | EMA | paired excess (sampler@NFE) | excess vs all digits | precision | recall | confident | train s |")
    print("|---" * (12 + len(NFES)) + "|")
    excess = {"excess": {}, "excess_all": {}}  # measure -> (label, budget) -> mean over the seeds
    se = {}  # (label, budget) -> the sampling error of the mean paired excess
    for label in labels:
        for budget in budgets:
            rs = [r["budgets"][str(budget)] for r in of[label] if str(budget) in r["budgets"]]
            if not rs:
                continue
            cells = [f"{spread([r[nfe][0] for r in rs])} ({statistics.mode(r[nfe][1] for r in rs)}@{rs[0][nfe][2]})" for nfe in nfes]
            top = [min((r[nfe] for nfe in nfes), key=lambda row: row[0]) for r in rs]
            for key in excess:
                excess[key][label, budget] = statistics.mean(r[key] for r in rs)
            se[label, budget] = math.sqrt(sum(r["excess_se"] ** 2 for r in rs)) / len(rs)
            ema = "/".join(f"{r['ema']:g}" + (" ag {:g} w {:g}".format(*r["guide"]) if r.get("guide") else "") for r in rs)
            paired = statistics.mode("{}@{}".format(*r["paired"]) for r in rs)
            print(f"| {label} | {of[label][0]['params'] / 1e6:.2f} M | {len(rs)} | {budget * batch:,} | " + " | ".join(cells)
                  + f" | {ema} | {spread([r['excess'] for r in rs])} +- {se[label, budget]:.2f} ({paired}) "
                  f"| {spread([r['excess_all'] for r in rs])} | {spread([row[3] for row in top])} "
                  f"| {spread([row[4] for row in top])} | {spread([row[5] for row in top])} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    floors, c = runs[0]["floors"], runs[0]["c"]
    if runs[0].get("judge") == "held-out":
        print(f"\nHeld-out judge: trained on half of the digits, judged against the other half only. FD columns: one "
              f"sample set of {runs[0]['n']} against the held-out digits (the training digits themselves: {floor:.2f}). "
              f"'Paired' excess: FD - (c / n + {floor:.2f} / 2) over {len(floors)} fresh sample sets against the held-out "
              f"digits; excess vs all: those sets together, minus c / N + {floor:.2f} / 2; c = {c:.0f} from {len(floors)} halvings "
              f"of all the digits (floors {statistics.mean(floors):.2f}, s.d. {statistics.stdev(floors):.2f}).")
    else:
        print(f"\nFD columns: one sample set of {runs[0]['n']} against one real half (floor {floor:.2f}), the best sampler "
              f"of the recipe with the chosen EMA (sigma_rel, per seed), mean (min-max) over the seeds. Paired excess: "
              f"FD - floor over {len(floors)} fresh sample sets, each against its own random halving of the digits (floors "
              f"{statistics.mean(floors):.2f}, s.d. {statistics.stdev(floors):.2f}), mean (min-max) over the seeds "
              f"+- the sampling error of the mean. Excess vs all digits: those sets together against all the digits, "
              f"minus the floor c (1 / N + 1 / N_real), c = {c:.0f}.")
    print(f"{runs[0]['threads']} torch threads per run")
    peers = [label for label in labels if label.startswith("diffusers")]
    for key, name in (("excess", "paired excess"), ("excess_all", "excess vs all digits")):
        if peers:
            print(f"\nthe bar by the {name}:")
            verdict(excess[key], se, labels, peers, budgets, batch,
                    lambda label: statistics.mean(r["budgets"][str(budgets[-1])]["seconds"] for r in of[label]))


def verdict(excess: dict, se: dict, labels, peers, budgets, batch: int, seconds) -> None:
    """Issue 16's bar, one line per recipe: reaching the peer's excess at the last budget by half of it,
    and excesses at most 0.6x the peer's (its best final rate, and its best rate at each budget). A ratio
    is taken only where the peer's excess is more than 2 sampling errors (se) above zero."""
    last = budgets[-1]
    peer = min((p for p in peers if (p, last) in excess), key=lambda p: excess[p, last])
    goal = excess[peer, last]
    at_floor = goal <= 2 * se[peer, last]  # then "the peer's quality" is the floor itself, as far as it is resolved
    print(f"peer: {peer}, the lowest excess at {last * batch:,} images ({goal:.2f} +- {se[peer, last]:.2f}) of {', '.join(peers)}"
          + ("; it is not resolved above the floor, so reaching it means an excess within 2 sampling errors of 0 "
             "or below" if at_floor else ""))
    for label in labels:
        if label in peers or (label, last) not in excess:
            continue
        reaches = lambda b: (label, b) in excess and excess[label, b] <= (2 * se[label, b] if at_floor else goal)
        reach = next((b for b in budgets if reaches(b)), None)
        target = "the floor" if at_floor else f"the peer's {goal:.2f}"
        ratio = lambda p, b: (f"{excess[label, b] / excess[p, b]:.2f}" if excess[p, b] > 2 * se[p, b] else "-")
        ratios = [ratio(peer, b) for b in budgets if (label, b) in excess]
        tuned = [ratio(min((p for p in peers if (p, b) in excess), key=lambda p: excess[p, b]), b) for b in budgets if (label, b) in excess]
        half = reach is not None and reach <= last / 2
        within = all(r == "-" or float(r) <= 0.6 for r in ratios + tuned)
        print(f"{label}: reaches {target} at " + (f"{reach * batch:,} images ({reach / last:.2f}x)" if reach else
              "none of the budgets") + f" [{'PASS' if half else 'FAIL'} <= 0.5x]; excess / the peer's: "
              f"{', '.join(ratios)}; / the best peer lr at each budget: {', '.join(tuned)} [{'PASS' if within else 'FAIL'} <= 0.6x; "
              f"'-': the peer's excess is within 2 sampling errors of 0]; training time {seconds(label) / seconds(peer):.2f}x the peer's")


if __name__ == "__main__":
    main()
