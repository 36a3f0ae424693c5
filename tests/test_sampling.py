"""The sampling value: [sample] parsing (fields and sampler options), its TOML round trip, the plan
(per-preset solver options, NFE), and a learned-variance model under guidance."""

import pytest
import torch

from diffspace.config import Config, SampleConfig, apply_overrides, load_config
from diffspace.model import Diffusion
from diffspace.nn import MLP
from diffspace.presets import PRESETS, get_preset
from diffspace.samplers import SAMPLERS, sampler_nfe
from diffspace.sampling import plan, sample
from diffspace.schedules import VPSDE, SqrtVE

from conftest import perturb_


def test_sample_section_fields_and_sampler_options_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["sample.sampler=ddim", "sample.eta=0.5", "sample.classes=1,3",
                                     "sample.guidance_interval=0.3,5", "sample.S_churn=40", "sample.flag=true",
                                     "sample.predictor=euler"])
    s = cfg.sample
    assert (s.sampler, s.classes, s.guidance_interval) == ("ddim", "1,3", [0.3, 5])
    assert s.options == {"eta": 0.5, "S_churn": 40, "flag": True, "predictor": "euler"}
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert "eta = 0.5" in path.read_text() and "options" not in path.read_text()
    assert load_config(path).to_dict() == cfg.to_dict()
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # the nested form of to_dict too


def test_plan_uses_the_presets_solver_options_and_counts_nfe():
    vp, ve, edm = (plan(get_preset(n), SampleConfig()) for n in ("vp", "ve", "edm"))
    assert vp.sampler == "euler" and isinstance(vp.options["schedule"], VPSDE) and vp.nfe == 35
    assert isinstance(ve.options["schedule"], SqrtVE)
    assert edm.sampler == "heun" and edm.options == {} and edm.nfe == 35 and len(edm.sigmas) == 19
    ddpm = plan(get_preset("ddpm"), SampleConfig())
    assert ddpm.sampler == "ddpm" and ddpm.nfe == 1000
    dpm = plan(get_preset("vp"), SampleConfig(sampler="dpmpp_2m", nfe=10))
    assert dpm.options == {} and dpm.nfe == 10  # the VP column's own-time option is Euler's and Heun's only
    for name in [n for n in SAMPLERS if n != "adaptive"]:  # every sampler plans within its NFE (adaptive: test_adaptive.py)
        p = plan(get_preset("edm"), SampleConfig(sampler=name, nfe=12, options={"n_steps": 2} if name in ("langevin", "mala") else {}))
        assert p.nfe == sampler_nfe(name, len(p.sigmas) - 1, **p.options) and p.nfe <= 12


def test_plan_gives_langevin_and_pc_their_papers_budgets():
    """Annealed Langevin at 35 NFE would be one noise level at sigma_max (the NCSN failure of issue
    12: samples spread over +-40); by default it gets NCSN's 10 levels x 100 steps, pc score_sde's
    N = 1000 predictor steps."""
    ve = get_preset("ve")
    langevin = plan(ve, SampleConfig(sampler="langevin"))
    assert langevin.nfe == 1001 and len(langevin.sigmas) == 11 and float(langevin.sigmas[-2]) == pytest.approx(0.02)
    pc = plan(ve, SampleConfig(sampler="pc"))
    assert pc.nfe == 1999 and len(pc.sigmas) == 1001
    few = plan(ve, SampleConfig(sampler="langevin", nfe=501, options={"n_steps": 5}))
    assert len(few.sigmas) == 101 and few.nfe == 501


@pytest.mark.parametrize("settings, message", [
    (dict(sampler="nope"), "sample.sampler='nope'"),
    (dict(nfe=-1), "sample.nfe=-1"),
    (dict(sampler="langevin", nfe=35), "sample.nfe=35 is below one step of langevin"),
    (dict(sampler="heun", options={"eta": 1.0}), "unknown option"),
])
def test_plan_errors(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan(get_preset("edm"), SampleConfig(**settings))


def test_learned_variance_samples_under_guidance():
    """iDDPM's hybrid model: ddpm uses its learned Sigma, with classifier-free guidance too; w = 1 is
    the unguided conditional run to the bit."""
    net = perturb_(MLP(2, hidden=16, depth=1, num_classes=3, out_dim=4))
    model = Diffusion(net, get_preset("ddpm"), "eps", objective="hybrid", shape=(2,), num_classes=3).eval()
    plain = sample(model, 12, SampleConfig(classes="all", nfe=8, seed=1))
    same = sample(model, 12, SampleConfig(classes="all", nfe=8, seed=1, guidance=1.0))
    guided = sample(model, 12, SampleConfig(classes="all", nfe=8, seed=1, guidance=3.0))
    fixed = sample(model, 12, SampleConfig(classes="all", nfe=8, seed=1, options={"variance": "beta"}))
    assert torch.equal(plain.x, same.x) and torch.isfinite(guided.x).all()
    assert not torch.allclose(plain.x, guided.x) and not torch.allclose(plain.x, fixed.x)
    assert guided.guided == guided.evaluations == 8


def test_every_preset_samples_its_default_plan():
    for name, preset in PRESETS.items():
        model = Diffusion(perturb_(MLP(2, hidden=8, depth=1)), preset, shape=(2,)).eval()
        s = sample(model, 5, SampleConfig(nfe=3))
        assert s.x.shape == (5, 2) and torch.isfinite(s.x).all() and s.labels is None, name


def test_sample_reports_and_stores_the_steps_and_nfe_it_spent(tmp_path, capsys):
    """--nfe 10 with Heun (2 per step, 1 on the step to 0) spends 9: said on stdout and kept in the .npz."""
    import numpy as np

    from diffspace.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "ring8", "--steps", "3", "--quiet", "model.hidden=8", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--sampler", "heun", "--nfe", "10", "-n", "4", "--out", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "sampler heun, 5 steps, NFE 9" in out and "--nfe 10 cannot be met exactly" in out
    assert "--sampler deis_pc is the more accurate solver" in out  # few steps of heun: the better one is named
    saved = np.load(tmp_path / "h.npz")
    assert (str(saved["sampler"]), int(saved["steps"]), int(saved["nfe"])) == ("heun", 5, 9)
    assert main(["sample", str(run), "--sampler", "euler", "--nfe", "10", "-n", "4", "--out", str(tmp_path / "e.png")]) == 0
    assert "cannot be met" not in capsys.readouterr().out
    assert main(["sample", str(run), "--sampler", "deis_pc", "--nfe", "10", "-n", "4", "--out", str(tmp_path / "d.png")]) == 0
    assert "note:" not in capsys.readouterr().out
