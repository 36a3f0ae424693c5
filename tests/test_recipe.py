"""The training recipe's parts (issue 16), trained through the command line on the digits and judged
in the digits feature net: EDM2's magnitude-preserving U-Net (model.network=mp), its learned
uncertainty weighting (model.uncertainty), the inverse-sqrt learning rate and a changed sigma_data
(model.preset_params). Their effect on quality per training image is measured in
benchmarks/time_to_quality.py; here, that a run with each of them learns the digits."""

import pytest
import torch
from conftest import run as cli

from diffspace.config import SampleConfig
from diffspace.evaluate import real_sets
from diffspace.features import digits_feature_net, digits_metrics
from diffspace.model import load_model
from diffspace.sampling import sample
from diffspace.train import load_data

SMALL = ["--data", "digits", "--preset", "edm", "--quiet", "model.base_channels=16", "model.channel_mult=[1,2]",
         "model.num_blocks=1", "train.batch_size=64", "train.warmup=20", "log.n_samples=4", "sample.nfe=4"]
PARTS = ["model.network=mp", "train.lr=1e-2", "model.uncertainty=true", "model.preset_params.sigma_data=0.75",
         "train.lr_schedule=inv-sqrt", "train.lr_ref_steps=100"]


def _fd(run, n=300):
    model, cfg, _ = load_model(run)
    x = sample(model, n, SampleConfig(sampler="deis_pc", nfe=10, seed=3)).x.clamp(-1, 1)
    data = load_data(cfg)[0]
    real, other = real_sets(data, n)
    net = digits_feature_net()
    return digits_metrics(x, real, net)["FD_digits"], digits_metrics(other, real, net)["FD_digits"]


def test_every_part_of_the_recipe_at_once_learns_the_digits(tmp_path):
    """After 20 steps the samples are noise-like; after 200 of the same run their FD has fallen by
    more than 4x (measured: 516 -> 60, the floor at n = 300 being 8.2), and the run holds the parts."""
    run = tmp_path / "run"
    r = cli("train", *SMALL, *PARTS, "--steps", "200", "--out", run, "log.checkpoint_every=20", "log.keep=20")
    assert r.returncode == 0, r.stderr
    early, floor = _fd(run / "checkpoints" / "ckpt-00000020.json")
    late, _ = _fd(run)
    assert late < early / 4, (early, late, floor)
    model, cfg, _ = load_model(run)
    assert cfg.model.network == "mp" and cfg.model.preset_params == {"sigma_data": 0.75}
    assert model.preset.precond.sigma_data == 0.75 and model.uncertainty.linear.weight.abs().sum() > 0
    assert type(model.network).__name__ == "MPUNet"


@pytest.mark.slow
def test_the_demo_recipe_reaches_twice_the_noise_floor(tmp_path):
    """configs/digits-edm.toml as shipped: FD of 400 deis_pc samples at 10 NFE within 2.5x the floor."""
    from pathlib import Path

    config = Path(__file__).parent.parent / "configs" / "digits-edm.toml"
    r = cli("train", config, "--quiet", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    fd, floor = _fd(tmp_path / "run")
    assert fd < 2.5 * floor, (fd, floor)
