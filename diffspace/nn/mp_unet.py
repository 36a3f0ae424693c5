"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, 'Analyzing and Improving the Training
Dynamics of Diffusion Models', config G), written from the paper's equations.

"Magnitude-preserving" (EDM2, sec. 2): each layer maps inputs of unit expected magnitude (RMS 1 per
element) to outputs of unit expected magnitude, and every weight row is kept at unit magnitude in
training (forced weight normalisation), so activations and weights cannot drift in size and the
net needs no normalisation layers (no group norm) and no biases. Sums, concatenations and SiLU are
rescaled (mp_sum, mp_cat, mp_silu), convs divide their weight by its norm and sqrt(fan_in), and
what should start at zero (output, embedding modulation) has a learned scalar gain initialised to 0.

EDM2 also trains with a learned per-noise-level uncertainty weighting of the loss (its
config B) and an inverse-square-root learning-rate decay (config E); those belong to the
losses and the training loop (losses.Uncertainty, train.learning_rate), not to the network.

    conv_in(cat(x, 1)) -> enc Blocks per level (a 'down' Block starts each level after the first)
        -> middle: 2 dec Blocks (attention in the first) -> per level num_blocks + 1 dec Blocks,
        each on mp_cat(h, skip), an 'up' Block between levels -> conv_out(gain = out_gain)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet import _positive_int, check_input, check_levels

Tensor = torch.Tensor


def normalize(x: Tensor, dim=None, eps: float = 1e-4) -> Tensor:
    """x / (eps + ||x|| / sqrt(n)) over `dim` (default: all but dim 0, i.e. per output channel of a
    weight), n = entries per normalised row: each row gets unit RMS (forced weight normalisation; pixel norm)."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    n = x.numel() / norm.numel()
    return x / (eps + norm / math.sqrt(n)).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """silu(x) / 0.596: 0.596 is the RMS of silu(z) for z ~ N(0, 1) (EDM2's 'MP-SiLU')."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): an interpolation of two independent unit-magnitude
    signals that stays at unit magnitude (EDM2's 'MP-Sum'); t is the weight of b."""
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """cat(w_a a, w_b b) along dim with C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2)),
    w_a = C (1 - t) / sqrt(N_a), w_b = C t / sqrt(N_b) (EDM2's 'MP-Cat'): unit magnitude, with a
    and b weighted (1 - t) : t as in mp_sum whatever their channel counts N_a, N_b."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C * (1 - t) / math.sqrt(Na)), b * (C * t / math.sqrt(Nb))], dim=dim)


def resample(x: Tensor, mode: str) -> Tensor:
    """'keep': x; 'down': 2x2 average pooling; 'up': nearest-neighbour x2 (EDM2's [1, 1] filter)."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return F.interpolate(x, scale_factor=2.0, mode="nearest") if mode == "up" else x


class MPFourier(nn.Module):
    """sqrt(2) cos(2 pi (f x + phi)), f ~ N(0, bandwidth^2) and phi ~ U[0, 1) drawn once and kept as
    buffers (EDM2's 'MP-Fourier'): a random phase makes each feature's RMS exactly 1."""

    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        _positive_int("channels", channels)
        self.register_buffer("freqs", torch.randn(channels) * bandwidth)
        self.register_buffer("phases", torch.rand(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, device=self.freqs.device).float()[:, None]
        return math.sqrt(2) * torch.cos(2 * math.pi * (x * self.freqs.float() + self.phases.float()))


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k) or int k) or linear layer (kernel ()), no bias
    (EDM2's 'forced weight normalization'): in training the stored weight is first
    projected back to unit-RMS rows, w <- normalize(w), then the layer uses
    w_hat = gain normalize(w) / sqrt(fan_in), so unit-variance white input gives unit-variance output."""

    def __init__(self, in_ch: int, out_ch: int, kernel=()):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, *kernel))

    def forward(self, x: Tensor, gain=1) -> Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(dtype)))
        # a copy, so that a second forward's in-place projection cannot touch a tensor saved for backward
        w = normalize(self.weight.to(dtype, copy=True))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2's residual block (fig. 21, config G). enc: resample, 1x1 conv_skip if the channel count
    changes, pixel norm; dec: resample, conv_skip after the residual branch. Residual branch:
    conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) (1 + emb_gain emb_linear(emb))))),
    x = mp_sum(x, branch, res_balance); optional self-attention with pixel-normalised q, k, v,
    x = mp_sum(x, attn, attn_balance); finally x is clamped to +-clip_act (None: no clamp)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, flavor: str = "enc", resample: str = "keep",
                 attention: bool = False, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        for name, v, allowed in (("flavor", flavor, ("enc", "dec")), ("resample", resample, ("keep", "up", "down"))):
            if v not in allowed:
                raise ValueError(f"{name}={v!r}; allowed: {', '.join(allowed)}")
        self.flavor, self.mode, self.dropout = flavor, resample, dropout
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.conv_res0 = MPConv(out_ch if flavor == "enc" else in_ch, out_ch, 3)
        self.emb_linear = MPConv(emb_ch, out_ch, ())
        self.emb_gain = nn.Parameter(torch.zeros(()))
        self.conv_res1 = MPConv(out_ch, out_ch, 3)
        self.conv_skip = MPConv(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.num_heads = 0
        if attention:  # heads of ~64 channels, at least one; fall back to a divisor of out_ch
            self.num_heads = max(1, out_ch // 64)
            while out_ch % self.num_heads:
                self.num_heads -= 1
            self.attn_qkv = MPConv(out_ch, 3 * out_ch, 1)
            self.attn_proj = MPConv(out_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.mode)
        if self.flavor == "enc":
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = self.conv_res1(F.dropout(y, self.dropout, training=self.training))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            B, C, H, W = x.shape
            qkv = self.attn_qkv(x).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
            q, k, v = normalize(qkv, dim=3).transpose(-1, -2).contiguous().unbind(dim=1)  # (B, heads, H*W, d), d contiguous
            # (the fused attention kernels need it; unet.Attention)
            y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
            x = mp_sum(x, self.attn_proj(y.transpose(-1, -2).reshape(B, C, H, W)), self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)


class MPUNet(nn.Module):
    """Magnitude-preserving U-Net F(x, noise_cond, class_labels=None) -> (B, out_channels, H, W), a
    drop-in for diffspace.nn.UNet (same arguments where they overlap, same forward).

    Level l has base_channels * channel_mult[l] channels at image_size / 2^l; self-attention in the
    Blocks at attention_resolutions and in the first middle Block. Conditioning:
    emb = mp_silu(mp_sum(MPConv(MPFourier(noise_cond)), MPConv(sqrt(N) onehot(label)), label_balance))
    with 4 * base_channels channels; label num_classes (the null label, also class_labels=None) is
    the all-zero vector. Skips join by mp_cat(h, skip, concat_balance). out_gain starts at 0, so a
    fresh network returns exactly 0. image_size=None: any H, W divisible by 2^(levels-1).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, base_channels: int = 64,
                 channel_mult: tuple = (1, 2), num_blocks: int = 2, attention_resolutions: tuple = (),
                 image_size: int | None = None, dropout: float = 0.0, num_classes: int | None = None,
                 label_balance: float = 0.5, concat_balance: float = 0.5):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("base_channels", base_channels),
                        ("num_blocks", num_blocks), ("num_classes", 1 if num_classes is None else num_classes)):
            _positive_int(name, v)
        for name, v in (("label_balance", label_balance), ("concat_balance", concat_balance)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name}={v!r} must lie in [0, 1]")
        channel_mult, attention_resolutions, resolutions = check_levels(channel_mult, attention_resolutions,
                                                                        image_size, dropout)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mult=channel_mult, num_blocks=num_blocks,
                           attention_resolutions=attention_resolutions, image_size=image_size, dropout=dropout,
                           num_classes=num_classes, label_balance=label_balance, concat_balance=concat_balance)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.label_balance, self.concat_balance, levels = label_balance, concat_balance, len(channel_mult)
        self.factor = 2 ** (levels - 1)
        attn = [r in attention_resolutions for r in resolutions or (None,) * levels]  # per level
        emb_ch = 4 * base_channels

        self.emb_fourier = MPFourier(base_channels)
        self.emb_noise = MPConv(base_channels, emb_ch, ())
        self.emb_label = MPConv(num_classes, emb_ch, ()) if num_classes else None
        self.conv_in = MPConv(in_channels + 1, base_channels, 3)

        def block(cin, cout, flavor, mode="keep", attention=False):
            return Block(cin, cout, emb_ch, flavor, mode, attention, dropout)

        ch, skip_chs = base_channels, [base_channels]
        self.enc = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            if level:
                self.enc.append(block(ch, ch, "enc", "down"))
                skip_chs.append(ch)
            for _ in range(num_blocks):
                self.enc.append(block(ch, base_channels * mult, "enc", attention=attn[level]))
                ch = base_channels * mult
                skip_chs.append(ch)
        self.mid = nn.ModuleList([block(ch, ch, "dec", attention=True), block(ch, ch, "dec")])
        self.dec = nn.ModuleList()  # every Block but the 'up' ones eats one skip
        for level, mult in reversed(list(enumerate(channel_mult))):
            if level != levels - 1:
                self.dec.append(block(ch, ch, "dec", "up"))
            for _ in range(num_blocks + 1):
                self.dec.append(block(ch + skip_chs.pop(), base_channels * mult, "dec", attention=attn[level]))
                ch = base_channels * mult
        self.conv_out = MPConv(ch, out_channels, 3)
        self.out_gain = nn.Parameter(torch.zeros(()))

    def embed(self, noise_cond: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        """The conditioning vector (batch, 4 base_channels), unit magnitude (see the class docstring)."""
        dtype, device = self.conv_in.weight.dtype, self.conv_in.weight.device
        c = torch.as_tensor(noise_cond, device=device)
        if c.numel() == 1 and c.ndim <= 1:
            c = c.reshape(1).expand(batch)
        if c.shape != (batch,):
            raise ValueError(f"noise_cond has shape {tuple(c.shape)}; expected ({batch},) or a scalar")
        emb = self.emb_noise(self.emb_fourier(c).to(dtype))
        if self.emb_label is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a network built with num_classes=None")
            return mp_silu(emb)
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}; expected ({batch},)")
        labels = class_labels.long().to(device)
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(f"class_labels must lie in 0 .. {self.num_classes} (= null)")
        onehot = F.one_hot(labels, self.num_classes + 1)[:, :-1].to(dtype) * math.sqrt(self.num_classes)
        return mp_silu(mp_sum(emb, self.emb_label(onehot), self.label_balance))

    def forward(self, x: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None) -> Tensor:
        check_input(self, x)
        emb = self.embed(noise_cond, class_labels, x.shape[0])
        h = x.to(self.conv_in.weight.dtype)
        h = self.conv_in(torch.cat([h, torch.ones_like(h[:, :1])], dim=1))  # constant channel (EDM2)
        skips = [h]
        for blk in self.enc:
            skips.append(h := blk(h, emb))
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.dec:
            h = blk(h if blk.mode == "up" else mp_cat(h, skips.pop(), t=self.concat_balance), emb)
        return self.conv_out(h, gain=self.out_gain).to(x.dtype)
