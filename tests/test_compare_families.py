"""`diffspace compare families` and the spec features it needs: per-dataset run overrides
([run.data.<name>]) and eval options ([eval.<name>]), reflow runs (reflow = "@label"), an NFE below
one step left out as n/a, diverged samples reported, not measured, the samples figure, and one
likelihood per trained model. A tiny spec on the ring runs in seconds; the shipped spec's --quick run
is slow."""

import json

import numpy as np
import pytest
from conftest import non_blank_png, run_process
import torch

from diffspace import compare
from diffspace.compare import load_spec, run_config, training_config
from diffspace.config import SampleConfig, load_config
from diffspace.evaluate import NonFiniteSamples, sample_quality
from diffspace.model import load_model
from diffspace.presets import PRESETS
from diffspace.sampling import BudgetError, plan

TINY = """
title = "tiny"
[base]
"train.seed" = 0
"log.every" = 10
[data.ring8]
"data.n" = 1000
"model.hidden" = 32
"model.depth" = 1
"train.steps" = 20
"train.batch_size" = 32
"log.checkpoint_every" = 20
"log.n_samples" = 16

[[run]]
label = "flow"
"model.preset" = "rectified-flow"
"model.parameterization" = "flow"

[[run]]
label = "flow, heun at 12"
sampler = "heun"
"model.preset" = "rectified-flow"
"model.parameterization" = "flow"
[run.data.ring8]
"sample.nfe" = 12

[[run]]
label = "2-RF"
reflow = "@flow"
reflow_pairs = 120
reflow_nfe = 6
"model.preset" = "rectified-flow"
"model.parameterization" = "flow"

[[run]]
label = "NCSN"
sampler = "langevin"
"model.preset" = "ve"
"model.parameterization" = "score"
[run.data.ring8]
"sample.nfe" = 202

[eval]
nfe = [10, 0]
n = 100
vlb_steps = [10]
vlb_samples = 8
[eval.ring8]
pf_ode_rtol = 1e-3
"""




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    spec = folder / "tiny.toml"
    spec.write_text(TINY)
    out = folder / "out"
    return spec, out, compare.run(str(spec), out, progress=False)


def test_per_dataset_overrides_sharing_and_the_own_budget(tiny):
    spec, out, results = tiny
    rows = {r["label"]: r for r in results["datasets"]["ring8"]}
    assert list(rows) == ["flow", "flow, heun at 12", "2-RF", "NCSN"]
    heun = rows["flow, heun at 12"]  # its own [sample] keys only: the flow run's training, no folder of its own
    assert heun["train_seconds"] is None and not (out / "ring8" / "flow-heun-at-12").exists()
    assert heun["quality"][0]["nfe_used"] == 11 and heun["quality"][0]["sampler"] == "heun"  # NFE 0: its own 12 -> 2 * 6 - 1
    assert rows["flow"]["quality"][0]["nfe_used"] == 35
    assert heun["likelihood"] == rows["flow"]["likelihood"]  # one model, measured once
    names = [name for name, _, _ in rows["flow"]["likelihood"]]
    # a continuous-time model: its PF-ODE NLL, not a bound on some chain it was not trained on
    assert not any("VLB" in n for n in names) and any("Dormand-Prince, rtol = atol = 0.001" in n for n in names)
    assert results["eval"]["ring8"]["pf_ode_rtol"] == 1e-3


def test_an_nfe_below_one_step_is_na_not_an_error(tiny):
    _, out, results = tiny
    ncsn = {r["label"]: r for r in results["datasets"]["ring8"]}["NCSN"]
    assert ncsn["quality"][10]["rows"] == [] and "below one step" in ncsn["quality"][10]["skipped"]
    assert ncsn["quality"][0]["nfe_used"] == 201  # 2 levels x 100 steps + the final denoising step
    line = next(li for li in (out / "results.md").read_text().splitlines() if li.startswith("| NCSN |"))
    assert "| n/a |" in line and "@201" in line
    assert non_blank_png(out / "ring8_samples.png") and non_blank_png(out / "ring8_runs.png")


def test_a_reflow_run_trains_on_its_sources_pairs_from_its_weights(tiny):
    spec, out, results = tiny
    folder = out / "ring8" / "2-rf"
    with np.load(folder / "pairs.npz") as f:
        assert f["x"].shape == (120, 2) and f["eps"].shape == (120, 2)
    made = json.loads((folder / "pairs.json").read_text())
    assert made["nfe"] == 6 and made["sampler"] == "euler" and "ring8/flow/checkpoints" in made["source"]
    cfg = load_config(folder / "config.toml")
    assert cfg.data.spec == str((folder / "pairs.npz").resolve()) and "ring8/flow/checkpoints" in cfg.train.init
    assert cfg.model.coupling == "independent" and cfg.train.steps == 20
    model, _, _ = load_model(folder)  # trained on the pairs: not the source model
    source, _, _ = load_model(out / "ring8" / "flow")
    x = torch.randn(4, 2)
    assert not torch.allclose(model(x, torch.ones(4)), source(x, torch.ones(4)))
    # a second call reuses every run: no new pairs, no training
    stamp = (folder / "pairs.npz").stat().st_mtime_ns
    again = compare.run(str(spec), out, progress=False)
    rows = {r["label"]: r for r in again["datasets"]["ring8"]}
    assert rows["flow"]["train_seconds"] == 0 and rows["2-RF"]["train_seconds"] < 5
    assert (folder / "pairs.npz").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("text, words", [
    ('[data.ring8]\n[[run]]\nlabel = "a"\nreflow = "a"\n', "must name an earlier run as '@label'"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\nreflow = "@b"\n[[run]]\nlabel = "b"\n', "must name an earlier run"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[run.data.digits]\n"train.steps" = 3\n', r"\[run.data\] tables \['digits'\]"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[run.data.ring8]\n"train.stepz" = 3\n', "unknown option 'train.stepz'"),
    ('[data.ring8]\n[[run]]\nlabel = "a"\n[eval.ring8]\nnfes = [1]\n', r"unknown \[eval.ring8\] keys \['nfes'\]"),
])
def test_spec_errors_of_the_new_tables(tmp_path, text, words):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=words):
        load_spec(str(bad))


def test_the_families_spec_has_every_family_at_equal_size_and_images():
    spec = load_spec("families")
    labels = [r["label"] for r in spec["run"]]
    assert labels == ["DDPM (eps)", "EDM, Heun", "EDM, deis_pc", "NCSN, Langevin", "NCSN, PC", "energy, Heun",
                      "energy, MALA", "flow, independent", "flow, OT", "flow, 2-RF"]
    for data_name in ("ring8", "digits"):
        cfgs = {r["label"]: run_config(spec, data_name, r) for r in spec["run"]}
        nets = {(c.model.hidden, c.model.depth, c.model.base_channels, tuple(c.model.channel_mult), c.train.steps,
                 c.train.batch_size) for c in cfgs.values()}
        assert len(nets) == 1, nets  # the same network, steps and batch for every family
        runs = {r["label"]: r for r in spec["run"]}
        # the two NCSN samplers (and EDM's, energy's) share one training on each dataset
        for a, b in [("NCSN, Langevin", "NCSN, PC"), ("EDM, Heun", "EDM, deis_pc"), ("energy, Heun", "energy, MALA")]:
            assert (training_config(spec, data_name, runs[a]).to_toml() == training_config(spec, data_name, runs[b]).to_toml())
        assert cfgs["flow, OT"].model.coupling == "ot" and cfgs["flow, independent"].model.coupling == "independent"
    ring, digits = (run_config(spec, d, runs["NCSN, Langevin"]) for d in ("ring8", "digits"))
    assert (ring.model.preset, ring.sample.nfe, ring.model.parameterization) == ("ve", 0, "score")
    assert (digits.model.preset, digits.model.parameterization, digits.sample.nfe, digits.sample.options) == (
        "edm", "precond", 501, {"n_steps": 5})
    # on the digits NCSN is the EDM model's score: one training, in EDM's folder (EDM comes first)
    assert training_config(spec, "digits", runs["NCSN, PC"]).to_toml() == training_config(spec, "digits", runs["EDM, Heun"]).to_toml()
    assert compare.eval_options(spec, "ring8")["pf_ode_rtol"] == 1e-5 and compare.eval_options(spec, "digits")["pf_ode_rtol"] == 0


def test_below_one_step_is_a_budget_error_and_non_finite_samples_are_refused():
    with pytest.raises(BudgetError, match="below one step of langevin"):
        plan(PRESETS["ve"], SampleConfig(sampler="langevin", nfe=10))
    with pytest.raises(BudgetError, match="chooses its own steps"):
        plan(PRESETS["edm"], SampleConfig(sampler="adaptive", nfe=10))
    assert issubclass(BudgetError, ValueError) and issubclass(NonFiniteSamples, ValueError)  # one-line CLI errors
    from diffspace.data import load

    data = load("ring8", n=500)
    x = torch.randn(200, 2)
    x[3, 1] = float("nan")
    with pytest.raises(NonFiniteSamples, match="1 of 200 samples are not finite"):
        sample_quality(x, data)
    assert compare.skipped_cell({"nfe_used": 35}) == "diverged" and compare.skipped_cell({"nfe_used": None}) == "n/a"


def test_a_sampler_that_diverges_is_reported_not_measured(tiny):
    spec, out, _ = tiny
    model, cfg, _ = load_model(out / "ring8" / "flow")
    model.register_forward_hook(lambda m, i, o: o * float("nan"))
    options = compare.eval_options(load_spec(str(spec)), "ring8")
    row, _, shown = compare.measure_run(model, cfg, {"label": "nan"}, {**options, "vlb_samples": 0}, 1.0)
    assert shown is None and all(q["rows"] == [] and "not finite" in q["skipped"] for q in row["quality"].values())


@pytest.mark.slow
def test_families_quick_through_the_entry_point(tmp_path):
    out = tmp_path / "families"
    r = run_process("compare", "families", "--quick", "--quiet", "--out", out, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["datasets"]) == ["digits", "ring8"]
    for data_name, rows in results["datasets"].items():
        assert len(rows) == 10
        assert non_blank_png(out / f"{data_name}_samples.png")
        for row in rows:
            for q in row["quality"].values():
                assert q["rows"] or q["skipped"]
    assert (out / "digits" / "flow-2-rf" / "pairs.npz").is_file()
    digits = {r["label"]: r for r in results["datasets"]["digits"]}
    assert digits["NCSN, Langevin"]["train_seconds"] is None and not (out / "digits" / "ncsn-langevin").exists()  # EDM's model
    assert any("VLB" in n for n, _, _ in digits["DDPM (eps)"]["likelihood"])
    assert not any("VLB" in n for n, _, _ in digits["flow, OT"]["likelihood"])
