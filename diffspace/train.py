"""Training: Algorithm 1 of Ho et al. (2020), generalised to every preset x parameterization x
weighting x noise distribution, with EMA, bf16 autocast, torch.compile, exact resume.

    repeat
        x ~ data;  t ~ p(t) (the preset's noise distribution);  eps ~ N(0, I)
        z_t = alpha_t x + sigma_t eps
        gradient step on  w(t) || target - prediction ||^2
    until converged

The model (network + preset) is built by model.build_model from the [model] section: a
Diffusion, or with model.kind = 'classifier' a noise-conditional classifier trained by the same
loop on -log p(y | x~, sigma) (for classifier guidance).

The loop below reads top to bottom; `config.Config` holds every knob and is saved as config.toml.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import math
import signal
import threading
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import Config, TrainConfig
from .encoder import load_encoder
from .model import Diffusion, LatentAutoencoder, augment_kwargs, build_model
from .sampling import class_labels, plan, sample, stream_seed
from .schedules import unchecked

Tensor = torch.Tensor


# -- EMA ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def power_ema_gamma(sigma_rel: float) -> float:
    """gamma of the power-function EMA with relative standard deviation sigma_rel
    (Karras et al. 2024, 'Analyzing and Improving the Training Dynamics of Diffusion Models',
    eq. 3: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))), solved by bisection."""
    if not 0 < sigma_rel < 0.5:
        raise ValueError(f"ema_sigma_rel={sigma_rel} must lie in (0, 0.5)")
    rel = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    lo, hi = -0.99, 1e6  # rel decreases in gamma
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rel(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def power_ema_decay(sigma_rel: float, step: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) at optimizer step t (1-based): the power-function EMA
    (Karras et al. 2024, eq. 2), whose profile over past steps is ~ (gamma + 1) tau^gamma / t^(gamma + 1)."""
    return (1 - 1 / step) ** (power_ema_gamma(sigma_rel) + 1)


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """beta at optimizer step `step` (1-based): fixed, or the power EMA's of train.ema_sigma_rel."""
    if cfg.ema == "fixed":
        return cfg.ema_decay
    if cfg.ema == "power":
        return power_ema_decay(cfg.ema_sigma_rel, step)
    raise ValueError(f"train.ema={cfg.ema!r}; allowed: power, fixed")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) model, buffers copied; one multi-tensor (foreach) call each: on a
    GPU a few kernels for all the parameters instead of one per tensor (the same lerp, elementwise)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - beta)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


LR_SCHEDULES = ("cosine", "inv-sqrt")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr * lr_min_ratio at `steps`, or
    EDM2's inverse square root, lr / sqrt(max(step / lr_ref_steps, 1)) (Karras et al. 2024;
    it does not depend on train.steps: with the power EMA, the checkpoint of step k is the run of k steps)."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={cfg.lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "inv-sqrt":
        return cfg.lr / math.sqrt(max(step / cfg.lr_ref_steps, 1.0))
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -- the training loop --------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM: at a step boundary with a checkpoint of that step (the
    first signal), or at once with the step in progress discarded (a second one)."""


class StopSignals:
    """While active (a `with` block in the main thread), the first SIGINT or SIGTERM only sets
    `received` (the loop finishes its step, saves and stops: resume is exact whatever the moment of
    the signal); a second one raises Interrupted at once. Elsewhere (another thread) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self.previous = None, {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise Interrupted(f"stopped at once by a second {signal.Signals(signum).name}; the step in progress is discarded")
        self.received = signal.Signals(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of metrics.csv after `step` (logged past the checkpoint a run resumes from)."""
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [li for li in lines[1:] if li.split(",", 1)[0].isdigit() and int(li.split(",", 1)[0]) <= step]
    if len(kept) != len(lines):
        ckpt.atomic_write_text(path, "".join(kept))


class Diverged(ValueError):
    """Training met a non-finite loss or gradient: it stops at the next check (LossWindow), naming
    that step; no checkpoint of it or after it is written."""

    def __init__(self, step: int, what: str, value: float, saved: int, cfg: TrainConfig):
        kept = f"the last checkpoint (step {saved}) is kept" if saved else "no checkpoint was written"
        super().__init__(f"training diverged at step {step}: {what} is {value} (train.lr={cfg.lr:g}, "
                         f"train.grad_clip={cfg.grad_clip:g}); {kept}; lower train.lr, or check the data")


class LossWindow:
    """Each step's loss and gradient norm, kept on the device and read back in one transfer at the
    next log row, sample grid, snapshot or checkpoint rather than every step: on a GPU each read-back
    waits for all queued work, so the host could not launch the next step ahead. `check` raises
    Diverged at the first non-finite one; the run has gone on past it in memory, but nothing after it
    is written, and the error names that step."""

    def __init__(self):
        self.pending, self.losses, self.grad_norm = [], [], float("nan")

    def add(self, loss: Tensor, grad_norm: Tensor) -> None:
        self.pending.append(torch.stack([loss.detach().float(), grad_norm.detach().float()])[None])
        if len(self.pending) > 256:  # a long window (large log.every) kept as one (steps, 2) tensor
            self.pending = [torch.cat(self.pending)]

    def check(self, step: int, saved: int, cfg: TrainConfig) -> None:
        """Read back the steps since the last check (the last of them is `step`)."""
        if not self.pending:
            return
        values = torch.cat(self.pending).tolist()
        first, self.pending = step - len(values) + 1, []
        for k, (loss, grad_norm) in enumerate(values):
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                raise Diverged(first + k, "the loss" if not math.isfinite(loss) else "the gradient norm",
                               loss if not math.isfinite(loss) else grad_norm, saved, cfg)
        self.losses += [loss for loss, _ in values]
        self.grad_norm = values[-1][1]

    def mean_loss(self) -> float:
        """The mean loss of the steps checked since `restart`."""
        return sum(self.losses) / max(len(self.losses), 1)

    def restart(self) -> None:
        self.losses = []


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """x (on the CPU) on `device`; to a GPU through pinned memory without blocking, since a plain copy
    from pageable memory waits for all queued work (a host-device sync)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """A device by name: auto (cuda if available), cpu, cuda or cuda:N; under torchrun auto and cuda are
    this process's GPU, cuda:LOCAL_RANK (distributed.local_device). ValueError naming `what` (the
    option it came from) for other names or a missing GPU."""
    name = distributed.local_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what}={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}={name!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{what}={name!r}, but this torch sees {torch.cuda.device_count()} CUDA devices "
                         f"(CUDA build: {torch.version.cuda is not None}); use {what}=cpu or auto")
    return device


def load_data(cfg: Config):
    """(data, train_set, test_set) of a config: data.load with its data.* options, split
    deterministically by data.test_fraction (Dataset.split), both by data.seed: replicates that
    differ in train.seed train on, and are judged on, the same data."""
    from .data import load

    data = load(cfg.data.spec, n=cfg.data.n or None, size=cfg.data.size or None,
                channels=cfg.data.channels or None, seed=cfg.data.seed)
    return (data, *data.split(cfg.data.test_fraction, seed=cfg.data.seed))


def init_weights(model: torch.nn.Module, init: str) -> None:
    """Load the EMA weights of a run folder or checkpoint into a new run's model (train.init; the EMA
    starts as a copy of it). Reflow starts the 2-RF model from the 1-RF one, as Liu et al. (2023) do."""
    from .model import load_checkpoint

    _, tensors, state = load_checkpoint(Path(init))
    try:
        ckpt.load_module(model, tensors, "ema")
    except ValueError:
        raise ValueError(f"train.init={init!r}: its network ({state['config']['model']['kind']}, preset "
                         f"{state['config']['model']['preset']!r}) does not fit this run's model (same [model] "
                         f"network settings and data shape needed)") from None


def train(cfg: Config | None, run_dir: Path, *, resume: bool = False, steps: int | None = None,
          stop_at: int | None = None, progress: bool = True) -> dict:
    """Train into `run_dir` (a new run from `cfg`), or continue it (resume=True, cfg=None: the run's
    own config from its latest checkpoint). `steps` changes the total number of steps of a resumed
    run; `stop_at` stops early at that step with a checkpoint, as an interruption would (Ctrl-C also
    writes one). Returns a summary dict (steps, seconds, model, ema, data, config). The folder is
    locked while it runs (checkpoint.RunLock: a second writer is refused); stray temporary files of
    a killed run are removed, a resume starts from the newest checkpoint that verifies."""
    lock = ckpt.RunLock(Path(run_dir)) if distributed.is_main() else contextlib.nullcontext()  # rank 0 writes
    with StopSignals() as stop, lock:
        return _train(cfg, Path(run_dir), stop, resume=resume, steps=steps, stop_at=stop_at, progress=progress)


def _train(cfg: Config | None, run_dir: Path, stop: "StopSignals", *, resume: bool, steps: int | None,
           stop_at: int | None, progress: bool) -> dict:
    from . import plots
    from .augment import augment
    from .data import batch_indices, random_hflip

    main = distributed.is_main()
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "phema") if main else ():
        ckpt.remove_stray_files(folder)
    last = ckpt.latest(run_dir / "checkpoints")
    if resume:
        if cfg is not None:
            raise ValueError("a resumed run keeps its own config; only the number of steps may change")
        if last is None:
            raise ValueError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        _, tensors, state = ckpt.load_latest(run_dir / "checkpoints")
        cfg = Config.from_saved(state["config"])
        if steps is not None:
            if steps < state["step"]:
                raise ValueError(f"steps={steps} is before the checkpoint's step {state['step']}")
            cfg.train.steps = steps
    elif last is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another folder")
    elif steps is not None:
        cfg.train.steps = steps
    device = resolve_device(cfg.train.device)
    distributed.init(device)
    world = distributed.world_size()
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
                         f"number of processes, {world}")
    if cfg.log.tensorboard:
        check_tensorboard()
    if cfg.train.phema and not cfg.log.phema_every:
        raise ValueError(f"train.phema={cfg.train.phema} needs log.phema_every >= 1 (steps between snapshots)")
    learning_rate(cfg.train, 0)  # a bad train.lr_schedule fails here, before any work
    torch.manual_seed(cfg.train.seed)

    data, train_set, test_set = load_data(cfg)
    if cfg.data.hflip and (len(train_set.shape) != 3 or cfg.data.encoder):
        raise ValueError(f"data.hflip=true mirrors images; {cfg.data.spec!r} holds points of shape {train_set.shape}"
                         if len(train_set.shape) != 3 else "data.hflip=true mirrors pixels; a latent run (data.encoder) "
                         "trains on latents encoded once: flip the images before encoding instead")
    if len(train_set) < cfg.train.batch_size:
        raise ValueError(f"the training set of {cfg.data.spec!r} has {len(train_set)} samples, "
                         f"fewer than train.batch_size={cfg.train.batch_size}")
    if cfg.data.encoder and cfg.model.kind != "diffusion":
        raise ValueError(f"data.encoder={cfg.data.encoder!r} is for diffusion models; model.kind={cfg.model.kind!r} trains on pixels")
    encoder = load_encoder(cfg.data.encoder, device)  # pixels: the identity
    train_set = encoder.dataset(train_set)
    model = build_model(cfg.model, train_set.shape, data.num_classes, train_set.levels).to(device)
    denoising = isinstance(model, Diffusion)
    if denoising:
        model.encoder = encoder
    if train_set.eps is not None and not denoising:
        raise ValueError(f"data {cfg.data.spec!r} holds paired noise (eps): it trains a diffusion model, not a classifier")
    if cfg.train.init and not resume:
        init_weights(model, cfg.train.init)
    if denoising:  # the run's [sample] section draws its sample grids: check it now, not after training
        plan(model.preset, cfg.sample)
        class_labels(cfg.sample.classes, 1, model.num_classes)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trackers = [copy.deepcopy(model).eval().requires_grad_(False) for _ in cfg.train.phema]  # post-hoc EMA's
    if device.type == "cuda":  # TF32 matmuls and convolutions: float32 storage, 10-bit mantissa products
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    layout = torch.channels_last if cfg.train.channels_last and len(train_set.shape) == 3 else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            fused=device.type == "cuda")  # one kernel for the whole update on a GPU
    if cfg.train.compile:
        model.network.compile()  # in place: parameter names (and so checkpoints) stay the same
    step_loss = LossOf(model)
    if distributed.active():  # DDP wraps the module whose forward is the loss: its gradients are averaged
        step_loss = torch.nn.parallel.DistributedDataParallel(
            step_loss, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    step = 0
    if resume:
        ckpt.load_module(model, tensors, "model")
        ckpt.load_module(ema, tensors, "ema")
        for j, tracker in enumerate(trackers):
            ckpt.load_module(tracker, tensors, f"phema{j}")
        ckpt.load_optimizer(opt, {k: v.to(device) for k, v in tensors.items()}, state["optimizer"])
        noise_gen.set_state(tensors["rng.noise"])
        step = state["step"]
        _restore_rank_generators(tensors, device, cfg.train.seed, step)
    elif distributed.rank() > 0:  # the ranks' own generators (dropout) are independent streams
        torch.manual_seed(stream_seed(cfg.train.seed, distributed.rank()))
    distributed.same_on_all_ranks(step, "the step to resume from")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.toml", cfg.to_toml())

    def phema_tensors() -> dict:
        return {k: v for j, tracker in enumerate(trackers) for k, v in ckpt.module_tensors(tracker, f"phema{j}").items()}

    def save_checkpoint():
        rng = {"rng.noise": noise_gen.get_state(), **_rank_generators(device)}  # every rank takes part
        if not main:
            return
        opt_tensors, opt_meta = ckpt.optimizer_tensors(opt)
        tensors = {**ckpt.module_tensors(model, "model"), **ckpt.module_tensors(ema, "ema"), **opt_tensors, **rng,
                   **phema_tensors()}
        data_info = {"shape": list(train_set.shape), "num_classes": data.num_classes, "sigma_data": train_set.sigma_data,
                     "levels": train_set.levels}
        ckpt.save(run_dir / "checkpoints", step, tensors,
                  {"config": cfg.to_dict(), "optimizer": opt_meta, "data": data_info}, keep=cfg.log.keep)

    x_all = train_set.x.to(device, memory_format=layout)
    y_all = train_set.labels.to(device) if train_set.labels is not None else None
    eps_all = train_set.eps.to(device) if train_set.eps is not None else None
    metrics_path = run_dir / "metrics.csv"
    if main and (step == 0 or not metrics_path.exists()):
        metrics_path.write_text("step,loss,lr,grad_norm,samples_per_s,seconds\n")
    elif main:
        truncate_metrics(metrics_path, step)
    log = RunLog(metrics_path if main else None, run_dir / "tensorboard" if main and cfg.log.tensorboard else None)
    end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
    bar = _progress(progress and main, cfg.train.steps, step)
    start, seen, t_window, window = time.time(), 0, time.time(), LossWindow()
    saved, mine = step, distributed.shard(cfg.train.batch_size)
    stopping = distributed.any_rank(stop.received is not None)
    try:
        while step < end and not stopping:  # a signal (on any rank) stops the loop between steps
            idx = to_device(batch_indices(len(train_set), cfg.train.batch_size, step, cfg.train.seed), device)
            x = x_all[idx]  # the global batch, and its noise below, on every rank; this rank's rows: mine
            if cfg.data.hflip:
                x = random_hflip(x, noise_gen)
            augment_labels = None
            if cfg.model.augment:  # non-leaking: the network is told each image's transforms
                x, augment_labels = augment(x, cfg.model.augment, noise_gen)
            labels = None
            if not denoising and y_all is not None:  # a classifier learns the labels themselves
                labels = y_all[idx]
            elif y_all is not None and cfg.model.class_conditional:
                drop = torch.rand(idx.shape, generator=noise_gen, device=device) < cfg.model.label_dropout
                labels = torch.where(drop, data.num_classes, y_all[idx])  # the null class (no mask indexing: no sync)
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg.train, step)
            with unchecked():  # t drawn inside the schedule's domain: no value checks, no host-device syncs
                draw = model.draw(x, noise_gen, eps=None if eps_all is None else eps_all[idx])  # eps_all: reflow's pairs
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
                    per_sample = step_loss(x[mine], None if labels is None else labels[mine], draw.rows(mine),
                                           None if augment_labels is None else augment_labels[mine])
            weighted = per_sample if draw.importance is None else per_sample * draw.importance[mine].to(per_sample)
            opt.zero_grad(set_to_none=True)
            weighted.mean().backward()  # under DDP the ranks' gradients are averaged: the global batch's mean
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
            every = distributed.gather(per_sample.detach())  # the global batch's losses, on every rank
            model.observe(draw.t, every)
            loss = (every if draw.importance is None else every * draw.importance.to(every)).mean()
            window.add(loss, grad_norm)
            opt.step()
            step += 1
            ema_update(ema, model, ema_decay(cfg.train, step))
            for sigma_rel, tracker in zip(cfg.train.phema, trackers):
                ema_update(tracker, model, power_ema_decay(sigma_rel, step))
            seen += x.shape[0]
            logging, saving = step % cfg.log.every == 0 or step == end, step % cfg.log.checkpoint_every == 0 or step == end
            grid = denoising and cfg.log.sample_every and step % cfg.log.sample_every == 0 and step < end
            snapshot = trackers and step % cfg.log.phema_every == 0
            if logging or saving or grid or snapshot:
                window.check(step, saved, cfg.train)  # Diverged before anything of a bad step is written
            if logging:
                now = time.time()
                rate = seen / max(now - t_window, 1e-9)
                log.row(step, loss=window.mean_loss(), lr=opt.param_groups[0]["lr"], grad_norm=window.grad_norm,
                        samples_per_s=rate, seconds=now - start)
                bar.set_postfix(loss=f"{window.mean_loss():.4f}", samples_s=f"{rate:.0f}")
                t_window, seen = now, 0
                window.restart()
            bar.update(1)
            if main and grid:
                log.image(_save_sample_grid(ema, cfg, device, run_dir / "samples" / f"step-{step:08d}.png"), step)
            if main and snapshot:  # every snapshot is kept
                ckpt.save(run_dir / "phema", step, phema_tensors(), {"sigma_rel": cfg.train.phema, "step": step}, keep=10**9)
            if saving:
                save_checkpoint()
                saved = step
            stopping = distributed.any_rank(stop.received is not None)
        if stopping and step > saved:  # the last finished step, exactly
            window.check(step, saved, cfg.train)
            save_checkpoint()
            saved = step
    finally:
        bar.close()
        log.close()
    if stopping:
        why = stop.received.name if stop.received is not None else "a signal to another rank"
        if step == 0:
            raise Interrupted(f"stopped by {why} before the first step; nothing to save")
        raise Interrupted(f"stopped by {why} at step {step} of {cfg.train.steps}, saved; "
                          f"continue with `diffspace train --resume {run_dir}`")
    seconds = time.time() - start
    if main and step == cfg.train.steps:
        plots.loss_curve(metrics_path, run_dir / "loss.png")
        if denoising:
            final = _save_sample_grid(ema, cfg, device, run_dir / "samples" / "final.png")
            if cfg.log.tensorboard:
                with RunLog(None, run_dir / "tensorboard") as tb:
                    tb.image(final, step)
        _write_report(run_dir, cfg, data, ema, seconds, test_set)
    return {"steps": step, "seconds": seconds, "run_dir": str(run_dir), "model": model, "ema": ema,
            "data": data, "config": cfg}


def _rank_generators(device: torch.device) -> dict:
    """Every rank's global torch (and CUDA) generator state, as rng.torch (rank 0) and rng.torch.rankR."""
    kinds = {"torch": torch.get_rng_state}
    if device.type == "cuda":
        kinds["cuda"] = torch.cuda.get_rng_state
    out = {}
    for kind, get in kinds.items():
        states = distributed.gather(get()[None].to(device)).cpu()
        out |= {f"rng.{kind}" + (f".rank{r}" if r else ""): state for r, state in enumerate(states)}
    return out


def _restore_rank_generators(tensors: dict, device: torch.device, seed: int, step: int) -> None:
    """This rank's generators from a checkpoint; a rank the saving run did not have starts a stream of its own."""
    suffix = f".rank{distributed.rank()}" if distributed.rank() else ""
    if "rng.torch" + suffix not in tensors:
        torch.manual_seed(stream_seed(seed + step, distributed.rank()))
        return
    torch.set_rng_state(tensors["rng.torch" + suffix])
    if device.type == "cuda" and "rng.cuda" + suffix in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda" + suffix])


class RunLog:
    """metrics.csv (the source of truth; `path` None writes nothing, as on ranks other than 0) and,
    with a `tensorboard` folder (log.tensorboard), the same scalars under train/ and the sample grids
    as TensorBoard events (torch.utils.tensorboard, the optional extra diffspace[tensorboard])."""

    FORMATS = {"loss": ".6g", "lr": ".6g", "grad_norm": ".6g", "samples_per_s": ".1f", "seconds": ".2f"}

    def __init__(self, path: Path | None, tensorboard: Path | None):
        self.file = open(path, "a", newline="") if path is not None else None
        self.csv = csv.writer(self.file) if self.file else None
        self.tb = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard))

    def row(self, step: int, **values: float) -> None:
        if self.csv:
            self.csv.writerow([step] + [format(values[k], f) for k, f in self.FORMATS.items()])
            self.file.flush()
        for k, v in values.items() if self.tb else ():
            self.tb.add_scalar(f"train/{k}", v, step)

    def image(self, png: Path, step: int) -> None:
        """The sample grid written as `png` (images or a scatter plot of points), as an image event."""
        if self.tb:
            import numpy as np
            from PIL import Image

            with Image.open(png) as im:
                self.tb.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_tensorboard() -> None:
    """ValueError (before any work) when log.tensorboard is asked for and tensorboard is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("log.tensorboard=true needs the tensorboard package: pip install -e \".[tensorboard]\"") from None


class LossOf(torch.nn.Module):
    """model.loss(x, labels, t, eps) of a Draw as a module's forward, so that DistributedDataParallel,
    which acts through forward, wraps the loss itself (calling model.loss past the wrapper would
    leave the gradients unsynchronised); checkpoints keep saving `model`, with its own names."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, labels: Tensor | None, draw, augment_labels: Tensor | None = None) -> Tensor:
        return self.model.loss(x, labels, t=draw.t, eps=draw.eps, **augment_kwargs(augment_labels))


def _write_report(run_dir: Path, cfg: Config, data, ema, seconds: float, test_set) -> None:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["samples_per_s"]) for r in rows[len(rows) // 4:]] or [0.0]
    if isinstance(ema, Diffusion):
        p = plan(ema.preset, cfg.sample)
        spent = f"{p.nfe} network evaluations" if p.nfe is not None else "its own number of network evaluations (adaptive)"
        result = (f"- space: {ema.encoder.summary}\n- samples: EMA weights, `{p.sampler}` sampler, {spent}\n\n"
                  "![samples](samples/final.png)")
    elif isinstance(ema, LatentAutoencoder):
        psnr, std = autoencoder_quality(ema, test_set)
        result = (f"- autoencoder: latents {'x'.join(map(str, ema.latent_shape))}, held-out reconstruction PSNR "
                  f"{psnr:.2f} dB (data in [-1, 1]), latent std {std:.4f} (a latent run scales it to 0.5)")
    else:
        result = "- held-out accuracy of the EMA classifier at noise level sigma: " + ", ".join(
            f"{s:g}: {100 * a:.1f}%" for s, a in classifier_accuracy(ema, test_set).items())
    text = f"""# diffspace run

- data: {data.summary()}
- model: {cfg.model.kind}, preset `{cfg.model.preset}`, parameterization `{cfg.model.parameterization}`, network with
  {sum(p.numel() for p in ema.parameters()) / 1e6:.3f} M parameters
- training: {cfg.train.steps} steps of batch {cfg.train.batch_size}; this session {seconds:.1f} s,
  {sum(rates) / len(rates):.0f} samples/s; last logged loss {rows[-1]['loss'] if rows else 'n/a'}
{result}
![training loss](loss.png)

Full configuration: `config.toml`; metrics per step: `metrics.csv`; checkpoints: `checkpoints/`.
"""
    ckpt.atomic_write_text(run_dir / "report.md", text)


@torch.no_grad()
def autoencoder_quality(ae: LatentAutoencoder, test_set) -> tuple[float, float]:
    """(PSNR in dB of the held-out images decoded from their posterior means, 10 log10(2^2 / MSE) for
    data in [-1, 1]; the standard deviation of those latents)."""
    device = next(ae.parameters()).device
    mean = ae.F.encode(test_set.x.to(device))[0]
    mse = float(((ae.F.decode(mean) - test_set.x.to(device)) ** 2).mean())
    return 10 * math.log10(4 / max(mse, 1e-12)), float(mean.double().std())


@torch.no_grad()
def classifier_accuracy(classifier, test_set, sigmas=(0.0, 0.1, 0.5, 1.0, 2.0), seed: int = 0) -> dict:
    """Share of held-out x + sigma eps whose most probable class is the label, per sigma."""
    device = next(classifier.parameters()).device
    x, y = test_set.x.to(device), test_set.labels.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for s in sigmas:
        noisy = x + s * torch.randn(x.shape, generator=g, device=device)
        out[s] = float((classifier(noisy, torch.full((len(x),), max(s, 1e-3), device=device)).argmax(1) == y).double().mean())
    return out


def _save_sample_grid(ema, cfg, device, path):
    from .plots import save_samples

    s = sample(ema, cfg.log.n_samples, dataclasses.replace(cfg.sample, seed=cfg.train.seed + 2), device=device, shared=False)
    return save_samples(s.x.cpu(), path, labels=s.labels)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")
