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


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1):
    """(N, C, H, W) in [-1, 1] -> a uint8 PIL image tiling the N images (C = 1 or 3)."""
    from PIL import Image

    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[k]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_samples(x: torch.Tensor, path: Path, reference: torch.Tensor | None = None) -> Path:
    """Samples as a PNG: an image grid for (N, C, H, W), a scatter plot for (N, 2) points
    (next to `reference` points if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        image_grid(x, scale=max(1, 64 // x.shape[-1])).save(path)
        return path
    plt = _pyplot()
    sets = [("samples", x)] + ([("data", reference)] if reference is not None else [])
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], sets):
        pts = pts.detach().cpu().reshape(len(pts), -1)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set(title=title, aspect="equal")
    lims = [min(a.get_xlim()[0] for a in axes[0]), max(a.get_xlim()[1] for a in axes[0])]
    for ax in axes[0]:
        ax.set(xlim=lims, ylim=lims)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def samples_vs_data(samples: torch.Tensor, data: torch.Tensor, path: Path) -> Path:
    """Generated images (left) next to real ones (right), as one PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3))
    for ax, (title, x) in zip(axes, [("generated", samples), ("real", data)]):
        img = image_grid(x, nrow=10)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    return _save(fig, plt, path)


def forward_process_images(x: torch.Tensor, schedule: Schedule | None, path: Path, seed: int = 0) -> Path:
    """The forward process on images: rows are images, columns x_t = alpha_t x + sigma_t eps at
    t = 0 .. 1 (DDPM's linear schedule unless another is given), and below the mean coefficient
    alpha_t and variance sigma_t^2 of q(x_t | x_0) against t (the lecture's forward-process slide)."""
    from .schedules import ddpm_linear

    schedule = schedule or ddpm_linear()
    plt = _pyplot()
    times = [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0]
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=g)
    fig = plt.figure(figsize=(1.3 * len(times), 1.3 * len(x) + 2.8))
    grid = fig.add_gridspec(len(x) + 2, len(times))
    for j, t in enumerate(times):
        tt = torch.tensor(t, dtype=torch.float64)
        xt = (schedule.alpha(tt) * x.double() + schedule.sigma(tt) * eps.double()).float()
        for i in range(len(x)):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(xt[i, 0].clamp(-2.5, 2.5), cmap="gray", vmin=-2.5, vmax=2.5)
            ax.set(xticks=[], yticks=[])
            if i == 0:
                ax.set_title(f"t = {t:g}", fontsize=9)
    ax = fig.add_subplot(grid[len(x):, :])
    t = torch.linspace(0, 1, 200, dtype=torch.float64)
    ax.plot(t, schedule.alpha(t), label="mean coefficient alpha_t")
    ax.plot(t, schedule.sigma(t) ** 2, label="variance sigma_t^2")
    ax.set(xlabel="t", title=f"q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), {schedule.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def reverse_snapshots(snapshots: list, path: Path, columns: int = 8) -> Path:
    """Reverse-process snapshots [(sigma, x, denoised), ...] from a sampler callback: for a few
    steps, the noisy state x (top) and the denoiser's estimate D(x, sigma) (bottom) of each image."""
    plt = _pyplot()
    pick = sorted({round(k * (len(snapshots) - 1) / (columns - 1)) for k in range(columns)})
    n = snapshots[0][1].shape[0]
    fig, axes = plt.subplots(2 * n, len(pick), figsize=(1.2 * len(pick), 1.2 * 2 * n), squeeze=False)
    for j, k in enumerate(pick):
        sigma, x, den = snapshots[k]
        for i in range(n):
            for r, (img, lim) in enumerate([(x[i, 0] / (1 + sigma**2) ** 0.5, 2.5), (den[i, 0], 1.0)]):
                ax = axes[2 * i + r, j]
                ax.imshow(img.clamp(-lim, lim), cmap="gray", vmin=-lim, vmax=lim)
                ax.set(xticks=[], yticks=[])
        axes[0, j].set_title(f"sigma={sigma:.3g}", fontsize=8)
    axes[0, 0].set_ylabel("x_t", fontsize=8)
    axes[1, 0].set_ylabel("D(x_t)", fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def loss_curve(metrics_csv: Path, path: Path) -> Path:
    """Training loss (per logged window) against step, from a run's metrics.csv."""
    import csv

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set(xlabel="step", ylabel="weighted loss", yscale="log", title="training loss")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
