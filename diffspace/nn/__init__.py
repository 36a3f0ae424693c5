"""Noise-conditional networks F(x, noise_cond, class_labels=None).

They know nothing of schedules: noise_cond (B,) is whatever the preconditioner feeds
(c_noise = ln(sigma)/4, 999 t, ...). This package imports no diffusion module.
"""

from __future__ import annotations

import torch
from torch import nn

from .classifier import EncoderClassifier
from .embeddings import Conditioning, FourierEmbedding, SinusoidalEmbedding, make_embedding
from .mlp import MLP
from .mp_unet import MPUNet
from .unet import UNet, group_count

Tensor = torch.Tensor

__all__ = ["SinusoidalEmbedding", "FourierEmbedding", "Conditioning", "make_embedding", "MLP", "UNet", "MPUNet",
           "group_count", "EncoderClassifier", "Energy", "count_parameters", "describe"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in the module's parameters (buffers such as Fourier frequencies excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe(module: nn.Module) -> str:
    """One line: 'UNet: 1.23 M parameters, base_channels=64, channel_mult=(1, 2), ...'."""
    n = count_parameters(module)
    size = f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n}"
    inner = module.net if isinstance(module, Energy) else module
    config = getattr(inner, "config", {})
    parts = [f"{type(module).__name__}: {size} parameters"]
    parts += [f"{k}={v!r}" for k, v in config.items() if v is not None and v != ()]
    return ", ".join(parts)


class Energy(nn.Module):
    """A scalar energy per sample from any vector network (Salimans & Ho 2021, 'Should EBMs model
    the energy or the score?'):

        E(x, c) = 0.5 * sum over non-batch dims of (x - net(x, c))^2     -> shape (B,)

    Its negative gradient -grad_x E = -(I - J_net)^T (x - net(x, c)) is a conservative, score-like
    field: where net(x, c) is a denoised estimate x0_hat and J_net is small it is -(x - x0_hat),
    i.e. sigma^2 times the score (Tweedie). Any 1/sigma^2 scaling belongs to the parameterization
    (it knows the schedule); the network does not. Gradients need autograd at sampling time too:
    use torch.autograd.grad(E.sum(), x, create_graph=training). Training by double backprop costs
    twice a vector step's matrix products by construction; measured per step: 1.6x the same net
    predicting eps for the ring8 MLP, 2.5x for the digits U-Net (benchmarks/energy.py).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None, **kwargs) -> Tensor:
        out = self.net(x, noise_cond, class_labels, **kwargs)
        if out.shape != x.shape:
            raise ValueError(f"Energy needs net(x) shaped like x {tuple(x.shape)}; got {tuple(out.shape)}")
        return 0.5 * (x - out).pow(2).flatten(1).sum(dim=1)
