"""Training and sampling throughput of diffspace's U-Net against diffusers' UNet2DModel at equal widths.

    python benchmarks/throughput.py [--quick] [--layouts small,cifar10] [--batch 16] [--reps 5] [--compile] [--device cpu]

Two layouts, each built by both libraries with the same widths:
* small: 16x16x3, channels 32/64, 1 block per level, attention at 8x8;
* cifar10: the google/ddpm-cifar10-32 layout (Ho et al. 2020): 32x32x3, channels 128/256/256/256,
  2 blocks per level, attention at 16x16 (diffusers: AttnDownBlock2D / AttnUpBlock2D at that level).
Measured per layout, same batch, same threads, repetitions interleaved (A B A B ...) so that drift of
the machine hits both alike; the median of each is printed with its ratio to diffusers:
* train img/s: forward + MSE loss + backward + AdamW step on random data;
* ms per network evaluation: one no-grad forward of the batch (what a sampler spends per NFE).
* ops / train step: the aten operators one eager forward + loss + backward dispatches (views left
  out), each a kernel launch or more on a GPU: the host's share when kernels are short.
diffspace's U-Net is run with its default ADM scale-shift conditioning and with DDPM's added
conditioning (model.scale_shift = false), which makes it UNet2DModel's architecture, parameter for
parameter (35,746,307 in the cifar10 layout); eager, then channels_last. With --compile both
libraries are also timed at their best, channels_last + torch.compile. On a
GPU (--device cuda) the train step runs under bf16 autocast for both and MFU is printed from the
forward + backward FLOPs counted by torch.utils.flop_counter and the --peak-tflops given.
diffusers is a benchmark-only dependency (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffspace.nn import UNet

LAYOUTS = {
    "small": dict(size=16, channels=(32, 64), blocks=1, attention=8),
    "cifar10": dict(size=32, channels=(128, 256, 256, 256), blocks=2, attention=16),
}


def diffspace_net(layout: dict, scale_shift: bool = True) -> torch.nn.Module:
    """scale_shift=False: DDPM's added conditioning, as UNet2DModel (equal parameters); True: ADM's scale-shift."""
    base = layout["channels"][0]
    return UNet(3, 3, base_channels=base, channel_mult=tuple(c // base for c in layout["channels"]),
                num_blocks=layout["blocks"], attention_resolutions=(layout["attention"],), image_size=layout["size"],
                scale_shift=scale_shift)


def diffusers_net(layout: dict) -> torch.nn.Module:
    from diffusers import UNet2DModel

    levels = len(layout["channels"])
    res = [layout["size"] // 2**i for i in range(levels)]
    down = tuple("AttnDownBlock2D" if r == layout["attention"] else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r == layout["attention"] else "UpBlock2D" for r in reversed(res))
    return UNet2DModel(sample_size=layout["size"], in_channels=3, out_channels=3, block_out_channels=layout["channels"],
                       layers_per_block=layout["blocks"], down_block_types=down, up_block_types=up,
                       norm_num_groups=min(32, layout["channels"][0]))


class Case:
    """One network as it is timed: call(x, t) -> output, its optimizer, and its memory format."""

    def __init__(self, name, net, call, device, channels_last=False, compile_=False):
        self.name, self.device = name, device
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=self.layout)
        self.forward = torch.compile(self.net) if compile_ else self.net
        self.call = call
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.params = sum(p.numel() for p in self.net.parameters())

    def step(self, x, t):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = (self.call(self.forward, x, t).float() - x).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, x, t):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            self.call(self.forward, x, t)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def flops(case: Case, x, t) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        (case.call(case.net, x, t).float() - x).pow(2).mean().backward()
    case.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def dispatched(case: Case, x, t) -> int | None:
    """aten operators (views left out) that one eager train step's forward + loss + backward dispatches:
    on a GPU each is a kernel launch or more, the host's work per step when the kernels are short.
    None for a compiled case (its graph is not dispatched op by op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if case.forward is not case.net:
        return None

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        (case.call(case.net, x, t).float() - x).pow(2).mean().backward()
    case.opt.zero_grad(set_to_none=True)
    return counter.n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="small,cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time diffspace under torch.compile")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU (H100/H200: 989)")
    ap.add_argument("--quick", action="store_true", help="the small layout, 2 repetitions")
    args = ap.parse_args()
    device = torch.device(args.device)
    layouts, reps = (["small"], 2) if args.quick else (args.layouts.split(","), args.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, batch {args.batch}, "
          f"{reps} interleaved repetitions (median)\n")
    print("| layout | network | parameters | train img/s | x diffusers | ms / evaluation | x diffusers | ops / train step |" +
          (" MFU | peak GiB (train step) |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if device.type == "cuda" else ""))
    for name in layouts:
        layout = LAYOUTS[name]
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, layout["size"], layout["size"], device=device)
        t = torch.rand(args.batch, device=device)
        ours = lambda f, x, t: f(x, t)  # noqa: E731
        theirs = lambda f, x, t: f(x, t * 999).sample  # noqa: E731
        cases = [Case("diffusers UNet2DModel", diffusers_net(layout), theirs, device),
                 Case("diffspace UNet (ADM scale-shift)", diffspace_net(layout), ours, device),
                 Case("diffspace UNet, DDPM conditioning", diffspace_net(layout, False), ours, device),
                 Case("diffspace UNet, DDPM conditioning, channels_last", diffspace_net(layout, False), ours, device,
                      channels_last=True)]
        if args.compile:  # each library at its best: channels_last and torch.compile
            cases += [Case("diffusers UNet2DModel, channels_last + compiled", diffusers_net(layout), theirs, device,
                           channels_last=True, compile_=True),
                      Case("diffspace UNet, DDPM conditioning, channels_last + compiled", diffspace_net(layout, False),
                           ours, device, channels_last=True, compile_=True)]
        inputs = {c.name: (x.contiguous(memory_format=c.layout), t) for c in cases}
        train_s = {c.name: [] for c in cases}
        eval_s = {c.name: [] for c in cases}
        memory = {}
        for c in cases:  # warm-up (and compilation), then one step's peak memory
            c.step(*inputs[c.name])
            c.evaluate(*inputs[c.name])
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                c.step(*inputs[c.name])
                memory[c.name] = torch.cuda.max_memory_allocated() / 2**30
        for _ in range(reps):
            for c in cases:
                train_s[c.name].append(timed(lambda: c.step(*inputs[c.name]), device))
                eval_s[c.name].append(timed(lambda: c.evaluate(*inputs[c.name]), device))
        base_train, base_eval = (statistics.median(v[cases[0].name]) for v in (train_s, eval_s))
        for c in cases:
            tr, ev = statistics.median(train_s[c.name]), statistics.median(eval_s[c.name])
            row = (f"| {name} | {c.name} | {c.params / 1e6:.2f} M | {args.batch / tr:.1f} | {base_train / tr:.2f} | "
                   f"{1e3 * ev:.1f} | {base_eval / ev:.2f} | {dispatched(c, *inputs[c.name]) or '-'} |")
            if device.type == "cuda":
                row += f" {100 * flops(c, *inputs[c.name]) / tr / (args.peak_tflops * 1e12):.1f}% | {memory[c.name]:.2f} |"
            print(row)
    print("\nx diffusers: diffusers' time / this row's time (> 1: faster than diffusers). ops / train step: aten\n"
          "operators (not views) dispatched by one eager forward + loss + backward, each a kernel launch or more on a GPU.")


if __name__ == "__main__":
    main()
