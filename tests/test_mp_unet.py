"""Tests of diffspace.nn.mp_unet (EDM2's magnitude-preserving U-Net): the magnitude-preserving
primitives by Monte Carlo, forced weight normalisation, MPUNet shapes / zero init / labels /
gradients / errors, and a tiny regression fit."""

import pytest
import torch

from diffspace.nn import UNet, count_parameters
from diffspace.nn.mp_unet import Block, MPConv, MPFourier, MPUNet, mp_cat, mp_silu, mp_sum, normalize

torch.set_num_threads(1)


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


def set_gains_(net, value=1.0):
    """Give every zero-initialised scalar gain (out_gain, each Block's emb_gain) a nonzero value."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(value)
    return net


# -- primitives ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_and_mp_cat_preserve_magnitude(t):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10_000, 10, generator=g), torch.randn(10_000, 10, generator=g)
    assert rms(mp_sum(a, b, t)) == pytest.approx(1, abs=0.02)
    a, b = torch.randn(10_000, 3, generator=g), torch.randn(10_000, 17, generator=g)  # unequal widths
    out = mp_cat(a, b, dim=1, t=t)
    assert out.shape == (10_000, 20)
    assert rms(out) == pytest.approx(1, abs=0.02)
    # b's share of the output's energy is t^2 / ((1 - t)^2 + t^2), whatever the widths
    share = out[:, 3:].double().pow(2).sum() / out.double().pow(2).sum()
    assert share.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=0.02)


def test_mp_silu_and_normalize():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    assert rms(mp_silu(x)) == pytest.approx(1, abs=0.02)
    w = 5 * torch.randn(6, 4, 3, 3)
    rows = normalize(w).flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rows, torch.ones(6), atol=1e-3)
    pix = normalize(torch.randn(2, 8, 5, 5) * 3, dim=1).pow(2).mean(1).sqrt()  # pixel norm
    assert torch.allclose(pix, torch.ones_like(pix), atol=1e-3)


@pytest.mark.parametrize("kernel", [(), 1, 3])
def test_mpconv_forced_weight_norm_and_unit_output(kernel):
    torch.manual_seed(0)
    conv = MPConv(32, 48, kernel)
    with torch.no_grad():
        conv.weight.mul_(7.0)  # far from unit rows
    x = torch.randn(2000, 32) if kernel == () else torch.randn(4, 32, 32, 32)
    conv.eval()
    before = conv.weight.clone()
    y_eval = conv(x)
    assert torch.equal(conv.weight, before)  # eval: the stored weight is left alone
    conv.train()
    y = conv(x)
    rows = conv.weight.detach().flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rows, torch.ones(48), atol=1e-3)  # forced normalisation stored unit rows
    assert torch.allclose(y, y_eval, rtol=1e-3, atol=1e-5)  # the stored scale only matters through eps
    assert rms(y) == pytest.approx(1, abs=0.1)  # (3x3: zero padding lowers the border's variance a little)
    assert torch.allclose(conv(x, gain=2), 2 * y, atol=1e-4)


def test_mpconv_two_training_forwards_then_backward():
    conv = MPConv(4, 4, 3).train()
    x = torch.randn(2, 4, 6, 6)
    (conv(x).sum() + conv(x).sum()).backward()  # the second in-place projection breaks no saved tensor
    assert conv.weight.grad is not None


def test_mpfourier_unit_rms():
    torch.manual_seed(0)
    f = MPFourier(1024)
    x = torch.rand(1000) * 6 - 3
    out = f(x)
    assert out.shape == (1000, 1024)
    assert rms(out) == pytest.approx(1, abs=0.05)
    assert list(dict(f.named_buffers())) == ["freqs", "phases"] and not list(f.parameters())


# -- MPUNet -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C, size", [(1, 8), (3, 16)])
def test_mpunet_shape_zero_init_and_magnitude(C, size):
    torch.manual_seed(0)
    net = MPUNet(C, base_channels=16, channel_mult=(1, 2), num_blocks=1, attention_resolutions=(8,),
                 image_size=size)
    x, c = torch.randn(2, C, size, size), torch.randn(2)
    out = net(x, c)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # out_gain = 0
    assert sum(isinstance(m, Block) and m.num_heads > 0 for m in net.modules()) >= 2  # attention built
    set_gains_(net)
    out = net(x, c)
    assert torch.isfinite(out).all()
    assert 0.2 <= rms(out) <= 5
    assert net(x, torch.tensor(0.3)).shape == x.shape  # scalar noise_cond


def test_mpunet_any_size_out_channels_and_dtype():
    net = set_gains_(MPUNet(3, out_channels=5, base_channels=8, channel_mult=(1, 2), num_blocks=1))
    assert net(torch.randn(2, 3, 12, 20), torch.randn(2)).shape == (2, 5, 12, 20)
    out = net.double()(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert net.config["out_channels"] == 5 and net.config["channel_mult"] == (1, 2)


def test_mpunet_class_labels():
    torch.manual_seed(0)
    net = MPUNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1, num_classes=4).eval()
    x, c = torch.randn(3, 1, 8, 8), torch.randn(3)
    null = torch.full((3,), 4)
    assert torch.equal(net(x, c), net(x, c, null))
    set_gains_(net)
    assert torch.equal(net(x, c), net(x, c, null))  # None means the null label, exactly
    a, b = net(x, c, torch.tensor([0, 1, 2])), net(x, c, torch.tensor([3, 3, 3]))
    assert (a - b).abs().max() > 1e-3
    assert (a - net(x, c)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c, torch.tensor([0, 1, 5]))


def test_mpunet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = set_gains_(MPUNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1, attention_resolutions=(4,),
                            image_size=8, num_classes=3), 0.5)
    x = torch.randn(4, 1, 8, 8)
    net(x, torch.randn(4), torch.tensor([0, 1, 2, 3])).pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mpunet_bad_arguments():  # bad inputs: test_nn.test_bad_inputs, for both U-Nets
    for kwargs in (dict(base_channels=0), dict(channel_mult=()), dict(num_blocks=0), dict(dropout=1.0),
                   dict(attention_resolutions=(8,)), dict(image_size=8, attention_resolutions=(2,)),
                   dict(label_balance=1.5), dict(num_classes=0)):
        with pytest.raises(ValueError):
            MPUNet(1, **kwargs)
    with pytest.raises(ValueError, match="flavor"):
        Block(8, 8, 8, flavor="mid")


def test_mpunet_fits_a_fixed_batch():
    torch.manual_seed(0)
    net = MPUNet(1, base_channels=16, channel_mult=(1, 2), num_blocks=1).train()
    x, c = torch.randn(8, 1, 8, 8), torch.zeros(8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (net(x, c) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_parameter_count_is_of_unet_order():
    kw = dict(base_channels=24, channel_mult=(1, 2), num_blocks=1)
    n_mp, n_unet = count_parameters(MPUNet(1, **kw)), count_parameters(UNet(1, **kw))
    assert 0.3 < n_mp / n_unet < 3, (n_mp, n_unet)
