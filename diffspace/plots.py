"""Figures (matplotlib, written as PNG). Sits on top of the math; nothing imports it but the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import losses
from .presets import PRESETS, Preset
from .samplers import SAMPLERS, get_sigmas, sampler_nfe
from .schedules import DiscreteVP, Schedule


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


def save_samples(x: torch.Tensor, path: Path, reference: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> Path:
    """Samples as a PNG: an image grid for (N, C, H, W) (one row per class for sorted `labels` in
    equal shares), a scatter plot for (N, 2) points coloured by label (next to `reference` points)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        nrow = len(x) // len(torch.unique(labels)) if labels is not None else None
        image_grid(x, nrow=nrow, scale=max(1, 64 // x.shape[-1])).save(path)
        return path
    plt = _pyplot()
    sets = [("samples", x)] + ([("data", reference)] if reference is not None else [])
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], sets):
        pts = pts.detach().cpu().reshape(len(pts), -1)
        colour = labels.cpu().numpy() if labels is not None and title == "samples" else None
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, c=colour, cmap="tab10" if colour is not None else None)
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
            ax.imshow(xt[i, 0].clamp(-2.5, 2.5).numpy(), cmap="gray", vmin=-2.5, vmax=2.5)
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
                ax.imshow(img.clamp(-lim, lim).cpu().numpy(), cmap="gray", vmin=-lim, vmax=lim)
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


# -- reverse-process trajectories on 2-D data ------------------------------------------------------------
def trajectory(sampler: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator=None, **options):
    """The states a sampler passes through: (levels (S,), states (S, *x.shape)) holding the start x at
    sigmas[0], every state the sampler reports to its callback (the state before each step, at the
    level it reports, e.g. EDM's sigma_hat after churn) and the final sample at sigmas[-1]."""
    levels, states = [float(sigmas[0])], [x.detach().clone()]

    def record(s):
        levels.append(float(s["sigma"]))
        states.append(s["x"].detach().clone())

    with torch.no_grad():
        out = SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, callback=record, **options)
    levels.append(float(sigmas[-1]))
    states.append(out.detach().clone())
    return torch.tensor(levels, dtype=torch.float64), torch.stack(states)


def vp_scaled(states: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x~ / sqrt(1 + sigma^2): the scale-free state in VP coordinates z_t = alpha_t x~ with
    alpha_t = 1 / sqrt(1 + sigma^2) (Karras et al. 2022, sec. 4), so noise at sigma = 80 and data share axes."""
    scale = (1 + levels.to(states.device, torch.float64) ** 2) ** -0.5
    return states * scale.to(states.dtype).reshape(-1, *([1] * (states.ndim - 1)))


def _density_background(ax, lim: float, log_density=None, reference=None, bins: int = 200) -> None:
    """log_density(points) as filled contours on [-lim, lim]^2 (clipped 12 nats below its maximum),
    else a 2-D histogram of `reference` points, else nothing."""
    if log_density is not None:
        u = torch.linspace(-lim, lim, bins, dtype=torch.float64)
        X, Y = torch.meshgrid(u, u, indexing="xy")
        with torch.no_grad():
            lp = log_density(torch.stack([X.flatten(), Y.flatten()], dim=1)).reshape(bins, bins).double().cpu()
        ax.contourf(X.numpy(), Y.numpy(), lp.clamp(min=float(lp.max()) - 12).numpy(), levels=12, cmap="Blues")
    elif reference is not None:
        r = reference.detach().double().cpu().reshape(len(reference), -1)
        ax.hist2d(r[:, 0].numpy(), r[:, 1].numpy(), bins=150, range=[[-lim, lim], [-lim, lim]], cmap="Blues", cmin=1)


def _draw_paths(ax, paths: torch.Tensor, levels: torch.Tensor):
    """Paths (S, n, 2) as line segments coloured by log10 of the noise level they start from,
    start points as black circles, end points as red dots; returns the segments (for a colour bar)."""
    from matplotlib.collections import LineCollection

    p = paths.detach().double().cpu()
    segments = torch.stack([p[:-1], p[1:]], dim=2).transpose(0, 1).reshape(-1, 2, 2)  # (n (S-1), 2, 2)
    shade = torch.log10(levels[:-1].clamp(min=1e-3)).repeat(p.shape[1])
    lines = LineCollection(segments.numpy(), array=shade.numpy(), cmap="plasma", lw=0.9, alpha=0.75)
    ax.add_collection(lines)
    ends = p[[0, -1]].numpy()
    ax.scatter(ends[0, :, 0], ends[0, :, 1], s=18, facecolors="none", edgecolors="k", lw=0.8, label="start (noise)",
               zorder=3)
    ax.scatter(ends[1, :, 0], ends[1, :, 1], s=14, c="red", label="end (sample)", zorder=4)
    return lines


def reverse_trajectories(denoiser, path: Path, *, log_density=None, reference=None, n: int = 32,
                         sigma_max: float = 80.0, steps: int = 18, churn: float = 40.0, seed: int = 0,
                         device="cpu", sigma_min: float = 0.002) -> Path:
    """Reverse-process paths of n particles of 2-D data, from the same noise x = sigma_max * N(0, I):
    left, the probability-flow ODE (Heun, Karras et al. 2022 Algorithm 1); right, the stochastic
    EDM sampler (Algorithm 2, S_churn = `churn`, plain Heun at churn = 0); both on the EDM grid with
    `steps` levels (samplers.get_sigmas('edm', steps, sigma_min=..., sigma_max=...)). States are collected through the
    samplers' callback (`trajectory`) and drawn in VP-scaled coordinates x / sqrt(1 + sigma^2)
    (`vp_scaled`), so that the start (unit Gaussian noise) and the data share the axes. Behind the
    paths: filled contours of log_density(points) (e.g. an analytic mixture's log_prob) if given, else
    a 2-D histogram of `reference` points. `denoiser` is any D(x, sigma) (a Diffusion model, a mixture)
    taking float32 points on `device`."""
    plt = _pyplot()
    g = torch.Generator(device=device).manual_seed(seed)
    sigmas = get_sigmas("edm", steps, sigma_min=sigma_min, sigma_max=sigma_max)
    x = sigma_max * torch.randn(n, 2, generator=g, device=device)
    runs = [(f"ODE: heun, {sampler_nfe('heun', steps)} NFE", trajectory("heun", denoiser, x, sigmas)),
            (f"SDE: edm_sde, S_churn = {churn:g}, {sampler_nfe('edm_sde', steps)} NFE",
             trajectory("edm_sde", denoiser, x, sigmas, generator=g, S_churn=churn))]
    paths = [vp_scaled(states, levels) for _, (levels, states) in runs]
    lim = 1.1 * float(torch.quantile(torch.cat([p.flatten() for p in paths]).abs().double(), 0.995))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8), layout="constrained")
    for ax, (title, (levels, _)), p in zip(axes, runs, paths):
        _density_background(ax, lim, log_density, reference)
        lines = _draw_paths(ax, p, levels)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title,
               xlabel="x_1 / sqrt(1 + sigma^2)", ylabel="x_2 / sqrt(1 + sigma^2)")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.colorbar(lines, ax=axes, shrink=0.8, label="log10 sigma of the step")
    fig.suptitle(f"reverse process from sigma = {sigma_max:g} to 0 over the data density, {len(x)} particles")
    return _save(fig, plt, path)


# -- training loss per noise level --------------------------------------------------------------------------
def _logsnr_bounds(schedule: Schedule, low: float, high: float) -> tuple[float, float]:
    """[low, high] cut to the schedule's log-SNR range [lambda(t_max), lambda(t_min)]."""
    ends = schedule.logsnr(torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64))
    return max(low, float(ends[1])), min(high, float(ends[0]))


def noise_levels(model, n_levels: int, logsnr_range: tuple[float, float] | None = None, draws: int = 10_000):
    """Training times t of `n_levels` noise levels of a train.Diffusion, evenly spaced in log-SNR over
    the range its noise distribution visits (min .. max of `draws` seeded draws), or over
    `logsnr_range` cut to the schedule's range, mapped by schedule.t_from_logsnr. On a discrete chain
    (DiscreteVP, e.g. DDPM) t is snapped to the steps i / T, i = 1..T (duplicates dropped), where
    the chain and its 'vlb' weighting are defined. Sorted by increasing log-SNR."""
    sch = model.schedule
    if logsnr_range is None:
        lam = sch.logsnr(model.noise(draws, sch, generator=torch.Generator().manual_seed(0)))
        lam = lam[torch.isfinite(lam)]  # zero terminal SNR's lambda = -inf is no point of the axis
        low, high = float(lam.min()), float(lam.max())
    else:
        low, high = _logsnr_bounds(sch, *logsnr_range)
    t = sch.t_from_logsnr(torch.linspace(low, high, n_levels, dtype=torch.float64))
    if isinstance(sch, DiscreteVP):
        t = torch.unique(torch.round(t * sch.T).clamp(1, sch.T)) / sch.T
    return t[torch.argsort(sch.logsnr(t))]


@torch.no_grad()
def loss_per_noise_level(model, x: torch.Tensor, *, n_levels: int = 32, labels: torch.Tensor | None = None,
                         seed: int = 0, logsnr_range: tuple[float, float] | None = None):
    """The per-t training loss of a train.Diffusion: at each level t of `noise_levels`,

        L(t) = mean_i model.loss(x_i, labels, g, t)     (w(t) ||target - prediction||^2 in its own space),

    with the same noise eps at every level (g reseeded with `seed`: common random numbers, a smoother
    curve). The model is used in the mode it is in (call .eval() for dropout-free numbers).
    Returns (t, lambda = schedule.logsnr(t), L), each of shape (levels,)."""
    t = noise_levels(model, n_levels, logsnr_range)
    loss = []
    for t_k in t.tolist():
        g = torch.Generator(device=x.device).manual_seed(seed)
        tt = torch.full((x.shape[0],), t_k, dtype=torch.float64, device=x.device)
        loss.append(model.loss(x, labels, g, t=tt).mean().double().cpu())
    return t, model.schedule.logsnr(t), torch.stack(loss)


def loss_per_noise_level_figure(models, x: torch.Tensor, path: Path, *, n_levels: int = 32,
                                labels: torch.Tensor | None = None, seed: int = 0,
                                logsnr_range: tuple[float, float] | None = None) -> Path:
    """The weighted training loss L(t) of `loss_per_noise_level` against log-SNR lambda_t, one line per
    model (a Diffusion, or a dict label -> Diffusion to compare runs on the same data x and noise).
    Each curve is its model's own objective, so lines are comparable where the objectives agree."""
    models = models if isinstance(models, dict) else {"model": models}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, model in models.items():
        _, lam, loss = loss_per_noise_level(model, x, n_levels=n_levels, labels=labels, seed=seed,
                                            logsnr_range=logsnr_range)
        desc = f"{model.preset.name}, {model.parameterization}, {model.weighting}"
        ax.plot(lam.numpy(), loss.numpy(), marker=".", label=f"{label} ({desc})")
    ax.set(xlabel="log-SNR lambda = log(alpha_t^2 / sigma_t^2)", ylabel="mean weighted loss", yscale="log",
           title="training loss per noise level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


# -- loss weightings -------------------------------------------------------------------------------------
LOSS_SPACES = ("x0", "eps", "v", "flow", "score")


def lsimple_weights(schedule: Schedule, logsnr: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight L_simple (weight 1 on ||eps - eps_hat||^2, Ho et al. 2020 eq. 14) puts on each
    parameterization's error at log-SNR `logsnr`: losses.convert_weight(1, 'eps', p, t, schedule),
    t = schedule.t_from_logsnr(logsnr). x0: SNR = exp(lambda); eps: 1; score: sigma_t^2 (energy: the same);
    v: alpha^2 / (alpha^2 + sigma^2)^2 (alpha_t^2 on VP schedules);
    flow: (alpha/sigma)^2 / (alpha' - sigma' alpha/sigma)^2 (alpha_t^2 on rectified flow)."""
    t = schedule.t_from_logsnr(torch.as_tensor(logsnr, dtype=torch.float64))
    return {p: losses.convert_weight(torch.ones_like(t), "eps", p, t, schedule) for p in LOSS_SPACES}


def x0_weight(schedule: Schedule, weighting: str, *, defined_in: str | None = None,
              logsnr_range: tuple[float, float] = (-12.0, 12.0), n: int = 400, **kwargs):
    """(lambda, w): the x0-space weight lambda(sigma) on ||D - x||^2 of a losses.WEIGHTINGS entry stated in
    `defined_in` (losses.weighting(..., space='x0')), over `logsnr_range` cut to the schedule's range.
    Continuous schedules: n levels even in log-SNR. Discrete chains (DiscreteVP): the steps t = i / T,
    i = 1..T, where the chain is defined; 'vlb' takes the index i itself (losses.vlb_weight)."""
    low, high = _logsnr_bounds(schedule, *logsnr_range)
    if isinstance(schedule, DiscreteVP):
        i = torch.arange(1, schedule.T + 1, dtype=torch.float64)
        t = schedule.discrete_t(i)
        arg = i if weighting == "vlb" else t
    else:
        t = arg = schedule.t_from_logsnr(torch.linspace(low, high, n, dtype=torch.float64))
    lam = schedule.logsnr(t)
    w = losses.weighting(weighting, arg, schedule, space="x0", defined_in=defined_in, **kwargs)
    keep = (lam >= low) & (lam <= high)
    return lam[keep], w[keep]


def preset_x0_weight(preset: Preset, **options):
    """x0_weight of a preset's own weighting on its training schedule (Karras et al. 2022, Table 1
    'loss weighting' as lambda(sigma); DDPM's L_simple and rectified flow's flow loss converted)."""
    return x0_weight(preset.training_schedule, preset.weighting, defined_in=preset.weighting_space,
                     **options, **preset.weighting_kwargs)


def weighting_figure(path: Path, schedule: Schedule | None = None,
                     logsnr_range: tuple[float, float] = (-12.0, 12.0)) -> Path:
    """The lecture's loss-weighting table drawn, against log-SNR lambda, log y-axis:
    left, the weight L_simple (eps-space weight 1) puts on each parameterization's error on a VP
    schedule (default: iDDPM cosine; `lsimple_weights`); right, the x0-space weight lambda(sigma) on
    ||D - x||^2 of every preset's own weighting (presets.PRESETS, `preset_x0_weight`), plus DDPM's true
    VLB weighting (Ho et al. 2020, eq. 12) on its discrete chain (i = 1..T) for contrast."""
    from .schedules import Cosine

    schedule = schedule or Cosine()
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    low, high = _logsnr_bounds(schedule, *logsnr_range)
    lam = torch.linspace(low, high, 400, dtype=torch.float64)
    formulas = {"x0": "SNR = exp(lambda)", "eps": "1", "v": "alpha^2 / (alpha^2 + sigma^2)^2", "flow":
                "(alpha/sigma)^2 / (alpha' - sigma' alpha/sigma)^2", "score": "sigma^2 (= energy)"}
    for p, w in lsimple_weights(schedule, lam).items():
        axes[0].plot(lam.numpy(), w.numpy(), label=f"{p}: {formulas[p]}")
    axes[0].set(title=f"L_simple seen in each loss space ({schedule.name} schedule)",
                ylabel="weight on ||p - p_hat||^2")
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3))]
    for k, (name, preset) in enumerate(PRESETS.items()):
        lam_p, w = preset_x0_weight(preset, logsnr_range=logsnr_range)
        axes[1].plot(lam_p.numpy(), w.numpy(), ls=styles[k % len(styles)], lw=2.5 - 0.3 * k,
                     label=f"{name}: {preset.text['weighting']}")
    ddpm = PRESETS["ddpm"]
    lam_v, w_v = x0_weight(ddpm.training_schedule, "vlb", logsnr_range=logsnr_range)
    axes[1].plot(lam_v.numpy(), w_v.numpy(), color="gray", lw=1, label="ddpm L_vlb (Ho et al. eq. 12), i = 1..T")
    axes[1].set(title="each preset's weighting as lambda(sigma) on ||D - x||^2", ylabel="x0-space weight")
    for ax in axes:
        ax.set(xlabel="log-SNR lambda = log(alpha_t^2 / sigma_t^2)", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


# -- comparisons ------------------------------------------------------------------------------------------
def quality_vs_nfe(results: dict, path: Path, *, metric_name: str, floor: float | None = None,
                   log_y: bool = False, title: str | None = None, x_name: str = "NFE (denoiser evaluations)") -> Path:
    """Sample quality against the number of denoiser evaluations: results = {label: {nfe: value}}, one
    line with markers per label (preset / sampler), log-x NFE, and the metric's noise floor (e.g. the
    sliced W2 between two true sample sets, evaluate.noise_floor) as a dashed line if given. Any
    other positive x (e.g. the EMA length sigma_rel) with x_name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curve in results.items():
        nfe = sorted(curve)
        ax.plot(nfe, [curve[k] for k in nfe], marker="o", label=label)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", label=f"noise floor {floor:.3g}")
    ax.set(xscale="log", xlabel=x_name, ylabel=metric_name,
           title=title or f"{metric_name} vs {x_name.split(' (')[0]}", yscale="log" if log_y else "linear")
    ticks = sorted({k for curve in results.values() for k in curve})
    ax.set_xticks(ticks, [f"{k:g}" for k in ticks], minor=False)
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def bar_table(rows: dict, path: Path, *, title: str = "runs side by side", floors: dict | None = None) -> Path:
    """rows = {run: {metric: value}} as bars: one panel per metric (their scales differ), one bar per
    run (e.g. sample quality and bits/dim of runs trained with different objectives), the value
    printed on each bar and a metric's noise floor (floors = {metric: value}) as a dashed line."""
    metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.2 + 0.6 * len(rows) * len(metrics) + 1.5 * len(metrics), 4),
                             squeeze=False)
    names = list(rows)
    for ax, metric in zip(axes[0], metrics):
        values = [rows[r].get(metric, float("nan")) for r in names]
        bars = ax.bar(range(len(names)), values, color=[f"C{k}" for k in range(len(names))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if floors and metric in floors:
            ax.axhline(floors[metric], color="gray", ls="--", label="noise floor")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set(title=metric, xlabel="run", ylabel=metric)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def tradeoff(points: dict, path: Path, *, x_name: str, y_name: str, floor: tuple | None = None,
             title: str = "trade-off") -> Path:
    """points = {run: (x, y)} (e.g. label agreement vs FD of guidance settings) as a labelled scatter;
    runs whose labels share the text before ' w = ' are joined in order (one line per guidance kind);
    floor = (x, y) of the real data is drawn as a star."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    series: dict = {}
    for label, (x, y) in points.items():
        series.setdefault(label.split(" w = ")[0].rstrip(", ") if " w = " in label else label, []).append((label, x, y))
    for k, (name, members) in enumerate(series.items()):
        ax.plot([m[1] for m in members], [m[2] for m in members], marker="o", ls="-" if len(members) > 1 else "",
                color=f"C{k}", label=name)
        for label, x, y in members:
            ax.annotate(label.split(" w = ")[-1] if " w = " in label else label, (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if floor is not None:
        ax.plot(*floor, marker="*", ms=12, color="gray", ls="", label="real data")
    ax.set(xlabel=x_name, ylabel=y_name)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def samples_side_by_side(panels: dict, path: Path, *, reference: torch.Tensor | None = None, title: str = "",
                         columns: int = 4, images: int = 64, points: int = 1000) -> Path:
    """panels = {caption: samples} in a grid of `columns`, the real data (`reference`) first: (N, C, H,
    W) images as a grid of the first `images`, (N, 2) points as a scatter of the first `points` on
    shared axes (the data's range, widened by a tenth, so a run that spreads out shows it)."""
    shown = ({"data": reference} if reference is not None else {}) | panels
    plt = _pyplot()
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.4), squeeze=False)
    lim = None
    if reference is not None and reference.ndim == 2:
        lim = 1.1 * float(reference.abs().max())
    for ax, (caption, x) in zip(axes.flat, shown.items()):
        x = x.detach().float().cpu()
        if x.ndim == 4:
            ax.imshow(image_grid(x[:images]), cmap="gray", vmin=0, vmax=255)
            ax.set(xticks=[], yticks=[])
        else:
            ax.scatter(x[:points, 0], x[:points, 1], s=2, alpha=0.5, color="gray" if caption == "data" else "C0")
            ax.set(aspect="equal", xticks=[], yticks=[])
            if lim is not None:
                ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
        ax.set_title(caption, fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
