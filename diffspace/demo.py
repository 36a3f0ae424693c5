"""The main job (`diffspace demo`, README command 1): train -> sample -> see, in minutes on a CPU.

1. Digits: a class-conditional EDM-preconditioned U-Net on scikit-learn's 8x8 digits (label dropout
   0.1, so one net is both the conditional and the unconditional model); 1,000 unconditional samples
   judged by the digits feature net (features.py: a small conv net trained on the real digits, 99 %
   held-out accuracy): confidence, class coverage, and the Frechet distance in its features; then a
   classifier-free guided grid, one row per digit, and the share the feature net puts in the
   requested class (label agreement).
2. A 2-D panel: an MLP on the ring of 8 Gaussians; sliced Wasserstein-2 to fresh true samples,
   next to its noise floor (two independent true sample sets of the same size).
Everything lands in one run folder with report.md and the figures it shows.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .analytic import ring8
from .evaluate import judge, noise_floor, real_sets, sliced_wasserstein
from .features import digits_feature_net, digits_metrics
from .config import Config, SampleConfig, set_option
from .sampling import sample
from .train import train

# Chosen to finish within 5 minutes on 2 CPU cores, with a margin. Measured on this project's 2-core
# machines: base 32 (0.70 M parameters) x 3000 steps took 636 s in all; base 24 (0.40 M) x 1200 steps
# 239 s on a slower one; this setting (class-conditional, 1000 steps, guided and unconditional panels
# of 200) 110 s in all on the machine of the session that introduced it.
DIGITS = {"data.spec": "digits", "model.preset": "edm", "model.class_conditional": True, "model.label_dropout": 0.1,
          "model.uncertainty": True, "model.preset_params": {"P_mean": -0.6}, "model.base_channels": 24,
          "model.channel_mult": [1, 2], "model.num_blocks": 1, "train.steps": 1000, "train.batch_size": 128,
          "train.lr": 2e-3, "train.warmup": 100, "log.checkpoint_every": 1000, "log.every": 25}
RING = {"data.spec": "ring8", "model.preset": "edm", "model.hidden": 128, "model.depth": 3, "train.steps": 1000,
        "train.batch_size": 256, "train.lr": 2e-3, "log.checkpoint_every": 1000, "log.every": 25}
N_SAMPLES = 1000
SAMPLER, NFE = "heun", 35  # EDM's own solver and 18-step grid
MAIN = SampleConfig(sampler=SAMPLER, nfe=NFE, classes="all", seed=1234)  # the conditional model, equal shares
GUIDED = dataclasses.replace(MAIN, guidance=2.0, seed=2024)  # the guided panel: classifier-free, w = 2
N_SIDE = 200  # samples of the guided and the unconditional panels (20 per digit)


def _config(settings: dict, scale: float) -> Config:
    cfg = Config()
    for key, value in settings.items():
        set_option(cfg, key, value)
    cfg.train.steps = max(20, int(cfg.train.steps * scale))
    cfg.log.checkpoint_every = cfg.train.steps
    return cfg


def run(out: Path, scale: float = 1.0, progress: bool = True) -> dict:
    """Run both panels into `out` (scale < 1 shortens training and the sample counts, for tests)."""
    from . import plots

    out = Path(out)
    for sub in ("digits", "ring8"):  # the demo re-runs from scratch (README command 1 is idempotent)
        if (out / sub / "config.toml").exists():
            shutil.rmtree(out / sub)
    t0 = time.time()
    results: dict = {}

    # 1. digits ------------------------------------------------------------------------------------
    cfg = _config(DIGITS, scale)
    summary = train(cfg, out / "digits", progress=progress)
    ema, data = summary["ema"], summary["data"]
    snapshots, n_samples = [], max(200, int(N_SAMPLES * min(scale, 1.0)))
    spread = slice(None, None, n_samples // 100)  # a tenth of each class: the labels come sorted
    conditional = sample(ema, n_samples, MAIN, callback=lambda s: snapshots.append(
        (s["sigma"], s["x"][spread][::10].clone(), s["denoised"][spread][::10].clone())))
    x, net = conditional.x, digits_feature_net()
    report = digits_metrics(x, data.x, net)
    a, b = real_sets(data, n_samples)
    report["FD_floor"] = digits_metrics(b, a, net)["FD_digits"]
    report["FD_same_size"], report["FD_n"] = digits_metrics(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:len(a)]], a, net)["FD_digits"], len(a)
    predict = judge(data, net)
    agreement = lambda s: float((predict(s.x) == s.labels).double().mean())  # noqa: E731
    uncond = digits_metrics(sample(ema, N_SIDE, dataclasses.replace(MAIN, classes="")).x, data.x, net)
    guided = sample(ema, N_SIDE, GUIDED)
    results["digits"] = dict(report, train_seconds=summary["seconds"], steps=cfg.train.steps, agreement=agreement(conditional),
                             samples_per_s=_mean_rate(out / "digits" / "metrics.csv"), params=_params(ema),
                             unconditional_confident=uncond["confident"])
    results["guided"] = dict(agreement=agreement(guided), n=N_SIDE, w=GUIDED.guidance, described=guided.describe())
    plots.save_samples(guided.x, out / "digits_guided.png", labels=guided.labels)
    plots.samples_vs_data(x[spread][:100], data.x[:100], out / "digits_samples.png")
    plots.forward_process_images(data.x[:6], None, out / "digits_forward.png")
    plots.reverse_snapshots(snapshots, out / "digits_reverse.png")
    plots.loss_curve(out / "digits" / "metrics.csv", out / "digits_loss.png")

    # 2. ring of 8 Gaussians -------------------------------------------------------------------------
    cfg = _config(RING, scale)
    summary = train(cfg, out / "ring8", progress=progress)
    ema = summary["ema"]
    n = max(400, int(2000 * min(scale, 1.0)))
    pts = sample(ema, n, SampleConfig(sampler=SAMPLER, nfe=NFE, seed=4321)).x
    mixture = ring8()
    sw2 = sliced_wasserstein(pts, mixture.sample(n, torch.Generator().manual_seed(99)))
    floor = noise_floor(mixture.sample, n)
    results["ring8"] = dict(sw2=sw2, floor=floor, ratio=sw2 / floor, train_seconds=summary["seconds"], steps=cfg.train.steps)
    plots.save_samples(pts, out / "ring8_samples.png", reference=mixture.sample(n, torch.Generator().manual_seed(7)))
    plots.reverse_trajectories(ema, out / "ring8_trajectories.png", log_density=mixture.log_prob)
    plots.loss_curve(out / "ring8" / "metrics.csv", out / "ring8_loss.png")

    from . import schedules as S

    plots.forward_process_figure(out / "forward_process.png", {
        "ddpm-linear": S.ddpm_linear(), "vp-sde": S.VPSDE(), "cosine": S.Cosine(), "ve": S.VE(), "edm": S.EDM(),
        "rectified-flow": S.RectifiedFlow()}, shown="ddpm-linear")
    results["seconds"] = time.time() - t0
    write_report(out / "report.md", results)
    return results


def _mean_rate(metrics: Path) -> float:
    with open(metrics) as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)]
    rates = rates[len(rates) // 4:] or rates  # skip the warm-up rows
    return sum(rates) / len(rates)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_report(path: Path, r: dict) -> None:
    d, ring, g = r["digits"], r["ring8"], r["guided"]
    ok_digits = d["confident"] >= 0.8 and d["min_class_fraction"] >= 0.04
    fractions = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in enumerate(d["class_fractions"]))
    text = f"""# diffspace demo

Total time: {r['seconds']:.0f} s.

## Digits (scikit-learn 8x8), EDM preset (P_mean -0.6) with EDM2's learned loss weighting, class-conditional U-Net with {d['params'] / 1e6:.2f} M parameters
Trained {d['steps']} steps in {d['train_seconds']:.0f} s ({d['samples_per_s']:.0f} images/s).
{d['n']} samples of the conditional model (labels in equal shares, no guidance), `{SAMPLER}` at {NFE} NFE
(EMA weights), judged by the digits feature net, a small conv net trained on the real digits (held-out
accuracy {100 * d['classifier_accuracy']:.1f}%):

- confidently recognised (top class probability >= 0.8): **{100 * d['confident']:.1f}%** (bar: >= 80%)
- class shares: {fractions}; smallest **{100 * d['min_class_fraction']:.1f}%** (bar: >= 4%)
- verdict: {'PASS' if ok_digits else 'FAIL'}
- label agreement (the net's class is the requested one): {100 * d['agreement']:.1f}%; the same net
  sampled unconditionally (the null label, seen by 10% of the training samples): {100 * d['unconditional_confident']:.1f}% confident
- in the net's features: Frechet distance **{d['FD_same_size']:.2f}** to {d['FD_n']} real digits, noise floor
  {d['FD_floor']:.2f} (two disjoint real sets of that size); precision {d['precision']:.2f}, recall
  {d['recall']:.2f} (k-NN manifolds, against all {d['n_real']} real digits); classifier score
  {d['classifier_score']:.2f} (max 10)

![samples next to real digits](digits_samples.png)

Classifier-free guidance (Ho & Salimans 2022), one row per digit 0..9 ({g['n']} samples,
{g['described']}): the feature net puts **{100 * g['agreement']:.1f}%** of them in the requested class.

![guided samples, one row per digit](digits_guided.png)
![forward process](digits_forward.png)
![reverse process](digits_reverse.png)
![loss](digits_loss.png)

## Ring of 8 Gaussians, EDM preset, MLP
Trained {ring['steps']} steps in {ring['train_seconds']:.0f} s. Sliced Wasserstein-2 to fresh true
samples: **{ring['sw2']:.4f}**, noise floor {ring['floor']:.4f}, ratio **{ring['ratio']:.2f}** (bar: <= 2):
{'PASS' if ring['ratio'] <= 2 else 'FAIL'}.

![ring samples](ring8_samples.png)
![reverse process: probability-flow ODE and SDE paths over the density](ring8_trajectories.png)
![loss](ring8_loss.png)

## The forward process of every schedule
![schedules](forward_process.png)
"""
    path.write_text(text)
