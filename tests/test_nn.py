"""Tests of diffspace.nn: shapes, zero init, conditioning, embeddings, Energy, import hygiene, errors."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import perturb_

from diffspace.nn import (MLP, Energy, FourierEmbedding, MPUNet, SinusoidalEmbedding, UNet, count_parameters, describe,
                          group_count)

torch.set_num_threads(2)




# -- shapes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C, size, mult, attn, classes", [
    (1, 8, (1, 2), (), None),
    (1, 8, (1, 2), (4,), 10),
    (3, 16, (1, 2, 2), (8,), None),
    (3, 32, (1, 1, 2), (16, 8), 5),
    (1, 64, (1, 2, 2, 2), (8,), None),
])
def test_unet_shapes(C, size, mult, attn, classes):
    torch.manual_seed(0)
    net = UNet(C, base_channels=16, channel_mult=mult, num_blocks=1, attention_resolutions=attn, image_size=size,
               num_classes=classes)
    x = torch.randn(2, C, size, size)
    assert net(x, torch.randn(2)).shape == x.shape
    if classes:
        assert net(x, torch.randn(2), torch.tensor([0, classes])).shape == x.shape  # incl. the null label


def test_unet_out_channels_any_size_and_dtype():
    net = UNet(3, out_channels=6, base_channels=8, channel_mult=(1, 2), num_blocks=1, mid_attention=False)
    assert net(torch.randn(2, 3, 12, 20), torch.randn(2)).shape == (2, 6, 12, 20)
    out = net(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    assert out.dtype == torch.float64  # computed in the weights' dtype, returned in x's
    assert net(torch.randn(2, 3, 8, 8), torch.tensor(0.5)).shape == (2, 6, 8, 8)  # scalar noise_cond


def test_head_channels():
    net = UNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1, image_size=8, attention_resolutions=(8, 4),
               head_channels=8)
    assert net.mid[1].num_heads == 4
    assert net(torch.randn(2, 1, 8, 8), torch.randn(2)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
@pytest.mark.parametrize("classes", [None, 3])
def test_mlp_shapes(embedding, classes):
    net = MLP(2, hidden=32, depth=2, emb_dim=16, embedding=embedding, num_classes=classes)
    assert net(torch.randn(7, 2), torch.randn(7)).shape == (7, 2)
    assert MLP(5, hidden=16, depth=1, out_dim=3)(torch.randn(4, 5), torch.randn(4)).shape == (4, 3)
    if classes:
        assert net(torch.randn(7, 2), torch.randn(7), torch.randint(0, classes + 1, (7,))).shape == (7, 2)


def test_group_count():
    assert [group_count(c) for c in (1, 3, 8, 32, 64, 96, 128, 256, 640)] == [1, 1, 2, 8, 16, 24, 32, 32, 32]
    for c in range(1, 300):
        assert c % group_count(c) == 0


# -- zero init and training ---------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: UNet(1, base_channels=16, channel_mult=(1, 2), image_size=8, attention_resolutions=(4,)), (4, 1, 8, 8)),
    (lambda: UNet(1, base_channels=16, channel_mult=(1, 2), image_size=8, scale_shift=False), (4, 1, 8, 8)),
    (lambda: MLP(2, hidden=32, depth=2), (4, 2)),
])
def test_zero_init_then_moves(make, shape):
    torch.manual_seed(0)
    net = make()
    x, c = torch.randn(shape), torch.randn(shape[0])
    assert torch.equal(net(x, c), torch.zeros(shape))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    (net(x, c) - x).pow(2).mean().backward()
    opt.step()
    assert net(x, c).abs().max() > 0


def test_unet_zero_inits_resblock_tail():
    net = UNet(1, base_channels=8, channel_mult=(1, 2), num_blocks=1, image_size=8)
    assert torch.count_nonzero(net.conv_out.weight) == 0
    assert torch.count_nonzero(net.mid[0].conv2.weight) == 0 and torch.count_nonzero(net.mid[1].proj.weight) == 0


# -- conditioning is used -----------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: UNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1, image_size=8, num_classes=4), (3, 1, 8, 8)),
    (lambda: UNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1, image_size=8, num_classes=4, scale_shift=False),
     (3, 1, 8, 8)),
    (lambda: MLP(2, hidden=32, depth=2, num_classes=4), (3, 2)),
])
def test_uses_noise_cond_and_labels(make, shape):
    torch.manual_seed(0)
    net = perturb_(make()).eval()
    x, c = torch.randn(shape), torch.randn(shape[0])
    base = net(x, c, torch.tensor([0, 1, 2]))
    assert not torch.allclose(base, net(x, c + 0.5, torch.tensor([0, 1, 2])))
    assert not torch.allclose(base, net(x, c, torch.tensor([3, 2, 1])))
    torch.testing.assert_close(net(x, c), net(x, c, torch.tensor([4, 4, 4])))  # None = the null label 4
    assert not torch.allclose(net(x, c), base)


def test_labels_without_classes_raise():
    net = MLP(2, hidden=16, depth=1)
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(2, 2), torch.randn(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_is_its_formula(scale_shift):
    """ADM: skip(x) + conv2(SiLU(GN(h) (1 + scale) + shift)); DDPM: skip(x) + conv2(SiLU(GN(h + b))), h = conv1(SiLU(GN(x))),
    written out here with torch.nn.functional and the block's own weights (float64)."""
    import torch.nn.functional as F

    from diffspace.nn.unet import ResBlock

    torch.manual_seed(0)
    block = perturb_(ResBlock(8, 16, 12, scale_shift=scale_shift)).double()
    x, emb = torch.randn(3, 8, 5, 5, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    gn = lambda z, m: F.group_norm(z, m.num_groups, m.weight, m.bias, m.eps)  # noqa: E731
    conv = lambda z, m, pad: F.conv2d(z, m.weight, m.bias, padding=pad)  # noqa: E731
    h = conv(F.silu(gn(x, block.norm1)), block.conv1, 1)
    e = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)[:, :, None, None]
    h = gn(h, block.norm2) * (1 + e[:, :16]) + e[:, 16:] if scale_shift else gn(h + e, block.norm2)
    expected = conv(x, block.skip, 0) + conv(F.silu(h), block.conv2, 1)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-12, atol=1e-12)


def test_the_cifar10_ddpm_recipe_has_ddpms_parameter_count():
    """configs/cifar10-ddpm.toml's network: Ho et al. (2020) report 35.7 M parameters for CIFAR-10
    (sec. 4 / appendix B), with DDPM's added conditioning (model.scale_shift = false)."""
    from pathlib import Path

    from diffspace.config import load_config
    from diffspace.model import build_network

    cfg = load_config(Path(__file__).parents[1] / "configs" / "cifar10-ddpm.toml")
    params = count_parameters(build_network(cfg.model, (3, 32, 32)))
    assert round(params / 1e6, 1) == 35.7, params


@pytest.mark.parametrize("args, words", [
    (["--data", "ring8"], ["model.scale_shift=false", "U-Net", "(2,)"]),
    (["--data", "digits", "model.network=mp"], ["model.scale_shift=false", "model.network='mp'"]),
])
def test_ddpm_conditioning_elsewhere_is_a_one_line_error(tmp_path, args, words):
    from conftest import one_line_error, run

    one_line_error(run("train", *args, "model.scale_shift=false", "--steps", "2", "--out", tmp_path / "r", "--quiet"), *words)


# -- embeddings ----------------------------------------------------------------------------------------
def test_sinusoidal_formula():
    dim, max_period = 8, 10000.0
    x = torch.tensor([-3.0, -0.25, 0.0, 1.5, 999.0])
    expected = torch.empty(5, dim)
    half = dim // 2
    for i, xi in enumerate(x.tolist()):
        for k in range(half):
            f = math.exp(-math.log(max_period) * k / half)
            expected[i, k] = math.cos(xi * f)
            expected[i, half + k] = math.sin(xi * f)
    torch.testing.assert_close(SinusoidalEmbedding(dim, max_period)(x), expected, atol=1e-4, rtol=1e-4)


def test_fourier_features_fixed():
    torch.manual_seed(0)
    emb = FourierEmbedding(16, scale=16.0)
    assert list(emb.parameters()) == []
    assert "freqs" in dict(emb.named_buffers()) and "freqs" in emb.state_dict()
    x = torch.tensor([-1.0, 0.0, 2.0])
    out = emb(x)
    assert out.shape == (3, 16)
    b = emb.freqs
    torch.testing.assert_close(out, torch.cat([torch.cos(2 * math.pi * x[:, None] * b), torch.sin(2 * math.pi * x[:, None] * b)], 1))
    net = MLP(2, hidden=16, depth=1, emb_dim=16, embedding="fourier")
    assert all("freqs" not in n for n, _ in net.named_parameters()) and "cond.embed.freqs" in net.state_dict()


@pytest.mark.parametrize("dim", [0, 7])
def test_embedding_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        SinusoidalEmbedding(dim)


# -- Energy ---------------------------------------------------------------------------------------------
def test_energy_gradient_shape():
    net = perturb_(UNet(1, base_channels=8, channel_mult=(1, 2), num_blocks=1, image_size=8))
    energy = Energy(net)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    E = energy(x, torch.randn(3))
    assert E.shape == (3,)
    (grad,) = torch.autograd.grad(E.sum(), x)
    assert grad.shape == x.shape


def test_energy_of_zero_net():
    zero = lambda x, c, labels=None: torch.zeros_like(x)
    x = torch.randn(4, 3, requires_grad=True)
    e = Energy(zero)(x, torch.zeros(4))
    torch.testing.assert_close(e, 0.5 * x.detach().pow(2).sum(1))
    (grad,) = torch.autograd.grad(e.sum(), x)
    torch.testing.assert_close(-grad, -x.detach())
    # a fresh (zero-output) MLP is the zero function too
    x2 = torch.randn(4, 2, requires_grad=True)
    e2 = Energy(MLP(2, hidden=16, depth=1))(x2, torch.randn(4))
    torch.testing.assert_close(e2, 0.5 * x2.detach().pow(2).sum(1))


# -- hygiene -------------------------------------------------------------------------------------------
def test_no_diffusion_imports():
    code = ("import sys, diffspace.nn; bad = [m for m in ('schedules', 'parameterization', 'process', 'losses', "
            "'precond', 'presets', 'samplers', 'analytic', 'train', 'data', 'evaluate', 'cli') "
            "if 'diffspace.' + m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_determinism():
    make = lambda: UNet(3, base_channels=16, channel_mult=(1, 2), num_blocks=1, image_size=8, attention_resolutions=(8,),
                        embedding="fourier", dropout=0.1)
    torch.manual_seed(123)
    a = make()
    torch.manual_seed(123)
    b = make()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    perturb_(a).eval()
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    assert torch.equal(a(x, c), a(x, c))  # eval: dropout off


def test_attention_path():
    torch.manual_seed(0)
    net = perturb_(UNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1, image_size=8, attention_resolutions=(8,),
                        mid_attention=False)).eval()
    attn = [m for m in net.modules() if type(m).__name__ == "Attention"]
    assert len(attn) == 3  # one on the way down at 8x8, two on the way up
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    before = net(x, c)
    with torch.no_grad():
        attn[0].qkv.weight.mul_(3.0)
    assert not torch.allclose(before, net(x, c))


@pytest.mark.parametrize("Net", [UNet, MPUNet])
def test_attention_runs_on_a_fused_kernel(Net):
    """With only the flash kernel allowed, both U-Nets' attention runs (q, k, v with a contiguous last
    dim; else SDPA refuses, and by default falls back to the math path that stores the (H*W)^2 matrix)
    and agrees with the math path to float rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    net = perturb_(Net(3, base_channels=16, channel_mult=(1, 2), num_blocks=1, image_size=8,
                       attention_resolutions=(8, 4))).eval()
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = net(x, c)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        math_path = net(x, c)
    assert torch.allclose(fused, math_path, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(fused, torch.zeros_like(fused))


def test_count_and_describe():
    net = MLP(2, hidden=16, depth=1, emb_dim=8, embedding="fourier")
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())
    line = describe(UNet(1, base_channels=8, channel_mult=(1, 2), num_blocks=1, image_size=8))
    assert line.startswith("UNet: ") and "parameters" in line and "channel_mult=(1, 2)" in line


# -- bad configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 2, 2), image_size=10), "image_size"),
    (dict(channel_mult=(1, 2), image_size=8, attention_resolutions=(2,)), "attention_resolutions"),
    (dict(channel_mult=(1, 2), attention_resolutions=(4,)), "image_size"),
    (dict(base_channels=0), "base_channels"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(image_size=8, channel_mult=(1,), attention_resolutions=(8,), num_heads=3), "num_heads"),
    (dict(embedding="gaussian"), "embedding"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_unet_config(kwargs, word):
    kwargs = dict(dict(base_channels=8, num_blocks=1), **kwargs)
    with pytest.raises(ValueError, match=word):
        UNet(1, **kwargs)


@pytest.mark.parametrize("Net", [UNet, MPUNet])
def test_bad_inputs(Net):
    net = Net(1, base_channels=8, channel_mult=(1, 2), num_blocks=1, image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        net(torch.randn(2, 1, 16, 16), torch.randn(2))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(2, 3, 8, 8), torch.randn(2))
    with pytest.raises(ValueError, match="noise_cond"):
        net(torch.randn(2, 1, 8, 8), torch.randn(3))
    with pytest.raises(ValueError, match="num_classes=None"):
        net(torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible"):
        Net(1, base_channels=8, channel_mult=(1, 2))(torch.randn(1, 1, 7, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="depth"):
        MLP(2, depth=-1)
