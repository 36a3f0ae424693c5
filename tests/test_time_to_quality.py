"""benchmarks/time_to_quality.py's verdict on issue 16's bar, from made-up results whose verdict is
worked out by hand here: which peer learning rate is "the peer", at which budget a recipe reaches its
final excess, the ratios of excesses (to the peer, and to the peer's best rate at each budget), and
that an excess the sampling error cannot tell from zero gives no ratio."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("time_to_quality", Path(__file__).parents[1] / "benchmarks" / "time_to_quality.py")
ttq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ttq)


def write_run(out: Path, label: str, excess: dict, se: float = 0.1) -> None:
    """A result file as run_all writes it, with the given paired excess per budget."""
    row = lambda fd: [fd, "heun", 35, 0.8, 0.7, 0.9]
    budgets = {str(b): {"seconds": float(b), "10": row(e + 4), "20": row(e + 3), "35": row(e + 2.5), "ema": 0.1,
                        "paired": ["heun", 35], "excess": e, "excess_se": se, "excess_all": e} for b, e in excess.items()}
    (out / f"{label}-seed0.json").write_text(json.dumps(
        {"label": label, "seed": 0, "params": 400_000, "floor": 2.5, "floors": [2.4, 2.6], "c": 1125.0, "n": 898, "batch": 128,
         "threads": 1, "budgets": budgets}))


def verdict(capsys, label: str) -> str:
    """The recipe's line under each of the two measures (given the same excesses here): they must agree."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(label + ":")]
    assert len(lines) == 2 and lines[0] == lines[1]
    return lines[0]


def test_the_bar_is_judged_against_the_peer_and_its_best_rate_at_each_budget(tmp_path, capsys):
    write_run(tmp_path, "diffusers@1e-3", {100: 4.0, 200: 2.0})  # the peer: lowest excess at the last budget
    write_run(tmp_path, "diffusers@3e-3", {100: 3.0, 200: 2.5})  # the better rate at the first budget
    write_run(tmp_path, "edm-u", {100: 1.5, 200: 0.9})  # 1.5 / 4.0, 0.9 / 2.0; 1.5 / 3.0, 0.9 / 2.0
    ttq.report(tmp_path)
    line = verdict(capsys, "edm-u")
    assert "reaches the peer's 2.00 at 12,800 images (0.50x) [PASS" in line
    assert "the peer's: 0.38, 0.45;" in line and "each budget: 0.50, 0.45 [PASS" in line


def test_a_recipe_good_against_one_rate_fails_against_the_best_rate_at_that_budget(tmp_path, capsys):
    write_run(tmp_path, "diffusers@1e-3", {100: 4.0, 200: 2.0})
    write_run(tmp_path, "diffusers@3e-3", {100: 2.0, 200: 2.5})
    write_run(tmp_path, "edm", {100: 2.2, 200: 1.0})  # 0.55x the peer at 100, but 1.10x its best rate there
    ttq.report(tmp_path)
    line = verdict(capsys, "edm")
    assert "the peer's: 0.55, 0.50;" in line and "each budget: 1.10, 0.50 [FAIL" in line
    assert "(0.50x) [PASS" not in line and "at 25,600 images (1.00x) [FAIL" in line


def test_an_unresolved_peer_excess_gives_no_ratio(tmp_path, capsys):
    write_run(tmp_path, "diffusers@1e-3", {100: 4.0, 200: 0.15})  # 0.15 < 2 x its sampling error 0.1
    write_run(tmp_path, "edm", {100: 2.0, 200: 0.5})
    ttq.report(tmp_path)
    line = verdict(capsys, "edm")
    assert "the peer's: 0.50, -;" in line and "[PASS <= 0.6x" in line
    assert "reaches the floor at none of the budgets [FAIL" in line  # the peer is at it; edm's 0.5 is 5 errors above


def test_reaching_a_peer_at_the_floor_means_reaching_the_floor(tmp_path, capsys):
    write_run(tmp_path, "diffusers@1e-3", {100: 4.0, 200: 1.0, 400: -0.4})  # below the floor at the end
    write_run(tmp_path, "edm-u", {100: 2.0, 200: 0.15, 400: -0.5})  # within 2 errors (0.2) of 0 at 200
    ttq.report(tmp_path)
    line = verdict(capsys, "edm-u")
    assert "reaches the floor at 25,600 images (0.50x) [PASS" in line and "the peer's: 0.50, 0.15, -;" in line


def test_held_out_share_tells_copies_of_the_training_digits_from_fresh_ones():
    """Copies of training digits are nearest a training digit (share 0), copies of held-out ones
    a held-out one (share 1); a mix of 30 held-out and 70 training copies gives 0.30."""
    import torch

    from diffspace.data import Dataset

    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(200, 1, 8, 8, generator=g), torch.rand(50, 1, 8, 8, generator=g)
    noisy = lambda x: x + 1e-3 * torch.randn(x.shape, generator=g)
    sets = Dataset(train, name="train", kind="images"), Dataset(test, name="test", kind="images")
    assert ttq.held_out_share(noisy(train[:100]), *sets) == 0.0
    assert ttq.held_out_share(noisy(test), *sets) == 1.0
    assert abs(ttq.held_out_share(noisy(torch.cat([test[:30], train[:70]])), *sets) - 0.30) < 1e-12


def test_recipe_names_carry_a_rate_and_autoguidance():
    label, overrides, samplers, autoguided = ttq.recipe("diffusers@1e-3+ag")
    assert (label, overrides["train.lr"], overrides["model.network"], autoguided) == ("diffusers@1e-3+ag", 1e-3, "diffusers", True)
    assert samplers == ttq.PEER_SAMPLERS
    _, overrides, samplers, autoguided = ttq.recipe("edm-u")
    assert overrides["model.uncertainty"] and overrides["train.lr"] == 2e-3 and not autoguided and samplers == ttq.EDM_SAMPLERS
    for bad in ("edm-u+agx", "edm-u+ag@1e-3", "nope", "edm-u++ag"):
        try:
            ttq.recipe(bad)
        except SystemExit as e:
            assert repr(bad) in str(e) and "allowed" in str(e)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_every_benchmark_sampler_runs_within_each_budget_of_evaluations():
    """Each recipe's samplers with the benchmark's options (edm_sde's churn) on its preset: a plan at
    every NFE column that spends at most that many evaluations, counted while sampling a toy denoiser,
    and the churn really adds noise (two seeds differ where the deterministic heun would not)."""
    import torch

    from diffspace.config import SampleConfig
    from diffspace.presets import get_preset
    from diffspace.sampling import plan
    from diffspace.samplers import SAMPLERS

    for preset, samplers in (("edm", ttq.EDM_SAMPLERS), ("ddpm", ttq.PEER_SAMPLERS)):
        for name in samplers:
            for nfe in ttq.NFES:
                p = plan(get_preset(preset), SampleConfig(sampler=name, nfe=nfe, options=ttq.SAMPLER_OPTIONS.get(name, {})))
                calls = []
                denoiser = lambda x, s: calls.append(1) or 0.5 * x / (1 + s.reshape(-1, 1) ** 2)  # noqa: E731
                x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * float(p.sigmas[0])
                SAMPLERS[p.sampler](denoiser, x, p.sigmas, generator=torch.Generator().manual_seed(1), **dict(p.options))
                assert 0 < len(calls) <= nfe, (preset, name, nfe, len(calls))
    p = plan(get_preset("edm"), SampleConfig(sampler="edm_sde", nfe=35, options=ttq.SAMPLER_OPTIONS["edm_sde"]))
    x = torch.ones(4, 2) * float(p.sigmas[0])
    a, b = (SAMPLERS["edm_sde"](lambda y, s: y / (1 + s.reshape(-1, 1) ** 2), x, p.sigmas, generator=torch.Generator().manual_seed(k), **dict(p.options))
            for k in (1, 2))
    assert not torch.allclose(a, b)
