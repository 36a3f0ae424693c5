"""A small KL-regularised convolutional autoencoder (Rombach et al. 2022, 'High-Resolution Image
Synthesis with Latent Diffusion Models', sec. 3 and appendix G, without the perceptual and GAN terms):

    encoder: conv_in -> [ResBlock x num_blocks, stride-2 conv] per level (none after the last)
             -> GroupNorm, SiLU, conv to 2 z channels: the mean and log-variance of q(z | x)
    decoder: conv_in -> [ResBlock x num_blocks, nearest 2x + conv] per level, mirrored
             -> GroupNorm, SiLU, conv_out to the image channels

len(channel_mult) levels downsample by 2^(levels - 1): 8x8 digits with channel_mult (1, 2) have
4x4 latents. No noise conditioning: this network knows nothing of diffusion.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import norm

Tensor = torch.Tensor


class Block(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x)))))) (a 1x1 conv on x where channels change)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.body = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
                                  norm(out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def _levels(base: int, channel_mult: tuple, num_blocks: int, up: bool) -> nn.Sequential:
    chans = [base * m for m in channel_mult]
    layers, ch = [], chans[-1] if up else base
    order = list(reversed(range(len(chans)))) if up else list(range(len(chans)))
    for k, level in enumerate(order):
        for _ in range(num_blocks):
            layers.append(Block(ch, chans[level]))
            ch = chans[level]
        if k < len(order) - 1:
            layers.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                          if up else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """encode(x) -> (mean, logvar) of q(z | x), each (B, latent_channels, H / f, W / f); decode(z) -> x."""

    def __init__(self, in_channels: int, latent_channels: int = 4, base_channels: int = 32, channel_mult: tuple = (1, 2),
                 num_blocks: int = 1):
        super().__init__()
        if not channel_mult or latent_channels < 1 or base_channels < 1 or num_blocks < 1:
            raise ValueError(f"an autoencoder needs channel_mult (got {channel_mult!r}), latent_channels, base_channels "
                             f"and num_blocks >= 1 (got {latent_channels}, {base_channels}, {num_blocks})")
        top = base_channels * channel_mult[-1]
        self.factor = 2 ** (len(channel_mult) - 1)
        self.latent_channels = latent_channels
        self.encoder = nn.Sequential(nn.Conv2d(in_channels, base_channels, 3, padding=1),
                                     _levels(base_channels, tuple(channel_mult), num_blocks, up=False),
                                     norm(top), nn.SiLU(), nn.Conv2d(top, 2 * latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, top, 3, padding=1),
                                     _levels(base_channels, tuple(channel_mult), num_blocks, up=True),
                                     norm(base_channels), nn.SiLU(), nn.Conv2d(base_channels, in_channels, 3, padding=1))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} must be divisible by the autoencoder's factor {self.factor}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)
