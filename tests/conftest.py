"""Helpers shared by the tests."""

import torch


def perturb_(net, std=0.1, seed=0):
    """Move every parameter of a net away from its (partly zero) init, so every input and the noise
    conditioning matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


class Counting:
    """A denoiser that counts its calls (to check a sampler's NFE exactly)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)
