"""Embeddings of the scalar noise condition (B,) -> (B, dim).

The network never knows what its noise condition means: the preconditioner feeds it
c_noise = ln(sigma)/4 (EDM), 999 t (DDPM/VP), ln(sigma/2) (VE), ... Both embeddings below accept
any real value, negative included.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"embedding dim={dim!r} must be an even integer >= 2 (half cosines, half sines)")


def _as_batch(noise_cond: Tensor) -> Tensor:
    """noise_cond as a float32 vector (B,); a scalar becomes (1,)."""
    noise_cond = torch.as_tensor(noise_cond)
    if noise_cond.ndim == 0:
        noise_cond = noise_cond.reshape(1)
    if noise_cond.ndim != 1:
        raise ValueError(f"noise_cond has shape {tuple(noise_cond.shape)}; expected (B,)")
    return noise_cond.float()


class SinusoidalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a real number (Vaswani et al. 2017, sec. 3.5), used for
    the diffusion time by Ho et al. (2020) and Dhariwal & Nichol (2021):

        freq_k = exp(-ln(max_period) k / half),  k = 0 .. half-1,  half = dim / 2
        emb(x) = [cos(x freq_0), ..., cos(x freq_{half-1}), sin(x freq_0), ..., sin(x freq_{half-1})]

    (cosines first, as in ADM's `timestep_embedding`). Periods range from 2 pi to 2 pi max_period;
    for a small-range input such as ln(sigma)/4 the slow half is nearly constant and the MLP behind
    it learns to ignore it.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        _check_dim(dim)
        if not max_period > 1:
            raise ValueError(f"max_period={max_period!r} must be > 1")
        self.dim, self.max_period = dim, float(max_period)

    def forward(self, noise_cond: Tensor) -> Tensor:
        x = _as_batch(noise_cond)
        half = self.dim // 2
        k = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = torch.exp(-math.log(self.max_period) * k / half)
        angles = x[:, None] * freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}"


class FourierEmbedding(nn.Module):
    """Random Fourier features (Tancik et al. 2020; Song et al. 2021, NCSN++ for ln sigma):

        b_k ~ N(0, scale^2) drawn once,   emb(x) = [cos(2 pi b x), sin(2 pi b x)]

    The frequencies b are a fixed buffer (in state_dict, not in parameters(), never trained).
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        _check_dim(dim)
        if not scale > 0:
            raise ValueError(f"scale={scale!r} must be > 0")
        self.dim, self.scale = dim, float(scale)
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, noise_cond: Tensor) -> Tensor:
        x = _as_batch(noise_cond).to(self.freqs.device)
        angles = 2 * math.pi * x[:, None] * self.freqs[None, :].float()
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale:g}"


EMBEDDINGS = {"sinusoidal": SinusoidalEmbedding, "fourier": FourierEmbedding}


def make_embedding(name: str, dim: int) -> nn.Module:
    """The embedding called `name` ('sinusoidal' or 'fourier') of width dim."""
    if name not in EMBEDDINGS:
        raise ValueError(f"embedding={name!r}; allowed: {', '.join(EMBEDDINGS)}")
    return EMBEDDINGS[name](dim)


class Conditioning(nn.Module):
    """The conditioning vector of a network: noise embedding -> small MLP (+ class embedding).

        emb = Linear(SiLU(Linear(embed(noise_cond)))) + label_emb(class_labels)

    as in Ho et al. (2020) and Dhariwal & Nichol (2021, class embedding added to the time
    embedding). With num_classes given, the label table has num_classes + 1 rows: index num_classes
    is the 'null' label of classifier-free guidance (Ho & Salimans 2022), and class_labels=None
    means the null label for every sample. With augment_dim, the labels of non-leaking augmentation
    (augment.py) are added through Linear(augment_dim, out_dim) without bias, as EDM's map_augment
    (Karras et al. 2022, Appendix F.2): augment_labels=None, the labels of no augmentation (zeros),
    adds nothing. The blocks apply SiLU + their own projection.
    """

    def __init__(self, emb_dim: int, out_dim: int, embedding: str = "sinusoidal", num_classes: int | None = None,
                 augment_dim: int = 0):
        super().__init__()
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} must be a positive integer or None")
        self.num_classes = num_classes
        self.embed = make_embedding(embedding, emb_dim)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.label_emb = nn.Embedding(num_classes + 1, out_dim) if num_classes else None
        self.augment_emb = nn.Linear(augment_dim, out_dim, bias=False) if augment_dim else None

    def forward(self, noise_cond: Tensor, class_labels: Tensor | None, batch: int,
                augment_labels: Tensor | None = None) -> Tensor:
        c = torch.as_tensor(noise_cond, device=self.mlp[0].weight.device)
        if c.numel() == 1 and c.ndim <= 1:
            c = c.reshape(1).expand(batch)
        if c.shape != (batch,):
            raise ValueError(f"noise_cond has shape {tuple(c.shape)}; expected ({batch},) or a scalar")
        emb = self.mlp(self.embed(c).to(self.mlp[0].weight.dtype))
        if augment_labels is not None:
            if self.augment_emb is None:
                raise ValueError("augment_labels given to a network built without augment_dim")
            if augment_labels.shape != (batch, self.augment_emb.in_features):
                raise ValueError(f"augment_labels has shape {tuple(augment_labels.shape)}; "
                                 f"expected ({batch}, {self.augment_emb.in_features})")
            emb = emb + self.augment_emb(augment_labels.to(emb.dtype))
        if self.label_emb is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a network built with num_classes=None")
            return emb
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}; expected ({batch},)")
        return emb + self.label_emb(class_labels.long())
