"""Data: 2-D toys, the Gaussian mixtures of `analytic`, scikit-learn's 8x8 digits, image folders, arrays.

Everything becomes one `Dataset`: a float32 tensor `x` of shape (N, d) (points) or (N, C, H, W)
(images, scaled to [-1, 1]), optional int64 labels, and a name. `load(spec)` builds one from

- a 2-D generator: 'moons', 'swissroll', '8gaussians', 'checkerboard' (written here, in torch,
  drawn from a `torch.Generator` seeded with `seed`);
- an analytic mixture: 'ring8', 'image64' ((N, 64) points) and 'checkerboard-gm' (the mixture
  `analytic.MIXTURES["checkerboard"]`, renamed because 'checkerboard' is the uniform board here;
  every mixture is also reachable as '<name>-gm'); its labels are the mixture components;
- 'digits': scikit-learn's bundled 8x8 digits (no download), x / 8 - 1 in [-1, 1], labels 0..9;
- a folder of PNG/JPEG images (labels from sub-folder names), or a .npy / .npz array file;
- CIFAR-10 in its binary distribution: `cifar-10-binary.tar.gz`, its extracted folder
  (`cifar-10-batches-bin`, the training batches data_batch_*.bin) or one .bin file (`read_cifar_binary`).

Nothing is ever downloaded. `batch_indices` gives the shuffled minibatches as a pure function of the step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .analytic import MIXTURES

Tensor = torch.Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_N = 10_000


# -- the dataset ------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """x: float32 (N, d) points or (N, C, H, W) images in [-1, 1]; labels: int64 (N,) or None;
    num_classes: number of label values (0 without labels); kind: 'points' or 'images';
    levels: the number of quantization levels of the values, x = 2k / (levels - 1) - 1 (256 for 8-bit
    images, 17 for the digits), or 0 for continuous data; likelihoods of quantized data are reported
    in bits/dim of the discrete values (process.discretized_gaussian_log_likelihood); eps: float32 noise
    of x's shape paired with x (reflow's (noise, sample) pairs: the loss trains on z_t = alpha_t x_i +
    sigma_t eps_i instead of a fresh draw), or None."""

    x: Tensor = field(repr=False)
    labels: Tensor | None = field(default=None, repr=False)
    num_classes: int = 0
    name: str = ""
    kind: str = "points"
    levels: int = 0
    eps: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in ("points", "images"):
            raise ValueError(f"kind={self.kind!r} is not allowed; allowed: 'points', 'images'")
        if self.x.ndim != (2 if self.kind == "points" else 4):
            raise ValueError(f"{self.kind} need x of ndim {2 if self.kind == 'points' else 4}, got shape {tuple(self.x.shape)}")
        if self.labels is not None and tuple(self.labels.shape) != (len(self.x),):
            raise ValueError(f"labels must have shape ({len(self.x)},), got {tuple(self.labels.shape)}")
        if self.eps is not None and self.eps.shape != self.x.shape:
            raise ValueError(f"paired noise eps must have the shape of x {tuple(self.x.shape)}, got {tuple(self.eps.shape)}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample: (d,) or (C, H, W)."""
        return tuple(self.x.shape[1:])

    @property
    def sigma_data(self) -> float:
        """The data standard deviation over all entries, sqrt(mean((x - mean(x))^2)), with one scalar
        mean over every entry of every sample (numpy's `x.std()`), computed in float64.

        EDM (Karras et al. 2022, sec. 5 and Table 1) preconditions the network with it:
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
        c_in = 1 / sqrt(sigma^2 + sigma_data^2), using 0.5 for images in [-1, 1]. (`analytic.GaussianMixture
        .sigma_data` subtracts a per-dimension mean instead; the two agree for centred data.)"""
        x = self.x.double()
        return float(((x - x.mean()) ** 2).mean().sqrt())

    def subset(self, index: Tensor) -> "Dataset":
        """The samples at `index` (a LongTensor, with their labels and paired noise), same name, kind and number of classes."""
        return replace(self, x=self.x[index], labels=None if self.labels is None else self.labels[index],
                       eps=None if self.eps is None else self.eps[index])

    def split(self, test_fraction: float = 0.1, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(train, test): a deterministic random split (same seed, same split), stratified by label.

        test holds round(test_fraction * N) samples; with labels, each class gives floor(fraction * n_c)
        and the leftover samples go to the classes with the largest remainders. Both keep data order."""
        if not 0 <= test_fraction < 1:
            raise ValueError(f"test_fraction={test_fraction} is not allowed; it must be in [0, 1)")
        g = torch.Generator().manual_seed(seed)
        n = len(self)
        groups = [torch.arange(n)] if self.labels is None else [
            (self.labels == c).nonzero().flatten() for c in torch.unique(self.labels)]
        quota = [test_fraction * len(idx) for idx in groups]
        take = [math.floor(q) for q in quota]
        extra = round(test_fraction * n) - sum(take)
        for k in sorted(range(len(groups)), key=lambda k: -(quota[k] - take[k]))[:extra]:
            take[k] += 1
        test = torch.cat([idx[torch.randperm(len(idx), generator=g)[:t]] for idx, t in zip(groups, take)])
        is_test = torch.zeros(n, dtype=torch.bool)
        is_test[test] = True
        if is_test.all():
            raise ValueError(f"test_fraction={test_fraction} leaves no training samples out of {n}")
        return self.subset((~is_test).nonzero().flatten()), self.subset(is_test.nonzero().flatten())

    def summary(self) -> str:
        """One line: name, N, per-sample shape, classes, sigma_data, value range."""
        classes = f"{self.num_classes} classes" if self.labels is not None else "no labels"
        lo, hi = (float(self.x.min()), float(self.x.max())) if len(self) else (math.nan, math.nan)
        return (f"{self.name}: {len(self)} {self.kind} of shape {self.shape}, {classes}, "
                f"sigma_data={self.sigma_data:.4f}, range [{lo:.3g}, {hi:.3g}]")


# -- minibatches ------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of minibatch number `step` (0-based) of a shuffled stream over n samples.

    Epoch e = step // (n // batch_size) uses the permutation drawn from a generator seeded with
    (seed, e), cut into n // batch_size batches (drop_last). The stream is a pure function of
    (n, batch_size, seed, step): a resumed run sees exactly the batches it would have seen."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; it must be >= 1")
    if n < batch_size:
        raise ValueError(f"the dataset has {n} samples, fewer than batch_size={batch_size}")
    if step < 0:
        raise ValueError(f"step={step} is not allowed; it must be >= 0")
    epoch, j = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size]


# -- 2-D generators (each: n, generator -> points (n, 2) float64, labels or None) ---------------------
def moons(n: int, g: torch.Generator, noise: float = 0.05):
    """Two interleaving half circles of radius 1 (as sklearn.datasets.make_moons), centred at the
    origin: upper (cos a, sin a) - (0.5, 0.25), lower (1 - cos a, 0.5 - sin a) - (0.5, 0.25), a ~ U(0, pi),
    plus N(0, noise^2) noise; label = which moon. Box [-1.5, 1.5] x [-0.75, 0.75] before noise."""
    label = torch.randint(0, 2, (n,), generator=g)
    a = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.stack([a.cos(), a.sin()], 1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
    x = torch.where(label[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25], dtype=torch.float64)
    return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), label


def swissroll(n: int, g: torch.Generator, noise: float = 0.02):
    """The 2-D swiss roll (the (x, z) plane of sklearn.datasets.make_swiss_roll), scaled to radius <= 1:
    t = 1.5 pi (1 + 2u), u ~ U(0, 1), x = t (cos t, sin t) / (4.5 pi) + N(0, noise^2); radius in [1/3, 1]."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = t[:, None] * torch.stack([t.cos(), t.sin()], 1) / (4.5 * math.pi)
    return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), None


def eight_gaussians(n: int, g: torch.Generator, radius: float = math.sqrt(2), std: float = 0.1):
    """8 equal Gaussians N(radius (cos 2 pi k/8, sin 2 pi k/8), std^2 I), label k (sigma_data ~ 1)."""
    k = torch.randint(0, 8, (n,), generator=g)
    a = k.double() * (2 * math.pi / 8)
    x = radius * torch.stack([a.cos(), a.sin()], 1)
    return x + std * torch.randn(n, 2, generator=g, dtype=torch.float64), k


def checkerboard(n: int, g: torch.Generator, cells: int = 4, size: float = 2.0):
    """Uniform on the dark squares of a cells x cells board on [-size/2, size/2]^2: cell (i, j) (i along x,
    j along y, (0, 0) at the bottom left) is dark when i + j is even. The same board as
    `analytic.checkerboard()`, whose mixture ('checkerboard-gm') matches this one's mean and covariance."""
    dark = torch.tensor([(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0], dtype=torch.float64)
    cell = dark[torch.randint(0, len(dark), (n,), generator=g)]
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return (cell + u) * (size / cells) - size / 2, None


GENERATORS = {"moons": moons, "swissroll": swissroll, "8gaussians": eight_gaussians, "checkerboard": checkerboard}
# analytic mixtures: '<name>-gm' always, the bare name where it does not clash with a generator
MIXTURE_SPECS = {**{m: m for m in MIXTURES if m not in GENERATORS}, **{m + "-gm": m for m in MIXTURES}}
NAMES = (*GENERATORS, *MIXTURE_SPECS, "digits")


# -- load -------------------------------------------------------------------------------------------
def load(spec: str | os.PathLike, *, n: int | None = None, size: int | None = None,
         channels: int | None = None, seed: int = 0) -> Dataset:
    """A Dataset from a built-in name (see NAMES), an image folder, or a .npy / .npz file.

    n: number of points for generators and mixtures (default 10_000); for stored data a random subset
    of n samples drawn with `seed` (in data order). size: images only, the side of the square output
    (digits and arrays: bilinear; folders: Pillow bicubic; shorter side to size, then centre crop).
    channels: images only, 1 (grayscale) or 3 (RGB). seed: the torch.Generator seed of generated data.

    A built-in name wins over a folder of the same name (write ./digits for the folder).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n={n!r} is not allowed; it must be an integer >= 1")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size={size!r} is not allowed; it must be an integer >= 1")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not allowed; allowed: 1 (grayscale), 3 (RGB)")
    name = str(spec)
    if name in GENERATORS or name in MIXTURE_SPECS:
        if size is not None or channels is not None:
            raise ValueError(f"size / channels apply to images only, not to the 2-D set {name!r}")
        g = torch.Generator().manual_seed(seed)
        if name in GENERATORS:
            x, labels = GENERATORS[name](n or DEFAULT_N, g)
            classes = 0 if labels is None else int(labels.max()) + 1
        else:  # a mixture's labels are its components
            mixture = MIXTURES[MIXTURE_SPECS[name]]()
            (x, labels), classes = mixture.sample(n or DEFAULT_N, g, return_labels=True), mixture.K
        return Dataset(x.float(), labels, classes, name, "points")
    if name == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        raw = load_digits()
        x = torch.from_numpy(raw.images).float()[:, None] / 8 - 1
        data = Dataset(x, torch.from_numpy(raw.target).long(), 10, "digits", "images", levels=17)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if path.suffix.lower() in (".npy", ".npz") or os.sep in name or "/" in name:
                raise ValueError(f"path {name!r} does not exist")
            raise ValueError(f"unknown data {name!r} (and no file or folder of that name); allowed: "
                             f"{', '.join(NAMES)}, or a path to an image folder or a .npy / .npz file")
        if path.is_dir() and sorted(path.glob("data_batch_*.bin")):
            data = read_cifar_binary(path)
        elif path.name.endswith((".tar.gz", ".tgz")) or path.suffix.lower() == ".bin":
            data = read_cifar_binary(path)
        elif path.is_dir():
            data = _load_folder(path, size, channels)
            size = channels = None  # already applied
        elif path.suffix.lower() in (".npy", ".npz"):
            data = _load_array(path)
        else:
            raise ValueError(f"{name!r} is a file but not .npy / .npz; pass a folder of images or an array file")
    if data.kind == "points" and (size is not None or channels is not None):
        raise ValueError(f"size / channels apply to images only, but {name!r} holds points of shape {data.shape}")
    if size is not None and tuple(data.x.shape[-2:]) != (size, size):  # interpolated values are not quantized
        data = replace(data, x=_resize_crop(data.x, size), levels=0)
    if channels is not None and channels != data.x.shape[1]:  # so are luma mixtures; repeated channels are
        data = replace(data, x=_convert_channels(data.x, channels), levels=data.levels if channels == 3 else 0)
    if n is not None and n < len(data):
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        data = data.subset(keep)
    elif n is not None and n > len(data):
        raise ValueError(f"n={n} is more than the {len(data)} samples of {name!r}")
    return data


def _resize_crop(x: Tensor, size: int) -> Tensor:
    """Images (N, C, H, W): shorter side to `size` (bilinear, antialiased when shrinking), centre crop."""
    H, W = x.shape[-2:]
    if (H, W) != (size, size):
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=s < 1)
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top:top + size, left:left + size].contiguous()
    return x


def _convert_channels(x: Tensor, channels: int) -> Tensor:
    """1 -> 3 channels by repetition; 3 -> 1 by ITU-R 601 luma (Pillow's 'L' conversion)."""
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue 32 x 32 planes, row-major


def read_cifar_binary(path: Path) -> Dataset:
    """CIFAR-10's binary distribution (Krizhevsky 2009; www.cs.toronto.edu/~kriz/cifar.html): records
    of 3,073 bytes, one label byte (0..9) and 3,072 pixel bytes (R, G, B planes of 32 x 32), read from
    a .bin file, a folder holding data_batch_*.bin (the 50,000 training images; test_batch.bin is
    left out), or the .tar.gz of that folder. No pickle anywhere. x = pixels / 127.5 - 1."""
    import tarfile

    path = Path(path)
    if path.is_dir():
        blobs = [(p.name, p.read_bytes()) for p in sorted(path.glob("data_batch_*.bin"))]
    elif path.suffix.lower() == ".bin":
        blobs = [(path.name, path.read_bytes())]
    else:
        try:
            with tarfile.open(path, "r:gz") as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile() and Path(m.name).name.startswith("data_batch_")
                                  and m.name.endswith(".bin")), key=lambda m: m.name)
                blobs = [(Path(m.name).name, tar.extractfile(m).read()) for m in members]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{str(path)!r} is not a readable .tar.gz ({e})") from None
    if not blobs:
        raise ValueError(f"{str(path)!r} holds no CIFAR-10 training batches (data_batch_*.bin)")
    for name, blob in blobs:
        if not blob or len(blob) % CIFAR_RECORD:
            raise ValueError(f"{name} has {len(blob)} bytes, not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records")
    records = np.frombuffer(b"".join(blob for _, blob in blobs), dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    if int(labels.max()) > 9:
        raise ValueError(f"{str(path)!r}: a label byte is {int(labels.max())}; CIFAR-10's are 0..9")
    x = torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32)) / 127.5 - 1
    return Dataset(x, labels, 10, "cifar10", "images", levels=256)


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Images mirrored left-right, each with probability 1/2 (the augmentation of Ho et al. 2020 and
    Karras et al. 2022 on CIFAR-10), one uniform draw per image from the generator."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.reshape(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def _load_folder(root: Path, size: int | None, channels: int | None) -> Dataset:
    """Images under `root`, found recursively (suffixes IMAGE_SUFFIXES; other files are ignored).

    Labels: when every image lies below an immediate sub-folder, the sorted names of those sub-folders
    are the classes 0..K-1; when every image lies directly in `root`, labels are None; a mix is an error.
    channels defaults to 1 if every image is grayscale, else 3 (RGBA and palettes convert to RGB)."""
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        others = sum(1 for p in root.rglob("*") if p.is_file())
        raise ValueError(f"no images found in folder {str(root)!r} (looked for {', '.join(IMAGE_SUFFIXES)}; "
                         f"{others} other files)")
    images, bad = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except Exception:
            bad.append(p.relative_to(root).as_posix())
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{len(bad)} unreadable image files in {str(root)!r}: {', '.join(bad[:5])}{more}")
    rel = [p.relative_to(root) for p in files]
    nested = [len(r.parts) > 1 for r in rel]
    if any(nested) and not all(nested):
        loose = next(r for r, d in zip(rel, nested) if not d)
        raise ValueError(f"{str(root)!r} has images both in sub-folders (labels) and at its top level "
                         f"(e.g. {loose.as_posix()}); put every image in a class folder, or none")
    labels, classes = None, []
    if all(nested):
        classes = sorted({r.parts[0] for r in rel})
        labels = torch.tensor([classes.index(r.parts[0]) for r in rel], dtype=torch.long)

    gray = {"1", "L", "LA", "I", "I;16", "F"}
    mode = ("L" if all(im.mode in gray for im in images) else "RGB") if channels is None else {1: "L", 3: "RGB"}[channels]
    arrays = []
    if size is None:
        sizes = {}
        for p, im in zip(rel, images):
            sizes.setdefault(im.size, p)
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise ValueError(f"images in {str(root)!r} have different sizes: {p1.as_posix()} is {s1[0]}x{s1[1]}, "
                             f"{p2.as_posix()} is {s2[0]}x{s2[1]} (W x H); pass size=... to resize and centre-crop")
    for im in images:
        im = _to_mode(im, mode)
        if size is not None:
            W, H = im.size
            s = size / min(W, H)
            w, h = max(size, round(W * s)), max(size, round(H * s))
            if (w, h) != (W, H):
                im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    return Dataset(x, labels, len(classes), root.resolve().name, "images", levels=256)


def _to_mode(im, mode: str):
    """Convert a Pillow image to 'L' or 'RGB' (16-bit / float grayscale scaled to 8 bits first)."""
    from PIL import Image

    if im.mode in ("I", "I;16", "F") and mode in ("L", "RGB"):
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if a.max() > 255 else 1.0
        im = Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
        im = im.convert("RGBA")  # transparent pixels become black
    return im.convert(mode)


def _load_array(path: Path) -> Dataset:
    """A .npy array, or a .npz with key 'x' (or its only other array), optional 'labels' / 'y' and
    optional 'eps', the noise paired with each sample (reflow.py's pairs file; float, the shape of x).

    Shapes: (N, d) -> points; (N, H, W) -> 1-channel images; (N, C, H, W) when C = shape[1] is 1 or 3
    (NCHW wins a tie), else (N, H, W, C) when shape[3] is 1 or 3. uint8 arrays are mapped from [0, 255]
    to [-1, 1] (x / 127.5 - 1); other numeric arrays are used as given (cast to float32), must be finite.
    Labels: N non-negative integers; num_classes = max + 1."""
    y = eps = None
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            label_keys = [k for k in ("labels", "y") if k in keys]
            rest = [k for k in keys if k not in label_keys and k != "eps"]
            if "x" in keys:
                key = "x"
            elif len(rest) == 1:
                key = rest[0]
            else:
                raise ValueError(f"{path.name}: cannot tell the data array among keys {keys}; name it 'x'")
            a = z[key]
            y = z[label_keys[0]] if label_keys and label_keys[0] != key else None
            eps = z["eps"] if "eps" in keys else None
    else:
        a = np.load(path, allow_pickle=False)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{path.name}: array dtype {a.dtype} is not numeric")
    if a.ndim == 2:
        kind = "points"
    elif a.ndim == 3:
        a, kind = a[:, None], "images"
    elif a.ndim == 4 and a.shape[1] in (1, 3):
        kind = "images"
    elif a.ndim == 4 and a.shape[3] in (1, 3):
        a, kind = a.transpose(0, 3, 1, 2), "images"
    else:
        raise ValueError(f"{path.name}: array shape {a.shape} is not allowed; allowed: (N, d) points, (N, H, W), "
                         f"(N, C, H, W) or (N, H, W, C) images with C in {{1, 3}}")
    if len(a) == 0:
        raise ValueError(f"{path.name}: the array holds no samples (shape {a.shape})")
    if a.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(a)).float() / 127.5 - 1
    else:
        x = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32))
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{path.name}: the array holds {bad} NaN / inf values (or values beyond float32); it must be finite")
    labels, num_classes = None, 0
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path.name}: labels have shape {y.shape}, but the data holds {len(x)} samples; "
                             f"need shape ({len(x)},)")
        if y.dtype.kind not in "biu" or (len(y) and y.min() < 0):
            raise ValueError(f"{path.name}: labels must be non-negative integers, got dtype {y.dtype}")
        labels = torch.from_numpy(y.astype(np.int64))
        num_classes = int(labels.max()) + 1
    if eps is not None:
        if eps.shape != tuple(x.shape) or eps.dtype.kind != "f" or not np.isfinite(eps).all():
            raise ValueError(f"{path.name}: 'eps' (shape {eps.shape}, dtype {eps.dtype}) must be finite floats "
                             f"of the data's shape {tuple(x.shape)}")
        eps = torch.from_numpy(np.ascontiguousarray(eps).astype(np.float32))
    return Dataset(x.contiguous(), labels, num_classes, path.stem, kind, levels=256 if a.dtype == np.uint8 else 0, eps=eps)
