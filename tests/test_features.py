"""Feature-space metrics: Frechet distance, precision / recall, classifier score, the FID Inception
(random weights only; the real file is never needed) and the cached digits feature net."""

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffspace import features
from diffspace.data import load
from diffspace.features import (classifier_score, digits_feature_net, digits_metrics, frechet_distance,
                                frechet_distance_of, precision_recall)
from diffspace.nn import inception as inception_module
from diffspace.nn.inception import WEIGHTS_FILE, FIDInception, load_inception, pool3x3

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: one thread is as fast, and on a loaded 2-core machine two OpenMP threads
    wait on each other (an Inception forward measured 30x slower). The count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spd(d, g, scale=1.0):
    a = torch.randn(d, d, generator=g, dtype=F64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=F64))


def _gaussian(n, mu, cov, g):
    return mu + torch.randn(n, len(mu), generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T


def _fd_scipy(mu1, c1, mu2, c2):
    """||dmu||^2 + tr(C1 + C2 - 2 sqrtm(C1 C2)) with scipy's general (Schur) matrix square root."""
    cross = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    return float(((mu1 - mu2) ** 2).sum()) + float(np.trace(c1.numpy() + c2.numpy() - 2 * cross))


# -- Frechet distance --------------------------------------------------------------------------------
def test_fd_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    c1, c2 = torch.rand(6, generator=g, dtype=F64) + 0.1, 3 * torch.rand(6, generator=g, dtype=F64)
    expected = float(((c1.sqrt() - c2.sqrt()) ** 2).sum() + ((mu1 - mu2) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(c1), mu2, torch.diag(c2)) == pytest.approx(expected, rel=1e-12)
    same = frechet_distance(mu1.numpy(), np.diag(c1.numpy()), mu1.numpy(), np.diag(c1.numpy()))  # arrays work too
    assert same == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("seed, d", [(1, 2), (2, 8), (3, 32)])
def test_fd_matches_scipy_sqrtm(seed, d):
    g = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    c1, c2 = _spd(d, g), _spd(d, g, scale=2.0)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(_fd_scipy(mu1, c1, mu2, c2), rel=1e-9)


def test_fd_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(4)
    full = torch.randn(400, 16, generator=g, dtype=F64) * 5
    low_rank = torch.randn(20, 64, generator=g)  # N < d: a singular covariance
    assert frechet_distance_of(full, full) == pytest.approx(0, abs=1e-9)
    assert frechet_distance_of(low_rank, low_rank) == pytest.approx(0, abs=1e-6)


def test_fd_of_large_samples_near_the_analytic_value():
    g = torch.Generator().manual_seed(5)
    d = 4
    mu1, mu2 = torch.zeros(d, dtype=F64), torch.tensor([1.0, -0.5, 0.0, 0.25], dtype=F64)
    c1, c2 = _spd(d, g), _spd(d, g, scale=0.5)
    a, b = _gaussian(100_000, mu1, c1, g), _gaussian(100_000, mu2, c2, g)
    exact = _fd_scipy(mu1, c1, mu2, c2)
    assert frechet_distance_of(a, b) == pytest.approx(exact, rel=0.02, abs=0.005)
    mu, cov = features.feature_statistics(a)
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(a.numpy(), rowvar=False)))


# -- precision and recall ----------------------------------------------------------------------------
def test_precision_recall_identical_and_far_apart():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 5, generator=g, dtype=F64)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_half_the_support():
    """Real: 10 far-apart clusters; fake: fresh samples of the first 5 only. Fake samples lie in the real
    manifold (precision ~ 1, short of it only by the k-NN balls' uncovered tails); real samples of
    clusters 5..9 are far from every fake ball, those of clusters 0..4 inside one up to the same tails
    (recall just under 0.5). With the fake set an exact copy of half the real samples both are exact: (1, 0.5)."""
    g = torch.Generator().manual_seed(7)
    centres = 50.0 * torch.arange(10, dtype=F64)[:, None].expand(10, 2)
    real = torch.cat([c + torch.randn(500, 2, generator=g, dtype=F64) for c in centres])
    fake = torch.cat([c + torch.randn(500, 2, generator=g, dtype=F64) for c in centres[:5]])
    precision, recall = precision_recall(real, fake)
    assert precision > 0.95
    assert 0.475 < recall <= 0.5
    assert precision_recall(real, real[:2500].clone()) == (1.0, 0.5)


def test_precision_recall_matches_a_brute_force_computation():
    """Against numpy on the full distance matrices (the code works in row blocks: 3 blocks here)."""
    g = torch.Generator().manual_seed(8)
    real = torch.randn(3000, 8, generator=g, dtype=F64)
    fake = 1.3 * torch.randn(2500, 8, generator=g, dtype=F64) + 0.3
    r, f = real.numpy(), fake.numpy()
    dist = scipy.spatial.distance.cdist
    for k in (1, 3, 5):
        radius_r, radius_f = (np.partition(dist(a, a), k, axis=1)[:, k] for a in (r, f))
        expected = ((dist(f, r) <= radius_r).any(1).mean(), (dist(r, f) <= radius_f).any(1).mean())
        assert precision_recall(real, fake, k) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_rejects_bad_k_and_shapes():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k=10"):
        precision_recall(x, x, k=10)
    with pytest.raises(ValueError, match="features"):
        precision_recall(x, torch.randn(10, 4))


def test_classifier_score():
    eye = torch.eye(10, dtype=F64).repeat(3, 1)  # certain and balanced: the maximum, 10
    assert classifier_score(eye) == pytest.approx(10.0, rel=1e-12)
    same = torch.full((7, 10), 0.1, dtype=F64)  # every prediction equal: 1
    assert classifier_score(same) == pytest.approx(1.0, rel=1e-12)
    # p = (1, 0), (1/2, 1/2): p(y) = (3/4, 1/4), KL = log(4/3) and log(4/3) / 2, score = (4/3)^(3/4)
    assert classifier_score(torch.tensor([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx((4 / 3) ** 0.75, rel=1e-12)


# -- the FID Inception (random weights) ------------------------------------------------------------------
# Key names and shapes of pt_inception-2015-12-05-6726825d.pth, verified in mseitzer/pytorch-fid
# src/pytorch_fid/inception.py (fid_inception_v3: torchvision's Inception3(num_classes=1008,
# aux_logits=False) with Mixed_5b/c/d = FIDInceptionA(192/256/288, pool_features=32/64/64), Mixed_6b..e =
# FIDInceptionC(768, channels_7x7=128/160/160/192), Mixed_7b/c = FIDInceptionE_1(1280) / E_2(2048),
# loaded with strict load_state_dict), pytorch/vision torchvision/models/inception.py (the layer shapes,
# BasicConv2d = bias-free conv + BatchNorm2d(eps=0.001)) and toshas/torch-fidelity
# utils/util_convert_inception_weights.py (the TF graph's 94 conv + batchnorm pairs and fc, 1008 classes).
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def inception():
    """A random FIDInception with every BatchNorm tensor moved off its init, so round trips test them all."""
    torch.manual_seed(0)
    net = FIDInception()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if ".bn." in name and t.is_floating_point():
                t.copy_(0.5 + torch.rand(t.shape, generator=g) if "var" in name or "weight" in name
                        else 0.1 * torch.randn(t.shape, generator=g))
    return net


def test_inception_keys_and_shapes_match_the_fid_weights(inception):
    sd = inception.state_dict()
    for key, shape in KNOWN_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)
    convs = [m for m in inception.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94
    assert all(c.bias is None for c in convs) and all(b.eps == 0.001 for b in bns)
    # torchvision's inception_v3(aux_logits=False) has 23,834,568 parameters with 1000 classes (a figure
    # cited across public model zoos and fixtures); the 1008-way fc adds 8 x 2048 + 8.
    assert sum(p.numel() for p in inception.parameters()) == 23_834_568 + 8 * 2048 + 8
    assert len(sd) == 94 * 6 + 2  # conv weight; bn weight, bias, running mean, var, num_batches_tracked; fc


def test_inception_fid_pooling_variants():
    x = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(pool3x3(x, "avg"), x)  # TF 'SAME' averaging: padding not counted
    ramp = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert pool3x3(ramp, "max")[0, 0, 0, 0] == 6.0 and pool3x3(ramp, "max")[0, 0, 4, 4] == 24.0
    net = FIDInception()
    pools = {name: m.pool for name, m in net.named_children() if hasattr(m, "pool")}
    assert pools == {"Mixed_7b": "avg", "Mixed_7c": "max"}


def test_inception_output_shapes(inception):
    """At the real input size, 299 x 299 (other tests resize to 75 x 75, Inception-v3's smallest input)."""
    g = torch.Generator().manual_seed(2)
    gray = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    rgb = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(inception.prepare(gray), F.interpolate(gray.expand(-1, 3, -1, -1), size=(299, 299),
                                                                      mode="bilinear", align_corners=False))
    for x in (gray, rgb):
        y = inception(x)
        assert y.shape == (len(x), 2048) and bool(torch.isfinite(y).all()) and y.dtype == torch.float32
    with pytest.raises(ValueError, match="N, 1 or 3, H, W"):
        inception(torch.zeros(2, 2, 8, 8))


@pytest.fixture
def small_inputs(monkeypatch):
    monkeypatch.setattr(inception_module, "SIZE", 75)


def test_inception_gray_is_repeated_rgb(inception, small_inputs):
    gray = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert inception(gray).shape == (2, 2048)
    torch.testing.assert_close(inception(gray), inception(gray.expand(-1, 3, -1, -1)))


def test_inception_round_trips(inception, small_inputs, tmp_path):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    expected = inception(x)
    sd = {k: v.contiguous() for k, v in inception.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    # files written before PyTorch 0.4.1 (no num_batches_tracked) or 1.6 (no zip container) load too
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for name in ("w.safetensors", "w.pth", "old.pt"):
        net = load_inception(tmp_path / name)
        assert not net.training
        assert torch.equal(net(x), expected), name


def test_inception_metrics_from_a_weights_file(inception, small_inputs, tmp_path):
    """One call (an FD in 2048 dimensions takes seconds): a set against itself, in batches of 4."""
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(tmp_path / "w.safetensors"))
    real = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    same = features.inception_metrics(real, real.clone(), tmp_path / "w.safetensors", batch_size=4)
    assert (same["precision"], same["recall"], same["n"]) == (1.0, 1.0, 6)
    assert same["FD_inception"] == pytest.approx(0, abs=1e-9) and same["weights"] == "w.safetensors"
    other = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1  # eval's floor set
    both = features.inception_metrics(real, real.clone(), tmp_path / "w.safetensors", batch_size=4, others=(other,))
    alone = features.inception_metrics(other, real.clone(), tmp_path / "w.safetensors", batch_size=4)
    assert both == [same, alone] and alone["n"] == 5


def test_inception_missing_file_is_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        load_inception(tmp_path / "nowhere" / WEIGHTS_FILE)
    message = str(e.value)
    assert "\n" not in message and WEIGHTS_FILE in message and "nowhere" in message
    assert "https://github.com/mseitzer/pytorch-fid/releases" in message


_UNPICKLED = []


def _mark_unpickled():
    _UNPICKLED.append(True)
    return "boom"


class _Payload:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_inception_refuses_pickled_objects(tmp_path):
    torch.save({"fc.weight": torch.zeros(1), "payload": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="pickled objects") as e:
        load_inception(tmp_path / "evil.pth")
    assert _UNPICKLED == [] and "\n" not in str(e.value)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        load_inception(tmp_path / "junk.pth")
    assert _UNPICKLED == []


def test_inception_names_bad_keys_and_shapes(inception, tmp_path):
    sd = {k: v.clone() for k, v in inception.state_dict().items()}
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        load_inception(tmp_path / "bad.pth")
    for part in ("Mixed_6b.branch7x7_2.conv.weight", "AuxLogits.fc.weight", "fc.weight (1000, 2048)"):
        assert part in str(e.value)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        load_inception(tmp_path / "w.npz")


def test_nn_inception_imports_no_diffusion_module():
    code = ("import sys, diffspace.nn.inception; bad = [m for m in ('schedules', 'parameterization', 'process', "
            "'losses', 'precond', 'samplers', 'train', 'features') if 'diffspace.' + m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the digits feature net --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    net = digits_feature_net(cache)
    return net, cache, time.perf_counter() - start


def test_digits_net_accuracy_on_held_out_digits(digits_net):
    net, _, seconds = digits_net
    assert not net.info["cached"]
    assert seconds < 60  # ~5-10 s on 2 loaded cores
    _, test = load("digits").split(net.info["settings"]["test_fraction"], seed=net.info["settings"]["seed"])
    accuracy = float((net.probabilities(test.x).argmax(1) == test.labels).double().mean())
    assert accuracy >= 0.95 and accuracy == pytest.approx(net.accuracy)
    assert net.features(test.x).shape == (len(test), net.info["settings"]["features"])
    assert net.features(test.x).dtype == F64


def test_digits_net_second_call_loads_from_cache(digits_net, monkeypatch):
    net, cache, _ = digits_net

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(features, "train_digits_feature_net", no_training)
    start = time.perf_counter()
    again = digits_feature_net(cache)
    assert time.perf_counter() - start < 2.0
    assert again.info["cached"] and again.accuracy == net.accuracy
    x = load("digits").x
    assert torch.equal(again.features(x), net.features(x))
    stored = [json.loads(p.read_text()) for p in cache.glob("digits-featurenet-*.json")]
    assert len(stored) == 1 and stored[0]["accuracy"] == net.accuracy
    assert len(list(cache.glob("digits-featurenet-*.safetensors"))) == 1
    monkeypatch.setenv("DIFFSPACE_CACHE", str(cache))
    assert features.default_cache_dir() == cache
    assert digits_feature_net().info["cached"]


def test_digits_metrics_real_halves_and_noise(digits_net):
    net, _, _ = digits_net
    x = load("digits").x
    g = torch.Generator().manual_seed(9)
    perm = torch.randperm(len(x), generator=g)
    a, b = x[perm[:898]], x[perm[898:]]
    noise = torch.rand(898, 1, 8, 8, generator=g) * 2 - 1
    real = digits_metrics(a, b, net)
    bad = digits_metrics(noise, b, net)
    assert real["FD_digits"] * 10 < bad["FD_digits"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert real["classifier_score"] > 9 and real["classes_covered"] == 10 and real["confident"] > 0.9
    assert real["min_class_fraction"] > 0.05 and sum(real["class_fractions"]) == pytest.approx(1.0)
    assert bad["classifier_score"] < 2 and bad["confident"] < 0.1
    assert bad["precision"] < 0.5
    assert math.isclose(real["classifier_accuracy"], net.accuracy)
