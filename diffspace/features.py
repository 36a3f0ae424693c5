"""Sample quality in a feature space: the Frechet distance, improved precision and recall, and two
feature nets to measure them in.

* `frechet_distance`: the Frechet (2-Wasserstein) distance between the Gaussians fitted to two
  feature sets; in Inception-v3's pool3 features it is the FID (Heusel et al. 2017).
* `precision_recall`: the k-NN manifold precision and recall of Kynkaanniemi et al. (2019).
* `DigitsFeatureNet` / `digits_feature_net`: a small conv net trained on scikit-learn's 8x8 digits,
  deterministically and offline, cached as safetensors + JSON; `digits_metrics` measures samples in it.
* `inception_metrics`: the same measures in the FID Inception's 2048-d features, from a local
  weights file (`diffspace.nn.inception.load_inception`; nothing is ever downloaded).

Features come back as float64 (N, d); every statistic is computed in float64.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import atomic_write, atomic_write_text
from .data import load
from .nn.inception import load_inception

Tensor = torch.Tensor
F64 = torch.float64


def _matrix(x) -> Tensor:
    """A float64 CPU tensor from a tensor or array."""
    return (x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))).detach().to("cpu", F64)


# -- Frechet distance --------------------------------------------------------------------------------
def feature_statistics(feats) -> tuple[Tensor, Tensor]:
    """(mu, cov) of features (N, d): the mean and the unbiased covariance (divided by N - 1, numpy's
    np.cov(rowvar=False), as in the FID of Heusel et al. 2017), float64."""
    x = _matrix(feats)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature_statistics needs features (N, d) with N >= 2, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / (len(x) - 1)


def sqrtm_psd(c: Tensor) -> Tensor:
    """The symmetric square root V diag(sqrt(max(lambda, 0))) V^T of a symmetric PSD matrix
    (eigendecomposition; the tiny negative eigenvalues of rounding are clamped to 0)."""
    lam, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet distance between N(mu1, C1) and N(mu2, C2) (Frechet 1957; Dowson & Landau 1982):

        d^2 = ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2}),

    the FID of Heusel et al. (2017) in Inception features. tr (C1^{1/2} C2 C1^{1/2})^{1/2} is
    the sum of the square roots of that symmetric PSD matrix's eigenvalues, all in float64 (no scipy:
    its sqrtm of the non-symmetric C1 C2 can turn complex). Rounding can leave d^2 at -1e-12: it is
    clamped to 0."""
    mu1, cov1, mu2, cov2 = (_matrix(a) for a in (mu1, cov1, mu2, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance needs mu (d,) and cov (d, d) of one d; got {tuple(mu1.shape)}, "
                         f"{tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}")
    s1 = sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    d2 = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * lam.sqrt().sum()
    return max(float(d2), 0.0)


def frechet_distance_of(feats_a, feats_b) -> float:
    """frechet_distance between the Gaussians fitted to two feature sets (N, d) and (M, d)."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


# -- improved precision and recall ---------------------------------------------------------------------
def _row_blocks(n_rows: int, n_cols: int, budget: int = 2 ** 22):
    """Row slices whose distance blocks (rows x n_cols) hold at most `budget` entries (32 MB in float64)."""
    step = max(1, budget // max(n_cols, 1))
    return (slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step))


def knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance of each point of x (N, d) to its k-th nearest other point of x (the point itself, at
    distance 0, is the first of the k + 1 smallest)."""
    return torch.cat([torch.cdist(x[s], x).kthvalue(k + 1, dim=1).values for s in _row_blocks(len(x), len(x))])


def inside_manifold(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Boolean (N,): does point i lie in some ball B(centre_j, radius_j) (distance <= radius)?"""
    blocks = _row_blocks(len(points), len(centres))
    return torch.cat([(torch.cdist(points[s], centres) <= radii).any(1) for s in blocks])


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, 'Improved Precision and Recall Metric
    for Assessing Generative Models'): each set's manifold is the union of balls around its
    samples, with radius the distance to the k-th nearest neighbour in the same set (k = 3 in the paper;
    a point on a ball's boundary is inside, '<=' as in the authors' code);

        precision = share of fake samples inside the real manifold,
        recall    = share of real samples inside the fake manifold.

    real (N, d), fake (M, d) features; distances in float64, in row blocks, so 10k x 10k fits in memory."""
    real, fake = _matrix(real), _matrix(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs features (N, d) and (M, d); got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k} is not allowed; it must be in [1, {min(len(real), len(fake)) - 1}] "
                         f"(smaller than each set's size)")
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def classifier_score(probs) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x): the Inception Score's form (Salimans et al. 2016,
    'Improved Techniques for Training GANs') for any classifier; 1 when all predictions are equal, the number of classes (at most) when
    every prediction is certain and the classes are used equally."""
    p = _matrix(probs)
    marginal = p.mean(0, keepdim=True)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal)).sum(1)
    return float(kl.mean().exp())


# -- the digits feature net ----------------------------------------------------------------------------
DIGITS_SETTINGS = dict(version=1, seed=0, test_fraction=0.2, width=32, features=128, epochs=15,
                       batch_size=64, lr=1e-2, weight_decay=1e-4, max_shift=1, outlier_batch=16, outlier_weight=0.5)


class DigitsFeatureNet(nn.Module):
    """A small conv net on 8x8 digits in [-1, 1] (data.load('digits') scaling, x / 8 - 1):

        conv3x3(1 -> w), ReLU, max pool 2 -> conv3x3(w -> 2w), ReLU, max pool 2 -> 2 x 2 x 2w
        -> Linear(8w -> features), ReLU  = the feature layer  -> Linear(features -> 10) = logits

    `features` and `probabilities` take images (N, 1, 8, 8) or (N, 64), clamp them to [-1, 1] and return
    float64; `accuracy` is the held-out accuracy stored with the weights."""

    def __init__(self, width: int = 32, features: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(8 * width, features)
        self.head = nn.Linear(features, 10)
        self.accuracy = math.nan
        self.info: dict = {}

    def embed(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))

    def _apply_batched(self, fn, images, batch_size: int = 2048) -> Tensor:
        x = torch.as_tensor(images).detach().to("cpu", torch.float32)
        if x.numel() != 64 * len(x):
            raise ValueError(f"digits images need 64 values each ((N, 1, 8, 8) or (N, 64)), got shape {tuple(x.shape)}")
        x = x.reshape(-1, 1, 8, 8).clamp(-1, 1)
        with torch.no_grad():
            return torch.cat([fn(x[i:i + batch_size]).double() for i in range(0, len(x), batch_size)])

    def features(self, images) -> Tensor:
        """The feature layer, (N, features) float64."""
        return self._apply_batched(self.embed, images)

    def probabilities(self, images) -> Tensor:
        """p(y | x), (N, 10) float64."""
        return self._apply_batched(lambda x: self(x).softmax(1), images)


@contextmanager
def _one_thread():
    """Train on one thread: a net this small gains nothing from more, and the result does not depend
    on the machine's thread count (a loaded 2-core machine ran 2 threads ~30x slower than 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def shift_images(x: Tensor, g: torch.Generator, max_shift: int) -> Tensor:
    """Each image moved by a random (dy, dx) in [-max_shift, max_shift]^2, background (-1) filling in."""
    m, (h, w) = max_shift, x.shape[-2:]
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    d = torch.randint(0, 2 * m + 1, (len(x), 2), generator=g)
    out = torch.empty_like(x)
    for dy in range(2 * m + 1):
        for dx in range(2 * m + 1):
            sel = (d[:, 0] == dy) & (d[:, 1] == dx)
            out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def train_digits_feature_net(settings: dict = DIGITS_SETTINGS) -> DigitsFeatureNet:
    """Train DigitsFeatureNet on the real digits: a stratified split (Dataset.split(test_fraction, seed)),
    AdamW with a one-cycle learning rate, random shifts of up to max_shift pixels, and the loss

        CE(f(x), y) + outlier_weight * CE(f(u), uniform),   u ~ U[-1, 1]^64, outlier_batch per step

    (outlier exposure, Hendrycks et al. 2019, their lambda = 0.5): pure noise gets flat predictions
    instead of a ReLU net's arbitrary confident ones, so the confident share means something. Seeded
    and single-threaded: the same settings give the same net. Sets net.accuracy (held-out) and net.info."""
    s = settings
    train, test = load("digits").split(s["test_fraction"], seed=s["seed"])
    g = torch.Generator().manual_seed(s["seed"])
    start = time.perf_counter()
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        net = DigitsFeatureNet(s["width"], s["features"])
        per_epoch = len(train) // s["batch_size"]
        opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"], total_steps=s["epochs"] * per_epoch)
        for _ in range(s["epochs"]):
            perm = torch.randperm(len(train), generator=g)
            for j in range(per_epoch):
                idx = perm[j * s["batch_size"]:(j + 1) * s["batch_size"]]
                x = shift_images(train.x[idx], g, s["max_shift"])
                u = torch.rand(s["outlier_batch"], 1, 8, 8, generator=g) * 2 - 1
                loss = F.cross_entropy(net(x), train.labels[idx]) - s["outlier_weight"] * net(u).log_softmax(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval().requires_grad_(False)
        accuracy = float((net.probabilities(test.x).argmax(1) == test.labels).double().mean())
    net.accuracy = accuracy
    net.info = dict(accuracy=accuracy, n_train=len(train), n_test=len(test), settings=dict(s),
                    train_seconds=round(time.perf_counter() - start, 2), torch=torch.__version__)
    return net


def default_cache_dir() -> Path:
    """$DIFFSPACE_CACHE, else ~/.cache/diffspace."""
    return Path(os.environ.get("DIFFSPACE_CACHE") or Path.home() / ".cache" / "diffspace").expanduser()


def digits_feature_net(cache_dir=None) -> DigitsFeatureNet:
    """The digits feature net, loaded from `cache_dir` (default: default_cache_dir(); a run folder
    works too) or trained and stored there. Files: digits-featurenet-<hash>.safetensors (weights) and
    .json (accuracy, settings), the hash that of DIGITS_SETTINGS; both written atomically, the JSON
    last, so a file pair counts only once complete. net.info['cached'] says whether it was loaded."""
    key = hashlib.sha256(json.dumps(DIGITS_SETTINGS, sort_keys=True).encode()).hexdigest()[:12]
    stem = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    st, js = stem / f"digits-featurenet-{key}.safetensors", stem / f"digits-featurenet-{key}.json"
    if st.exists() and js.exists():
        info = json.loads(js.read_text())
        if info.get("settings") == DIGITS_SETTINGS:
            net = DigitsFeatureNet(DIGITS_SETTINGS["width"], DIGITS_SETTINGS["features"])
            net.load_state_dict(load_file(str(st)), strict=True)
            net.eval().requires_grad_(False)
            net.accuracy, net.info = info["accuracy"], dict(info, cached=True)
            return net
    net = train_digits_feature_net(DIGITS_SETTINGS)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(st, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(js, json.dumps(net.info, indent=1, sort_keys=True))
    net.info = dict(net.info, cached=False)
    return net


def digits_metrics(samples, real, net: DigitsFeatureNet | None = None, k: int = 3) -> dict:
    """Digit samples (N, 1, 8, 8) in [-1, 1] against real digits, in DigitsFeatureNet's features:

    FD_digits (frechet_distance of the feature Gaussians), precision / recall (k-NN manifolds),
    classifier_score (exp E KL(p(y|x) || p(y)), max 10), class_fractions (share of each predicted
    label), min_class_fraction, classes_covered (classes with >= 1 % of the samples), confident (share
    with top probability >= 0.8), and the net's held-out classifier_accuracy."""
    net = net if net is not None else digits_feature_net()
    fake, ref = net.features(samples), net.features(real)
    precision, recall = precision_recall(ref, fake, k)
    p = net.probabilities(samples)
    fractions = torch.bincount(p.argmax(1), minlength=10).double() / len(p)
    return {
        "n": len(fake), "n_real": len(ref),
        "FD_digits": frechet_distance_of(fake, ref),
        "precision": precision, "recall": recall,
        "classifier_score": classifier_score(p),
        "class_fractions": fractions.tolist(),
        "min_class_fraction": float(fractions.min()),
        "classes_covered": int((fractions >= 0.01).sum()),
        "confident": float((p.max(1).values >= 0.8).double().mean()),
        "classifier_accuracy": net.accuracy,
    }


# -- Inception (FID) ---------------------------------------------------------------------------------
def inception_features(net: nn.Module, images, batch_size: int = 50) -> Tensor:
    """Pool3 features (N, 2048) float64 of images (N, 1 or 3, H, W) in [-1, 1] (clamped), in batches,
    on the net's device. Under torchrun the batches are shared out (rank r: batches r, r + W, ...) and
    gathered: every rank returns all the features, the same as one process's."""
    from . import distributed

    device = next(net.parameters()).device
    x = torch.as_tensor(images).detach()
    count, mine = -(-len(x) // batch_size), []
    with torch.no_grad():
        for i in range(distributed.rank(), count, distributed.world_size()):
            mine.append(net(x[i * batch_size:(i + 1) * batch_size].to(device, torch.float32).clamp(-1, 1)).to(F64))
    dim = distributed.most(mine[0].shape[1] if mine else 0)  # a rank with no batch learns the features' size
    return torch.cat(distributed.gather_chunks(mine, count, batch_size, len(x),
                                               torch.empty((0, dim), dtype=F64, device=device))).cpu()


def inception_metrics(samples, real, weights_path, batch_size: int = 50, k: int = 3, device=None, others=()):
    """Images (N, 1 or 3, H, W) in [-1, 1] against real ones in the FID Inception's pool3 features:
    FD_inception (the FID when weights_path is pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
    and k-NN precision / recall (Kynkaanniemi et al. 2019 used VGG-16 features; these use Inception's).
    device: where the net runs (default: that of `samples`, CPU for arrays). A dict; with `others`,
    further sets of images measured against the same real ones (the net loaded and the real features
    computed once), a list of dicts, samples' first."""
    net = load_inception(weights_path)
    net.to(device if device is not None else getattr(samples, "device", "cpu"))
    ref = inception_features(net, real, batch_size)
    results = []
    for images in (samples, *others):
        fake = inception_features(net, images, batch_size)
        precision, recall = precision_recall(ref, fake, k)
        results.append({"n": len(fake), "n_real": len(ref), "FD_inception": frechet_distance_of(fake, ref),
                        "precision": precision, "recall": recall, "weights": Path(weights_path).name})
    return results if others else results[0]
