"""diffusers in and out (the optional extra `diffspace[diffusers]`): a folder written by diffusers'
`save_pretrained` (a UNet2DModel and a scheduler config) read as a diffspace model, and a diffspace
run whose network is a UNet2DModel written as a folder that `DDPMPipeline.from_pretrained` loads.

The bridge is the discrete chain (Ho et al. 2020) both sides share: diffusers' 0-based timestep d
is diffspace's step i = d + 1 (t = i / T), its alphas_cumprod[d] is alpha-bar_i, and its
UNet is fed d, the preconditioner's index c_noise (precond.VPPrecond index=True). What the
scheduler config says becomes a preset (`scheduler_preset`): the betas (linear, scaled_linear,
squaredcos_cap_v2 or trained_betas; rescale_betas_zero_snr), the prediction type (epsilon, sample,
v_prediction: the x0 / eps / v parameterizations), timestep_spacing + steps_offset (the 'ddpm' grid),
the DDPM variance and the clip of the x0 estimate (sample.clip_x0); the scheduler class picks the
default sampler (`SCHEDULERS`). Then every diffspace sampler, guidance wrapper and likelihood works
on the model. Nothing is downloaded: folders are read with local_files_only.

Where the two differ (diffusers' own conventions, kept there): DDIM steps to t - T // n whatever the
spacing, so only spacings with that stride ('leading', or 'trailing' with n dividing T) give the
same chain; DDIM's set_alpha_to_one=false ends at alpha-bar_1, diffspace at sigma = 0; its
clip_sample clamps x0 but keeps the unclamped eps (diffspace steps with the clamped D).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import torch

from . import schedules as S
from .config import Config, SampleConfig
from .model import Diffusion
from .nn.diffusers_unet import DiffusersUNet, import_diffusers
from .precond import VPPrecond, VPredPrecond
from .presets import Preset

# diffusers scheduler class -> the diffspace sampler that does its job (exact for DDPM and DDIM)
SCHEDULERS = MappingProxyType({
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun", "UniPCMultistepScheduler": "unipc",
    "PNDMScheduler": "ipndm",
})
PREDICTIONS = MappingProxyType({"epsilon": "eps", "sample": "x0", "v_prediction": "v"})
VARIANCES = MappingProxyType({"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
                              "fixed_large_log": "beta"})
SPACINGS = ("leading", "trailing", "linspace")


def _allowed(key: str, value, allowed) -> ValueError:
    return ValueError(f"scheduler {key}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def chain_of(config: dict) -> S.DiscreteVP:
    """The discrete chain of a diffusers scheduler config: num_train_timesteps betas by beta_schedule
    ('linear': linspace(beta_start, beta_end, T); 'scaled_linear': linspace(sqrt(beta_start),
    sqrt(beta_end), T)^2; 'squaredcos_cap_v2': iDDPM's cosine, betas capped at 0.999) or the given
    trained_betas; rescaled to zero terminal SNR (Lin et al. 2024) if rescale_betas_zero_snr."""
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        chain = S.DiscreteVP(config["trained_betas"], name="trained-betas")
    elif kind == "linear":
        chain = S.ddpm_linear(T, start, end)
    elif kind == "scaled_linear":
        chain = S.DiscreteVP(torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2, name="scaled-linear")
    elif kind == "squaredcos_cap_v2":
        chain = S.Cosine(0.008).discrete(T, max_beta=0.999)
    else:
        raise _allowed("beta_schedule", kind, ("linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"))
    return S.rescale_zero_terminal_snr(chain) if config.get("rescale_betas_zero_snr") else chain


def scheduler_preset(config: dict) -> tuple[Preset, str]:
    """(preset, parameterization) of a diffusers scheduler config (its scheduler_config.json)."""
    name = config.get("_class_name", "")
    if name not in SCHEDULERS:
        raise _allowed("_class_name", name, SCHEDULERS)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise _allowed("prediction_type", prediction, PREDICTIONS)
    if config.get("thresholding"):
        raise ValueError("scheduler thresholding=true (dynamic thresholding, Saharia et al. 2022) is not supported; "
                         "set it false (sample.clip_x0 clamps x0 to a fixed range instead)")
    variance = config.get("variance_type") or "fixed_small"
    if name == "DDPMScheduler" and variance not in VARIANCES:
        raise _allowed("variance_type", variance, VARIANCES)
    spacing, offset = config.get("timestep_spacing", "leading"), int(config.get("steps_offset", 0))
    if spacing not in SPACINGS:
        raise _allowed("timestep_spacing", spacing, SPACINGS)
    chain = chain_of(config)
    parameterization = PREDICTIONS[prediction]
    if parameterization == "eps" and chain.zero_terminal_snr:
        raise ValueError("prediction_type='epsilon' cannot give x0 at zero terminal SNR (rescale_betas_zero_snr); "
                         "allowed there: v_prediction, sample")
    precond = (VPPrecond if parameterization == "eps" else VPredPrecond)(chain, chain.T, index=True)
    sampler = SCHEDULERS[name]
    return Preset(
        f"diffusers-{name}", f"a diffusers {name} folder (betas {chain.name}, {prediction})",
        MappingProxyType(dict(T=chain.T)), solver=sampler, time_steps="ddpm", time_step_params=("T",),
        time_step_options=MappingProxyType({"schedule": chain, "spacing": spacing, "offset": offset}),
        schedule=chain, training_schedule=chain, precond=precond, architecture="UNet2DModel",
        noise="discrete-uniform", noise_params=(), weighting="constant", weighting_params=(),
        weighting_space=parameterization, prior="unit",
        text=MappingProxyType({"time steps": f"timestep_spacing {spacing!r}, steps_offset {offset}",
                               "schedule": f"the {chain.name} chain, T = {chain.T}", "scaling": "s(t) = sqrt(abar_(tT))",
                               "noise": "i ~ U{1, T}", "weighting": f"1 on the {parameterization} error"}),
        solver_options=MappingProxyType({"ddpm": MappingProxyType({"variance": VARIANCES.get(variance, "beta_tilde")})}),
    ), parameterization


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None


def _parts(path: Path) -> tuple[Path, Path] | None:
    """(unet folder, scheduler config file) of a diffusers folder: a pipeline folder (unet/ and
    scheduler/) or one folder holding both config.json and scheduler_config.json; None otherwise."""
    for unet, scheduler in ((path / "unet", path / "scheduler" / "scheduler_config.json"),
                            (path, path / "scheduler_config.json")):
        if (unet / "config.json").is_file() and scheduler.is_file():
            return unet, scheduler
    return None


def is_diffusers_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and _parts(path) is not None


def load_folder(path, device="cpu") -> tuple[Diffusion, Config, dict]:
    """(model, Config, data info) of a diffusers folder, as model.load_model returns for a run: the
    UNet2DModel as F on the scheduler's preset, the Config's [sample] section with clip_x0 set from
    clip_sample (its [data] the default; `eval` takes --set data.spec=... for the reference data)."""
    path = Path(path)
    unet_dir, scheduler_file = _parts(path)
    unet_config, config = _json(unet_dir / "config.json"), _json(scheduler_file)
    if unet_config.get("_class_name") != "UNet2DModel":
        raise ValueError(f"{unet_dir}: the network is a {unet_config.get('_class_name')!r}; allowed: UNet2DModel")
    if unet_config.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{unet_dir}: time_embedding_type={unet_config['time_embedding_type']!r} (a VE score model) "
                         "is not supported; allowed: positional (DDPM-style nets fed the timestep)")
    preset, parameterization = scheduler_preset(config)
    unet = import_diffusers().UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if unet.config.out_channels != unet.config.in_channels:
        raise ValueError(f"{unet_dir}: out_channels={unet.config.out_channels} != in_channels={unet.config.in_channels} "
                         "(a learned variance head) is not supported")
    shape, classes = (unet.config.in_channels, h, w), int(unet.config.num_class_embeds or 0)
    model = Diffusion(DiffusersUNet(unet), preset, parameterization, shape=shape, num_classes=classes)
    cfg = Config(sample=SampleConfig(clip_x0=float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else 0.0))
    cfg.model.preset, cfg.model.network = preset.name, "diffusers"
    return model.to(device).eval(), cfg, {"shape": list(shape), "num_classes": classes, "levels": 0}


def scheduler_config(model: Diffusion, cfg: Config) -> dict:
    """The DDPMScheduler config that samples like `model` with its run's [sample] settings: the chain
    (linear betas for the ddpm and ztsnr presets, trained_betas otherwise), the prediction type of its
    parameterization, trailing spacing (the 'ddpm' grid's default) unless the preset has its own, the
    DDPM variance and clip_x0."""
    preset, chain = model.preset, model.schedule
    index = isinstance(preset.precond, VPPrecond) and preset.precond.index
    if not (isinstance(chain, S.DiscreteVP) and index and preset.schedule is chain):
        raise ValueError(f"export --format diffusers needs a discrete chain fed its step index (preset ddpm or ztsnr); "
                         f"this run has preset {preset.name!r}")
    kind = model.parameterization
    if kind == "precond":
        kind = "v" if isinstance(preset.precond, VPredPrecond) else "eps"
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(kind)
    if prediction is None:
        raise ValueError(f"model.parameterization={model.parameterization!r} has no diffusers prediction_type; "
                         f"allowed: precond, {', '.join(PREDICTIONS.values())}")
    variance = cfg.sample.options.get("variance", preset.sampler_options("ddpm").get("variance", "beta"))
    out = dict(num_train_timesteps=chain.T, prediction_type=prediction,
               variance_type={"beta": "fixed_large", "beta_tilde": "fixed_small"}[variance],
               timestep_spacing=preset.time_step_options.get("spacing", "trailing"),
               steps_offset=int(preset.time_step_options.get("offset", 0)),
               clip_sample=bool(cfg.sample.clip_x0), clip_sample_range=cfg.sample.clip_x0 or 1.0)
    if preset.name in ("ddpm", "ztsnr"):
        out.update(beta_schedule="linear", beta_start=preset.params["beta_start"], beta_end=preset.params["beta_end"],
                   rescale_betas_zero_snr=preset.name == "ztsnr")
    else:
        out.update(trained_betas=chain.betas.tolist())
    return out


def export(run, out) -> Path:
    """Write run's EMA model as a DDPMPipeline folder (model_index.json, unet/, scheduler/) at `out`."""
    from .model import load_model

    model, cfg, _ = load_model(Path(run))
    if not isinstance(model.network, DiffusersUNet):
        raise ValueError(f"export --format diffusers needs a run trained with model.network='diffusers' (a UNet2DModel); "
                         f"{run} has diffspace's own {type(model.network).__name__}")
    if model.num_classes:
        raise ValueError(f"{run} is class-conditional; DDPMPipeline samples unconditionally (no class labels)")
    diffusers = import_diffusers()
    scheduler = diffusers.DDPMScheduler(**scheduler_config(model, cfg))
    out = Path(out)
    diffusers.DDPMPipeline(unet=model.network.unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    return out

