"""A residual MLP for low-dimensional data (B, dim): 2-D toys, small vectors."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import Conditioning

Tensor = torch.Tensor


class MLPBlock(nn.Module):
    """x + Linear(Dropout(SiLU(Linear(SiLU(LayerNorm(x) (1 + scale) + shift))))),
    (scale, shift) = Linear(SiLU(emb)): the scale-shift modulation of Dhariwal & Nichol (2021,
    'use_scale_shift_norm'), here on a LayerNorm."""

    def __init__(self, hidden: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.emb_proj = nn.Linear(emb_channels, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb_proj(torch.nn.functional.silu(emb)).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        h = self.fc1(torch.nn.functional.silu(h))
        h = self.fc2(self.dropout(torch.nn.functional.silu(h)))
        return x + h


class MLP(nn.Module):
    """Noise-conditional residual MLP F(x, noise_cond, class_labels=None) for x of shape (B, dim).

        h = Linear(x);  h = block(h, emb) depth times;  out = Linear(SiLU(LayerNorm(h)))

    emb = Conditioning(noise_cond, class_labels) (embedding 'sinusoidal' or 'fourier' of width
    emb_dim, through a 2-layer MLP to width hidden, plus the class embedding with its null label
    num_classes). The output layer starts at zero (as in ADM/EDM), so a fresh net returns 0.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128,
                 embedding: str = "sinusoidal", num_classes: int | None = None, dropout: float = 0.0,
                 out_dim: int | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("emb_dim", emb_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth={depth!r} must be a non-negative integer")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} must lie in [0, 1)")
        out_dim = dim if out_dim is None else out_dim
        self.config = dict(dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim, embedding=embedding,
                           num_classes=num_classes, dropout=dropout, out_dim=out_dim)
        self.num_classes = num_classes
        self.cond = Conditioning(emb_dim, hidden, embedding, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"x has shape {tuple(x.shape)}; this MLP expects (B, {self.config['dim']})")
        emb = self.cond(noise_cond, class_labels, x.shape[0])
        h = self.inp(x.to(self.inp.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).to(x.dtype)
