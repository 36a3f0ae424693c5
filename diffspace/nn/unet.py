"""A U-Net for images (B, C, H, W) in the style of Ho et al. (2020, DDPM) and Dhariwal & Nichol
(2021, ADM, 'Diffusion Models Beat GANs on Image Synthesis'):

    conv_in -> [ResBlock (+ attention)] x num_blocks per level, downsampling between levels
            -> middle: ResBlock, attention, ResBlock
            -> [ResBlock on concat(h, skip) (+ attention)] x (num_blocks + 1) per level, upsampling
            -> GroupNorm, SiLU, conv_out (zero-initialised)

Resampling is DDPM's: separate stride-2 conv (or 2x2 average pool) and nearest + conv layers;
ADM's BigGAN-style variant (resampling inside a ResBlock, 'resblock_updown') is left out to keep
the net small and plain.

Every ResBlock takes the conditioning vector emb (noise embedding + class embedding, see
`Conditioning`) through ADM's scale-shift norm, GroupNorm(h) (1 + scale) + shift, or with
scale_shift=False as DDPM does, added to the output of its first conv (Ho et al. 2020; diffusers'
UNet2DModel default; their CIFAR-10 net then has DDPM's 35.7 M parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import Conditioning

Tensor = torch.Tensor


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Groups for GroupNorm over `channels`: the largest g <= min(max_groups, channels // min_group_size)
    that divides channels (at least 1). DDPM/ADM use 32 groups on >= 128 channels; small nets
    (EDM's rule, Karras et al. 2022) keep >= 4 channels per group: 32 -> 8, 64 -> 16, 96 -> 24, 3 -> 1."""
    g = max(1, min(max_groups, channels // min_group_size))
    while channels % g:
        g -= 1
    return g


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias (ADM's `zero_module`): a residual branch starts as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """skip(x) + conv2(Dropout(SiLU(GroupNorm(conv1(SiLU(GroupNorm(x)))) (1 + scale) + shift)))

    (scale, shift) = Linear(SiLU(emb)) (Dhariwal & Nichol 2021, 'use_scale_shift_norm'); with
    scale_shift=False, DDPM's skip(x) + conv2(Dropout(SiLU(GroupNorm(conv1(SiLU(GroupNorm(x))) + b)))),
    b = Linear(SiLU(emb)) (Ho et al. 2020). conv2 starts at zero; skip is a 1x1 conv when the
    channel count changes, else the identity."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float = 0.0, scale_shift: bool = True):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, (2 if scale_shift else 1) * out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """x + proj(softmax(q k^T / sqrt(d)) v) over the H*W positions, multi-head (Vaswani et al.
    2017; at 16x16 in DDPM, at several resolutions in ADM). q, k, v are 1x1 convs of GroupNorm(x);
    proj starts at zero. Uses torch's scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        # each (B, heads, H*W, d), d contiguous: the fused kernels (flash, memory-efficient) need it, and
        # without them SDPA falls back to the math path, which stores the (H*W)^2 attention matrix
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(dim=1)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (DDPM, ADM conv_resample) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv (DDPM, ADM)."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbSequential(nn.Sequential):
    """A sequence of layers; ResBlocks also receive emb (ADM's TimestepEmbedSequential)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")


def check_levels(channel_mult, attention_resolutions, image_size: int | None, dropout: float):
    """(channel_mult, attention_resolutions, resolutions per level or None) of an encoder / U-Net,
    checked: one positive multiplier per level, dropout in [0, 1), image_size divisible by
    2^(levels-1), attention only at resolutions the net has (and only with an image_size)."""
    channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
    if not channel_mult:
        raise ValueError("channel_mult=() is empty: give one multiplier per resolution level, e.g. (1, 2)")
    for m in channel_mult:
        _positive_int("channel_mult entry", m)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must lie in [0, 1)")
    if image_size is None:
        if attention_resolutions:
            raise ValueError(f"attention_resolutions={attention_resolutions} needs image_size")
        return channel_mult, attention_resolutions, None
    _positive_int("image_size", image_size)
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by 2^(levels-1) = {factor} "
                         f"for channel_mult={channel_mult}")
    resolutions = tuple(image_size // 2**level for level in range(len(channel_mult)))
    bad = [r for r in attention_resolutions if r not in resolutions]
    if bad:
        raise ValueError(f"attention_resolutions {bad} not among this net's resolutions {resolutions}")
    return channel_mult, attention_resolutions, resolutions


def check_input(net: nn.Module, x: Tensor) -> None:
    """ValueError unless x is (B, net.in_channels, H, W) with H = W = net.image_size (if set) and
    H, W divisible by net.factor (the total downsampling)."""
    name = type(net).__name__
    if x.ndim != 4 or x.shape[1] != net.in_channels:
        raise ValueError(f"x has shape {tuple(x.shape)}; this {name} expects (B, {net.in_channels}, H, W)")
    H, W = x.shape[-2:]
    if net.image_size is not None and (H, W) != (net.image_size, net.image_size):
        raise ValueError(f"x is {H}x{W}; this {name} was built for image_size={net.image_size}")
    if H % net.factor or W % net.factor:
        raise ValueError(f"x is {H}x{W}; H and W must be divisible by {net.factor}")


class UNet(nn.Module):
    """Noise-conditional U-Net F(x, noise_cond, class_labels=None, augment_labels=None) -> (B, out_channels, H, W).

    Level l (l = 0 .. len(channel_mult) - 1) works at resolution image_size / 2^l with
    base_channels * channel_mult[l] channels and num_blocks ResBlocks (num_blocks + 1 on the way up,
    the extra one taking the skip of the downsampler). Self-attention follows each ResBlock at the
    resolutions in attention_resolutions, and sits in the middle block if mid_attention.
    Heads: head_channels channels each if given, else num_heads heads.
    The conditioning vector has base_channels * emb_mult channels; with num_classes, label
    num_classes is the null label and class_labels=None means null for all samples; with
    augment_dim, the labels of non-leaking augmentation enter it too (embeddings.Conditioning).
    The output conv and the last conv of every ResBlock start at zero (ADM), so a fresh
    network returns exactly 0. image_size=None builds a net for any H, W divisible by
    2^(levels-1), without attention outside the middle block.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, base_channels: int = 64,
                 channel_mult: tuple = (1, 2, 2), num_blocks: int = 2, attention_resolutions: tuple = (),
                 image_size: int | None = None, dropout: float = 0.0, num_classes: int | None = None,
                 num_heads: int = 4, head_channels: int | None = None, embedding: str = "sinusoidal",
                 emb_mult: int = 4, mid_attention: bool = True, conv_resample: bool = True, augment_dim: int = 0,
                 scale_shift: bool = True):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_channels", base_channels), ("num_blocks", num_blocks), ("emb_mult", emb_mult)):
            _positive_int(name, v)
        channel_mult, attention_resolutions, resolutions = check_levels(channel_mult, attention_resolutions,
                                                                        image_size, dropout)
        levels = len(channel_mult)
        self.factor = 2 ** (levels - 1)  # total downsampling
        resolutions = resolutions or ()

        def heads(ch: int) -> int:
            if head_channels is not None:
                _positive_int("head_channels", head_channels)
                if ch % head_channels:
                    raise ValueError(f"head_channels={head_channels} does not divide {ch} channels")
                return ch // head_channels
            _positive_int("num_heads", num_heads)
            if ch % num_heads:
                raise ValueError(f"num_heads={num_heads} does not divide {ch} channels")
            return num_heads

        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mult=channel_mult, num_blocks=num_blocks,
                           attention_resolutions=attention_resolutions, image_size=image_size, dropout=dropout,
                           num_classes=num_classes, num_heads=num_heads, head_channels=head_channels,
                           embedding=embedding, emb_mult=emb_mult, mid_attention=mid_attention,
                           conv_resample=conv_resample, augment_dim=augment_dim, scale_shift=scale_shift)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        emb_ch = base_channels * emb_mult
        self.cond = Conditioning(2 * ((base_channels + 1) // 2), emb_ch, embedding, num_classes, augment_dim)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # encoder: remember the channels of every output that becomes a skip connection
        ch, skip_chs = base_channels, [base_channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            res = resolutions[level] if resolutions else None
            for _ in range(num_blocks):
                layers = [ResBlock(ch, base_channels * mult, emb_ch, dropout, scale_shift)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(Attention(ch, heads(ch)))
                self.down.append(EmbSequential(*layers))
                skip_chs.append(ch)
            if level != levels - 1:
                self.down.append(EmbSequential(Downsample(ch, conv_resample)))
                skip_chs.append(ch)

        middle = [ResBlock(ch, ch, emb_ch, dropout, scale_shift)]
        if mid_attention:
            middle.append(Attention(ch, heads(ch)))
        middle.append(ResBlock(ch, ch, emb_ch, dropout, scale_shift))
        self.mid = EmbSequential(*middle)

        # decoder: each ResBlock eats one skip; the last one of a level is followed by an upsampler
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level] if resolutions else None
            for i in range(num_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), base_channels * mult, emb_ch, dropout, scale_shift)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(Attention(ch, heads(ch)))
                if level != 0 and i == num_blocks:
                    layers.append(Upsample(ch, conv_resample))
                self.up.append(EmbSequential(*layers))

        self.norm_out = norm(ch)
        self.conv_out = zero_(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        check_input(self, x)
        emb = self.cond(noise_cond, class_labels, x.shape[0], augment_labels)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips = [h]
        for step in self.down:
            h = step(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for step in self.up:
            h = step(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)
