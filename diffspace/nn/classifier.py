"""A noise-conditional image classifier p(y | x_t, noise_cond) for classifier guidance.

Dhariwal & Nichol (2021, 'Diffusion Models Beat GANs on Image Synthesis', sec. 4 and app. C)
train a classifier on noisy images and steer sampling with grad_x log p(y | x_t). Their
classifier is the downsampling half of the U-Net followed by a pooling head:

    conv3x3 stem -> [ResBlock (+ attention)] x num_blocks per level, downsampling between levels
                 -> middle ResBlock -> GroupNorm, SiLU, global average pool -> Linear -> logits

The blocks are the U-Net's own (`ResBlock`, `Attention`, `Downsample`, `EmbSequential` from
`unet`), conditioned on noise_cond through `Conditioning` exactly as in `UNet`. As everywhere in
`diffspace.nn`, noise_cond is whatever the preconditioner feeds (c_noise); the net knows no schedule.
ADM's best head pools by attention; the plain average-pool head here is their 'adaptive' variant.

For low-dimensional points (B, dim) no new class is needed: a noise-conditional classifier is
`MLP(dim, hidden, depth, out_dim=num_classes)`, whose output is read as logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import Conditioning
from .unet import Attention, Downsample, EmbSequential, ResBlock, _positive_int, check_levels, norm

Tensor = torch.Tensor


class EncoderClassifier(nn.Module):
    """Noise-conditional classifier F(x, noise_cond) -> logits (B, num_classes) for x (B, C, H, W).

    Level l works at resolution image_size / 2^l with base_channels * channel_mult[l] channels and
    num_blocks ResBlocks, each followed by self-attention if its resolution is in
    attention_resolutions (heads of 64 channels as in ADM's classifier, one head below 64 channels).
    The noise embedding has emb_dim channels (default: base_channels, rounded up to even) and the
    conditioning vector 4 * base_channels, as in `UNet`. image_size=None accepts any H, W but then
    allows no attention.

    The ResBlocks' last convs and the attention projections start at zero (ADM), so a fresh
    classifier ignores noise_cond until trained; the output Linear is not zeroed (unlike ADM) so
    that even a fresh net has a non-zero input gradient d logits / dx.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32, channel_mult: tuple = (1, 2),
                 num_blocks: int = 1, attention_resolutions: tuple = (), image_size: int | None = 8,
                 dropout: float = 0.0, emb_dim: int | None = None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes),
                        ("base_channels", base_channels), ("num_blocks", num_blocks)):
            _positive_int(name, v)
        channel_mult, attention_resolutions, resolutions = check_levels(channel_mult, attention_resolutions,
                                                                        image_size, dropout)
        levels = len(channel_mult)
        resolutions = resolutions or (None,) * levels
        emb_dim = 2 * ((base_channels + 1) // 2) if emb_dim is None else emb_dim
        if isinstance(emb_dim, bool) or not isinstance(emb_dim, int) or emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"emb_dim={emb_dim!r} must be an even integer >= 2 or None")

        self.config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                           channel_mult=channel_mult, num_blocks=num_blocks,
                           attention_resolutions=attention_resolutions, image_size=image_size, dropout=dropout,
                           emb_dim=emb_dim)
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        emb_ch = 4 * base_channels
        self.cond = Conditioning(emb_dim, emb_ch, num_classes=None)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        ch, layers = base_channels, []
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_blocks):
                layers.append(ResBlock(ch, base_channels * mult, emb_ch, dropout))
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(Attention(ch, ch // 64 if ch % 64 == 0 else 1))
            if level != levels - 1:
                layers.append(Downsample(ch))
        layers.append(ResBlock(ch, ch, emb_ch, dropout))  # middle
        self.encoder = EmbSequential(*layers)
        self.norm_out = norm(ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor, noise_cond: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; this classifier expects (B, {self.in_channels}, H, W)")
        H, W = x.shape[-2:]
        if self.image_size is not None and (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"x is {H}x{W}; this classifier was built for image_size={self.image_size}")
        emb = self.cond(noise_cond, None, x.shape[0])
        h = self.encoder(self.stem(x.to(self.stem.weight.dtype)), emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # global average pool -> (B, ch)
        return self.head(h).to(x.dtype)
