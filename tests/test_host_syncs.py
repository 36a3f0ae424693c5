"""The GPU path's host-device synchronisations, checked without a GPU (issue 14).

On a GPU the host queues kernels ahead of the device; a read-back (`.item()`, `bool(t)`, `.tolist()`)
or a copy from ordinary host memory to the device waits until everything queued has run, so the
device idles while the host launches what comes next. A training step and a sampler step should
have none. Here the model runs on PyTorch's `meta` device (shapes only, no data) under a dispatch
mode that records every read-back of a device tensor and every copy onto the device: the same
calls a GPU would see. (Tensors built from Python data with a device, `torch.tensor([...],
device=d)`, copy below the dispatcher; they are caught by wrapping torch.tensor / torch.as_tensor.)
The whole training loop, which the meta device cannot run, is measured on the CPU by counting
diffspace's read-backs per step.
"""

import collections
import json
import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffspace import checkpoint as ckpt
from diffspace import guidance, precond, sampling, schedules
from diffspace.cli import main
from diffspace.config import Config, SampleConfig, set_option
from diffspace.model import build_model
from diffspace.presets import PRESETS
from diffspace.samplers import SAMPLERS
from diffspace.sampling import plan
from diffspace.schedules import checking, on_device, unchecked


def _frames():
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _site() -> str:
    """file:line of the innermost diffspace frame on the stack."""
    return next((f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}" for f in _frames()
                 if "/diffspace/" in f.f_code.co_filename), "torch")


class DeviceTraffic(TorchDispatchMode):
    """Records, by diffspace's source line, each read-back of a meta tensor and each copy onto meta,
    and each op that meets a host tensor (not a 0-dim scalar) with a meta one: the meta device lets a
    CPU table be indexed with its indices, where a GPU raises."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.seen[f"read-back at {_site()}"] += 1
            return 0  # a meta tensor has no value; any number lets the code go on
        if func is torch.ops.aten._to_copy.default and args[0].device.type != "meta" \
                and torch.device(kwargs.get("device") or args[0].device).type == "meta":
            self.seen[f"copy to the device at {_site()}"] += 1
        if func is torch.ops.aten.copy_.default and args[0].device.type == "meta" and args[1].device.type != "meta":
            self.seen[f"copy to the device at {_site()}"] += 1
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(a.device.type == "meta" for a in flat) and any(a.device.type == "cpu" and a.dim() > 0 for a in flat) \
                and func not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            self.seen[f"host tensor meets a device tensor in {func} at {_site()}"] += 1
        return func(*args, **kwargs)


@pytest.fixture
def traffic(monkeypatch):
    """A DeviceTraffic to enter, with torch.tensor / torch.as_tensor of host data onto meta recorded too."""
    mode = DeviceTraffic()
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def wrapped(data, *args, _original=original, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "meta" and not (
                    isinstance(data, torch.Tensor) and data.device.type == "meta"):
                mode.seen[f"torch.{_original.__name__} of host data to the device at {_site()}"] += 1
            return _original(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, wrapped)
    return mode


IMAGES, POINTS = (1, 8, 8), (2,)  # a U-Net of base 8, or an MLP (quicker on meta: for what is not the network)


def _model(preset: str, shape=POINTS, **options):
    cfg = Config()
    for key, value in {"model.preset": preset, "model.base_channels": 8, "model.hidden": 16, **options}.items():
        set_option(cfg, key, value)
    return build_model(cfg.model, shape, 10, 256).to("meta")


def _training_step(model, labels=None, augment_labels=None):
    """What train.py runs per step on the device: the draw, the loss, the backward pass."""
    x = torch.randn(4, *model.shape, device="meta")
    with unchecked():
        draw = model.draw(x, None)
        loss = model.loss(x, labels, t=draw.t, eps=draw.eps, augment_labels=augment_labels)
        loss.mean().backward()
        model.observe(draw.t, loss)  # the importance sampler's history


MODELS = [(p, {}) for p in PRESETS] + [
    ("ddpm", {"model.objective": "vlb"}), ("ddpm", {"model.objective": "hybrid"}),
    ("ddpm", {"model.weighting": "vlb"}), ("ddpm", {"model.weighting": "min-snr"}),
    ("edm", {"model.uncertainty": "true"}), ("edm", {"model.class_conditional": "true"}),
    ("iddpm", {"model.noise": "iddpm"}), ("vp", {"model.noise": "logit-normal"}),
    ("ddpm", {"model.objective": "vlb", "model.noise": "importance"}),
    ("edm", {"shape": IMAGES}), ("edm", {"shape": IMAGES, "model.network": "mp"}),
    ("edm", {"shape": IMAGES, "model.augment": 0.5}), ("ddpm", {"shape": IMAGES, "model.dropout": 0.1}),
] + [("vp", {"model.parameterization": p}) for p in ("x0", "eps", "score", "energy", "v", "flow")]


@pytest.mark.parametrize("preset,options", MODELS, ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_a_training_step_reads_nothing_back_and_copies_nothing_to_the_device(preset, options, traffic):
    model = _model(preset, **options)
    labels = torch.zeros(4, dtype=torch.long, device="meta") if options.get("model.class_conditional") else None
    augment_labels = torch.zeros(4, 6, device="meta") if options.get("model.augment") else None
    _training_step(model, labels, augment_labels)  # the first step copies the constant tables once (on_device)
    with traffic:
        _training_step(model, labels, augment_labels)
    assert traffic.seen == {}


def test_the_check_finds_the_syncs_that_the_value_checks_make(traffic):
    """The test above can fail: the same step with the value checks on (outside `unchecked`) reads
    t and sigma back, and a table copied at each call (the DDPM chain's, before on_device) is seen."""
    model = _model("ddpm")
    x = torch.randn(4, *model.shape, device="meta")
    with traffic:
        draw = model.draw(x, None)
        model.loss(x, None, t=draw.t, eps=draw.eps)
        model.schedule.log_alpha_bars.to("meta")
        torch.tensor([0.0, 1.0], device="meta")
        model.schedule.log_alpha_bars[torch.zeros(2, dtype=torch.long, device="meta")]  # a GPU would refuse it
    kinds = {key.split(" at ")[0].split(" in ")[0] for key in traffic.seen}
    assert kinds == {"read-back", "copy to the device", "torch.tensor of host data to the device",
                     "host tensor meets a device tensor"}, traffic.seen


@pytest.mark.parametrize("preset", ["edm", "ddpm", "ztsnr", "rectified-flow"])
def test_every_sampler_step_reads_nothing_back_and_copies_nothing_to_the_device(preset, traffic):
    model = _model(preset)
    for name in SAMPLERS:
        if name in ("mala", "adaptive", "langevin"):  # Metropolis tests, error control, a chain: they decide on values
            continue
        p = plan(model.preset, SampleConfig(sampler=name, nfe=6))
        x = torch.randn(2, *model.shape, device="meta")
        with torch.no_grad(), unchecked():  # as sampling.sample runs them, after checking the grid
            SAMPLERS[name](model, x, p.sigmas, **p.options)  # warm: constant tables copied once
            with traffic:
                SAMPLERS[name](model, x, p.sigmas, **p.options)
        assert traffic.seen == {}, name


def test_guided_sampler_steps_read_nothing_back_without_an_interval(traffic):
    """CFG and autoguidance over the whole range of sigma (their default); with a set interval a
    batch must be read back to know whether the guide is needed (one read-back per call)."""
    model = _model("edm", **{"model.class_conditional": "true"})
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    p = plan(model.preset, SampleConfig(sampler="heun", nfe=5))
    x = torch.randn(2, *model.shape, device="meta")
    for D in (guidance.classifier_free(model, labels, 10, 2.0), guidance.autoguidance(lambda x, s: model(x, s, labels), model, 2.0)):
        with torch.no_grad(), unchecked():
            SAMPLERS["heun"](D, x, p.sigmas)
            with traffic:
                SAMPLERS["heun"](D, x, p.sigmas)
        assert traffic.seen == {} and D.guided == 2 * 5


@pytest.mark.parametrize("preset,options", [("ddpm", {}), ("edm", {}), ("ddpm", {"model.objective": "hybrid"})])
def test_the_bound_of_eval_has_no_traffic_per_step_of_its_chain(preset, options):
    """evaluate.model_vlb over 10 and over 20 steps of the chain: the same traffic (its prior term's
    two coefficients copied once), none per step. (Before: a table copied and about 9 read-backs per
    step, and the fixed variance indexed on the CPU with the device's step indices.)"""
    from diffspace.evaluate import model_vlb, vlb_chain

    model = _model(preset, **options)
    variance = model.denoise_with_variance if options else "beta"
    seen = []
    for steps in (10, 20):
        x, chain = torch.randn(4, *model.shape, device="meta"), vlb_chain(model, steps)
        with torch.no_grad(), DeviceTraffic():
            model_vlb(model, x, chain, variance=variance)  # warm: the chain's tables copied once
        mode = DeviceTraffic()
        with torch.no_grad(), mode:
            model_vlb(model, x, chain, variance=variance)
        seen.append(mode.seen)
    assert seen[0] == seen[1] and sum(seen[1].values()) <= 2 and not any(k.startswith("read") for k in seen[1])


def test_sample_runs_the_sampler_unchecked_and_checks_again_after(monkeypatch):
    states = []
    original = SAMPLERS["euler"]
    monkeypatch.setitem(SAMPLERS, "euler", lambda *a, **k: (states.append(checking()), original(*a, **k))[1])
    cfg = Config()
    set_option(cfg, "model.base_channels", 8)
    model = build_model(cfg.model, (1, 8, 8))
    sampling.sample(model, 2, SampleConfig(sampler="euler", nfe=3))
    assert states == [False] and checking()


def test_unchecked_skips_the_checks_only_inside_and_changes_no_value():
    sigma = torch.tensor([0.002, 0.5, 80.0, float("inf")], dtype=torch.float64)
    ztsnr = PRESETS["ztsnr"].precond
    checked = ztsnr(sigma)
    with pytest.raises(ValueError, match="noise level must be >= 0"):
        schedules.check_sigma(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="outside the time domain"):
        PRESETS["vp"].schedule.alpha(torch.tensor([1.5]))
    with pytest.raises(RuntimeError), unchecked():
        schedules.check_sigma(torch.tensor([-1.0]))  # not refused in here
        PRESETS["vp"].schedule.alpha(torch.tensor([1.5]))
        raise RuntimeError("leaving by an exception")
    assert checking()  # restored after the exception
    finite = sigma[:3].float()
    others = {name: PRESETS[name].precond(finite) for name in ("edm", "vp", "ve", "iddpm", "ddpm")}
    with unchecked():
        assert not checking()
        inside = ztsnr(sigma)  # the limits at sigma = inf applied without reading at_inf back
        for name, coefficients in others.items():
            assert all(torch.equal(a, b) for a, b in zip(PRESETS[name].precond(finite), coefficients)), name
    assert all(torch.equal(a, b) for a, b in zip(inside, checked))
    with pytest.raises(ValueError, match="sigma=-1 is invalid"):  # a number: checked before it is filled in
        precond.per_sample(-1.0, torch.zeros(2, 1))


@pytest.mark.parametrize("preset,noise", [("vp", "iddpm"), ("ve", "vp"), ("ve", "edm"), ("ve", "iddpm"), ("ddpm", "iddpm")])
def test_a_noise_law_the_schedule_cannot_reach_is_refused_where_the_model_is_built(preset, noise):
    """The training step no longer checks its t (it clamps): the check moved to the model's construction,
    where the law's support (an unbounded law's 1e-6 quantiles) must map into the schedule's time."""
    with pytest.raises(ValueError, match=f"is outside the range of the {PRESETS[preset].training_schedule.name} schedule"):
        _model(preset, **{"model.noise": noise})


def test_noise_laws_the_schedule_reaches_build_and_their_supports_are_right():
    from diffspace.losses import IDDPMNoise, LogNormal, LogUniform, VPNoise

    for preset, noise in [("vp", "edm"), ("ddpm", "edm"), ("edm", "ve"), ("iddpm", "iddpm"), ("rectified-flow", "edm")]:
        _model(preset, **{"model.noise": noise})
    assert LogUniform(0.02, 100).support() == (0.02, 100)
    lo, hi = LogNormal(-1.2, 1.2).support()  # exp(-1.2 -+ 4.7534 * 1.2): the normal's 1e-6 quantile, scipy-free
    assert lo == pytest.approx(math.exp(-1.2 - 4.753424 * 1.2), rel=1e-6) and hi == pytest.approx(math.exp(-1.2 + 4.753424 * 1.2), rel=1e-6)
    u = IDDPMNoise().u
    assert IDDPMNoise().support() == (float(u[999]), float(u[0])) and u[1000] == 0 and float(u[999]) > 0
    assert VPNoise().support() == pytest.approx((math.sqrt(math.exp(0.5 * 19.9e-10 + 0.1e-5) - 1), math.sqrt(math.exp(19.9 / 2 + 0.1) - 1)))


def test_on_device_copies_a_table_once_per_device_and_dtype():
    schedule = PRESETS["ddpm"].schedule
    a = on_device(schedule, "log_alpha_bars", torch.device("meta"))
    assert on_device(schedule, "log_alpha_bars", "meta") is a and a.device.type == "meta" and a.dtype == torch.float64
    b = on_device(schedule, "log_alpha_bars", torch.device("cpu"), torch.float32)
    assert b is not a and b.dtype == torch.float32 and torch.equal(b, schedule.log_alpha_bars.float())
    assert "_device_copies" not in repr(PRESETS["iddpm"].precond)


# -- the whole loop, on the CPU: read-backs per step ----------------------------------------------------
class ReadBacks(TorchDispatchMode):
    """diffspace's read-backs of tensor values (the optimizer's own step counters left out: CPU
    tensors, or on a GPU device tensors that fused AdamW never reads back)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not any(
                "/torch/optim/" in f.f_code.co_filename for f in _frames()):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _read_backs(monkeypatch, tmp_path, steps: int, options: list[str]) -> int:
    mode = ReadBacks()
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (setattr(mode, "count", mode.count + 1), original(self))[1])
    with mode:
        assert main(["train", "--out", str(tmp_path / f"r{steps}"), "--quiet", "--steps", str(steps), "log.every=10",
                     "log.n_samples=4", "train.warmup=0", *options]) == 0
    return mode.count


@pytest.mark.parametrize("options", [
    ["--data", "ring8", "model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=32"],
    ["--data", "digits", "model.base_channels=8", "model.class_conditional=true", "model.augment=0.5",
     "model.uncertainty=true", "train.batch_size=32"],
    ["--data", "ring8", "--preset", "ddpm", "model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=32",
     "model.objective=hybrid", "sample.nfe=10"],
], ids=["ring8-mlp", "digits-edm-labels-augment-u", "ring8-ddpm-hybrid"])
def test_the_training_loop_reads_back_once_per_log_row_not_per_step(monkeypatch, tmp_path, options):
    """20 more steps (2 more log rows, at steps 30 and 40) cost 2 more read-backs: the loss and
    gradient norm of the window, in one transfer (train.LossWindow). Before, each step read back
    the loss, its finiteness and some 16 value checks."""
    assert _read_backs(monkeypatch, tmp_path, 40, options) - _read_backs(monkeypatch, tmp_path, 20, options) == 2


# -- train.LossWindow: what the loop reads back late ----------------------------------------------------
RING = ["--data", "ring8", "model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=32", "log.n_samples=4",
        "train.warmup=0", "--quiet"]


def test_a_long_log_window_logs_the_mean_of_its_steps(tmp_path):
    """One row over 300 steps (the window kept as one tensor past 256) against 300 rows of one step each."""
    assert main(["train", "--out", str(tmp_path / "every"), "--steps", "300", "log.every=1", *RING]) == 0
    assert main(["train", "--out", str(tmp_path / "once"), "--steps", "300", "log.every=300", *RING]) == 0
    rows = lambda run: [float(line.split(",")[1]) for line in (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]]
    every, once = rows("every"), rows("once")
    assert len(every) == 300 and len(once) == 1
    assert once[0] == pytest.approx(sum(every) / 300, rel=1e-5)  # the rows hold 6 significant digits


def test_a_divergence_deep_in_a_long_window_names_its_step_and_saves_nothing_after_it(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--steps", "20", "log.checkpoint_every=10", *RING]) == 0
    capsys.readouterr()
    # resumed to step 300 with lr 1e30 from step 21, nothing read back before step 300
    last = ckpt.latest(out / "checkpoints")
    state = json.loads(last.with_suffix(".json").read_text())
    state["config"]["train"].update(lr=1e30, steps=300)
    state["config"]["log"].update(every=1000, checkpoint_every=1000)
    last.with_suffix(".json").write_text(json.dumps(state))
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step 22: the loss is nan" in err and "the last checkpoint (step 20) is kept" in err
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["ckpt-00000010", "ckpt-00000020"]


def test_the_ema_update_is_a_few_multi_tensor_calls_whatever_the_number_of_tensors():
    """On a GPU a call per parameter tensor is a kernel launch each (hundreds per step for a U-Net,
    three times with two post-hoc EMA trackers); the update is one foreach lerp and one foreach copy."""
    from diffspace.train import ema_update

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    seen = []
    for blocks in (1, 3):
        model = _model("ddpm", IMAGES, **{"model.num_blocks": blocks, "model.noise": "importance"})  # buffers too
        ema = _model("ddpm", IMAGES, **{"model.num_blocks": blocks, "model.noise": "importance"}).requires_grad_(False)
        with Ops() as ops:
            ema_update(ema, model, 0.999)
        seen.append((len(list(model.parameters())), dict(ops.calls)))
    (few, calls_few), (many, calls_many) = seen
    assert many > few + 20 and calls_few == calls_many
    assert sum(calls_many.values()) <= 4, calls_many


def test_control_and_the_deciding_samplers_meet_no_host_tensor_on_the_device():
    """Inpainting (replacement, RePaint, reconstruction guidance, SMC), SDEdit, DDIM inversion, guidance
    with an interval, x0 clipping, the adaptive and Langevin samplers: they may read values back (they
    decide on them), but a host table met with device tensors would be an error on a GPU."""
    from diffspace import edit

    model = _model("edm", **{"model.class_conditional": "true"})
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    D = lambda x, s: model(x, s, labels[:1].expand(len(x)))  # noqa: E731
    sigmas = plan(model.preset, SampleConfig(sampler="heun", nfe=5)).sigmas
    y = torch.randn(2, *model.shape, device="meta")
    mask = torch.zeros(2, *model.shape, dtype=torch.bool, device="meta")
    runs = {
        "replace": lambda: edit.inpaint(D, y, mask, sigmas, "heun"),
        "repaint": lambda: edit.inpaint(D, y, mask, sigmas, "heun", method="repaint", jump_length=2, jump_n_sample=2),
        "reconstruction": lambda: edit.inpaint(D, y, mask, sigmas, "heun", reconstruction=1.0),
        "smc": lambda: edit.inpaint(D, y, mask, plan(model.preset, SampleConfig(sampler="ddpm", nfe=5)).sigmas, "ddpm",
                                    method="smc", particles=3),
        "sdedit": lambda: edit.sdedit(D, y, sigmas, 0.5),
        "inversion": lambda: edit.decode(D, edit.encode(D, y, sigmas), sigmas),
        "cfg interval": lambda: SAMPLERS["heun"](guidance.classifier_free(model, labels, 10, 2.0, interval=(0.1, 5.0)), y, sigmas),
        "clip": lambda: SAMPLERS["heun"](guidance.clip_x0(D, 1.0), y, sigmas),
    }
    for name, nfe in (("adaptive", 0), ("langevin", 300)):
        p = plan(model.preset, SampleConfig(sampler=name, nfe=nfe))
        runs[name] = lambda p=p, name=name: SAMPLERS[name](D, y, p.sigmas, **p.options)
    for name, run in runs.items():
        mode = DeviceTraffic()
        with torch.no_grad(), unchecked(), mode:
            run()
        assert not any("meets" in key for key in mode.seen), (name, mode.seen)
