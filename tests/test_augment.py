"""Non-leaking augmentation (augment.py): the transforms against numpy's, their probabilities by
Monte Carlo, the network's conditioning on them, training with them, and a trained run whose
samples are the data's, not the augmented data's."""

import math

import numpy as np
import pytest
import torch

from conftest import ok, one_line_error, perturb_, run
from diffspace.augment import AUGMENT_DIM, augment
from diffspace.nn import UNet


def _expected(img: np.ndarray, a: np.ndarray) -> np.ndarray:
    """One image (C, H, W) transformed as its labels a say, by numpy: mirror left-right, mirror
    top-bottom, rotate by k quarter turns, then move by (dx, dy) with numpy's reflect padding."""
    H, W = img.shape[1:]
    k = {(0, 0): 0, (-1, 1): 1, (-2, 0): 2, (-1, -1): 3}[(round(a[2]), round(a[3]))]
    dx, dy, m = round(a[4] * W), round(a[5] * H), math.ceil(W / 8)
    out = img[:, :, ::-1] if a[0] else img
    out = out[:, ::-1, :] if a[1] else out
    out = np.rot90(out, k, axes=(1, 2))
    padded = np.pad(out, ((0, 0), (m, m), (m, m)), mode="reflect")
    return padded[:, m - dy:m - dy + H, m - dx:m - dx + W]


@pytest.mark.parametrize("size", [8, 16])
def test_every_image_is_its_labels_transforms_as_numpy_computes_them(size):
    x = torch.randn(400, 2, size, size, dtype=torch.float64)
    y, a = augment(x, 0.5, torch.Generator().manual_seed(0))
    assert a.shape == (400, AUGMENT_DIM) and y.dtype == x.dtype
    for b in range(len(x)):
        np.testing.assert_array_equal(y[b].numpy(), _expected(x[b].numpy(), a[b].numpy()))
    moved = (y != x).flatten(1).any(dim=1)  # (mirrored both ways and turned by 180 degrees is unmoved: not the converse)
    assert not (moved & ~(a != 0).any(dim=1)).any()  # an image with the labels of no augmentation is the image


def test_p_zero_is_the_identity_with_zero_labels_and_p_one_moves_every_image():
    x = torch.randn(64, 1, 8, 8)
    y, a = augment(x, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(y, x) and not a.any()
    _, a = augment(x, 1.0, torch.Generator().manual_seed(1))
    assert a[:, 0].all() and a[:, 1].all() and (a[:, 2:4] != 0).any(dim=1).all() and (a[:, 4:] != 0).any(dim=1).all()


def test_each_transform_is_drawn_with_probability_p_and_its_parameter_uniformly():
    n, p = 40_000, 0.3
    _, a = augment(torch.zeros(n, 1, 8, 8), p, torch.Generator().manual_seed(2))
    applied = torch.stack([a[:, 0] != 0, a[:, 1] != 0, (a[:, 2:4] != 0).any(1), (a[:, 4:] != 0).any(1)], 1).double()
    se = math.sqrt(p * (1 - p) / n)
    assert (applied.mean(0) - p).abs().max() < 4 * se, applied.mean(0)
    assert abs(torch.corrcoef(applied.T)[0, 1:].abs().max()) < 0.03  # drawn independently
    rotated = a[(a[:, 2:4] != 0).any(1)]
    k = torch.round(torch.atan2(rotated[:, 3], rotated[:, 2] + 1) / (math.pi / 2)).remainder(4)
    counts = torch.bincount(k.long(), minlength=4).double()
    assert counts[0] == 0 and ((counts[1:] / len(k) - 1 / 3).abs() < 4 * math.sqrt(2 / 9 / len(k))).all(), counts
    moved = a[(a[:, 4:] != 0).any(1), 4:] * 8
    cells = torch.bincount(((moved[:, 1] + 1) * 3 + moved[:, 0] + 1).round().long(), minlength=9).double()
    assert cells[4] == 0 and ((cells[torch.arange(9) != 4] / len(moved) - 1 / 8).abs() < 4 * math.sqrt(7 / 64 / len(moved))).all()


def test_the_same_generator_draws_the_same_augmentation():
    x = torch.randn(32, 1, 8, 8)
    one, two = augment(x, 0.4, torch.Generator().manual_seed(3)), augment(x, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_the_network_hears_the_labels_and_none_means_no_augmentation():
    net = perturb_(UNet(1, base_channels=8, channel_mult=(1, 2), num_blocks=1, image_size=8, augment_dim=AUGMENT_DIM))
    x, c = torch.randn(4, 1, 8, 8), torch.rand(4)
    _, a = augment(x, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(net(x, c), net(x, c, augment_labels=torch.zeros(4, AUGMENT_DIM)))
    assert not torch.allclose(net(x, c), net(x, c, augment_labels=a))
    with pytest.raises(ValueError, match="augment_labels has shape"):
        net(x, c, augment_labels=a[:, :3])
    with pytest.raises(ValueError, match="without augment_dim"):
        UNet(1, base_channels=8, channel_mult=(1,), num_blocks=1, image_size=8)(x, c, augment_labels=a)


def test_training_with_augmentation_trains_its_embedding(tmp_path):
    from diffspace import checkpoint as ckpt
    from diffspace.config import Config, set_option
    from diffspace.train import train

    cfg = Config()
    for key, value in {"data.spec": "digits", "data.n": 200, "model.base_channels": 8, "model.channel_mult": [1],
                       "model.num_blocks": 1, "model.augment": 0.5, "train.steps": 4, "train.batch_size": 16,
                       "train.warmup": 0, "log.every": 2, "log.checkpoint_every": 4, "log.n_samples": 4, "sample.nfe": 3}.items():
        set_option(cfg, key, value)
    summary = train(cfg, tmp_path / "run", progress=False)
    tensors, _ = ckpt.load(ckpt.latest(tmp_path / "run" / "checkpoints"))
    first = [k for k in tensors if k.startswith("model.") and k.endswith("augment_emb.weight")]
    assert len(first) == 1 and tensors[first[0]].shape[1] == AUGMENT_DIM
    assert summary["model"].network.cond.augment_emb.weight.grad is not None


@pytest.mark.parametrize("args, words", [
    (["--data", "digits", "model.augment=1.5"], ["model.augment=1.5", "[0, 1]"]),
    (["--data", "ring8", "model.augment=0.2"], ["model.augment=0.2", "images"]),
    (["--data", "digits", "model.augment=0.2", "model.network=mp"], ["model.augment=0.2", "model.network='mp'"]),
    (["--data", "digits", "model.augment=0.2", "model.kind=classifier"], ["model.augment=0.2", "classifier"]),
])
def test_bad_augmentation_settings_are_one_line_errors(tmp_path, args, words):
    one_line_error(run("train", *args, "--steps", "2", "--out", tmp_path / "r", "--quiet"), *words)


@pytest.mark.slow  # about 2 minutes: a digits run through the CLI
def test_a_trained_run_samples_digits_at_no_augmentation_and_mirrored_digits_when_told(tmp_path):
    """p = 0.15 (about half the training images transformed): samples drawn with the labels of no
    augmentation (how `sample` draws) are near the digits and far from the mirrored or half-turned
    digits in the digits feature net (the augmentation does not leak), and samples told 'mirrored
    left-right' are near the mirrored digits (the network learned what the labels mean)."""
    from diffspace.config import SampleConfig
    from diffspace.data import load
    from diffspace.evaluate import real_sets
    from diffspace.features import digits_feature_net, digits_metrics
    from diffspace.model import load_model
    from diffspace.samplers import SAMPLERS
    from diffspace.sampling import initial_state, plan

    out = tmp_path / "aug"
    ok(run("train", "--data", "digits", "--steps", "1000", "--out", out, "--quiet", "model.augment=0.15",
           "model.base_channels=24", "model.num_blocks=1", "model.uncertainty=true"))
    ok(run("sample", out, "--n", "600", "--sampler", "deis_pc", "--nfe", "20", "--seed", "1"))
    plain = torch.from_numpy(np.load(out / "samples" / "sample.npz")["x"]).float().clamp(-1, 1)
    model, _, _ = load_model(out)
    p = plan(model.preset, SampleConfig(sampler="deis_pc", nfe=20))
    told = torch.zeros(600, AUGMENT_DIM)
    told[:, 0] = 1  # mirrored left-right
    g = torch.Generator().manual_seed(2)
    x = initial_state(torch.randn((600, 1, 8, 8), generator=g), p.sigmas[0].item(), model.preset.prior)
    with torch.no_grad():
        mirrored = SAMPLERS[p.sampler](lambda x, s: model(x, s, None, told), x, p.sigmas, generator=g, **dict(p.options))
    real, _ = real_sets(load("digits"), 600)
    net = digits_feature_net()
    fd = lambda x, r: digits_metrics(x.clamp(-1, 1), r, net)["FD_digits"]
    near, far_mirror, far_turn = fd(plain, real), fd(plain, real.flip(3)), fd(plain, torch.rot90(real, 2, (2, 3)))
    assert near < 20 and near < far_mirror / 3 and near < far_turn / 1.5, (near, far_mirror, far_turn)
    assert fd(mirrored, real.flip(3)) < fd(mirrored, real) / 3, (fd(mirrored, real.flip(3)), fd(mirrored, real))
