"""`diffspace compare SPEC`: train a grid of runs from one spec and measure them side by side.

A spec is a TOML file (shipped ones: `diffspace/specs/*.toml`, named by their stem):

    title = "..."                     # what the comparison asks
    about = "..."                     # what to expect (the claim being reproduced)
    [base]                            # config overrides of every run ("section.key" = value)
    [data.<spec>]                     # one table per dataset: its own overrides (data.spec is the key)
    [[run]]                           # one per run: label, optional sampler, and its overrides
    label = "L_simple"
    sampler = ""                      # "" = the preset's own solver and time steps (= "sample.sampler")
    measure = true                    # false: trained only, e.g. the weak guide of autoguidance
    "model.weighting" = "constant"
    "sample.guide_run" = "@weak"      # "@label": the folder of an earlier run of the same dataset
    [eval]                            # nfe = [...] (0: the default), n, vlb_steps, vlb_samples, pf_ode_steps
    [quick]                           # --quick: overrides on top of all runs, and [quick.eval]

Every dataset x run pair trains into OUT/<dataset>/<run> (an existing finished run with the same
config is reused, a stopped one resumed: Ctrl-C never loses work; runs that differ only in their
[sample] settings share one training), then every NFE of the run's sampler is
measured by evaluate.sample_quality next to its noise floor, and the likelihood by
evaluate.likelihood. OUT gets results.md (the tables), results.json, and the figures: quality vs
NFE per dataset, the per-noise-level training loss of every run, and the loss weightings.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from importlib import resources
from pathlib import Path

import torch

from . import plots
from .checkpoint import atomic_write_text, latest
from .evaluate import likelihood, sample_quality
from .config import Config, SampleConfig, apply_overrides, load_config, set_option
from .model import load_model
from .sampling import describe_guidance, sample
from .train import load_data, train

EVAL_DEFAULTS = {"nfe": [0], "n": 1000, "seed": 0, "vlb_steps": [0], "vlb_samples": 100, "pf_ode_steps": 0}
RUN_KEYS = ("label", "sampler", "measure")
REFERENCES = ("sample.guide_run", "sample.classifier")  # may name an earlier run as "@label"


def shipped_specs() -> dict[str, Path]:
    """The specs that come with diffspace, by name (file stem)."""
    folder = resources.files("diffspace") / "specs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def load_spec(name_or_path: str) -> dict:
    """A spec by shipped name or path, checked: every run has a unique label and valid overrides."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    specs = shipped_specs()
    path = specs.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"spec {name_or_path!r} is neither a shipped spec ({', '.join(sorted(specs))}) nor a file")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"spec {path} is not valid TOML: {e}") from None
    unknown = set(spec) - {"title", "about", "base", "data", "run", "eval", "quick"}
    if unknown:
        raise ValueError(f"spec {path}: unknown top-level keys {sorted(unknown)}; allowed: title, about, base, data, run, eval, quick")
    if not spec.get("data") or not spec.get("run"):
        raise ValueError(f"spec {path} needs at least one [data.<name>] table and one [[run]]")
    labels = [r.get("label", "") for r in spec["run"]]
    if "" in labels or len(set(labels)) != len(labels):
        raise ValueError(f"spec {path}: every [[run]] needs a label, all different; got {labels}")
    bad = set(spec.get("eval", {})) - set(EVAL_DEFAULTS)
    if bad:
        raise ValueError(f"spec {path}: unknown [eval] keys {sorted(bad)}; allowed: {', '.join(EVAL_DEFAULTS)}")
    spec["name"] = path.stem
    for data_name in spec["data"]:  # fail early, before any training
        for i, run in enumerate(spec["run"]):
            run_config(spec, data_name, run, quick=True)
            for key in REFERENCES:
                ref = str(run.get(key, ""))
                if ref.startswith("@") and ref[1:] not in labels[:i]:
                    raise ValueError(f"spec {path}: run {run['label']!r} has {key} = {ref!r}; "
                                     f"'@label' must name an earlier run, one of {labels[:i]}")
    return spec


def run_config(spec: dict, data_name: str, run: dict, quick: bool = False, overrides=()) -> Config:
    """The config of one run: defaults < [base] < [data.<name>] < the run's overrides < [quick] <
    `overrides` ("section.key=value" strings, e.g. from --set)."""
    cfg = Config()
    set_option(cfg, "data.spec", data_name)
    own = {k: v for k, v in run.items() if k not in RUN_KEYS}
    if run.get("sampler"):
        own["sample.sampler"] = run["sampler"]
    layers = [spec.get("base", {}), spec["data"][data_name], own]
    if quick:
        layers.append({k: v for k, v in spec.get("quick", {}).items() if k != "eval"})
    for layer in layers:
        for key, value in layer.items():
            set_option(cfg, key, value)
    return apply_overrides(cfg, overrides)


def eval_options(spec: dict, quick: bool = False) -> dict:
    return {**EVAL_DEFAULTS, **spec.get("eval", {}), **(spec.get("quick", {}).get("eval", {}) if quick else {})}


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "run"


def train_or_reuse(cfg: Config, folder: Path, progress: bool) -> float:
    """Train `cfg` into `folder`, resume it if stopped, or reuse it if finished; returns the seconds spent
    training now. A folder holding a different config is an error (choose another --out)."""
    last = latest(folder / "checkpoints")
    if last is None:
        return train(cfg, folder, progress=progress)["seconds"]
    saved = load_config(folder / "config.toml")
    if saved.to_toml() != cfg.to_toml():
        raise ValueError(f"{folder} holds a run with another config; delete it or pass another --out")
    if json.loads(last.with_suffix(".json").read_text())["step"] >= cfg.train.steps:
        return 0.0
    return train(None, folder, resume=True, progress=progress)["seconds"]


def run(spec_name: str, out: Path, quick: bool = False, progress: bool = True, overrides=()) -> dict:
    """Train and measure every dataset x run of a spec into `out`; returns the results (also in out)."""
    spec = load_spec(spec_name)
    options = eval_options(spec, quick)
    out = Path(out)
    t0 = time.time()
    results = {"spec": spec["name"], "title": spec.get("title", ""), "about": spec.get("about", ""),
               "quick": quick, "eval": options, "datasets": {}}
    for data_name in spec["data"]:
        rows, models, trained, folders = [], {}, {}, {}  # trained: training config -> folder (shared by sampling variants)
        for r in spec["run"]:
            cfg = run_config(spec, data_name, r, quick, overrides)
            for key in REFERENCES:  # "@label" -> that run's folder
                value = getattr(cfg.sample, key.split(".")[1])
                if value.startswith("@"):
                    set_option(cfg, key, str(folders[value[1:]]))
            train_cfg = training_config(cfg)
            key = train_cfg.to_toml()
            shared = key in trained
            folder = folders[r["label"]] = trained.setdefault(key, out / slug(data_name) / slug(r["label"]))
            seconds = None if shared else train_or_reuse(train_cfg, folder, progress)
            if not r.get("measure", True):
                continue
            model, _, info = load_model(folder)
            if not shared:  # one curve per trained model in the per-level loss figure
                models[r["label"]] = model
            row, data = measure_run(model, cfg, r, options, seconds)
            rows.append(row)
            print(f"compare {spec['name']}: {data_name} / {r['label']} measured", flush=True)
        results["datasets"][data_name] = rows
        figures(out, data_name, rows, models, data, spec, quick)
    results["seconds"] = time.time() - t0
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", markdown(results))
    plots.weighting_figure(out / "weighting.png")
    return results


def training_config(cfg: Config) -> Config:
    """The config a run trains with: its [sample] settings reduced to the NFE of the training sample
    grids, so runs that differ only in how they sample share one training."""
    return dataclasses.replace(cfg, sample=SampleConfig(nfe=cfg.sample.nfe))


def measure_run(model, cfg: Config, run_spec: dict, options: dict, train_seconds: float | None):
    """(row, data): every NFE of one run, sample_quality of n samples (fixed seed; class_quality too for
    labelled samples), then the likelihood. quality is keyed by the NFE asked for (0: the sampler's
    default); nfe_used is what the sampler spent, the largest count that fits (Heun's 2n - 1 cannot
    hit an even NFE)."""
    data, _, test = load_data(cfg)
    quality = {}
    for nfe in options["nfe"]:
        sample_cfg = dataclasses.replace(cfg.sample, nfe=nfe, seed=options["seed"])
        s = sample(model, options["n"], sample_cfg)
        quality[nfe] = {"sampler": s.plan.sampler, "nfe_used": s.plan.nfe, "guided_calls": s.guided,
                        "rows": sample_quality(s.x, data, labels=s.labels, seed=options["seed"])}
    lik = []
    if options["vlb_samples"]:
        lik = likelihood(model, test.x[:options["vlb_samples"]], data.levels, vlb_steps=tuple(options["vlb_steps"]),
                         pf_ode_steps=options["pf_ode_steps"], seed=options["seed"])
    row = {"label": run_spec["label"], "preset": cfg.model.preset, "parameterization": cfg.model.parameterization,
           "weighting": model.weighting, "objective": cfg.model.objective, "noise": cfg.model.noise, "steps": cfg.train.steps,
           "guidance": describe_guidance(cfg.sample), "train_seconds": train_seconds, "quality": quality, "likelihood": lik}
    return row, data


def train_cell(seconds: float | None) -> str:
    """Training seconds spent by this compare call; 'shared' where the run reuses an earlier run's model."""
    return "shared" if seconds is None else f"{seconds:.0f}"


SE = ": standard error"  # the suffix of the row evaluate.likelihood gives beside each mean


def likelihood_column(name: str) -> str:
    """A likelihood row's name without its Sigma, so runs with fixed and learned variances share a column."""
    return re.sub(r", Sigma [a-z_]+", "", name)


def primary(rows: list) -> tuple[str, float, float]:
    """The headline measure of a quality table: the first row (sliced W2 for points), or FD_digits."""
    for row in rows:
        if row[0].startswith("FD"):
            return row
    return rows[0]


def figures(out: Path, data_name: str, rows: list, models: dict, data, spec: dict, quick: bool = False) -> None:
    """quality_vs_nfe (if several NFE), bar_table of the headline measure and likelihood per run, and
    the per-noise-level training loss of every run on 256 real samples (64 and 8 levels with quick)."""
    key = slug(data_name)
    curves, floor, metric = {}, None, ""
    for r in rows:
        curve = {}
        for q in r["quality"].values():
            metric, value, floor = primary(q["rows"])
            curve[q["nfe_used"]] = value
        curves[f"{r['label']} ({next(iter(r['quality'].values()))['sampler']})"] = curve
    if any(len(c) > 1 for c in curves.values()):
        plots.quality_vs_nfe(curves, out / f"{key}_quality_vs_nfe.png", metric_name=metric, floor=floor,
                             title=f"{spec.get('title', spec['name'])}: {data_name}")
    bars = {r["label"]: {**{f"{primary(q['rows'])[0]} @ {q['nfe_used']} NFE": primary(q["rows"])[1] for q in r["quality"].values()},
                         **{likelihood_column(name): v for name, v, _ in r["likelihood"] if not name.endswith(SE)}} for r in rows}
    plots.bar_table(bars, out / f"{key}_runs.png", title=f"{spec.get('title', spec['name'])}: {data_name}")
    agreement = "label agreement (higher)"
    found = {r["label"]: {row[0]: row for row in next(iter(r["quality"].values()))["rows"]} for r in rows}
    if found and all(agreement in m for m in found.values()):  # conditional samples: fidelity vs quality
        first = next(iter(found.values()))
        y_name = primary(list(first.values()))[0]
        points = {label: (m[agreement][1], m[y_name][1]) for label, m in found.items()}
        plots.tradeoff(points, out / f"{key}_tradeoff.png", x_name=agreement, y_name=y_name,
                       floor=(first[agreement][2], first[y_name][2]), title=f"{spec.get('title', spec['name'])}: {data_name}")
    x = data.x[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64 if quick else 256]]
    plots.loss_per_noise_level_figure(models, x, out / f"{key}_loss_per_level.png", n_levels=8 if quick else 32)


def markdown(results: dict) -> str:
    """The results as Markdown: per dataset, the headline measure per run and NFE beside its noise
    floor, the likelihood, and then every measure of every run."""
    lines = [f"# compare `{results['spec']}`{' (--quick)' if results['quick'] else ''}: {results['title']}", ""]
    if results["about"]:
        lines += [results["about"].strip(), ""]
    ev = results["eval"]
    likelihood_note = f"likelihood on {ev['vlb_samples']} held-out samples; " if ev["vlb_samples"] else ""
    lines += [f"n = {ev['n']} samples per cell (seed {ev['seed']}); {likelihood_note}total {results['seconds']:.0f} s.", ""]
    for data_name, rows in results["datasets"].items():
        nfes = sorted({int(k) for r in rows for k in r["quality"]})
        metric, _, floor = primary(next(iter(rows[0]["quality"].values()))["rows"])
        lik_names = list(dict.fromkeys(likelihood_column(name) for r in rows for name, _, _ in r["likelihood"]
                                       if not name.endswith(SE)))
        lines += [f"## {data_name}", "", f"Headline: **{metric}** (noise floor, real vs real: {floor:.4g}) per NFE "
                  "('@k': the sampler spent k < NFE evaluations, e.g. Heun's 2n - 1)"
                  + ("; likelihood of held-out data (lower is better)." if lik_names else "."), ""]
        head = ["run", "preset", "param.", "objective", "sampler", "train s"] + [f"NFE {k or 'default'}" for k in nfes] + lik_names
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            q = {int(k): v for k, v in r["quality"].items()}
            sampler = next(iter(q.values()))["sampler"] + (f"; {r['guidance']}" if r.get("guidance") else "")
            objective = {"hybrid": "hybrid (learned Sigma)", "vlb": "true bound (Sigma = beta)"}.get(
                r["objective"], f"weighting {r['weighting']}") + (f", noise {r['noise']}" if r["noise"] else "")
            cells = [r["label"], r["preset"], r["parameterization"], objective, sampler, train_cell(r["train_seconds"])]
            cells += [f"{primary(q[k]['rows'])[1]:.4g}" + (f" @{q[k]['nfe_used']}" if q[k]["nfe_used"] != k else "")
                  if k in q else "-" for k in nfes]
            lik = {likelihood_column(name): v for name, v, _ in r["likelihood"]}
            cells += [(f"{lik[name]:.4g}" + (f" ± {lik[name + SE]:.2g}" if name + SE in lik else "")) if name in lik else "-"
                      for name in lik_names]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Every measure ({data_name}), model / noise floor:", ""]
        names = list(dict.fromkeys(row[0] for r in rows for q in r["quality"].values() for row in q["rows"]))
        head = ["run", "NFE"] + names
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            for q in sorted(r["quality"].values(), key=lambda q: q["nfe_used"]):
                values = {row[0]: row for row in q["rows"]}
                lines.append("| " + " | ".join([r["label"], str(q["nfe_used"])] + [
                    f"{values[n][1]:.4g} / {values[n][2]:.4g}" if n in values else "-" for n in names]) + " |")
        lines.append("")
    return "\n".join(lines)
