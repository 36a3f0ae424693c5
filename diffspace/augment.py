"""Non-leaking augmentation (Karras et al. 2022, sec. 5 and Appendix F.2, after Karras et al. 2020's
ADA): each training image is transformed at random, and the network is told how, so that it learns
the augmented images as distributions of their own and the augmentations do not leak into samples,
which are drawn with the label of no augmentation (zeros; `augment_labels=None`).

    x_aug, a = augment(x, p, generator),   loss = lambda(sigma) ||D(x_aug + sigma eps, sigma; a) - x_aug||^2

Each of the transforms below is applied to an image with probability p, independently; all are
exact permutations of the pixels (no interpolation), so at 8x8 nothing is blurred. EDM's pipeline
also scales and rotates by arbitrary angles and stretches; those resample the image and are left out.

    transform                            labels (zero: not applied)
    mirror left-right                    a_0 = 1
    mirror top-bottom                    a_1 = 1
    rotate by k * 90 degrees, k in 1..3  a_2 = cos(k pi / 2) - 1, a_3 = sin(k pi / 2)
    translate by (dx, dy) pixels,        a_4 = dx / W, a_5 = dy / H
    each in -m..m, m = ceil(W / 8), not both zero, reflecting at the border (EDM's padding)
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

AUGMENT_DIM = 6  # the length of the labels above: what the network's augmentation embedding takes


def _applied(p: float, n: int, generator: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _reflect(i: Tensor, size: int) -> Tensor:
    """Indices reflected into 0..size-1 without repeating the edge (numpy's 'reflect' padding)."""
    period = 2 * (size - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= size, period - i, i)


def translate(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """x (B, C, H, W) moved right by dx and down by dy pixels (integer tensors (B,)), the border
    reflected: out[b, :, i, j] = x[b, :, reflect(i - dy_b), reflect(j - dx_b)]."""
    B, C, H, W = x.shape
    rows = _reflect(torch.arange(H, device=x.device)[None, :] - dy[:, None], H)  # (B, H)
    cols = _reflect(torch.arange(W, device=x.device)[None, :] - dx[:, None], W)  # (B, W)
    out = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def augment(x: Tensor, p: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x_aug, labels (B, AUGMENT_DIM)) of images x (B, C, H, W) (square for the rotations), each
    transform of the module docstring applied per image with probability p, drawn from the generator
    in a fixed order (so a resumed run draws the same)."""
    B, C, H, W = x.shape
    if H != W:
        raise ValueError(f"model.augment rotates by 90 degrees: it needs square images, got {H}x{W}")
    dev, dtype = x.device, x.dtype
    labels = torch.zeros(B, AUGMENT_DIM, device=dev, dtype=dtype)
    per_image = lambda m: m.reshape(B, 1, 1, 1)

    flip = _applied(p, B, generator, dev)
    x, labels[:, 0] = torch.where(per_image(flip), x.flip(3), x), flip.to(dtype)
    flip = _applied(p, B, generator, dev)
    x, labels[:, 1] = torch.where(per_image(flip), x.flip(2), x), flip.to(dtype)

    k = torch.randint(1, 4, (B,), generator=generator, device=dev) * _applied(p, B, generator, dev)
    for quarter in (1, 2, 3):
        x = torch.where(per_image(k == quarter), torch.rot90(x, quarter, dims=(2, 3)), x)
    # cos(k pi / 2) - 1 and sin(k pi / 2), k = 0..3, exactly, from k itself (no table copied to the device)
    labels[:, 2] = -(k % 2).to(dtype) - 2 * (k == 2).to(dtype)  # 0, -1, -2, -1
    labels[:, 3] = (k == 1).to(dtype) - (k == 3).to(dtype)  # 0, 1, 0, -1

    m = math.ceil(W / 8)
    side = 2 * m + 1  # the (dx, dy) of the grid -m..m squared but (0, 0), uniformly: index j skips the centre
    j = torch.randint(0, side * side - 1, (B,), generator=generator, device=dev)
    j = j + (j >= side * side // 2).long()
    shift = torch.stack([j % side - m, j // side - m], dim=1) * _applied(p, B, generator, dev)[:, None]
    x = translate(x, shift[:, 0], shift[:, 1])
    labels[:, 4], labels[:, 5] = shift[:, 0].to(dtype) / W, shift[:, 1].to(dtype) / H
    return x, labels
