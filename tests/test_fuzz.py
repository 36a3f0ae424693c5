"""Property-based fuzz of the command line, TOML configs and compare specs (issue 13): whatever the
input, `diffspace` exits 0 or 2 with at most one line on stderr, never lets an exception escape
(a traceback), and never writes a checkpoint with NaN or inf in it."""

import math
import os
import shutil
import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffspace import checkpoint as ckpt
from diffspace.cli import main
from diffspace.compare import load_spec
from diffspace.config import Config
from diffspace.samplers import OPTION_RULES

KEYS = [f"{s}.{f}" for s in Config.__dataclass_fields__ for f in type(getattr(Config(), s)).__dataclass_fields__
        if (s, f) not in (("sample", "options"), ("train", "init"), ("sample", "guide_run"), ("sample", "classifier"))]
NUMBERS = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2, 0.5, 1e-9, 1e30, 1e300]))
TEXT = st.text(string.ascii_letters + string.digits + "-_.,[] ", max_size=12)
VALUES = st.one_of(NUMBERS.map(str), TEXT, st.lists(NUMBERS, max_size=3).map(lambda v: "[" + ",".join(map(str, v)) + "]"),
                   st.sampled_from(["true", "false", "nan", "inf", "-inf", "", "auto", "cpu", "cuda", "ot", "heun", "all"]))
OVERRIDE = st.tuples(st.one_of(st.sampled_from(KEYS), TEXT), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}")
TINY = ["--data", "ring8", "--steps", "3", "--quiet", "model.hidden=8", "model.depth=1", "data.n=200",
        "train.batch_size=16", "log.n_samples=2", "sample.nfe=4", "log.checkpoint_every=2"]
# DIFFSPACE_FUZZ_EXAMPLES=500 for a longer hunt (the default keeps the suite fast)
FUZZ = settings(max_examples=int(os.environ.get("DIFFSPACE_FUZZ_EXAMPLES", 15)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _run(argv, capsys) -> int:
    """main(argv) with stderr captured from here on; argparse's own usage errors (SystemExit 2) count as exit 2."""
    capsys.readouterr()
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _assert_clean(code, capsys):
    err = capsys.readouterr().err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _assert_finite_checkpoints(run):
    for stem in ckpt.list_checkpoints(run / "checkpoints"):
        tensors, _ = ckpt.load(stem)
        assert not ckpt.non_finite(tensors), stem


@FUZZ
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3), command=st.sampled_from(["train", "train-classifier"]))
def test_train_with_random_overrides_exits_0_or_2_and_never_writes_nan(tmp_path, capsys, overrides, command):
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    code = _run([command, *TINY, "--out", str(run), *overrides], capsys)
    _assert_clean(code, capsys)
    _assert_finite_checkpoints(run)


def _toml(value):
    if isinstance(value, str):
        return '"' + value.replace("\\", "").replace('"', "") + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


TOML_VALUES = st.one_of(NUMBERS, st.booleans(), TEXT, st.lists(st.integers(-3, 70), max_size=3))
SECTIONS = st.sampled_from(["data", "model", "train", "log", "sample", "nonsense"])


@FUZZ
@given(entries=st.lists(st.tuples(SECTIONS, st.one_of(st.sampled_from([k.split(".")[1] for k in KEYS]), TEXT.filter(str.isidentifier)),
                                  TOML_VALUES), max_size=4),
       scalar_section=st.booleans())
def test_train_with_a_random_toml_config_exits_0_or_2(tmp_path, capsys, entries, scalar_section):
    lines = ["train = 5"] if scalar_section else []
    by_section = {}
    for section, key, value in entries:
        by_section.setdefault(section, {})[key] = value
    for section, values in by_section.items():
        lines += [f"[{section}]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
    config = tmp_path / "c.toml"
    config.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    code = _run(["train", str(config), *TINY, "--out", str(run)], capsys)
    _assert_clean(code, capsys)
    _assert_finite_checkpoints(run)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    return run


def cheap_or_refused(cheap: int, limit: int):
    """Integers that cost little (-2 .. cheap) or lie past the allowed `limit` (refused at once): an
    allowed but huge value (10^7 reflow pairs at NFE 10^4) would run for hours, not test anything."""
    return st.one_of(st.integers(-2, cheap), st.integers(limit + 1, 100 * limit))


SAMPLER_OPTIONS = sorted(k for k in OPTION_RULES if isinstance(k, str))
SAMPLE_FLAGS = st.lists(st.one_of(
    st.tuples(st.just("--nfe"), cheap_or_refused(200, 10**4).map(str)),
    st.tuples(st.just("--n"), st.integers(-5, 300).map(str)),
    st.tuples(st.just("--sampler"), st.sampled_from(["euler", "heun", "ddim", "pc", "langevin", "adaptive", "mala", "nope", ""])),
    st.tuples(st.just("--seed"), st.integers(-3, 10).map(str)),
    st.tuples(st.just("--class"), st.sampled_from(["3", "all", "x", ""])),
    st.tuples(st.just("--guidance"), NUMBERS.map(str)),
    st.tuples(st.just("--set"), OVERRIDE.map(lambda o: "sample." + o.split(".", 1)[-1])),
    st.tuples(st.just("--set"), st.tuples(st.sampled_from(SAMPLER_OPTIONS), VALUES).map(lambda kv: f"sample.{kv[0]}={kv[1]}")),
), max_size=3).map(lambda pairs: [x for p in pairs for x in p])


@FUZZ
@given(flags=SAMPLE_FLAGS, command=st.sampled_from(["sample", "eval"]))
def test_sample_and_eval_with_random_flags_exit_0_or_2(tiny_run, capsys, flags, command):
    if command == "eval":
        flags = [f for f in flags] + ["--nll-samples", "2", "--pf-ode-steps", "2"]
        flags = flags if "--n" in flags else flags + ["--n", "20"]
    _assert_clean(_run([command, str(tiny_run), *flags], capsys), capsys)


SPEC_VALUES = st.one_of(TOML_VALUES, st.just({}), st.dictionaries(TEXT.filter(str.isidentifier), TOML_VALUES, max_size=2))


@FUZZ
@given(spec=st.fixed_dictionaries({}, optional={
    "title": SPEC_VALUES, "base": SPEC_VALUES, "data": st.one_of(SPEC_VALUES, st.just({"ring8": {}})),
    "run": st.one_of(SPEC_VALUES, st.lists(st.dictionaries(st.sampled_from(["label", "sampler", "measure", "reflow", "reflow_nfe",
                                                                           "model.preset", "data"]), TOML_VALUES, max_size=3), max_size=3)),
    "eval": st.one_of(SPEC_VALUES, st.dictionaries(st.sampled_from(["nfe", "n", "seed", "vlb_steps", "pf_ode_rtol", "ring8"]),
                                                   TOML_VALUES, max_size=3)),
    "junk": SPEC_VALUES}))
def test_random_specs_load_or_give_one_clear_error(tmp_path, spec):
    def table(prefix, d):
        scalars = {k: v for k, v in d.items() if not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, dict) for x in v))}
        out = [f"[{prefix}]"] + [f'"{k}" = {_toml(v)}' for k, v in scalars.items()] if prefix else [f'"{k}" = {_toml(v)}' for k, v in scalars.items()]
        for k, v in d.items():
            if isinstance(v, dict):
                out += table(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for x in v:
                    out += [f"[[{k}]]"] + [f'"{a}" = {_toml(b)}' for a, b in x.items() if not isinstance(b, dict)]
        return out

    path = tmp_path / "s.toml"
    path.write_text("\n".join(table("", spec)) + "\n")
    try:
        load_spec(str(path))
    except ValueError as e:
        assert "\n" not in str(e).strip() or "TOML" in str(e)


EDIT_FLAGS = st.lists(st.one_of(
    st.tuples(st.just("--mask"), st.sampled_from(["left", "top", "center", "bogus", "m.npz"])),
    st.tuples(st.just("--strength"), NUMBERS.map(str)),
    st.tuples(st.just("--invert")),
    st.tuples(st.just("--method"), st.sampled_from(["replace", "repaint", "x"])),
    st.tuples(st.just("--jump-length"), st.integers(-2, 10**6).map(str)),
    st.tuples(st.just("--jump-n-sample"), st.integers(-2, 10**7).map(str)),
    st.tuples(st.just("--reconstruction"), NUMBERS.map(str)),
    st.tuples(st.just("--n"), st.integers(-2, 40).map(str)),
    st.tuples(st.just("--nfe"), st.integers(-2, 50).map(str)),
    st.tuples(st.just("--input"), st.sampled_from(["held-out", "ring8", "nowhere.npz", "digits"])),
), max_size=4).map(lambda pairs: [x for p in pairs for x in p])


@FUZZ
@given(flags=EDIT_FLAGS)
def test_edit_with_random_flags_exits_0_or_2(tiny_run, capsys, flags):
    flags = flags if "--input" in flags else ["--input", "held-out", *flags]
    _assert_clean(_run(["edit", str(tiny_run), *flags, "--out", str(tiny_run / "edit.png")], capsys), capsys)


@FUZZ
@given(flags=st.lists(st.one_of(
    st.tuples(st.just("--pairs"), cheap_or_refused(2_000, 10**7).map(str)),
    st.tuples(st.just("--nfe"), cheap_or_refused(50, 10**4).map(str)),
    st.tuples(st.just("--steps"), st.integers(-2, 3).map(str)),
    st.tuples(st.just("--sampler"), st.sampled_from(["euler", "heun", "ddpm", "adaptive", "x"])),
    st.tuples(OVERRIDE)), max_size=3).map(lambda pairs: [x for p in pairs for x in p]))
def test_reflow_with_random_flags_exits_0_or_2(tiny_run, tmp_path, capsys, flags):
    out = tmp_path / "reflow"
    shutil.rmtree(out, ignore_errors=True)
    if "--pairs" not in flags:
        flags = [*flags, "--pairs", "64"]
    if "--nfe" not in flags:
        flags = [*flags, "--nfe", "4"]
    _assert_clean(_run(["reflow", str(tiny_run), "--out", str(out), "--quiet", "--steps", "2", *flags], capsys), capsys)
    _assert_finite_checkpoints(out)


TINY_SPEC = """
[base]
"model.hidden" = 8
"model.depth" = 1
"data.n" = 200
"train.steps" = 3
"train.batch_size" = 16
"log.n_samples" = 2
"log.checkpoint_every" = 2
[data.ring8]
[eval]
nfe = [4]
n = 40
vlb_steps = [0]
"""
RUN_KEYS = st.sampled_from(["sampler", "model.preset", "train.lr", "sample.nfe", "sample.eta", "sample.S_churn", "measure",
                            "model.parameterization", "train.steps", "reflow", "reflow_nfe"])
PLAUSIBLE = st.sampled_from(["euler", "ddim", "vp", "v", "eps", "@r0", 1e-3, 0.5, 4, 0, -1, False, True])  # often valid


@FUZZ
@given(runs=st.lists(st.dictionaries(RUN_KEYS, st.one_of(PLAUSIBLE, PLAUSIBLE, TOML_VALUES), max_size=2), min_size=1, max_size=2),
       sets=st.one_of(st.just([]), st.just([]), st.lists(OVERRIDE, max_size=1)), nfe=st.one_of(st.just(None), st.lists(st.sampled_from([0, 2, 5, -1, 1.5]), max_size=2)))
def test_compare_with_random_runs_and_overrides_exits_0_or_2(tmp_path, capsys, runs, sets, nfe):
    """A tiny ring8 spec with random [[run]] keys, [eval] NFEs and --set overrides: compare answers
    exit 0 or 2 (one line, before training when the input is bad), never a traceback or a NaN checkpoint."""
    lines = [TINY_SPEC] + ([f"[eval.ring8]\nnfe = {_toml(nfe)}"] if nfe is not None else [])
    for i, run in enumerate(runs):
        lines += ["[[run]]", f'label = "r{i}"'] + [f'"{k}" = {_toml(v)}' for k, v in run.items()]
    spec = tmp_path / "tiny.toml"
    spec.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["compare", str(spec), "--quiet", "--out", str(out)] + [x for o in sets for x in ("--set", o)]
    code = _run(argv, capsys)
    event(f"exit {code}")
    _assert_clean(code, capsys)
    for run in out.glob("ring8/*"):
        _assert_finite_checkpoints(run)


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf", "1e9"])
def test_demo_scale_out_of_range_is_refused_before_any_work(tmp_path, capsys, scale):
    assert _run(["demo", f"--scale={scale}", "--out", str(tmp_path / "demo"), "--quiet"], capsys) == 2
    assert "--scale=" in _assert_clean(2, capsys) and not (tmp_path / "demo").exists()


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz-phema") / "run"
    assert main(["train", *TINY, "train.phema=[0.05,0.1]", "log.phema_every=1", "--out", str(run)]) == 0
    return run


@FUZZ
@given(flags=st.lists(st.one_of(
    st.tuples(st.just("--sigma-rel"), st.one_of(st.lists(NUMBERS, min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))), TEXT)),
    st.tuples(st.just("--step"), st.integers(-3, 10).map(str))), max_size=2).map(lambda pairs: [x for p in pairs for x in p]))
def test_phema_with_random_flags_exits_0_or_2(phema_run, capsys, flags):
    flags = flags if "--sigma-rel" in flags else ["--sigma-rel", "0.07", *flags]
    _assert_clean(_run(["phema", str(phema_run), *flags], capsys), capsys)
