"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on a trained digits run: FD in the digits feature
net against all 1,797 digits, for S_churn in a sweep (S_tmin 0.05, S_tmax 50: their ImageNet-64 range) beside the
deterministic deis_pc and heun at the same NFE; each setting on two sample sets (seeds 0, 1) of 1,797.

    diffspace train configs/digits-edm.toml train.steps=1600 --out runs/digits-u
    python benchmarks/edm_sde_churn.py runs/digits-u

gamma = min(S_churn / steps, sqrt 2 - 1): at 35 NFE (18 Heun steps) every S_churn >= 7.5 is the same sampler.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diffspace, installed or not

from diffspace.config import SampleConfig  # noqa: E402
from diffspace.data import load  # noqa: E402
from diffspace.features import digits_feature_net, digits_metrics  # noqa: E402
from diffspace.model import load_model  # noqa: E402
from diffspace.sampling import sample  # noqa: E402


def main(run: str, nfe: int = 35, churns=(2, 5, 10)) -> None:
    torch.set_num_threads(1)
    net, real = digits_feature_net(), load("digits").x
    model, _, _ = load_model(Path(run))
    settings = [("heun", {}), ("deis_pc", {})] + [("edm_sde", {"S_churn": c, "S_tmin": 0.05, "S_tmax": 50.0}) for c in churns]
    print(f"| sampler | S_churn | FD seed 0 | FD seed 1 | mean |  ({run}, {nfe} NFE, n = {len(real)})")
    print("|---|---|---|---|---|")
    for sampler, options in settings:
        fds = [digits_metrics(sample(model, len(real), SampleConfig(sampler=sampler, nfe=nfe, seed=seed, options=options)).x,
                              real, net)["FD_digits"] for seed in (0, 1)]
        print(f"| {sampler} | {options.get('S_churn', '')} | {fds[0]:.2f} | {fds[1]:.2f} | {sum(fds) / 2:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
