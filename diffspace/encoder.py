"""The space a diffusion model lives in (EDM2's pattern, Karras et al. 2024): an `Encoder` whose pixel
case is the identity, so training, sampling and evaluation have no latent branch.

* `Encoder()`: pixels; encode(x) = x, decode(z) = z.
* `LatentEncoder`: latent diffusion (Rombach et al. 2022): encode(x) = s * mean of q(z | x) of an
  autoencoder, decode(z) = Dec(z / s). The scale s makes the training latents' standard deviation
  0.5, the sigma_data of EDM's preconditioning (EDM2 normalises its latents to 0.5 too; Rombach
  et al. use 1 / std); it is measured on the autoencoder's own training data (up to 4,096 images)
  when the encoder is loaded, so it always belongs to those weights.

`load_encoder(spec)` reads `data.encoder`: "" (pixels), a `diffspace train-autoencoder` run folder,
or a local diffusers `AutoencoderKL` folder (its own `scaling_factor` applies: latents of std ~1).
The latents are the posterior means, encoded once before training (the loop then trains on them as
on any images); a run's samples are decoded to pixels by `sampling.sample`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

Tensor = torch.Tensor
LATENT_STD = 0.5  # the standard deviation a LatentEncoder gives the training latents
BATCH = 512


class Encoder:
    """Pixels: the identity (the latent case is LatentEncoder)."""

    latent = False
    summary = "pixels"

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def dataset(self, data):
        """The data set the diffusion model trains on: the data itself for pixels."""
        return data

    def __deepcopy__(self, memo):
        return self  # fixed: a model copied for its EMA shares its encoder


class LatentEncoder(Encoder):
    """encode(x) = scale * mean(x), decode(z) = dec(z / scale), for callables mean and dec (batched,
    without gradients, on the autoencoder's device)."""

    latent = True

    def __init__(self, mean, dec, scale: float, device, summary: str):
        self._mean, self._dec, self.scale, self.device, self.summary = mean, dec, float(scale), device, summary

    @torch.no_grad()
    def _batched(self, f, x: Tensor) -> Tensor:
        return torch.cat([f(x[i:i + BATCH].to(self.device)).float() for i in range(0, len(x), BATCH)]).to(x.device)

    def encode(self, x: Tensor) -> Tensor:
        return self._batched(lambda b: self.scale * self._mean(b), x)

    def decode(self, z: Tensor) -> Tensor:
        return self._batched(lambda b: self._dec(b / self.scale), z)

    def dataset(self, data):
        """The data set's images encoded once to latents (continuous: levels 0; labels kept)."""
        return dataclasses.replace(data, x=self.encode(data.x), levels=0, eps=None)


def _std_scale(mean, x: Tensor) -> float:
    """LATENT_STD / std of the latents of up to 4,096 images of x (a fixed subset)."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:4096]
    z = LatentEncoder(mean, None, 1.0, x.device, "").encode(x[pick])
    return LATENT_STD / float(z.double().std())


def load_encoder(spec: str, device="cpu") -> Encoder:
    """The Encoder that `data.encoder` names (module docstring)."""
    if not spec:
        return Encoder()
    path = Path(spec)
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return _diffusers_autoencoder(path, device)
    from .model import load_model
    from .train import load_data

    ae, cfg, info = load_model(path, device, kind="autoencoder")
    _, train_set, _ = load_data(cfg)
    scale = _std_scale(lambda b: ae.F.encode(b)[0], train_set.x.to(device))
    latent = "x".join(map(str, ae.latent_shape))
    return LatentEncoder(lambda b: ae.F.encode(b)[0], ae.F.decode, scale, device,
                         f"latents {latent} of autoencoder {spec} (scale {scale:.4g})")


def _diffusers_autoencoder(path: Path, device) -> Encoder:
    from .nn.diffusers_unet import import_diffusers

    vae = import_diffusers().AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False).to(device).eval()
    scale = float(vae.config.scaling_factor)
    return LatentEncoder(lambda b: vae.encode(b).latent_dist.mean, lambda z: vae.decode(z).sample, scale, device,
                         f"latents of diffusers AutoencoderKL {path} (scaling_factor {scale:.4g})")
