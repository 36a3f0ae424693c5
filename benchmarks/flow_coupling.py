"""Flow matching on 2-D data: independent coupling (1-RF) vs minibatch OT coupling (OT-CFM, Tong et
al. 2023) vs reflow of the independent model (2-RF, Liu et al. 2023), and the independent model
trained on for as many steps as 1-RF + 2-RF together (the compute-matched baseline).

Every model: the rectified-flow preset with the flow parameterization, an MLP 128 x 3, batch 256.
Measured per model, all from the same noise seeds:
* sliced W2 of n flow_euler samples at NFE 1, 2, 4, 10 (evaluate.sample_quality), beside the noise
  floor (the same distance between two independent real sets of n points);
* the straightness S = 1/t0 int ||dz/dt - (z_0 - z_N)/t0||^2 dt of its ODE paths (reflow.straightness,
  Liu et al. 2023; flow_euler, 100 steps, 2,000 paths) and the 1-step gap E||ODE_1(eps) - ODE_100(eps)||^2.

    python benchmarks/flow_coupling.py                      # ring8 and moons, 1,500 steps
    python benchmarks/flow_coupling.py --data ring8 --quick # a smoke run of the whole pipeline

On a shared CPU, one thread (--threads 1, the default) is the fast setting for these small nets.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from diffspace.config import SampleConfig, load_config
from diffspace.data import load
from diffspace.evaluate import sample_quality
from diffspace.model import load_model
from diffspace.reflow import reflow, straightness
from diffspace.samplers import flow_euler
from diffspace.sampling import plan, sample
from diffspace.train import train

NFES = (1, 2, 4, 10)


def base_overrides(data: str, steps: int) -> list[str]:
    return [f"data.spec={data}", "model.preset=rectified-flow", "model.parameterization=flow", "model.hidden=128",
            "model.depth=3", f"train.steps={steps}", "train.batch_size=256", f"log.checkpoint_every={steps}",
            "log.every=100", "log.n_samples=64", "sample.sampler=flow_euler", "sample.nfe=10"]


@torch.no_grad()
def measure(model, data, n: int) -> dict:
    """Sliced W2 (and its floor) per NFE, straightness S and the 1-step gap of one model."""
    out = {}
    for nfe in NFES:
        x = sample(model, n, SampleConfig(sampler="flow_euler", nfe=nfe, seed=7)).x
        _, sw2, floor = sample_quality(x, data, seed=0)[0]
        out[nfe], out["floor"] = sw2, floor
    fine = plan(model.preset, SampleConfig(sampler="flow_euler", nfe=100)).sigmas
    one = plan(model.preset, SampleConfig(sampler="flow_euler", nfe=1)).sigmas
    x0 = fine[0].item() * torch.randn(2000, *model.shape, generator=torch.Generator().manual_seed(11))
    out["S"] = float(straightness(model, x0, fine).mean())
    out["gap"] = float((flow_euler(model, x0, one) - flow_euler(model, x0, fine)).pow(2).sum(1).mean())
    return out


def run(data: str, steps: int, pairs: int, n: int, root: Path) -> list[tuple]:
    rows = []
    base = base_overrides(data, steps)
    for name, coupling in (("independent (1-RF)", "independent"), ("OT coupling", "ot")):
        t0 = time.time()
        s = train(load_config(None, [*base, f"model.coupling={coupling}"]), root / coupling, progress=False)
        rows.append((name, steps, time.time() - t0, measure(s["ema"], load(data), n)))
    t0 = time.time()
    r = reflow(root / "independent", root / "2rf", pairs=pairs, steps=steps, nfe=100, progress=False)
    rows.append((f"2-RF (reflow of 1-RF, {pairs} pairs at NFE 100)", 2 * steps, time.time() - t0 + rows[0][2],
                 measure(r["ema"], load(data), n)))
    shutil.copytree(root / "independent", root / "long")
    t0 = time.time()
    train(None, root / "long", resume=True, steps=2 * steps, progress=False)
    rows.append(("independent, trained on (compute-matched)", 2 * steps, time.time() - t0 + rows[0][2],
                 measure(load_model(root / "long")[0], load(data), n)))
    return rows


def table(data: str, rows: list[tuple], n: int) -> str:
    head = ("| model | steps | train s | " + " | ".join(f"SW2 NFE {k}" for k in NFES)
            + " | straightness S | 1-step gap |")
    lines = [f"### {data} (n = {n}; sliced W2 noise floor {rows[0][3]['floor']:.4f})", "", head,
             "|---" * (len(NFES) + 5) + "|"]
    for name, steps, seconds, m in rows:
        lines.append(f"| {name} | {steps} | {seconds:.0f} | " + " | ".join(f"{m[k]:.4f}" for k in NFES)
                     + f" | {m['S']:.4f} | {m['gap']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="ring8,moons")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--pairs", type=int, default=10_000)
    p.add_argument("--n", type=int, default=5000, help="samples per measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="100 steps, 1,000 pairs, n = 1,000")
    args = p.parse_args()
    if args.quick:
        args.steps, args.pairs, args.n = 100, 1000, 1000
    torch.set_num_threads(args.threads)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data.split(","):
            print(table(data, run(data, args.steps, args.pairs, args.n, Path(tmp) / data), args.n), "\n", flush=True)
    print(f"done in {time.time() - start:.0f} s ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
