"""Latent against pixel diffusion on the digits, at equal training images (Rombach et al. 2022).

    python benchmarks/latent.py [--steps 1000] [--ae-steps 1500] [--n 1000] [--seeds 0,1] [--out runs/latent-bench]

1. `train-autoencoder` once: a KL autoencoder (base 16, channel_mult [1, 2], 2 latent channels:
   8x8 digits -> 2x4x4 latents, kl_weight 1e-3); its held-out PSNR and time.
2. Per seed, the same EDM U-Net recipe (base 24, channel_mult [1, 2], one block, batch 128, `steps`
   steps) in pixels and on the scaled latents (data.encoder): the same training images.
3. Each model sampled (Heun, 35 NFE, and deis_pc, 20 NFE), decoded to pixels, and measured by
   evaluate.sample_quality (FD in the digits features, precision, recall, classifier score) beside
   the noise floor of real against real digits. Prints a Markdown table: per space the mean over
   seeds (with the spread, max - min), parameters and diffusion training seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

UNET = {"data.spec": "digits", "model.preset": "edm", "model.base_channels": 24, "model.channel_mult": [1, 2],
        "model.num_blocks": 1, "train.batch_size": 128, "train.lr": 2e-3, "train.warmup": 100, "log.every": 50}
AE = {"data.spec": "digits", "model.kind": "autoencoder", "model.base_channels": 16, "model.channel_mult": [1, 2],
      "model.num_blocks": 1, "model.latent_channels": 2, "model.kl_weight": 1e-3, "train.batch_size": 64,
      "train.lr": 2e-3, "log.every": 100}
SAMPLINGS = (("heun", 35), ("deis_pc", 20))
MEASURES = ("FD (digits features)", "precision (higher)", "recall (higher)", "classifier score (higher, max 10)")


def config(settings: dict, steps: int, seed: int, **more):
    from diffspace.config import Config, set_option

    cfg = Config()
    for key, value in {**settings, **more, "train.steps": steps, "train.seed": seed,
                       "log.checkpoint_every": steps}.items():
        set_option(cfg, key, value)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--ae-steps", type=int, default=1500)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="runs/latent-bench")
    args = ap.parse_args()
    from diffspace.config import SampleConfig
    from diffspace.evaluate import sample_quality
    from diffspace.sampling import sample
    from diffspace.train import autoencoder_quality, load_data, train

    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    ae = train(config(AE, args.ae_steps, 0), out / "ae", progress=False)
    psnr, std = autoencoder_quality(ae["ema"], load_data(ae["config"])[2])
    print(f"autoencoder: {args.ae_steps} steps of batch 64 in {ae['seconds']:.0f} s, held-out PSNR {psnr:.2f} dB, "
          f"latent std {std:.3f}")
    rows: dict = {}
    for seed in seeds:
        for space, extra in (("pixels", {}), ("latents", {"data.encoder": str(out / "ae")})):
            run = train(config(UNET, args.steps, seed, **extra), out / f"{space}-{seed}", progress=False)
            params = sum(p.numel() for p in run["ema"].parameters())
            for sampler, nfe in SAMPLINGS:
                s = sample(run["ema"], args.n, SampleConfig(sampler=sampler, nfe=nfe, seed=1000 + seed))
                quality = {name: (value, floor) for name, value, floor in sample_quality(s.x, run["data"], seed=seed)}
                rows.setdefault((space, sampler, nfe), []).append((run["seconds"], params, quality))
            print(f"seed {seed} {space}: {run['seconds']:.0f} s", flush=True)
    print(f"\nDigits, {args.steps} steps x batch 128 ({args.steps * 128:,} training images) per run, seeds {args.seeds}, "
          f"n = {args.n} samples; mean (spread max - min) over seeds; {time.time() - t0:.0f} s in all\n")
    print("| space | sampler, NFE | params | train s | " + " | ".join(MEASURES) + " |")
    print("|---" * (4 + len(MEASURES)) + "|")
    floors = None
    for (space, sampler, nfe), got in rows.items():
        cells = []
        for name in MEASURES:
            values = [q[name][0] for _, _, q in got]
            cells.append(f"{sum(values) / len(values):.3g} ({max(values) - min(values):.2g})")
        floors = {name: got[0][2][name][1] for name in MEASURES}
        seconds = sum(s for s, _, _ in got) / len(got)
        print(f"| {space} | {sampler}, {nfe} | {got[0][1] / 1e6:.3f} M | {seconds:.0f} | " + " | ".join(cells) + " |")
    print("| noise floor (real vs real) | | | | " + " | ".join(f"{floors[n]:.3g}" for n in MEASURES) + " |")


if __name__ == "__main__":
    main()
