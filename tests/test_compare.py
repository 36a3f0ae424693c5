"""`diffspace compare`: both shipped specs run end to end in --quick mode through the real entry point."""

import json

import numpy as np
import pytest
from conftest import non_blank_png, run_process

from diffspace.compare import load_spec, run_config, shipped_specs




@pytest.mark.slow  # 60 s; the guidance spec below and test_fuzz's compare runs keep the path in the default suite
@pytest.mark.parametrize("name, datasets, runs, nfes", [
    ("objectives", ["digits"], ["L_simple", "L_vlb, fixed Sigma", "hybrid, learned Sigma"], [10]),
    ("design-space", ["digits", "ring8"], ["VP", "VE", "iDDPM + DDIM", "EDM", "EDM, deis_pc"], [5, 10]),
])
def test_shipped_spec_quick_through_the_entry_point(tmp_path, name, datasets, runs, nfes):
    out = tmp_path / name
    r = run_process("compare", name, "--quick", "--quiet", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["datasets"]) == datasets
    table = (out / "results.md").read_text()
    for data_name, rows in results["datasets"].items():
        assert [row["label"] for row in rows] == runs
        for row in rows:
            assert row["label"] in table
            assert sorted(int(k) for k in row["quality"]) == nfes
            used = [q["nfe_used"] for q in row["quality"].values()]
            assert used == ([5, 9] if row["label"] == "EDM" else nfes)  # Heun: 2n - 1
            for q in row["quality"].values():
                for measure, value, floor in q["rows"]:
                    assert np.isfinite(value) and np.isfinite(floor), measure
            for measure, value, _ in row["likelihood"]:
                assert np.isfinite(value), measure
        for figure in ["runs", "loss_per_level"] + (["quality_vs_nfe"] if len(nfes) > 1 else []):
            assert non_blank_png(out / f"{data_name}_{figure}.png"), figure
    assert non_blank_png(out / "weighting.png")
    if name == "objectives":  # the hybrid run is measured with its learned Sigma, the others with beta
        lik = {row["label"]: row["likelihood"][0][0] for row in results["datasets"]["digits"]}
        assert "Sigma learned" in lik["hybrid, learned Sigma"] and "Sigma beta" in lik["L_simple"]
    # a second call reuses the finished runs (no training) and writes the same tables
    r2 = run_process("compare", name, "--quick", "--quiet", "--out", out, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    again = json.loads((out / "results.json").read_text())
    shared = {"EDM, deis_pc"} if name == "design-space" else set()
    for rows in again["datasets"].values():
        assert all(row["train_seconds"] is None if row["label"] in shared else row["train_seconds"] == 0 for row in rows)
    if name == "design-space":  # the two EDM runs differ only in the sampler: one training, one folder
        assert not (out / "digits" / "edm-deis-pc").exists() and (out / "digits" / "edm").is_dir()
        rows = {row["label"]: row for row in results["datasets"]["digits"]}
        assert next(iter(rows["EDM, deis_pc"]["quality"].values()))["sampler"] == "deis_pc"
        assert rows["EDM, deis_pc"]["train_seconds"] is None and "| shared |" in table


def test_spec_errors(tmp_path):
    assert {"objectives", "design-space"} <= set(shipped_specs())
    with pytest.raises(ValueError, match="neither a shipped spec"):
        load_spec("no-such-spec")
    bad = tmp_path / "bad.toml"
    bad.write_text('[data.ring8]\n[[run]]\nlabel = "a"\n"model.stepz" = 3\n')
    with pytest.raises(ValueError, match="unknown option 'model.stepz'"):
        load_spec(str(bad))
    bad.write_text('[data.ring8]\n[[run]]\nlabel = "a"\n[[run]]\nlabel = "a"\n')
    with pytest.raises(ValueError, match="all different"):
        load_spec(str(bad))
    bad.write_text('[data.ring8]\n[[run]]\nlabel = "a"\n[eval]\nnfes = [1]\n')
    with pytest.raises(ValueError, match="unknown \\[eval\\] keys"):
        load_spec(str(bad))


def test_config_layers_apply_in_order():
    spec = load_spec("design-space")
    cfg = run_config(spec, "ring8", spec["run"][3])
    assert (cfg.data.spec, cfg.model.preset, cfg.train.steps, cfg.model.hidden) == ("ring8", "edm", 1500, 128)
    quick = run_config(spec, "ring8", spec["run"][3], quick=True)
    assert (quick.train.steps, quick.model.hidden, quick.model.preset) == (20, 32, "edm")


def test_a_run_folder_with_another_config_is_refused(tmp_path):
    from diffspace.compare import train_or_reuse

    spec = load_spec("design-space")
    cfg = run_config(spec, "ring8", spec["run"][3], quick=True)
    train_or_reuse(cfg, tmp_path / "r", progress=False)
    cfg.train.lr = 1e-4
    with pytest.raises(ValueError, match="another config"):
        train_or_reuse(cfg, tmp_path / "r", progress=False)


def test_guidance_spec_loads_and_references_an_earlier_run(tmp_path):
    spec = load_spec("guidance")
    labels = [r["label"] for r in spec["run"]]
    assert labels[0] == "weak guide" and spec["run"][0]["measure"] is False and len(labels) == 14
    auto = [r for r in spec["run"] if r.get("sample.guide_run")]
    assert len(auto) == 6 and all(r["sample.guide_run"] == "@weak guide" for r in auto)
    cfg = run_config(spec, "digits", auto[0])
    assert cfg.model.class_conditional and cfg.sample.classes == "all" and cfg.sample.guide_run == "@weak guide"
    bad = tmp_path / "bad.toml"
    bad.write_text('[data.ring8]\n[[run]]\nlabel = "a"\n"sample.guide_run" = "@b"\n[[run]]\nlabel = "b"\n')
    with pytest.raises(ValueError, match="must name an earlier run"):
        load_spec(str(bad))


def test_guidance_spec_quick_through_the_entry_point(tmp_path):
    out = tmp_path / "guidance"
    r = run_process("compare", "guidance", "--quick", "--quiet", "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["datasets"]["digits"]
    assert len(rows) == 13 and "weak guide" not in [row["label"] for row in rows]
    for row in rows:
        names = [name for name, _, _ in next(iter(row["quality"].values()))["rows"]]
        assert "label agreement (higher)" in names and any(n.startswith("FD per class") for n in names)
    assert non_blank_png(out / "digits_tradeoff.png")
    assert "autoguidance w=2" in (out / "results.md").read_text()
