"""Time per training step of an energy model (score = -grad E, trained by double backpropagation)
against the same network predicting a vector (eps), the baseline, measured in the same run.

    python benchmarks/energy.py [--quick] [--rounds N] [--threads 1] [--out FILE.md]

Nets: the issue's ring8 MLP (hidden 128, depth 3, batch 256) and the digits U-Net of
configs/digits-edm.toml (base_channels 32, channel_mult [1, 2], num_blocks 1, batch 128), both with
the EDM preset. The energy net is the same raw network F inside nn.Energy, E = 0.5 ||u - F(u)||^2
(Salimans & Ho 2021), built from the same seed. A step is train.py's: loss, backward, gradient
clipping, AdamW, EMA. The two variants alternate step by step, so load from other processes on the
machine hits both alike; the table gives medians of the main thread's CPU time (time.thread_time;
one intra-op thread by default: on 2 busy shared cores, 2 threads made the MLP's eps step 228 ms
against 13 ms with one, for both variants alike) and of the wall time.

Where the time goes, from 4 profiled steps each (torch.profiler, self CPU time): 'conv + matmul' is
aten's convolution and matrix-product kernels; 'other' is the rest (the elementwise ops of SiLU,
GroupNorm / LayerNorm and the scale-shift, their derivatives, the optimizer). Double backprop does
about twice the conv/matmul work of a vector step, whatever the energy's form: per layer y = W h the
vector step costs 3 products (forward, grad_h, grad_W); the energy step costs the forward, the
grad_h of grad_x E (create_graph), then the backward of both graphs, 2 products each: 6.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffspace.config import ModelConfig  # noqa: E402
from diffspace.data import load  # noqa: E402
from diffspace.model import Diffusion  # noqa: E402
from diffspace.train import ema_update  # noqa: E402

NETS = {  # name -> (data, [model] keys, batch)
    "ring8 MLP 128 x 3": ("ring8", dict(hidden=128, depth=3), 256),
    "digits U-Net 32, [1, 2], 1": ("digits", dict(base_channels=32, channel_mult=[1, 2], num_blocks=1), 128),
}
MATMUL = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::mm", "aten::addmm", "aten::bmm",
          "aten::_convolution_double_backward")


class Trainer:
    """One model (eps or energy) with its optimizer, EMA and batches: `step()` is one training step."""

    def __init__(self, data, keys: dict, batch: int, parameterization: str, seed: int = 0):
        torch.manual_seed(seed)
        self.model = Diffusion.from_config(ModelConfig(preset="edm", parameterization=parameterization, **keys),
                                           data.shape, data.num_classes)
        self.ema = Diffusion.from_config(ModelConfig(preset="edm", parameterization=parameterization, **keys),
                                         data.shape, data.num_classes).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-3)
        self.x, self.batch = data.x.float(), batch
        self.noise, self.order = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)

    def step(self) -> None:
        x = self.x[torch.randint(len(self.x), (self.batch,), generator=self.order)]
        loss = self.model.loss(x, None, self.noise).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        ema_update(self.ema, self.model, 0.999)


def timed(trainers: dict, rounds: int) -> dict:
    """Median (CPU ms, wall ms) per step of each trainer, the trainers alternating step by step."""
    cpu, wall = {k: [] for k in trainers}, {k: [] for k in trainers}
    for _ in range(rounds):
        for name, tr in trainers.items():
            c, w = time.thread_time(), time.perf_counter()
            tr.step()
            cpu[name].append(1e3 * (time.thread_time() - c))
            wall[name].append(1e3 * (time.perf_counter() - w))
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in trainers}


def profiled(trainer: Trainer, steps: int = 4) -> tuple[float, float]:
    """(conv + matmul, other) self CPU ms per step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step()
    events = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e3 / steps
    return matmul, sum(e.self_cpu_time_total for e in events) / 1e3 / steps - matmul


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=0, help="timed steps per variant (default 60 MLP / 12 U-Net)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.rounds < 0 or args.threads < 1:
        parser.error(f"--rounds={args.rounds} must be >= 0 and --threads={args.threads} >= 1")
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {args.threads} intra-op thread(s); medians of alternating steps; "
             "CPU = the main thread's CPU time", "",
             "| net | batch | eps ms/step (CPU / wall) | energy ms/step (CPU / wall) | energy / eps (CPU / wall) "
             "| conv + matmul: eps / energy ms (ratio) | other: eps / energy ms (ratio) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (spec, keys, batch) in NETS.items():
        data = load(spec)
        trainers = {p: Trainer(data, keys, batch, p) for p in ("eps", "energy")}
        for tr in trainers.values():  # off the zero-initialised output layer; allocator warm
            for _ in range(3):
                tr.step()
        rounds = args.rounds or (3 if args.quick else 60 if data.kind == "points" else 12)
        t = timed(trainers, rounds)
        (me, oe), (mv, ov) = profiled(trainers["eps"]), profiled(trainers["energy"])
        (ce, we), (cv, wv) = t["eps"], t["energy"]
        lines.append(f"| {name} | {batch} | {ce:.1f} / {we:.1f} | {cv:.1f} / {wv:.1f} | {cv / ce:.2f}x / {wv / we:.2f}x "
                     f"| {me:.1f} / {mv:.1f} ({mv / me:.2f}x) | {oe:.1f} / {ov:.1f} ({ov / oe:.2f}x) |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
