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
    reflow = "@flow"                  # trained by reflow of an earlier run (reflow.py): its ODE's pairs,
    reflow_pairs = 10000              #   how many, and the NFE that makes them (default 100); the
    reflow_nfe = 100                  #   run starts from that run's weights and trains on the pairs
    [run.data.digits]                 # this run's overrides on one dataset only
    [eval]                            # nfe = [...] (0: the run's sample.nfe, else its sampler's
                                      #   default), n, seed, vlb_steps, vlb_samples (the held-out
                                      #   samples of the likelihood), pf_ode_steps (K RK4 steps of
                                      #   the probability-flow ODE NLL; 0: none), pf_ode_rtol (> 0:
                                      #   that NLL by Dormand-Prince at this tolerance instead)
    [eval.digits]                     # [eval] keys for one dataset
    [quick]                           # --quick: overrides on top of all runs (reflow_pairs and
                                      #   reflow_nfe too, for the reflow runs), and [quick.eval]

Every dataset x run pair trains into OUT/<dataset>/<run> (an existing finished run with the same
config is reused, a stopped one resumed: Ctrl-C never loses work; runs that differ only in their
own [sample] settings share one training), then every NFE of the run's sampler is
measured by evaluate.sample_quality next to its noise floor (an NFE below one step of the sampler,
e.g. 10 for annealed Langevin's 100 steps per level, is left out and shown as "n/a"), and the
likelihood by evaluate.likelihood. OUT gets results.md (the tables), results.json, and the figures:
quality vs NFE per dataset, the samples of every run side by side, the per-noise-level training
loss of every run, and the loss weightings.
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
from . import reflow as rf
from .checkpoint import atomic_write_text, latest
from .evaluate import NonFiniteSamples, likelihood, sample_quality
from .config import MAX_NFE, Config, SampleConfig, apply_overrides, load_config, set_option
from .model import checkpoint_path, load_model
from .sampling import BudgetError, describe_guidance, plan, sample
from .schedules import DiscreteVP
from .train import load_data, train

EVAL_DEFAULTS = {"nfe": [0], "n": 1000, "seed": 0, "vlb_steps": [0], "vlb_samples": 100, "pf_ode_steps": 0, "pf_ode_rtol": 0.0}
REFLOW_KEYS = ("reflow_pairs", "reflow_nfe")  # also in [quick], for every reflow run
RUN_KEYS = ("label", "sampler", "measure", "data", "reflow") + REFLOW_KEYS
REFERENCES = ("sample.guide_run", "sample.classifier", "reflow")  # may name an earlier run as "@label"


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
    check_shape(spec, path)
    if not spec.get("data") or not spec.get("run"):
        raise ValueError(f"spec {path} needs at least one [data.<name>] table and one [[run]]")
    labels = [r.get("label", "") for r in spec["run"]]
    if "" in labels or len(set(labels)) != len(labels):
        raise ValueError(f"spec {path}: every [[run]] needs a label, all different; got {labels}")
    for table, keys in [("[eval]", set(spec.get("eval", {})) - set(spec["data"]))] + [
            (f"[eval.{d}]", set(spec.get("eval", {}).get(d, {}))) for d in spec["data"]]:
        if keys - set(EVAL_DEFAULTS):
            raise ValueError(f"spec {path}: unknown {table} keys {sorted(keys - set(EVAL_DEFAULTS))}; "
                             f"allowed: {', '.join(EVAL_DEFAULTS)} (and [eval.<dataset>] tables of them)")
    for where, options in [("[eval]", spec.get("eval", {})), ("[quick.eval]", spec.get("quick", {}).get("eval", {}))] + [
            (f"[eval.{d}]", spec.get("eval", {}).get(d, {})) for d in spec["data"]]:
        check_eval(options, f"spec {path} {where}")
    spec["name"] = path.stem
    for i, run in enumerate(spec["run"]):  # fail early, before any training
        extra = set(run.get("data", {})) - set(spec["data"])
        if extra:
            raise ValueError(f"spec {path}: run {run['label']!r} has [run.data] tables {sorted(extra)} for datasets "
                             f"the spec does not have; its datasets: {sorted(spec['data'])}")
        for key in REFERENCES:
            ref = str(run.get(key, ""))
            if ref and key == "reflow" and not ref.startswith("@"):
                raise ValueError(f"spec {path}: run {run['label']!r} has reflow = {ref!r}; it must name an earlier run as '@label'")
            if ref.startswith("@") and ref[1:] not in labels[:i]:
                raise ValueError(f"spec {path}: run {run['label']!r} has {key} = {ref!r}; "
                                 f"'@label' must name an earlier run, one of {labels[:i]}")
        for data_name in spec["data"]:
            run_config(spec, data_name, run, quick=True)
    return spec


RUN_TYPES = {"label": str, "sampler": str, "measure": bool, "data": dict, "reflow": str, "reflow_pairs": int, "reflow_nfe": int}


def check_shape(spec: dict, path) -> None:
    """ValueError unless the spec's tables are tables and its run keys of the right type."""
    for key in ("title", "about"):
        if not isinstance(spec.get(key, ""), str):
            raise ValueError(f"spec {path}: {key} = {spec[key]!r} must be a string")
    for key in ("base", "data", "eval", "quick"):
        if not isinstance(spec.get(key, {}), dict):
            raise ValueError(f"spec {path}: {key} = {spec[key]!r} must be a table ([{key}])")
    for name, table in spec.get("data", {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"spec {path}: data.{name} = {table!r} must be a table ([data.{name}])")
    runs = spec.get("run", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError(f"spec {path}: run = {runs!r} must be an array of tables ([[run]] blocks)")
    for r in runs:
        for key, kind in RUN_TYPES.items():
            value = r.get(key)
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise ValueError(f"spec {path}: a [[run]] has {key} = {value!r}; it must be a {kind.__name__}")
        if any(k in r for k in REFLOW_KEYS) and "reflow" not in r:
            raise ValueError(f"spec {path}: run {r.get('label')!r} has {', '.join(k for k in REFLOW_KEYS if k in r)} but no reflow = \"@label\"")
        for key in REFLOW_KEYS:
            if key in r and not 1 <= r[key] <= (10**7 if key == "reflow_pairs" else MAX_NFE):
                raise ValueError(f"spec {path}: run {r.get('label')!r} has {key} = {r[key]}; allowed: 1 .. "
                                 f"{10**7 if key == 'reflow_pairs' else MAX_NFE}")
        if not all(isinstance(t, dict) for t in r.get("data", {}).values()):
            raise ValueError(f"spec {path}: run {r.get('label')!r}: [run.data.<name>] entries must be tables")


EVAL_RANGES = {"nfe": (0, MAX_NFE), "n": (2, 100_000), "seed": (0, 2**63 - 1), "vlb_steps": (0, 100_000),
               "vlb_samples": (0, 100_000), "pf_ode_steps": (0, 100_000), "pf_ode_rtol": (0.0, 0.5)}


def check_eval(options: dict, where: str) -> None:
    """ValueError unless every [eval] value has its type (lists for nfe and vlb_steps) and range."""
    for key, value in options.items():
        if key not in EVAL_RANGES or isinstance(value, dict):
            continue  # unknown keys and [eval.<data>] tables are reported elsewhere
        listed = key in ("nfe", "vlb_steps")
        items = value if listed and isinstance(value, list) else [value]
        kind = float if key == "pf_ode_rtol" else int
        low, high = EVAL_RANGES[key]
        ok = (isinstance(value, list) == listed and items and all(
            isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool) and low <= v <= high for v in items))
        if not ok:
            shape = f"a list of integers in [{low}, {high}]" if listed else f"a{'' if kind is float else 'n integer'} number in [{low:g}, {high:g}]"
            raise ValueError(f"{where}: {key} = {value!r}; it must be {shape}")


def run_config(spec: dict, data_name: str, run: dict, quick: bool = False, overrides=(), sampling: bool = True) -> Config:
    """The config of one run: defaults < [base] < [data.<name>] < the run's overrides < its
    [run.data.<name>] ones < [quick] < `overrides` ("section.key=value" strings, e.g. from --set).
    sampling=False leaves out the run's own [sample] keys (those that do not change its training)."""
    cfg = Config()
    set_option(cfg, "data.spec", data_name)
    own = {k: v for k, v in run.items() if k not in RUN_KEYS}
    if run.get("sampler"):
        own["sample.sampler"] = run["sampler"]
    own.update(run.get("data", {}).get(data_name, {}))
    if not sampling:
        own = {k: v for k, v in own.items() if not k.startswith("sample.")}
    layers = [spec.get("base", {}), spec["data"][data_name], own]
    if quick:
        layers.append({k: v for k, v in spec.get("quick", {}).items() if k != "eval" and k not in REFLOW_KEYS})
    for layer in layers:
        for key, value in layer.items():
            set_option(cfg, key, value)
    return apply_overrides(cfg, overrides)


def eval_options(spec: dict, data_name: str, quick: bool = False) -> dict:
    """[eval] < [eval.<data_name>] < [quick.eval] (with --quick) on top of EVAL_DEFAULTS."""
    common = {k: v for k, v in spec.get("eval", {}).items() if k not in spec["data"]}
    return {**EVAL_DEFAULTS, **common, **spec.get("eval", {}).get(data_name, {}),
            **(spec.get("quick", {}).get("eval", {}) if quick else {})}


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
    out = Path(out)
    t0 = time.time()
    results = {"spec": spec["name"], "title": spec.get("title", ""), "about": spec.get("about", ""),
               "quick": quick, "eval": {}, "datasets": {}}
    for data_name in spec["data"]:
        options = results["eval"][data_name] = eval_options(spec, data_name, quick)
        rows, models, samples, trained, folders, known = [], {}, {}, {}, {}, {}  # trained: training config -> folder (shared by sampling variants)
        for r in spec["run"]:
            if quick and r.get("reflow"):
                r = {**r, **{k: v for k, v in spec.get("quick", {}).items() if k in REFLOW_KEYS}}
            cfg = run_config(spec, data_name, r, quick, overrides)
            for key in REFERENCES[:2]:  # "@label" -> that run's folder
                value = getattr(cfg.sample, key.split(".")[1])
                if value.startswith("@"):
                    set_option(cfg, key, str(folders[value[1:]]))
            train_cfg = training_config(spec, data_name, r, quick, overrides)
            own = out / slug(data_name) / slug(r["label"])
            if r.get("reflow"):  # its own training, on the pairs of another run
                folder, shared = own, False
                seconds = train_by_reflow(train_cfg, folder, folders[r["reflow"][1:]], r, progress)
            else:
                key = train_cfg.to_toml()
                shared = key in trained
                folder = trained.setdefault(key, own)
                seconds = None if shared else train_or_reuse(train_cfg, folder, progress)
            folders[r["label"]] = folder
            if not r.get("measure", True):
                continue
            model, _, info = load_model(folder)
            if not shared:  # one curve per trained model in the per-level loss figure
                models[r["label"]] = model
            row, data, samples[r["label"]] = measure_run(model, cfg, r, options, seconds, known.get(folder))
            known[folder] = row["likelihood"]  # the same model's likelihood, for the runs that share it
            rows.append(row)
            print(f"compare {spec['name']}: {data_name} / {r['label']} measured", flush=True)
        results["datasets"][data_name] = rows
        figures(out, data_name, rows, models, samples, data, spec, quick)
    results["seconds"] = time.time() - t0
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", markdown(results))
    plots.weighting_figure(out / "weighting.png")
    return results


def training_config(spec: dict, data_name: str, run: dict, quick: bool = False, overrides=()) -> Config:
    """The config a run trains with: run_config without the run's own [sample] keys, and [sample]
    reduced to the NFE of the training sample grids, so runs that differ only in how they sample
    share one training."""
    cfg = run_config(spec, data_name, run, quick, overrides, sampling=False)
    return dataclasses.replace(cfg, sample=SampleConfig(nfe=cfg.sample.nfe))


def train_by_reflow(cfg: Config, folder: Path, source: Path, run_spec: dict, progress: bool) -> float:
    """A reflow run (reflow.py): pairs of the source run's ODE (reflow_pairs, at reflow_nfe of its own
    sampler, seed 0) into `folder` unless there, then `cfg` on them from the source's weights, trained,
    resumed or reused as train_or_reuse does; returns the seconds spent on both now."""
    t0 = time.time()
    source = checkpoint_path(source)
    new = rf.reflow_config(cfg, folder, source, steps=None)
    pairs = int(run_spec.get("reflow_pairs", 10_000))
    rf.check_pairs(new, pairs)
    if not (folder / rf.PAIRS_FILE).is_file():
        model, source_cfg, _ = load_model(source)
        p = plan(model.preset, SampleConfig(sampler=source_cfg.sample.sampler, nfe=int(run_spec.get("reflow_nfe", 100))))
        rf.write_pairs(model, folder, p, pairs, 0, source)
    train_or_reuse(new, folder, progress)
    return time.time() - t0


def measure_run(model, cfg: Config, run_spec: dict, options: dict, train_seconds: float | None, lik: list | None = None):
    """(row, data, x): every NFE of one run, sample_quality of n samples (fixed seed; class_quality too
    for labelled samples), then the likelihood; x: the samples of the run's own budget (NFE 0) or its
    last NFE. quality is keyed by the NFE asked for (0: the run's sample.nfe, else the sampler's
    default); nfe_used is what the sampler spent, the largest count that fits (Heun's 2n - 1 cannot
    hit an even NFE); an NFE below one step of the sampler gets no samples, a sampler that diverges
    no measures, and either one its reason as 'skipped'. `lik`: the likelihood rows of this model
    measured already (by a run that shares its training). The VLB is computed for models trained on
    a discrete chain only (DDPM, iDDPM, ...): for a continuous-time one the bound on some chain is not
    its likelihood (its probability-flow ODE NLL is, pf_ode_steps / pf_ode_rtol)."""
    data, _, test = load_data(cfg)
    quality, shown = {}, None
    for nfe in options["nfe"]:
        sample_cfg = dataclasses.replace(cfg.sample, nfe=nfe or cfg.sample.nfe, seed=options["seed"])
        try:
            plan(model.preset, sample_cfg)
        except BudgetError as e:
            quality[nfe] = {"sampler": sample_cfg.sampler or model.preset.solver, "nfe_used": None, "skipped": str(e), "rows": []}
            continue
        s = sample(model, options["n"], sample_cfg)
        quality[nfe] = {"sampler": s.plan.sampler, "nfe_used": s.evaluations, "guided_calls": s.guided, "rows": []}
        try:
            quality[nfe]["rows"] = sample_quality(s.x, data, labels=s.labels, seed=options["seed"])
        except NonFiniteSamples as e:
            quality[nfe]["skipped"] = str(e)
            continue
        if shown is None or nfe == 0:
            shown = s.x
    if lik is None and options["vlb_samples"]:
        adaptive = options["pf_ode_rtol"] > 0
        discrete = isinstance(model.schedule, DiscreteVP)  # the bound is the likelihood of a model of that chain only
        lik = likelihood(model, test.x[:options["vlb_samples"]], data.levels, vlb_steps=tuple(options["vlb_steps"]) if discrete else (),
                         pf_ode_steps=None if adaptive else options["pf_ode_steps"],
                         pf_ode_rtol=options["pf_ode_rtol"] if adaptive else 1e-5, seed=options["seed"])
    lik = lik or []
    row = {"label": run_spec["label"], "preset": cfg.model.preset, "parameterization": cfg.model.parameterization,
           "weighting": model.weighting, "objective": cfg.model.objective, "noise": cfg.model.noise, "steps": cfg.train.steps,
           "guidance": describe_guidance(cfg.sample), "train_seconds": train_seconds, "quality": quality, "likelihood": lik}
    return row, data, shown


def train_cell(seconds: float | None) -> str:
    """Training seconds spent by this compare call; 'shared' where the run reuses an earlier run's model."""
    return "shared" if seconds is None else f"{seconds:.0f}"


SE = ": standard error"  # the suffix of the row evaluate.likelihood gives beside each mean
SOLVER = (": solver error estimate", ": solver NFE")  # and beside an adaptive PF-ODE NLL


DEFAULT_RANGE = "sigma 0.002..80"  # evaluate.ode_sigma_range where the schedule allows it


def likelihood_column(name: str) -> str:
    """A likelihood row's name without its Sigma and its ODE's sigma range, so runs with fixed and
    learned variances, or other ranges (VE's starts at 0.02), share a column."""
    return re.sub(r", Sigma [a-z_]+|, sigma [0-9.e+-]+\.\.[0-9.e+-]+", "", name)


def primary(rows: list) -> tuple[str, float, float]:
    """The headline measure of a quality table: the first row (sliced W2 for points), or FD_digits."""
    for row in rows:
        if row[0].startswith("FD"):
            return row
    return rows[0]


def measured(quality: dict) -> list:
    """The cells of a run's quality dict that were sampled (not left out as below one step)."""
    return [q for q in quality.values() if q["rows"]]


def figures(out: Path, data_name: str, rows: list, models: dict, samples: dict, data, spec: dict, quick: bool = False) -> None:
    """quality_vs_nfe (if several NFE), bar_table of the headline measure and likelihood per run, the
    samples of every run side by side (plots.samples_side_by_side), and the per-noise-level training
    loss of every run on 256 real samples (64 and 8 levels with quick)."""
    key = slug(data_name)
    title = f"{spec.get('title', spec['name'])}: {data_name}"
    curves, floor, metric = {}, None, ""
    for r in rows:
        curve = {}
        for q in measured(r["quality"]):
            metric, value, floor = primary(q["rows"])
            curve[q["nfe_used"]] = value
        curves[f"{r['label']} ({next(iter(r['quality'].values()))['sampler']})"] = curve
    if any(len(c) > 1 for c in curves.values()):
        plots.quality_vs_nfe(curves, out / f"{key}_quality_vs_nfe.png", metric_name=metric, floor=floor, title=title)
    bars = {r["label"]: {**{f"{primary(q['rows'])[0]} @ {q['nfe_used']} NFE": primary(q["rows"])[1] for q in measured(r["quality"])},
                         **{likelihood_column(name): v for name, v, _ in r["likelihood"] if not name.endswith(SE)}} for r in rows}
    plots.bar_table(bars, out / f"{key}_runs.png", title=title)
    shown = {f"{r['label']}\n{shown_cell(r['quality'])}": samples[r["label"]] for r in rows if samples.get(r["label"]) is not None}
    plots.samples_side_by_side(shown, out / f"{key}_samples.png", reference=data.x, title=title)
    agreement = "label agreement (higher)"
    found = {r["label"]: {row[0]: row for row in measured(r["quality"])[0]["rows"]} for r in rows if measured(r["quality"])}
    if found and all(agreement in m for m in found.values()):  # conditional samples: fidelity vs quality
        first = next(iter(found.values()))
        y_name = primary(list(first.values()))[0]
        points = {label: (m[agreement][1], m[y_name][1]) for label, m in found.items()}
        plots.tradeoff(points, out / f"{key}_tradeoff.png", x_name=agreement, y_name=y_name,
                       floor=(first[agreement][2], first[y_name][2]), title=title)
    x = data.x[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64 if quick else 256]]
    plots.loss_per_noise_level_figure(models, x, out / f"{key}_loss_per_level.png", n_levels=8 if quick else 32)


def likelihood_cell(lik: dict, name: str) -> str:
    """'mean ± standard error', and '(solver error e, k NFE)' for an adaptive PF-ODE NLL; '-' if not measured."""
    if name not in lik:
        return "-"
    cell = f"{lik[name]:.4g}" + (f" ± {lik[name + SE]:.2g}" if name + SE in lik else "")
    notes = [lik["range"]] if "probability-flow" in name and lik.get("range", DEFAULT_RANGE) != DEFAULT_RANGE else []
    if name + SOLVER[0] in lik:
        notes.append(f"solver error {lik[name + SOLVER[0]]:.1g}, {lik[name + SOLVER[1]]:.0f} NFE")
    return cell + (f" ({'; '.join(notes)})" if notes else "")


def skipped_cell(q: dict) -> str:
    """A quality cell with no measures: 'n/a' (NFE below one step) or 'diverged' (non-finite samples)."""
    return "diverged" if q["nfe_used"] is not None else "n/a"


def shown_cell(quality: dict) -> str:
    """'sampler, NFE k: measure value' of the samples measure_run keeps (NFE 0 if sampled, else the last)."""
    q = quality.get(0) if quality.get(0, {}).get("rows") else measured(quality)[-1]
    name, value, _ = primary(q["rows"])
    return f"{q['sampler']}, NFE {q['nfe_used']}: {name.split(' (')[0]} {value:.3g}"


def markdown(results: dict) -> str:
    """The results as Markdown: per dataset, the headline measure per run and NFE beside its noise
    floor, the likelihood, and then every measure of every run."""
    lines = [f"# compare `{results['spec']}`{' (--quick)' if results['quick'] else ''}: {results['title']}", ""]
    if results["about"]:
        lines += [results["about"].strip(), ""]
    lines += [f"Total {results['seconds']:.0f} s.", ""]
    for data_name, rows in results["datasets"].items():
        ev = results["eval"][data_name]
        likelihood_note = f"; likelihood on {ev['vlb_samples']} held-out samples" if ev["vlb_samples"] else ""
        nfes = sorted({int(k) for r in rows for k in r["quality"]}, key=lambda k: (k == 0, k))
        metric, _, floor = primary(next(q for r in rows for q in measured(r["quality"]))["rows"])
        lik_names = list(dict.fromkeys(likelihood_column(name) for r in rows for name, _, _ in r["likelihood"]
                                       if not name.endswith((SE,) + SOLVER)))
        lines += [f"## {data_name}", "", f"n = {ev['n']} samples per cell (seed {ev['seed']}){likelihood_note}.", "",
                  f"Headline: **{metric}** (noise floor, real vs real: {floor:.4g}) per NFE "
                  "('@k': the sampler spent k evaluations, e.g. Heun's 2n - 1 below an even NFE, or a run's own budget; "
                  "n/a: below one step of the sampler; diverged: non-finite samples)" + ("; likelihood of held-out data (lower is better)." if lik_names else "."), ""]
        head = ["run", "preset", "param.", "objective", "sampler", "train s"] + [f"NFE {k or 'default'}" for k in nfes] + lik_names
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            q = {int(k): v for k, v in r["quality"].items()}
            sampler = (measured(q) or list(q.values()))[0]["sampler"] + (f"; {r['guidance']}" if r.get("guidance") else "")
            objective = {"hybrid": "hybrid (learned Sigma)", "vlb": "true bound (Sigma = beta)"}.get(
                r["objective"], f"weighting {r['weighting']}") + (f", noise {r['noise']}" if r["noise"] else "")
            cells = [r["label"], r["preset"], r["parameterization"], objective, sampler, train_cell(r["train_seconds"])]
            cells += [(skipped_cell(q[k]) if not q[k]["rows"] else f"{primary(q[k]['rows'])[1]:.4g}"
                       + (f" @{q[k]['nfe_used']}" if q[k]["nfe_used"] != k else "")) if k in q else "-" for k in nfes]
            lik = {likelihood_column(name): v for name, v, _ in r["likelihood"]}
            lik["range"] = next((m.group(0) for name, _, _ in r["likelihood"]
                                 for m in [re.search(r"sigma [0-9.e+-]+\.\.[0-9.e+-]+", name)] if m), DEFAULT_RANGE)
            cells += [likelihood_cell(lik, name) for name in lik_names]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Every measure ({data_name}), model / noise floor:", ""]
        names = list(dict.fromkeys(row[0] for r in rows for q in r["quality"].values() for row in q["rows"]))
        head = ["run", "NFE"] + names
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            for q in sorted(measured(r["quality"]), key=lambda q: q["nfe_used"]):
                values = {row[0]: row for row in q["rows"]}
                lines.append("| " + " | ".join([r["label"], str(q["nfe_used"])] + [
                    f"{values[n][1]:.4g} / {values[n][2]:.4g}" if n in values else "-" for n in names]) + " |")
        lines.append("")
    return "\n".join(lines)
