"""What copying the training digits scores under time_to_quality's held-out judge (issue 16's bar).

    python benchmarks/copier.py                  # 32 sets each: copies, copies + pixel noise, same-class mixes

A recipe trains on a stratified half of the digits (899) and is judged against the other half (898):
paired excess = FD(n = 898 samples, held-out digits) - (c / n + FD(training half, held-out half) / 2),
c from random halvings of all the digits (time_to_quality.py, --judge held-out). Here the "samples"
use only the training digits, without any model: drawn with replacement, with N(0, h^2) pixel noise
added (a kernel density estimate of bandwidth h, clamped to [-1, 1]), or mixed with another digit of
the same class. Each line: the mean excess over fresh sets +- its standard error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diffspace, installed or not
import time_to_quality as ttq  # noqa: E402


def main() -> None:
    from diffspace.features import digits_feature_net, digits_metrics
    from diffspace.train import load_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=32, help="fresh sample sets per line")
    ap.add_argument("--noise", default="0.01,0.02,0.03,0.04,0.1", help="pixel noise std h (data in [-1, 1])")
    ap.add_argument("--mix", default="0.25,0.5,1", help="same-class mixes (1 - l) x_i + l x_j, l ~ U(0, a)")
    args = ap.parse_args()

    data, train_set, test_set = load_data(ttq.config({**ttq.COMMON, **ttq.EDM, "data.test_fraction": 0.5}, 1, 0))
    net, n, real = digits_feature_net(), 898, test_set.x
    c = ttq.halvings(data, n, net, 8)[1]
    floor = c / n + digits_metrics(train_set.x, real, net)["FD_digits"] / 2  # time_to_quality's held-out floor_of(n)
    print(f"{len(train_set)} training digits, {len(real)} held out; c = {c:.0f}; the floor of {n} samples {floor:.2f}")
    x, y, g = train_set.x, train_set.labels, torch.Generator().manual_seed(0)
    copies = lambda: x[torch.randint(0, len(x), (n,), generator=g)]
    by_class = [x[y == k] for k in range(10)]

    def mixes(a: float) -> torch.Tensor:
        k = y[torch.randint(0, len(y), (n,), generator=g)]
        pairs = [by_class[int(j)][torch.randint(0, len(by_class[int(j)]), (2,), generator=g)] for j in k]
        lam = (a * torch.rand(n, generator=g)).reshape(n, 1, 1, 1)
        return (1 - lam) * torch.stack([p[0] for p in pairs]) + lam * torch.stack([p[1] for p in pairs])

    def line(name: str, make) -> None:
        v = [digits_metrics(make(), real, net)["FD_digits"] - floor for _ in range(args.sets)]
        print(f"| {name} | {statistics.mean(v):.3f} +- {statistics.stdev(v) / len(v) ** 0.5:.3f} |")

    print("| training digits only | paired excess |\n|---|---|")
    line("drawn with replacement", copies)
    for h in (float(s) for s in args.noise.split(",") if s):
        line(f"+ N(0, {h:g}^2) pixel noise", lambda: (copies() + h * torch.randn(n, *x.shape[1:], generator=g)).clamp(-1, 1))
    for a in (float(s) for s in args.mix.split(",") if s):
        line(f"same-class mix, l ~ U(0, {a:g})", lambda: mixes(a))


if __name__ == "__main__":
    main()
