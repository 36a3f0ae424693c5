"""Tests of diffspace.nn.EncoderClassifier: shapes, noise conditioning, input gradients, errors, learning."""

import math

import pytest
import torch
from conftest import perturb_

from diffspace.nn import MLP, EncoderClassifier, count_parameters, describe

torch.set_num_threads(2)




CONFIGS = [
    dict(in_channels=1, num_classes=10, image_size=8),  # defaults: 8x8, channel_mult (1, 2)
    dict(in_channels=1, num_classes=2, base_channels=16, num_blocks=2, image_size=8, attention_resolutions=(4,)),
    dict(in_channels=3, num_classes=5, base_channels=16, channel_mult=(1, 2, 2), image_size=16,
         attention_resolutions=(8,)),
    dict(in_channels=3, num_classes=4, base_channels=64, channel_mult=(1, 1), image_size=16,
         attention_resolutions=(16, 8), dropout=0.1),  # 64 channels: one 64-channel head
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_shapes_scalar_and_batch_noise_cond(cfg):
    torch.manual_seed(0)
    net = EncoderClassifier(**cfg).eval()
    C, S, K = cfg["in_channels"], cfg["image_size"], cfg["num_classes"]
    x = torch.randn(3, C, S, S)
    out = net(x, torch.randn(3))
    assert out.shape == (3, K) and out.dtype == x.dtype and torch.isfinite(out).all()
    # a scalar noise_cond (tensor or float) is the same as that value for every sample
    c = 0.3
    ref = net(x, torch.full((3,), c))
    assert torch.allclose(net(x, torch.tensor(c)), ref, atol=1e-6)
    assert torch.allclose(net(x, c), ref, atol=1e-6)


def test_any_size_without_image_size():
    net = EncoderClassifier(1, 3, base_channels=8, image_size=None)
    for S in (8, 12, 7):
        assert net(torch.randn(2, 1, S, S), torch.zeros(2)).shape == (2, 3)


def test_config_and_describe():
    net = EncoderClassifier(1, 10)
    assert net.config["num_classes"] == 10 and net.config["emb_dim"] == 32 and net.config["channel_mult"] == (1, 2)
    assert describe(net).startswith("EncoderClassifier: ") and "num_classes=10" in describe(net)
    assert count_parameters(net) == 222826


@pytest.mark.parametrize("fresh", [True, False])
def test_input_gradient_nonzero_and_finite(fresh):
    """Classifier guidance needs grad_x log p(y | x); it must exist even for a fresh net."""
    torch.manual_seed(0)
    net = EncoderClassifier(3, 5, base_channels=16, channel_mult=(1, 2, 2), image_size=16, attention_resolutions=(8,))
    if not fresh:
        perturb_(net)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    logits = net(x, torch.randn(4))
    for k in (0, 4):
        (g,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)
        assert torch.isfinite(g).all()
        assert (g.flatten(1).abs().sum(dim=1) > 0).all()  # every sample gets a gradient
    # log-softmax gradient (what guidance uses) too
    (g,) = torch.autograd.grad(torch.log_softmax(logits, dim=1)[:, 1].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_logits_depend_on_noise_cond():
    torch.manual_seed(0)
    net = perturb_(EncoderClassifier(1, 4, base_channels=16, image_size=8))
    x = torch.randn(2, 1, 8, 8)
    a, b = net(x, torch.tensor([0.0, 0.0])), net(x, torch.tensor([1.5, -1.0]))
    assert (a - b).abs().max() > 1e-3
    # per sample: changing one sample's noise_cond changes only that sample's logits
    c = net(x, torch.tensor([0.0, -1.0]))
    assert torch.allclose(a[0], c[0], atol=1e-6) and (a[1] - c[1]).abs().max() > 1e-3


def test_fresh_net_ignores_noise_cond():
    """Zero-initialised residual branches (ADM): noise_cond only matters after training."""
    net = EncoderClassifier(1, 4, base_channels=16, image_size=8)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(net(x, torch.zeros(2)), net(x, torch.full((2,), 3.0)))


@pytest.mark.parametrize("kwargs, word", [
    (dict(in_channels=0), "in_channels"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2.5), "num_classes"),
    (dict(base_channels=-1), "base_channels"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(emb_dim=7), "emb_dim"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=6, channel_mult=(1, 2, 2)), "image_size=6"),
    (dict(attention_resolutions=(3,)), "attention_resolutions"),
    (dict(image_size=None, attention_resolutions=(8,)), "needs image_size"),
])
def test_bad_args(kwargs, word):
    base = dict(in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=word):
        EncoderClassifier(**{**base, **kwargs})


def test_bad_inputs():
    net = EncoderClassifier(1, 2, base_channels=8, image_size=8)
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(2, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="image_size"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_cond"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))


def test_points_classifier_is_an_mlp():
    net = MLP(2, hidden=32, depth=2, out_dim=3)
    assert net(torch.randn(5, 2), torch.randn(5)).shape == (5, 3)


def test_learns_noisy_brightness_sign():
    """256 random 8x8 images x0 ~ N(0, I), class = sign of the clean mean brightness, observed as
    x0 + sigma * noise with a per-sample level sigma (log-uniform on [0.02, 1]) and noise_cond =
    ln(sigma) / 4. The noisy mean alone gets ~95 %; 100 full-batch Adam steps fit > 90 %."""
    torch.manual_seed(0)
    n = 256
    x0 = torch.randn(n, 1, 8, 8)
    y = (x0.mean(dim=(1, 2, 3)) > 0).long()
    sigma = torch.exp(torch.empty(n).uniform_(math.log(0.02), math.log(1.0)))
    x = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
    noise_cond = sigma.log() / 4
    net = EncoderClassifier(1, 2, base_channels=8, image_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    accs, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is fastest (~1.5 s) and immune to busy cores
    try:
        for _ in range(100):
            logits = net(x, noise_cond)
            accs.append((logits.argmax(dim=1) == y).float().mean().item())
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = (net(x, noise_cond).argmax(dim=1) == y).float().mean().item()
    assert accs[0] < 0.75, f"a fresh net should be near chance, got {accs[0]:.3f}"
    assert acc > 0.9, f"training accuracy {acc:.3f} after 100 steps"
