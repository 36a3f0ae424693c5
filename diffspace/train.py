"""Training: Algorithm 1 of Ho et al. (2020), generalised to every preset x parameterization x
weighting x noise distribution, with EMA, bf16 autocast, torch.compile, exact resume.

    repeat
        x ~ data;  t ~ p(t) (the preset's noise distribution);  eps ~ N(0, I)
        z_t = alpha_t x + sigma_t eps
        gradient step on  w(t) || target - prediction ||^2
    until converged

Two ways to turn the raw network F into a model (`Diffusion`):
* parameterization = "precond" (default): Karras et al. (2022) Table 1 as it is. The denoiser is
  D(x~, sigma) = c_skip x~ + c_out F(c_in x~, c_noise) and the loss lambda(sigma) ||D - x||^2
  (the weighting converted to x0-space), sigma = sigma~(t).
* parameterization in {x0, eps, score, energy, v, flow}: F predicts that target in the (z_t, t)
  form, fed the preset's c_in and c_noise (precond.ConditionedInput), loss w(t) ||F - target||^2
  in that space (the weighting converted there with losses.convert_weight).

The loop below reads top to bottom; `Config` holds every knob and is saved as config.toml.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import losses, process
from .parameterization import PARAMETERIZATIONS, broadcast, target, to_x0
from .precond import ConditionedInput, Denoiser, ParameterizedDenoiser
from .presets import Preset, get_preset
from .samplers import SAMPLERS, get_sigmas, sampler_nfe
from .schedules import DiscreteVP

Tensor = torch.Tensor


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class DataConfig:
    spec: str = "digits"  # a name (digits, moons, ring8, ...), an image folder, or a .npy/.npz file
    size: int = 0  # images: resize + centre-crop to size x size (0: keep)
    channels: int = 0  # images: 1 or 3 (0: automatic)
    n: int = 0  # 2-D generators: number of points (0: default)
    test_fraction: float = 0.1


@dataclass
class ModelConfig:
    preset: str = "edm"
    parameterization: str = "precond"  # "precond" (Table 1 as is) or one of PARAMETERIZATIONS
    weighting: str = ""  # "" = the preset's; else a name in losses.WEIGHTINGS (stated in `weighting_space`)
    weighting_space: str = ""  # "" = the preset's (or the weighting's own space)
    noise: str = ""  # "" = the preset's noise distribution; else a name in losses.NOISE_DISTRIBUTIONS ("importance": iDDPM's)
    objective: str = "weighted"  # "weighted" (the weighting above), "vlb" (the true bound) or "hybrid" (+ L_vlb, learned Sigma)
    hybrid_lambda: float = 0.001  # iDDPM's lambda on L_vlb in the hybrid objective
    class_conditional: bool = False
    label_dropout: float = 0.1  # classifier-free guidance: probability of training with the null label
    # network: a U-Net for images, an MLP for points
    base_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 2])
    num_blocks: int = 2
    attention: list = field(default_factory=list)  # resolutions with self-attention
    dropout: float = 0.0
    hidden: int = 256  # MLP
    depth: int = 4  # MLP


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    lr_min_ratio: float = 1.0  # cosine decay to lr * ratio after warm-up (1.0 = constant)
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0: off)
    ema: str = "power"  # "power" (Karras et al. 2024, sigma_rel) or "fixed" (decay)
    ema_decay: float = 0.999
    ema_sigma_rel: float = 0.10
    bf16: bool = False  # bfloat16 autocast for the network's forward pass
    compile: bool = False  # torch.compile the network
    seed: int = 0
    device: str = "auto"  # auto: cuda if available


@dataclass
class LogConfig:
    every: int = 50  # metrics.csv row every k steps
    sample_every: int = 0  # sample grid every k steps (0: only at the end)
    checkpoint_every: int = 500
    keep: int = 3
    sampler: str = ""  # "" = the preset's solver
    nfe: int = 0  # 0 = sampler default
    n_samples: int = 64


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for section, values in d.items():
            if section not in cls.__dataclass_fields__:
                raise ValueError(f"unknown config section [{section}]; allowed: {', '.join(cls.__dataclass_fields__)}")
            for key, value in values.items():
                set_option(cfg, f"{section}.{key}", value)
        return cfg

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def set_option(cfg: Config, key: str, value) -> None:
    """Set `section.name` to value (strings from the command line are parsed to the field's type)."""
    section, _, name = key.partition(".")
    sub = getattr(cfg, section, None) if section in Config.__dataclass_fields__ else None
    if sub is None or name not in type(sub).__dataclass_fields__:
        allowed = [f"{s}.{f}" for s in Config.__dataclass_fields__ for f in type(getattr(cfg, s)).__dataclass_fields__]
        raise ValueError(f"unknown option {key!r}; allowed: {', '.join(allowed)}")
    current = getattr(sub, name)
    setattr(sub, name, _parse_like(value, current, key))


def _parse_like(value, current, key):
    """value (from TOML, or a string from the command line) checked against the type of `current`."""
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                value = text.lower() == "true"
            elif kind is list:
                value = [int(v) for v in text.strip("[]").split(",") if v.strip()]
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} must be of type {kind.__name__}")
    return value


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a TOML file (or the defaults) plus `section.key=value` overrides."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            cfg = Config.from_dict(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.steps=500")
        set_option(cfg, key.strip(), value.strip())
    return cfg


# -- the model: a raw network composed with a preset ---------------------------------------------------
OBJECTIVES = ("weighted", "vlb", "hybrid")


class VarianceHead(torch.nn.Module):
    """A raw network F with 2C output channels read as two heads (Nichol & Dhariwal 2021, sec. 3.1):
    the first C channels go on as F's prediction; the last C are the log-variance interpolation
    v of the reverse step, kept in `self.v` for the caller that asked for it right after the call
    (the hybrid loss, `Diffusion.denoise_with_variance`)."""

    def __init__(self, F: torch.nn.Module):
        super().__init__()
        self.F, self.v = F, None

    def forward(self, x: Tensor, noise_cond: Tensor, *args, **kwargs) -> Tensor:
        out = self.F(x, noise_cond, *args, **kwargs)
        half = out.shape[1] // 2
        self.v = out[:, half:]
        return out[:, :half]


class Diffusion(torch.nn.Module):
    """A raw network F made into a denoiser D(x~, sigma, labels) and a training loss by a preset.

    objective "weighted": w(t) ||target - prediction||^2 (L_simple with the DDPM preset's defaults;
    the bound's weights w_t for t >= 2 with weighting="vlb"); "vlb": the true bound itself,
    T L_{i-1} in bits/dim at the drawn step i with the fixed Sigma = beta, the discretized decoder
    at i = 1 for quantized data (Ho et al. 2020, eq. 5 and Table 2's 'L, fixed isotropic Sigma');
    "hybrid": the weighted loss plus lambda L_vlb with a learned diagonal reverse variance,
    Sigma = exp(v log beta_t + (1 - v) log beta~_t) (Nichol & Dhariwal 2021, eq. 15-16; F then
    outputs twice the data channels, v = (F's second half + 1) / 2), L_vlb seeing the mean through a
    stop-gradient, so the mean is trained by the first term alone. "vlb" and "hybrid" need a
    discrete chain (the ddpm or iddpm preset). `levels` is the data's number of quantization levels
    (0: continuous), which picks the decoder of L_0. noise="importance" draws the step by the loss's
    second moment and reweights it (losses.ImportanceSampler; Nichol & Dhariwal 2021, eq. 18).
    """

    def __init__(self, F: torch.nn.Module, preset: Preset, parameterization: str = "precond",
                 weighting: str = "", weighting_space: str = "", noise: str = "", objective: str = "weighted",
                 hybrid_lambda: float = 0.001, levels: int = 0):
        super().__init__()
        if parameterization != "precond" and parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization={parameterization!r}; allowed: precond, {', '.join(PARAMETERIZATIONS)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; allowed: {', '.join(OBJECTIVES)}")
        self.preset, self.parameterization = preset, parameterization
        self.schedule = preset.training_schedule
        self.objective, self.hybrid_lambda, self.levels = objective, hybrid_lambda, levels
        self.learned_variance = objective == "hybrid"
        if objective != "weighted" and not isinstance(self.schedule, DiscreteVP):
            raise ValueError(f"objective={objective!r} needs a discrete chain (preset ddpm or iddpm), got preset {preset.name!r}")
        if self.learned_variance:
            if parameterization == "energy":
                raise ValueError("objective='hybrid' needs a vector output (the variance head); parameterization 'energy' has none")
            F = VarianceHead(F)
        self.weighting = weighting or preset.weighting
        self.weighting_kwargs = preset.weighting_kwargs if not weighting else {}
        self.weighting_space = weighting_space or (preset.weighting_space if not weighting else "")
        if noise == "importance":  # iDDPM's sampler of t by the loss's second moment; needs the chain's T
            if not isinstance(self.schedule, DiscreteVP):
                raise ValueError(f"noise='importance' needs a discrete chain (preset ddpm or iddpm), got preset {preset.name!r}")
            self.noise = losses.ImportanceSampler(self.schedule.T)
        else:
            self.noise = losses.noise_distribution(noise or preset.noise, **(preset.noise_kwargs if not noise else {}))
        if parameterization == "precond":
            self.denoiser = Denoiser(F, preset.precond)
        else:
            net = ConditionedInput(F, preset.precond, self.schedule)
            self.denoiser = ParameterizedDenoiser(net, parameterization, self.schedule)

    def forward(self, x: Tensor, sigma, labels: Tensor | None = None) -> Tensor:
        """D(x~, sigma) -> x0_hat (the samplers' interface)."""
        return self.denoiser(x, sigma, labels)

    @property
    def head(self) -> VarianceHead:
        """The learned-variance head inside the denoiser (objective 'hybrid')."""
        return next(m for m in self.modules() if isinstance(m, VarianceHead))

    def denoise_with_variance(self, x: Tensor, sigma, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(D(x~, sigma), v) of a learned-variance model, from one network evaluation: the callable
        that samplers.ddpm takes as `variance` and evaluate.model_vlb as its variance."""
        if not self.learned_variance:
            raise ValueError("this model has no learned variance (objective='hybrid' trains one)")
        denoised = self(x, sigma, labels)
        return denoised, (self.head.v.to(denoised.dtype) + 1) / 2

    def _weight(self, t: Tensor, space: str) -> Tensor:
        tt = torch.round(t * self.schedule.T) if self.weighting == "vlb" else t
        return losses.weighting(self.weighting, tt, self.schedule, space=space,
                                defined_in=self.weighting_space or None, **self.weighting_kwargs)

    def loss(self, x: Tensor, labels: Tensor | None, generator: torch.Generator, t: Tensor | None = None) -> Tensor:
        """Per-sample weighted loss of Algorithm 1 (shape (B,)); t (B,) in the training schedule's
        time is drawn from the noise distribution unless given (e.g. to measure the loss per level)."""
        importance = None
        if t is None and isinstance(self.noise, losses.ImportanceSampler):
            t, importance = self.noise.sample(x.shape[0], self.schedule, generator=generator, device=x.device)
        elif t is None:
            t = self.noise(x.shape[0], self.schedule, generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if self.parameterization == "precond":  # Karras et al. 2022, eq. 2 with lambda(sigma)
            sigma = self.schedule.sigma_tilde(t)
            pred = self(x + broadcast(sigma, x) * eps, sigma.to(x.dtype), labels)
            goal, w, x0_hat = x, self._weight(t, "x0"), pred
        else:  # the (z_t, t) form, loss in the parameterization's own space
            alpha, sig = self.schedule.alpha(t), self.schedule.sigma(t)
            z = broadcast(alpha, x).to(x.dtype) * x + broadcast(sig, x).to(x.dtype) * eps
            pred = self.denoiser.predict(z, t, labels)
            goal = target(self.parameterization, x, eps, t.to(x.dtype), self.schedule)
            w = self._weight(t, self.parameterization)
            x0_hat = to_x0(pred, self.parameterization, z, t.to(x.dtype), self.schedule) if self.objective != "weighted" else None
        if self.objective == "vlb":
            loss = self._vlb_term(x, eps, t, x0_hat, None)
        else:
            per_sample = ((pred.float() - goal.float()) ** 2).reshape(x.shape[0], -1).mean(dim=1)
            loss = w.to(per_sample) * per_sample
            if self.learned_variance:
                loss = loss + self.hybrid_lambda * self._vlb_term(x, eps, t, x0_hat.detach(), self.head.v)
        if importance is not None:  # E[loss / (T p_t)] under p equals the uniform mean of the loss
            self.noise.update(t, loss.detach())
            loss = loss * importance.to(loss)
        return loss

    def _vlb_term(self, x: Tensor, eps: Tensor, t: Tensor, x0_hat: Tensor, v: Tensor | None) -> Tensor:
        """T L_{i-1} in bits/dim at the drawn steps i = tT (Ho et al. 2020, eq. 5: an unbiased estimate of
        the bound but for the constant L_T), the mean from x0_hat and the reverse variance learned
        from v or, v = None, fixed to beta. In the hybrid objective x0_hat comes detached (Nichol &
        Dhariwal 2021; their code scales the term by T/1000 with lambda = 0.001, the same as lambda T
        here at T = 1000)."""
        chain = self.schedule
        i = torch.round(t * chain.T).long().clamp(1, chain.T)
        z, _ = process.q_sample(x.double(), chain.discrete_t(i), chain, eps=eps.double())
        mean = process.ddpm_posterior(x0_hat.double(), z, i, chain)[0]
        if v is None:
            var = process.reverse_variance(chain, "beta").to(x.device)[i - 1]
        else:
            var = process.learned_variance((v.double() + 1) / 2, i, chain)
        decoder = "discretized" if self.levels else "gaussian"
        nats = process.vlb_term(x.double(), z, i, mean, var, chain, decoder, self.levels or 256)
        return (chain.T * nats / (x[0].numel() * math.log(2))).to(x.dtype)


def build_network(cfg: ModelConfig, shape: tuple, num_classes: int) -> torch.nn.Module:
    """A U-Net for (C, H, W) data, an MLP for (d,) data; for the energy parameterization, the scalar
    energy 0.5 ||x - net(x)||^2 built on it (nn.Energy)."""
    from .nn import MLP, Energy, UNet

    classes = num_classes if cfg.class_conditional else None
    out = shape[0] * (2 if cfg.objective == "hybrid" else 1)  # + the learned variance's channels
    if len(shape) == 3:
        net = UNet(shape[0], out, base_channels=cfg.base_channels, channel_mult=tuple(cfg.channel_mult),
                   num_blocks=cfg.num_blocks, attention_resolutions=tuple(cfg.attention), image_size=shape[1],
                   dropout=cfg.dropout, num_classes=classes)
    elif len(shape) == 1:
        net = MLP(shape[0], hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout, num_classes=classes, out_dim=out)
    else:
        raise ValueError(f"data of per-sample shape {shape} is not supported: need (d,) points or (C, H, W) images")
    return Energy(net) if cfg.parameterization == "energy" else net


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


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """beta at optimizer step `step` (1-based): fixed, or (1 - 1/step)^(gamma + 1) (power EMA)."""
    if cfg.ema == "fixed":
        return cfg.ema_decay
    if cfg.ema == "power":
        return (1 - 1 / step) ** (power_ema_gamma(cfg.ema_sigma_rel) + 1)
    raise ValueError(f"train.ema={cfg.ema!r}; allowed: power, fixed")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - beta)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr * lr_min_ratio at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -- sampling -----------------------------------------------------------------------------------------
def default_sampling(preset: Preset, sampler: str = "", nfe: int = 0) -> tuple[str, Tensor, dict]:
    """(sampler name, sigma grid, options) for a preset: its own solver and time steps by default.

    nfe = 0 uses 35 evaluations for ODE solvers (EDM's 18 Heun steps) and the full chain for DDPM.
    """
    name = sampler or preset.solver
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    options = {"schedule": preset.schedule} if name in ("euler", "heun") and preset.name in ("vp", "ve") else {}
    if preset.time_steps == "ddpm" and not nfe:
        steps = preset.params["T"]
    else:
        target_nfe = nfe or 35
        steps = max((n for n in range(1, 4 * target_nfe + 2) if sampler_nfe(name, n, **options) <= target_nfe), default=1)
    kwargs = preset.time_step_kwargs
    return name, get_sigmas(preset.time_steps, steps, **kwargs), options


@torch.no_grad()
def sample(model: Diffusion, n: int, shape: tuple, generator: torch.Generator, sampler: str = "", nfe: int = 0,
           labels: Tensor | None = None, device="cpu", callback=None) -> Tensor:
    """n samples from the model with its preset's grid (sigma_max * N(0, I) start)."""
    name, sigmas, options = default_sampling(model.preset, sampler, nfe)
    x = sigmas[0].item() * torch.randn((n, *shape), generator=generator, device=device)
    denoiser = lambda xx, s: model(xx, s, labels)
    if name == "ddpm" and model.learned_variance:
        options["variance"] = lambda xx, s: model.denoise_with_variance(xx, s, labels)
    return SAMPLERS[name](denoiser, x, sigmas.to(device), generator=generator, callback=callback, **options)


# -- the training loop --------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(cfg: Config):
    """(data, train_set, test_set) of a config: data.load with its data.* options and the run's seed,
    split deterministically by data.test_fraction (Dataset.split)."""
    from .data import load

    data = load(cfg.data.spec, n=cfg.data.n or None, size=cfg.data.size or None,
                channels=cfg.data.channels or None, seed=cfg.train.seed)
    return (data, *data.split(cfg.data.test_fraction, seed=cfg.train.seed))


def train(cfg: Config | None, run_dir: Path, *, resume: bool = False, steps: int | None = None,
          stop_at: int | None = None, progress: bool = True) -> dict:
    """Train into `run_dir` (a new run from `cfg`), or continue it (resume=True, cfg=None: the run's
    own config from its latest checkpoint). `steps` changes the total number of steps of a resumed
    run; `stop_at` stops early at that step with a checkpoint, as an interruption would (Ctrl-C also
    writes one). Returns a summary dict (steps, seconds, model, ema, data, config)."""
    from . import plots
    from .data import batch_indices

    run_dir = Path(run_dir)
    last = ckpt.latest(run_dir / "checkpoints")
    if resume:
        if cfg is not None:
            raise ValueError("a resumed run keeps its own config; only the number of steps may change")
        if last is None:
            raise ValueError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        tensors, state = ckpt.load(last)
        cfg = Config.from_dict(state["config"])
        if steps is not None:
            if steps < state["step"]:
                raise ValueError(f"steps={steps} is before the checkpoint's step {state['step']}")
            cfg.train.steps = steps
    elif last is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another folder")
    elif steps is not None:
        cfg.train.steps = steps
    device = _device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)

    data, train_set, _ = load_data(cfg)
    if len(train_set) < cfg.train.batch_size:
        raise ValueError(f"the training set of {cfg.data.spec!r} has {len(train_set)} samples, "
                         f"fewer than train.batch_size={cfg.train.batch_size}")
    preset = get_preset(cfg.model.preset)
    F = build_network(cfg.model, train_set.shape, data.num_classes).to(device)
    model = Diffusion(F, preset, cfg.model.parameterization, cfg.model.weighting, cfg.model.weighting_space,
                      cfg.model.noise, cfg.model.objective, cfg.model.hybrid_lambda, data.levels).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.compile:
        F.compile()  # in place: parameter names (and so checkpoints) stay the same
    noise_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    step = 0
    if resume:
        ckpt.load_module(model, tensors, "model")
        ckpt.load_module(ema, tensors, "ema")
        ckpt.load_optimizer(opt, {k: v.to(device) for k, v in tensors.items()}, state["optimizer"])
        noise_gen.set_state(tensors["rng.noise"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        step = state["step"]
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / "config.toml", cfg.to_toml())

    def save_checkpoint():
        opt_tensors, opt_meta = ckpt.optimizer_tensors(opt)
        rng = {"rng.noise": noise_gen.get_state(), "rng.torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state()
        tensors = {**ckpt.module_tensors(model, "model"), **ckpt.module_tensors(ema, "ema"), **opt_tensors, **rng}
        data_info = {"shape": list(train_set.shape), "num_classes": data.num_classes, "sigma_data": data.sigma_data,
                     "levels": data.levels}
        ckpt.save(run_dir / "checkpoints", step, tensors,
                  {"config": cfg.to_dict(), "optimizer": opt_meta, "data": data_info}, keep=cfg.log.keep)

    x_all = train_set.x.to(device)
    y_all = train_set.labels.to(device) if train_set.labels is not None else None
    metrics_path = run_dir / "metrics.csv"
    if step == 0 or not metrics_path.exists():
        metrics_path.write_text("step,loss,lr,grad_norm,samples_per_s,seconds\n")
    metrics = open(metrics_path, "a", newline="")
    writer = csv.writer(metrics)
    end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
    bar = _progress(progress, cfg.train.steps, step)
    start, seen, t_window, loss_sum, loss_n = time.time(), 0, time.time(), 0.0, 0
    saved = step
    try:
        while step < end:
            idx = batch_indices(len(train_set), cfg.train.batch_size, step, cfg.train.seed).to(device)
            x = x_all[idx]
            labels = None
            if y_all is not None and cfg.model.class_conditional:
                labels = y_all[idx].clone()
                drop = torch.rand(labels.shape, generator=noise_gen, device=device) < cfg.model.label_dropout
                labels[drop] = data.num_classes  # the null class
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg.train, step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
                loss = model.loss(x, labels, noise_gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
            opt.step()
            step += 1
            ema_update(ema, model, ema_decay(cfg.train, step))
            loss_sum, loss_n, seen = loss_sum + loss.item(), loss_n + 1, seen + x.shape[0]
            if step % cfg.log.every == 0 or step == end:
                now = time.time()
                rate = seen / max(now - t_window, 1e-9)
                writer.writerow([step, f"{loss_sum / loss_n:.6g}", f"{opt.param_groups[0]['lr']:.6g}",
                                 f"{float(grad_norm):.6g}", f"{rate:.1f}", f"{now - start:.2f}"])
                metrics.flush()
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", samples_s=f"{rate:.0f}")
                t_window, seen, loss_sum, loss_n = now, 0, 0.0, 0
            bar.update(1)
            if cfg.log.sample_every and step % cfg.log.sample_every == 0 and step < end:
                _save_sample_grid(ema, cfg, train_set.shape, device, run_dir / "samples" / f"step-{step:08d}.png")
            if step % cfg.log.checkpoint_every == 0 or step == end:
                save_checkpoint()
                saved = step
    except KeyboardInterrupt:  # never lose work: the last finished step is saved before stopping
        if step > saved:
            save_checkpoint()
        raise
    finally:
        bar.close()
        metrics.close()
    seconds = time.time() - start
    if step == cfg.train.steps:
        _save_sample_grid(ema, cfg, train_set.shape, device, run_dir / "samples" / "final.png")
        plots.loss_curve(metrics_path, run_dir / "loss.png")
        _write_report(run_dir, cfg, data, model, seconds)
    return {"steps": step, "seconds": seconds, "run_dir": str(run_dir), "model": model, "ema": ema,
            "data": data, "config": cfg}


def _write_report(run_dir: Path, cfg: Config, data, model: Diffusion, seconds: float) -> None:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["samples_per_s"]) for r in rows[len(rows) // 4:]] or [0.0]
    name, sigmas, options = default_sampling(model.preset, cfg.log.sampler, cfg.log.nfe)
    nfe = sampler_nfe(name, len(sigmas) - 1, **options)
    text = f"""# diffspace run

- data: {data.summary()}
- model: preset `{cfg.model.preset}`, parameterization `{cfg.model.parameterization}`, network with
  {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters
- training: {cfg.train.steps} steps of batch {cfg.train.batch_size}; this session {seconds:.1f} s,
  {sum(rates) / len(rates):.0f} samples/s; last logged loss {rows[-1]['loss'] if rows else 'n/a'}
- samples: EMA weights, `{name}` sampler, {nfe} network evaluations

![samples](samples/final.png)
![training loss](loss.png)

Full configuration: `config.toml`; metrics per step: `metrics.csv`; checkpoints: `checkpoints/`.
"""
    ckpt.atomic_write_text(run_dir / "report.md", text)


def load_model(path: Path, device="cpu") -> tuple[Diffusion, Config, dict]:
    """The EMA model of a run folder (its latest checkpoint) or of a checkpoint file,
    with its config and data info (shape, num_classes, sigma_data)."""
    path = Path(path)
    if path.is_dir():
        found = ckpt.latest(path / "checkpoints") or ckpt.latest(path)
        if found is None:
            raise ValueError(f"{path} holds no complete checkpoint (expected checkpoints/ckpt-*.json + .safetensors)")
        path = found
    tensors, state = ckpt.load(path)
    cfg = Config.from_dict(state["config"])
    info = state["data"]
    F = build_network(cfg.model, tuple(info["shape"]), info["num_classes"])
    model = Diffusion(F, get_preset(cfg.model.preset), cfg.model.parameterization, cfg.model.weighting,
                      cfg.model.weighting_space, cfg.model.noise, cfg.model.objective, cfg.model.hybrid_lambda,
                      info.get("levels", 0))
    ckpt.load_module(model, tensors, "ema")
    return model.to(device).eval(), cfg, info


def _save_sample_grid(ema, cfg, shape, device, path):
    from .plots import save_samples

    g = torch.Generator(device=device).manual_seed(cfg.train.seed + 2)
    x = sample(ema, cfg.log.n_samples, shape, g, cfg.log.sampler, cfg.log.nfe, device=device)
    save_samples(x.cpu(), path)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")
