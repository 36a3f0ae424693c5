"""The model: a raw network F composed with a preset into a denoiser D(x~, sigma, labels) and its
training loss, built in one place from its config (`Diffusion.from_config`), and read back from a
run folder (`load_model`).

Two ways to turn the raw network F into a model (`Diffusion`):
* parameterization = "precond" (default): Karras et al. (2022) Table 1 as it is. The denoiser is
  D(x~, sigma) = c_skip x~ + c_out F(c_in x~, c_noise) and the loss lambda(sigma) ||D - x||^2
  (the weighting converted to x0-space), sigma = sigma~(t).
* parameterization in {x0, eps, score, energy, v, flow}: F predicts that target in the (z_t, t)
  form, fed the preset's c_in and c_noise (precond.ConditionedInput), loss w(t) ||F - target||^2
  in that space (the weighting converted there with losses.convert_weight).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoint as ckpt
from . import losses, process
from .config import Config, ModelConfig
from .coupling import COUPLINGS, draw_noise
from .parameterization import PARAMETERIZATIONS, broadcast, target, to_x0
from .precond import ConditionedInput, Denoiser, ParameterizedDenoiser, per_sample
from .presets import Preset, get_preset
from .schedules import DiscreteVP

Tensor = torch.Tensor

OBJECTIVES = ("weighted", "vlb", "hybrid")
NETWORKS = ("", "mp", "diffusers")  # "": diffspace's U-Net for images, MLP for points; "mp": EDM2's magnitude-preserving U-Net; "diffusers": its UNet2DModel


class Draw(NamedTuple):
    """The randomness of one training step for a batch: t (B,) in the training schedule's time, eps
    (shape of x), and the importance weights 1 / (T p_t) (B,) of a loss-aware sampler of t (or None).
    Under torchrun every rank draws it for the global batch and takes its own rows (`rows`), so the
    noise of a sample does not depend on the number of processes."""

    t: Tensor
    eps: Tensor
    importance: Tensor | None = None

    def rows(self, part: slice) -> "Draw":
        return Draw(self.t[part], self.eps[part], None if self.importance is None else self.importance[part])


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
    `coupling` pairs the drawn noise with the batch ('independent', or 'ot': the exact minibatch OT
    assignment of OT-CFM, meant for flow matching) and `offset_noise` = s adds s n per sample and
    channel to it (Guttenberg 2023); both in coupling.py.
    """

    def __init__(self, F: torch.nn.Module, preset: Preset, parameterization: str = "precond",
                 weighting: str = "", weighting_space: str = "", noise: str = "", objective: str = "weighted",
                 hybrid_lambda: float = 0.001, levels: int = 0, shape: tuple = (), num_classes: int = 0,
                 coupling: str = "independent", offset_noise: float = 0.0, uncertainty: bool = False):
        super().__init__()
        from .encoder import Encoder

        self.shape, self.num_classes = tuple(shape), num_classes  # per-sample data shape; classes (0: unconditional)
        self.encoder = Encoder()  # pixels; a latent run's autoencoder (encoder.py) decodes its samples
        if parameterization != "precond" and parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization={parameterization!r}; allowed: precond, {', '.join(PARAMETERIZATIONS)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling={coupling!r}; allowed: {', '.join(COUPLINGS)}")
        if not (offset_noise >= 0 and math.isfinite(offset_noise)):  # NaN fails the first test
            raise ValueError(f"offset_noise={offset_noise!r} must be a finite number >= 0 (0: off)")
        self.coupling, self.offset_noise = coupling, float(offset_noise)
        self.preset, self.parameterization = preset, parameterization
        self.schedule = preset.training_schedule
        if parameterization in ("eps", "score", "energy") and getattr(self.schedule, "zero_terminal_snr", False):
            raise ValueError(f"parameterization={parameterization!r} cannot give x0 at the zero terminal SNR of preset "
                             f"{preset.name!r} (x0 = (z - sigma eps) / alpha, alpha_T = 0); allowed: precond, x0, v, flow")
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
            losses.check_noise(self.noise, self.schedule)
        self.uncertainty = losses.Uncertainty() if uncertainty else None  # EDM2's learned weighting u(t)
        if uncertainty and objective == "vlb":
            raise ValueError("model.uncertainty=true reweights the weighted loss; objective='vlb' is the bound itself")
        if parameterization == "precond":
            self.denoiser = Denoiser(F, preset.precond)
        else:
            net = ConditionedInput(F, preset.precond, self.schedule)
            self.denoiser = ParameterizedDenoiser(net, parameterization, self.schedule)

    @classmethod
    def from_config(cls, cfg: ModelConfig, shape: tuple, num_classes: int = 0, levels: int = 0) -> "Diffusion":
        """The model of a [model] config for data of per-sample `shape` with `num_classes` labels
        (used only if cfg.class_conditional) and `levels` quantization levels (0: continuous)."""
        classes = num_classes if cfg.class_conditional else 0
        if cfg.class_conditional and not classes:
            raise ValueError("model.class_conditional=true needs labelled data (this data set has no labels)")
        F = build_network(cfg, shape, classes, 2 if cfg.objective == "hybrid" else 1)
        return cls(F, get_preset(cfg.preset, cfg.preset_params), cfg.parameterization, cfg.weighting, cfg.weighting_space, cfg.noise,
                   cfg.objective, cfg.hybrid_lambda, levels, shape, classes, cfg.coupling, cfg.offset_noise,
                   cfg.uncertainty)

    def forward(self, x: Tensor, sigma, labels: Tensor | None = None, augment_labels: Tensor | None = None) -> Tensor:
        """D(x~, sigma, labels) -> x0_hat (the samplers' interface; labels None or num_classes: the null label).
        augment_labels: training on augmented images (augment.py); None, no augmentation, is how samples are drawn."""
        return self.denoiser(x, sigma, labels, **augment_kwargs(augment_labels))

    def energy(self, x: Tensor, sigma, labels: Tensor | None = None) -> Tensor:
        """E(x~, sigma, labels) of an energy model (parameterization 'energy'), shape (B,): -log p(x~)
        up to a constant per noise level (precond.ParameterizedDenoiser.energy), with -grad E the
        score that D uses; the `energy` that samplers.mala needs for its Metropolis-Hastings test."""
        if self.parameterization != "energy":
            raise ValueError(f"model.parameterization={self.parameterization!r} has no energy: only 'energy' models give "
                             "log p (train with model.parameterization=energy)")
        return self.denoiser.energy(x, sigma, labels)

    @property
    def network(self) -> torch.nn.Module:
        """The raw network F (without the variance head's split)."""
        inner = self.denoiser.F if self.parameterization == "precond" else self.denoiser.net.F
        return inner.F if isinstance(inner, VarianceHead) else inner

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

    def draw(self, x: Tensor, generator: torch.Generator, eps: Tensor | None = None) -> Draw:
        """The randomness of one step of Algorithm 1 for the batch x: t (B,) in the training schedule's
        time from the noise distribution (with its weights 1 / (T p_t) for the importance sampler),
        then eps (shape of x) paired with x as the coupling and offset noise say (coupling.draw_noise),
        unless eps is given: then eps_i is the noise of x_i as it is (reflow's pairs)."""
        importance = None
        if isinstance(self.noise, losses.ImportanceSampler):
            t, importance = self.noise.sample(x.shape[0], self.schedule, generator=generator, device=x.device)
        else:
            t = self.noise(x.shape[0], self.schedule, generator=generator, device=x.device)
        if eps is None:
            eps = draw_noise(x, generator, self.coupling, self.offset_noise)
        return Draw(t, eps, importance)

    def observe(self, t: Tensor, loss: Tensor) -> None:
        """The training loop hands over each step's per-sample losses at t (all ranks' under torchrun):
        the importance sampler keeps their history; other noise distributions need nothing."""
        if isinstance(self.noise, losses.ImportanceSampler):
            self.noise.update(t, loss.detach())

    def loss(self, x: Tensor, labels: Tensor | None, generator: torch.Generator | None = None, t: Tensor | None = None,
             eps: Tensor | None = None, augment_labels: Tensor | None = None) -> Tensor:
        """Per-sample loss of Algorithm 1 (shape (B,)) at the given t (B,) and eps (e.g. to measure
        the loss per level); without t, at a `draw` from the generator (importance-weighted for the
        importance sampler, so its mean stays unbiased; the loop draws for itself, see train.py).
        x augmented by augment.augment comes with its augment_labels, which the network is told."""
        importance = None
        if t is None:
            t, eps, importance = self.draw(x, generator, eps)
        elif eps is None:
            eps = draw_noise(x, generator, self.coupling, self.offset_noise)
        if self.parameterization == "precond":  # Karras et al. 2022, eq. 2 with lambda(sigma)
            sigma = self.schedule.sigma_tilde(t)
            s = broadcast(sigma, x)
            noisy = torch.where(torch.isinf(s), eps, x + s * eps)  # x~, or eps at SNR 0 (samplers' convention)
            pred = self(noisy, sigma.to(x.dtype), labels, augment_labels)
            goal, w, x0_hat = x, self._weight(t, "x0"), pred
        else:  # the (z_t, t) form, loss in the parameterization's own space
            alpha, sig = self.schedule.alpha(t), self.schedule.sigma(t)
            z = broadcast(alpha, x).to(x.dtype) * x + broadcast(sig, x).to(x.dtype) * eps
            pred = self.denoiser.predict(z, t, labels, **augment_kwargs(augment_labels))
            goal = target(self.parameterization, x, eps, t.to(x.dtype), self.schedule)
            w = self._weight(t, self.parameterization)
            x0_hat = to_x0(pred, self.parameterization, z, t.to(x.dtype), self.schedule) if self.objective != "weighted" else None
        if self.objective == "vlb":
            loss = self._vlb_term(x, eps, t, x0_hat, None)
        else:
            per_sample = ((pred.float() - goal.float()) ** 2).reshape(x.shape[0], -1).mean(dim=1)
            loss = w.to(per_sample) * per_sample
            if self.uncertainty is not None:
                loss = self.uncertainty.weigh(loss, self.schedule.logsnr(t))
            if self.learned_variance:
                loss = loss + self.hybrid_lambda * self._vlb_term(x, eps, t, x0_hat.detach(), self.head.v)
        return loss if importance is None else loss * importance.to(loss)  # E[loss / (T p_t)] under p = the uniform mean

    def _vlb_term(self, x: Tensor, eps: Tensor, t: Tensor, x0_hat: Tensor, v: Tensor | None) -> Tensor:
        """T L_{i-1} in bits/dim at the drawn steps i = tT (Ho et al. 2020, eq. 5: an unbiased estimate of
        the bound but for the constant L_T), the mean from x0_hat and the reverse variance learned
        from v or, v = None, fixed to beta as Ho et al.'s code has it (process.reverse_variance "beta":
        beta~_2 at step 1, the bound `diffspace eval` reports by default). In the hybrid objective
        x0_hat comes detached (Nichol & Dhariwal 2021; their code scales the term by T/1000 with
        lambda = 0.001, the same as lambda T here at T = 1000)."""
        chain = self.schedule
        i = torch.round(t * chain.T).long().clamp(1, chain.T)
        z, _ = process.q_sample(x.double(), chain.discrete_t(i), chain, eps=eps.double())
        mean = process.ddpm_posterior(x0_hat.double(), z, i, chain)[0]
        if v is None:
            var = process.reverse_variance_on(chain, "beta", x.device)[i - 1]
        else:
            var = process.learned_variance((v.double() + 1) / 2, i, chain)
        decoder = "discretized" if self.levels else "gaussian"
        nats = process.vlb_term(x.double(), z, i, mean, var, chain, decoder, self.levels or 256)
        return (chain.T * nats / (x[0].numel() * math.log(2))).to(x.dtype)


def augment_kwargs(augment_labels: Tensor | None) -> dict:
    """The keyword for augmentation labels, only when there are some (networks built without
    augmentation, and the classifier's and autoencoder's losses, do not take it)."""
    return {} if augment_labels is None else {"augment_labels": augment_labels}


def build_network(cfg: ModelConfig, shape: tuple, num_classes: int = 0, out_factor: int = 1) -> torch.nn.Module:
    """A U-Net for (C, H, W) data (diffspace's, or diffusers' UNet2DModel with model.network =
    "diffusers"), an MLP for (d,) data, with out_factor times the data's channels
    (2 for a learned variance) and a class embedding if num_classes; for the energy
    parameterization, the scalar energy 0.5 ||x - net(x)||^2 built on it (nn.Energy)."""
    from .augment import AUGMENT_DIM
    from .nn import MLP, Energy, MPUNet, UNet
    from .nn.unet import group_count

    classes = num_classes or None
    out = shape[0] * out_factor
    if cfg.network not in NETWORKS:
        raise ValueError(f"model.network={cfg.network!r}; allowed: {', '.join(repr(n) for n in NETWORKS)}")
    if cfg.network == "diffusers":
        from .nn.diffusers_unet import build_diffusers_unet

        if len(shape) != 3 or cfg.parameterization == "energy":
            raise ValueError(f"model.network='diffusers' (UNet2DModel) needs (C, H, W) images and a vector output; "
                             f"got data of shape {shape}, parameterization {cfg.parameterization!r}")
        return build_diffusers_unet(in_channels=shape[0], out_channels=out, image_size=shape[1],
                                    base_channels=cfg.base_channels, channel_mult=tuple(cfg.channel_mult),
                                    num_blocks=cfg.num_blocks, attention_resolutions=tuple(cfg.attention),
                                    dropout=cfg.dropout, num_classes=num_classes, groups=group_count(cfg.base_channels))
    if cfg.network == "mp" and len(shape) != 3:
        raise ValueError(f"model.network='mp' (EDM2's magnitude-preserving U-Net) needs (C, H, W) images; got data of shape {shape}")
    if not cfg.scale_shift and (len(shape) != 3 or cfg.network):
        raise ValueError(f"model.scale_shift=false (DDPM's added conditioning) is an option of diffspace's U-Net "
                         f"(model.network=''); got data of shape {shape}, model.network={cfg.network!r}")
    if cfg.augment and (len(shape) != 3 or cfg.network):
        raise ValueError(f"model.augment={cfg.augment} (non-leaking augmentation) needs images and diffspace's U-Net "
                         f"(model.network=''); got data of shape {shape}, model.network={cfg.network!r}")
    if len(shape) == 3:
        own = {} if cfg.network == "mp" else {"scale_shift": cfg.scale_shift}  # options of diffspace's U-Net only
        if cfg.augment:
            own["augment_dim"] = AUGMENT_DIM
        net = (MPUNet if cfg.network == "mp" else UNet)(
            shape[0], out, base_channels=cfg.base_channels, channel_mult=tuple(cfg.channel_mult), num_blocks=cfg.num_blocks,
            attention_resolutions=tuple(cfg.attention), image_size=shape[1], dropout=cfg.dropout, num_classes=classes, **own)
    elif len(shape) == 1:
        net = MLP(shape[0], hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout, num_classes=classes, out_dim=out)
    else:
        raise ValueError(f"data of per-sample shape {shape} is not supported: need (d,) points or (C, H, W) images")
    return Energy(net) if cfg.parameterization == "energy" else net


class NoisyClassifier(torch.nn.Module):
    """A noise-conditional classifier p(y | x~, sigma) for classifier guidance (Dhariwal & Nichol 2021,
    sec. 4), on the preset's preconditioned input:

        logits(x~, sigma) = F(c_in(sigma) x~, c_noise(sigma)),   loss = -log p(y | x + sigma eps, sigma),

    sigma = sigma~(t), t from the preset's noise distribution: the noise levels its denoiser is
    trained on. F: nn.EncoderClassifier for images, an MLP with num_classes outputs for points."""

    def __init__(self, F: torch.nn.Module, preset: Preset, shape: tuple = (), num_classes: int = 0):
        super().__init__()
        self.F, self.preset, self.schedule = F, preset, preset.training_schedule
        self.shape, self.num_classes = tuple(shape), num_classes
        self.noise = losses.noise_distribution(preset.noise, **preset.noise_kwargs)
        losses.check_noise(self.noise, self.schedule)

    @classmethod
    def from_config(cls, cfg: ModelConfig, shape: tuple, num_classes: int) -> "NoisyClassifier":
        from .nn import MLP, EncoderClassifier

        if not num_classes:
            raise ValueError("a classifier needs labelled data (this data set has no labels)")
        if len(shape) == 3:
            F = EncoderClassifier(shape[0], num_classes, base_channels=cfg.base_channels,
                                  channel_mult=tuple(cfg.channel_mult), num_blocks=cfg.num_blocks,
                                  attention_resolutions=tuple(cfg.attention), image_size=shape[1], dropout=cfg.dropout)
        elif len(shape) == 1:
            F = MLP(shape[0], hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout, out_dim=num_classes)
        else:
            raise ValueError(f"data of per-sample shape {shape} is not supported: need (d,) points or (C, H, W) images")
        return cls(F, get_preset(cfg.preset, cfg.preset_params), shape, num_classes)

    @property
    def network(self) -> torch.nn.Module:
        return self.F

    def forward(self, x: Tensor, sigma) -> Tensor:
        """Class logits (B, num_classes) at the noisy x~ of level sigma."""
        _, _, c_in, c_noise = self.preset.precond(per_sample(sigma, x))
        return self.F(broadcast(c_in, x) * x, c_noise)

    def log_prob(self, x: Tensor, sigma, labels: Tensor) -> Tensor:
        """log p(labels | x~, sigma), shape (B,)."""
        return torch.log_softmax(self(x, sigma).float(), dim=1).gather(1, labels.long()[:, None])[:, 0].to(x.dtype)

    def draw(self, x: Tensor, generator: torch.Generator, eps: Tensor | None = None) -> Draw:
        """t (B,) from the preset's noise distribution, then eps ~ N(0, I) of x's shape (unless given)."""
        t = self.noise(x.shape[0], self.schedule, generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if eps is None else eps
        return Draw(t, eps)

    def observe(self, t: Tensor, loss: Tensor) -> None:
        """Nothing to keep (see Diffusion.observe)."""

    def loss(self, x: Tensor, labels: Tensor, generator: torch.Generator | None = None, t: Tensor | None = None,
             eps: Tensor | None = None) -> Tensor:
        """Per-sample cross-entropy -log p(y | x + sigma eps, sigma) (shape (B,)) at the given t and eps,
        or at a `draw` from the generator."""
        if t is None:
            t, eps, _ = self.draw(x, generator, eps)
        elif eps is None:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        sigma = self.schedule.sigma_tilde(t).to(x.dtype)
        return torch.nn.functional.cross_entropy(self(x + broadcast(sigma, x) * eps, sigma).float(), labels, reduction="none")


class LatentAutoencoder(torch.nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3) as a model the
    training loop trains like the others, with the per-sample loss

        ||Dec(z) - x||^2 / dim(x) + kl_weight KL(q(z | x) || N(0, I)) / dim(z),   z = mean + exp(logvar / 2) eps,

    eps the Draw's (the reparameterisation; t unused). `encoder.load` reads a trained one back as
    the Encoder of a latent run (the perceptual and adversarial terms of the paper are left out:
    they need weights this project does not download)."""

    def __init__(self, F: torch.nn.Module, shape: tuple, kl_weight: float = 1e-3):
        super().__init__()
        self.F, self.shape, self.kl_weight, self.num_classes = F, tuple(shape), float(kl_weight), 0
        c, h, w = self.shape
        self.latent_shape = (F.latent_channels, h // F.factor, w // F.factor)

    @classmethod
    def from_config(cls, cfg: ModelConfig, shape: tuple) -> "LatentAutoencoder":
        from .nn.autoencoder import Autoencoder

        if len(shape) != 3:
            raise ValueError(f"model.kind='autoencoder' needs (C, H, W) images; got data of shape {shape}")
        F = Autoencoder(shape[0], cfg.latent_channels, cfg.base_channels, tuple(cfg.channel_mult), cfg.num_blocks)
        if shape[1] % F.factor or shape[2] % F.factor:
            raise ValueError(f"images of {shape[1]}x{shape[2]} are not divisible by 2^(len(model.channel_mult) - 1) = {F.factor}")
        return cls(F, shape, cfg.kl_weight)

    @property
    def network(self) -> torch.nn.Module:
        return self.F

    def draw(self, x: Tensor, generator: torch.Generator, eps: Tensor | None = None) -> Draw:
        """eps ~ N(0, I) of the latents' shape (t: zeros, unused)."""
        eps = torch.randn((x.shape[0], *self.latent_shape), generator=generator, dtype=x.dtype, device=x.device)
        return Draw(torch.zeros(x.shape[0], dtype=torch.float64, device=x.device), eps)

    def observe(self, t: Tensor, loss: Tensor) -> None:
        """Nothing to keep (see Diffusion.observe)."""

    def loss(self, x: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None,
             t: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
        if eps is None:
            eps = self.draw(x, generator).eps
        mean, logvar = self.F.encode(x)
        recon = self.F.decode(mean + torch.exp(0.5 * logvar) * eps)
        mse = ((recon.float() - x.float()) ** 2).flatten(1).mean(1)
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).flatten(1).mean(1)
        return mse + self.kl_weight * kl


def build_model(cfg: ModelConfig, shape: tuple, num_classes: int = 0, levels: int = 0):
    """The one construction site of a run's model: a Diffusion, a NoisyClassifier or a
    LatentAutoencoder (model.kind)."""
    if cfg.kind == "diffusion":
        return Diffusion.from_config(cfg, shape, num_classes, levels)
    if cfg.augment:
        raise ValueError(f"model.augment={cfg.augment} conditions a denoiser on its augmentation; "
                         f"model.kind={cfg.kind!r} has none (use model.augment=0)")
    if cfg.kind == "classifier":
        return NoisyClassifier.from_config(cfg, shape, num_classes)
    if cfg.kind == "autoencoder":
        return LatentAutoencoder.from_config(cfg, shape)
    raise ValueError(f"model.kind={cfg.kind!r}; allowed: diffusion, classifier, autoencoder")


def load_checkpoint(path: Path) -> tuple[Path, dict, dict]:
    """(stem, tensors, state) of a run folder's newest checkpoint that verifies (checkpoint.load_latest:
    damaged ones are passed over, and named) or of a checkpoint file, verified."""
    path = Path(path)
    if path.is_dir():
        found = ckpt.load_latest(path / "checkpoints") or ckpt.load_latest(path)
        if found is None:
            raise ValueError(f"{path} holds no complete checkpoint (expected checkpoints/ckpt-*.json + .safetensors)")
        return found
    if not path.exists() and not path.with_suffix(".json").exists():
        raise ValueError(f"{path} is neither a run folder nor a checkpoint file")
    return (path.with_suffix("") if path.suffix in (".json", ".safetensors") else path, *ckpt.load(path))


def checkpoint_path(path: Path) -> Path:
    """The checkpoint load_checkpoint picks (a run folder's newest that verifies, or the file itself)."""
    return load_checkpoint(path)[0]


def load_model(path: Path, device="cpu", kind: str = "diffusion"):
    """(EMA model, Config, data info) of a run folder (its latest checkpoint) or a checkpoint file;
    `kind` is what the caller needs (a 'diffusion' model or a 'classifier'), checked. A folder written
    by diffusers' save_pretrained (UNet2DModel + scheduler) is read as one (diffusers_io.load_folder)."""
    from . import diffusers_io

    if kind == "diffusion" and diffusers_io.is_diffusers_folder(path):
        return diffusers_io.load_folder(path, device)
    _, tensors, state = load_checkpoint(path)
    bad = ckpt.non_finite({k: v for k, v in tensors.items() if k.startswith("ema.")})
    if bad:
        raise ValueError(f"{path}: the model's weights hold NaN or inf ({len(bad)} tensors, e.g. {bad[0]}); "
                         "the run diverged: resume from an earlier checkpoint or retrain with a lower train.lr")
    cfg = Config.from_saved(state["config"])
    if cfg.model.kind != kind:
        raise ValueError(f"{path} holds a {cfg.model.kind} run; a {kind} run is needed here")
    info = state["data"]
    model = build_model(cfg.model, tuple(info["shape"]), info["num_classes"], info.get("levels", 0))
    ckpt.load_module(model, tensors, "ema")
    if kind == "diffusion" and cfg.data.encoder:  # a latent run: samples are decoded to pixels
        from .encoder import load_encoder

        model.encoder = load_encoder(cfg.data.encoder, device)
    return model.to(device).eval(), cfg, info
