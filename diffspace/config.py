"""Every knob of a run, in one place: `Config` = [data] + [model] + [train] + [log] + [sample].

A run folder's config.toml is `Config.to_toml()`; `load_config(path, overrides)` reads a TOML file
plus `section.key=value` overrides (strings from the command line are parsed to the field's type).
The [sample] section is the run's default way of sampling (sampler, NFE, sampler options, class
labels, guidance); `diffspace sample | eval | compare` take `--set sample.KEY=VALUE` on top of it.
Any [sample] key that is not a field below is a sampler option (e.g. `sample.eta=1.0` for DDIM,
`sample.S_churn=40` for the EDM SDE), checked against the sampler when sampling is planned.

This module imports nothing of diffspace: the model, sampling and training read their sections.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DataConfig:
    spec: str = "digits"  # a name (digits, moons, ring8, ...), an image folder, a .npy/.npz file, or CIFAR-10 binary (.tar.gz, folder, .bin)
    size: int = 0  # images: resize + centre-crop to size x size (0: keep)
    channels: int = 0  # images: 1 or 3 (0: automatic)
    n: int = 0  # 2-D generators: number of points (0: default)
    test_fraction: float = 0.1
    seed: int = 0  # the data's own seed: generated points, the data.n subset, the train/test split (not train.seed)
    hflip: bool = False  # images: mirror each training image left-right with probability 1/2 (per step)
    encoder: str = ""  # latent diffusion: "" = pixels; a train-autoencoder run folder or a diffusers AutoencoderKL folder


@dataclass
class ModelConfig:
    kind: str = "diffusion"  # "diffusion" (a denoiser), "classifier" (p(y | x~, sigma), for classifier guidance) or "autoencoder" (latent diffusion)
    preset: str = "edm"
    preset_params: dict = field(default_factory=dict)  # some of the preset's numbers changed, e.g. {sigma_data = 0.75, P_mean = -1.0} (presets.DEFAULT_PARAMS)
    parameterization: str = "precond"  # "precond" (Table 1 as is) or one of PARAMETERIZATIONS
    weighting: str = ""  # "" = the preset's; else a name in losses.WEIGHTINGS (stated in `weighting_space`)
    weighting_space: str = ""  # "" = the preset's (or the weighting's own space)
    noise: str = ""  # "" = the preset's noise distribution; else a name in losses.NOISE_DISTRIBUTIONS ("importance": iDDPM's)
    uncertainty: bool = False  # EDM2's learned weighting: loss / exp(u(t)) + u(t), u learned per noise level (losses.Uncertainty)
    objective: str = "weighted"  # "weighted" (the weighting above), "vlb" (the true bound) or "hybrid" (+ L_vlb, learned Sigma)
    hybrid_lambda: float = 0.001  # iDDPM's lambda on L_vlb in the hybrid objective
    coupling: str = "independent"  # pairing of noise and data in a batch: "independent" or "ot" (exact minibatch OT, OT-CFM; meant for flow matching)
    offset_noise: float = 0.0  # s of offset noise (Guttenberg 2023): eps + s n, n ~ N(0, 1) per sample and channel (0: off)
    class_conditional: bool = False
    label_dropout: float = 0.1  # classifier-free guidance: probability of training with the null label
    augment: float = 0.0  # non-leaking augmentation (EDM): probability of each of augment.py's transforms per image and step, the network told which (0: off)
    # network: a U-Net for images, an MLP for points
    network: str = ""  # "" = diffspace's; "mp" = EDM2's magnitude-preserving U-Net (nn/mp_unet.py); "diffusers" = diffusers' UNet2DModel with the settings below (optional extra)
    base_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 2])
    num_blocks: int = 2
    attention: list = field(default_factory=list)  # resolutions with self-attention
    dropout: float = 0.0
    scale_shift: bool = True  # diffspace's U-Net: ADM's scale-shift norm of the conditioning; false: DDPM's addition after the first conv (Ho et al. 2020)
    latent_channels: int = 4  # autoencoder: channels of z (spatial size: the image's / 2^(len(channel_mult) - 1))
    kl_weight: float = 1e-3  # autoencoder: beta on KL(q(z | x) || N(0, I)) per latent entry, beside the per-pixel MSE
    hidden: int = 256  # MLP
    depth: int = 4  # MLP


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # after warm-up: "cosine" decay to lr * lr_min_ratio, or "inv-sqrt" (EDM2): lr / sqrt(max(step / lr_ref_steps, 1))
    lr_min_ratio: float = 1.0  # cosine: the final lr over lr (1.0 = constant)
    lr_ref_steps: int = 1000  # inv-sqrt: the step where the decay starts (EDM2's t_ref, in steps)
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0: off)
    ema: str = "power"  # "power" (Karras et al. 2024, sigma_rel) or "fixed" (decay)
    ema_decay: float = 0.999
    ema_sigma_rel: float = 0.10
    phema: list = field(default_factory=list)  # sigma_rel of extra power EMAs kept for post-hoc EMA (EDM2: [0.05, 0.10])
    bf16: bool = False  # bfloat16 autocast for the network's forward pass
    compile: bool = False  # torch.compile the network
    channels_last: bool = False  # images: NHWC memory format for the network and the batches (faster convolutions on GPUs)
    seed: int = 0
    init: str = ""  # a run folder or checkpoint whose EMA weights start a new run (reflow: the 1-RF model); "" = random
    device: str = "auto"  # auto: cuda if available


@dataclass
class LogConfig:
    every: int = 50  # metrics.csv row every k steps
    sample_every: int = 0  # sample grid every k steps (0: only at the end), drawn as [sample] says
    checkpoint_every: int = 500
    keep: int = 3
    n_samples: int = 64
    tensorboard: bool = False  # also log the metrics and sample grids as TensorBoard events in RUN/tensorboard/
    phema_every: int = 0  # snapshot of the train.phema EMAs every k steps into RUN/phema/ (`diffspace phema`)


@dataclass
class SampleConfig:
    """How to sample (sampling.plan resolves it against a model's preset, once)."""

    sampler: str = ""  # "" = the preset's solver (a name in samplers.SAMPLERS)
    nfe: int = 0  # network evaluations per sample; 0 = 35 for ODE solvers, the full chain for DDPM
    classes: str = ""  # class-conditional runs: "" = unconditional (null label), "3", "1,7", or "all" (equal shares)
    guidance: float = 1.0  # W: D_w = D_g + W (D - D_g); 1 = no guidance, 0 = the guide alone
    guidance_interval: list = field(default_factory=list)  # [sigma_lo, sigma_hi]: guide only there (Kynkaanniemi et al. 2024)
    guidance_rescale: float = 0.0  # phi of CFG rescale (Lin et al. 2024); 0 = off
    guide_run: str = ""  # autoguidance: a weaker model's run folder as the guide (Karras et al. 2024)
    classifier: str = ""  # classifier guidance: a `train-classifier` run folder (Dhariwal & Nichol 2021)
    classifier_scale: float = 1.0  # S: D + S sigma^2 grad log p(y | x~, sigma)
    seed: int = 0
    batch: int = 2048  # samples per network batch: sample i's noise is chunk i // batch's (sampling.stream_seed)
    clip_x0: float = 0.0  # clamp the denoiser's x0 to [-c, c] at every step (diffusers' clip_sample; 0 = off)
    options: dict = field(default_factory=dict)  # sampler options: every other [sample] key


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for section, values in d.items():
            if section not in cls.__dataclass_fields__:
                raise ValueError(f"unknown config section [{section}]; allowed: {', '.join(cls.__dataclass_fields__)}")
            if not isinstance(values, dict):
                raise ValueError(f"{section} = {values!r} must be a [{section}] table of options, e.g. [{section}] then key = value")
            for key, value in values.items():
                if section == "sample" and key == "options":  # to_dict's nesting of the sampler options
                    for option, v in value.items():
                        set_option(cfg, f"sample.{option}", v)
                else:
                    set_option(cfg, f"{section}.{key}", value)
        return cfg

    @classmethod
    def from_saved(cls, d: dict) -> "Config":
        """A run's own saved config (its checkpoints' state): a run saved before data.seed existed
        drew and split its data by train.seed, and keeps doing so (resume and eval stay exact)."""
        cfg = cls.from_dict(d)
        if "seed" not in d.get("data", {}):
            cfg.data.seed = cfg.train.seed
        return cfg

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            options = values.pop("options", {}) if section == "sample" else {}
            lines += [f"{k} = {_toml_value(v)}" for k, v in {**values, **options}.items()]
            lines.append("")
        return "\n".join(lines)


MAX_NFE = 10_000  # network evaluations per sample (5x score_sde's PC budget): more is a typo, not a plan
# The allowed values of every numeric option: (low, high), inclusive, "(" / ")" marking an open end.
# A list option's bounds apply to each entry. Floats must also be finite. Checked by set_option, so
# TOML files, overrides and compare specs are all checked when they are read, before any work.
RANGES = {
    "data.size": (0, 4096), "data.channels": (0, 3), "data.n": (0, 10**8), "data.test_fraction": (0, 1, ")"), "data.seed": (0, 2**63 - 1),
    "model.hybrid_lambda": (0, math.inf), "model.offset_noise": (0, math.inf), "model.label_dropout": (0, 1, ")"), "model.augment": (0, 1),
    "model.base_channels": (1, 4096), "model.latent_channels": (1, 1024), "model.kl_weight": (0, math.inf), "model.channel_mult": (1, 64), "model.num_blocks": (1, 64),
    "model.attention": (1, 4096), "model.dropout": (0, 1, ")"), "model.hidden": (1, 1 << 16), "model.depth": (1, 256),
    "train.steps": (1, 10**9), "train.batch_size": (1, 1 << 20), "train.lr": (0, math.inf, "("),
    "train.lr_min_ratio": (0, 1), "train.lr_ref_steps": (1, 10**9), "train.warmup": (0, 10**9), "train.weight_decay": (0, math.inf),
    "train.grad_clip": (0, math.inf), "train.ema_decay": (0, 1, ")"), "train.ema_sigma_rel": (0, 0.5, "()"),
    "train.phema": (0, 0.5, "()"), "log.phema_every": (0, 10**9),
    "train.seed": (0, 2**63 - 1),
    "log.every": (1, 10**9), "log.sample_every": (0, 10**9), "log.checkpoint_every": (1, 10**9),
    "log.keep": (1, 10**6), "log.n_samples": (1, 10_000),
    "sample.nfe": (0, MAX_NFE), "sample.guidance": (-math.inf, math.inf), "sample.guidance_interval": (0, math.inf),
    "sample.guidance_rescale": (0, 1), "sample.clip_x0": (0, math.inf), "sample.classifier_scale": (-math.inf, math.inf), "sample.seed": (0, 2**63 - 1),
    "sample.batch": (1, 1 << 20),
}


def check_range(key: str, value) -> None:
    """ValueError naming key, value and the allowed range unless every number in value is allowed."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(value, list) and key in RANGES:
                raise ValueError(f"{key}={value!r}: every entry must be a number")
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key}={value!r} must be finite")
        if key not in RANGES:
            continue
        low, high, *opened = RANGES[key]
        ends = opened[0] if opened else ""
        if v < low or v > high or (v == low and "(" in ends) or (v == high and ")" in ends):
            allowed = f"{'(' if '(' in ends or low == -math.inf else '['}{low:g}, {high:g}{')' if ')' in ends or high == math.inf else ']'}"
            raise ValueError(f"{key}={value!r} is out of range; allowed: {allowed}" + (" (each entry)" if isinstance(value, list) else ""))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def set_option(cfg: Config, key: str, value) -> None:
    """Set `section.name` to value (strings from the command line are parsed to the field's type).
    In [sample], a name that is not a field is a sampler option, its value parsed as a literal."""
    section, _, name = key.partition(".")
    name, _, entry = name.partition(".")
    sub = getattr(cfg, section, None) if section in Config.__dataclass_fields__ else None
    if section == "sample" and name and name not in SampleConfig.__dataclass_fields__ and not entry:
        cfg.sample.options[name] = _literal(value)
        return
    if (sub is None or name not in type(sub).__dataclass_fields__ or (section, name) == ("sample", "options")
            or (entry and not isinstance(getattr(sub, name), dict))):
        allowed = [f"{s}.{f}" for s in Config.__dataclass_fields__ for f in type(getattr(cfg, s)).__dataclass_fields__]
        raise ValueError(f"unknown option {key!r}; allowed: {', '.join(allowed)} (and sample.<sampler option>)")
    current = getattr(sub, name)
    if isinstance(current, dict) and entry:  # one entry of a table option, e.g. model.preset_params.sigma_data=0.75
        current[entry] = _literal(value)
        return
    value = _parse_like(value, current, key)
    check_range(key, value)
    setattr(sub, name, value)


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def _literal(value):
    """A sampler option's value: TOML values as they are; command-line text as bool, int, float or string."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return _number(text)
    except ValueError:
        return text


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
                value = [_number(v.strip()) for v in text.strip("[]").split(",") if v.strip()]
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} must be of type {kind.__name__}")
    return value


def apply_overrides(cfg: Config, overrides) -> Config:
    """cfg with `section.key=value` strings applied (in order)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.steps=500")
        set_option(cfg, key.strip(), value.strip())
    return cfg


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
    return apply_overrides(cfg, overrides)
