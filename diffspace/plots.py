"""Figures (matplotlib, written as PNG). Sits on top of the math; nothing imports it but the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .schedules import Schedule


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ring_of_gaussians(n: int, generator: torch.Generator, k: int = 8, radius: float = 1.0, std: float = 0.08):
    """n points from k equal Gaussians on a circle (a 2-D toy for pictures)."""
    j = torch.randint(0, k, (n,), generator=generator)
    angle = 2 * math.pi * j.double() / k
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def forward_process_figure(path: Path, schedules: dict[str, Schedule], shown: str, seed: int = 0) -> Path:
    """The forward process q(z_t | x) = N(alpha_t x, sigma_t^2 I):

    top row, samples z_t of a 2-D ring for several t under the schedule `shown`;
    bottom row, for every schedule, the mean coefficient alpha_t, the variance sigma_t^2 and the
    log-SNR against t (the lecture's slide: the mean shrinks towards 0 and the variance grows).
    """
    plt = _pyplot()
    g = torch.Generator().manual_seed(seed)
    x = ring_of_gaussians(2000, g)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    sch = schedules[shown]
    times = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    fig, axes = plt.subplots(2, len(times), figsize=(3 * len(times), 6.4))
    for ax, t in zip(axes[0], times):
        tt = torch.tensor(t, dtype=torch.float64)
        z = sch.alpha(tt) * x + sch.sigma(tt) * eps
        ax.scatter(z[:, 0], z[:, 1], s=1, alpha=0.5)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
        ax.set_title(f"{shown}: t = {t:g}\nalpha={sch.alpha(tt).item():.3f}, sigma={sch.sigma(tt).item():.3f}", fontsize=9)
    t = torch.linspace(1e-3, 1 - 1e-3, 400, dtype=torch.float64)
    curves = [("alpha_t  (mean of q(z_t|x) / x)", "alpha"), ("sigma_t^2  (variance)", "sigma2"), ("log-SNR lambda_t", "logsnr")]
    for ax in axes[1, len(curves):]:
        ax.axis("off")
    for ax, (title, kind) in zip(axes[1], curves):
        for name, s in schedules.items():
            if s.t_max == math.inf:  # EDM: time is sigma; show it over [0, 80] rescaled to [0, 1]
                tt, label = t * 80.0, f"{name} (t/80)"
            else:
                tt, label = t, name
            y = {"alpha": lambda: s.alpha(tt), "sigma2": lambda: s.sigma(tt) ** 2, "logsnr": lambda: s.logsnr(tt)}[kind]()
            ax.plot(t, y, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("t")
        if kind == "sigma2":
            ax.set_yscale("log")
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
