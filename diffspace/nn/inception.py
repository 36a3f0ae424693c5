"""The Inception-v3 network of the standard FID (Heusel et al. 2017, 'GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium'), as ported from TensorFlow's 2015-12-05 graph by
pytorch-fid (github.com/mseitzer/pytorch-fid, weights file `pt_inception-2015-12-05-6726825d.pth`).

Inception-v3 (Szegedy et al. 2016, 'Rethinking the Inception Architecture') with the FID graph's
differences from torchvision's model: the 3x3 average pools inside the A, C and first E blocks
average over the valid pixels only (count_include_pad=False, TensorFlow's 'SAME' pooling), the
last E block (Mixed_7c) max-pools its pool branch, there is no auxiliary classifier, and the
classifier has 1008 outputs. The state-dict keys and shapes are those of the weights file, so it
loads with strict key matching; `load_inception` reads it from a local file (nothing is downloaded).

Input: images (N, 3, H, W) or (N, 1, H, W) (repeated to RGB) in [-1, 1], the range the network
expects (pytorch-fid maps its [0, 1] input to it by 2x - 1; diffspace images are in [-1, 1] already),
resized bilinearly to 299 x 299 (align_corners=False, as pytorch-fid). Output: the 2048-d 'pool3'
features, the global average of Mixed_7c's output.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

Tensor = torch.Tensor

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
SIZE = 299
FEATURES = 2048
CLASSES = 1008  # the 2015 graph's softmax: 1000 ImageNet classes + 8 unused


class ConvBN(nn.Module):
    """ReLU(BatchNorm(conv(x))): a bias-free convolution, BatchNorm with eps = 0.001 (TensorFlow's), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool3x3(x: Tensor, kind: str) -> Tensor:
    """The stride-1 3x3 pool of a branch: 'avg' over the valid pixels of each window (TensorFlow's
    padding, count_include_pad=False) or 'max' (Mixed_7c of the FID graph)."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (Mixed_5b/c/d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1,
    64 + 64 + 96 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(pool3x3(x, "avg")),
        ], 1)


class InceptionB(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a): stride-2 3x3 | 1x1 -> 3x3 -> stride-2 3x3 | stride-2 max pool,
    384 + 96 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorized 7x7 convolutions (Mixed_6b..6e), c7 inner channels:
    1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1, 4 x 192 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(pool3x3(x, "avg"))], 1)


class InceptionD(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a): 1x1 -> stride-2 3x3 | 1x1 -> 1x7 -> 7x1 -> stride-2 3x3 |
    stride-2 max pool, 320 + 192 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c): 1x1 | 1x1 -> (1x3, 3x1) |
    1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1, 320 + 768 + 768 + 192 = 2048 channels. pool: 'avg'
    (Mixed_7b) or 'max' (Mixed_7c, a quirk of the FID graph kept for its weights)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(s), self.branch3x3_2b(s),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pool3x3(x, self.pool)),
        ], 1)


class FIDInception(nn.Module):
    """Inception-v3 of the FID: images (N, 1 or 3, H, W) in [-1, 1] -> pool3 features (N, 2048).

        299 x 299 x 3 -> Conv2d_1a_3x3 (stride 2) -> 2a_3x3 -> 2b_3x3 (pad 1) -> max pool 3/2
        -> 3b_1x1 -> 4a_3x3 -> max pool 3/2 -> Mixed_5b, 5c, 5d (35 x 35) -> 6a -> 6b..6e (17 x 17)
        -> 7a -> 7b, 7c (8 x 8) -> global average pool -> 2048

    `fc` (2048 -> 1008) is kept so the weights file loads strictly; `logits` uses it. A fresh net has
    random weights; use `load_inception` for the real ones. It is built in eval mode with frozen
    parameters: BatchNorm uses its stored statistics, as a feature extractor must."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURES, CLASSES)
        self.requires_grad_(False)
        self.eval()

    def prepare(self, x: Tensor) -> Tensor:
        """(N, 1 or 3, H, W) in [-1, 1] -> (N, 3, 299, 299): gray repeated to RGB, bilinear resize."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInception needs images (N, 1 or 3, H, W) in [-1, 1]; got shape {tuple(x.shape)}")
        x = x.to(self.fc.weight.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare(x)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))

    def logits(self, x: Tensor) -> Tensor:
        """The 1008 class logits of the 2015 graph (fc of the pool3 features)."""
        return self.fc(self(x))


# -- weights from a local file ------------------------------------------------------------------------
def _names(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_state_dict(net: nn.Module, state: dict, source: str = "state dict") -> dict:
    """`state` completed for strict loading into `net`, or ValueError naming missing, unexpected and
    mis-shaped keys. BatchNorm's `num_batches_tracked` counters are optional (files written before
    PyTorch 0.4.1 lack them; they do not affect evaluation) and taken from `net` when absent."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{source} is not a flat dict of name -> tensor (a state dict)")
    own = net.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (need {tuple(own[k].shape)})" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f"{len(v)} {what}: {_names(v)}" for what, v in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if v]
    if problems:
        raise ValueError(f"{source} does not fit {type(net).__name__}: " + "; ".join(problems))
    return {**{k: own[k] for k in optional}, **state}


def read_tensors(path: Path) -> dict:
    """Tensors of a .safetensors file, or of a .pth / .pt file read with torch.load(weights_only=True),
    which refuses any pickled object other than tensors and plain containers."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_file(str(path))
    if suffix not in (".pth", ".pt"):
        raise ValueError(f"{path.name}: unsupported weights file type {suffix!r}; allowed: .safetensors, .pth, .pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused globals, and whatever a corrupt file makes the unpickler raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        unsafe = [line.split(". ")[0] for line in lines if "Unsupported global" in line]
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise ValueError(f"{path.name} holds pickled objects other than tensors; refused to load it with "
                             f"torch.load(weights_only=True): {unsafe[0]}") from None
        raise ValueError(f"{path.name} is not a readable PyTorch weights file "
                         f"({type(e).__name__}: {lines[0]})") from None


def load_inception(path) -> FIDInception:
    """FIDInception with the weights of a local file: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
    (download it yourself from WEIGHTS_URL; nothing is downloaded here) or the same tensors saved as
    .safetensors. The keys and shapes must match exactly (see `check_state_dict`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"Inception weights file {str(path)!r} not found: download {WEIGHTS_FILE} from "
                         f"{WEIGHTS_URL} and pass its local path (diffspace never downloads)")
    net = FIDInception()
    net.load_state_dict(check_state_dict(net, read_tensors(path), path.name), strict=True)
    return net
