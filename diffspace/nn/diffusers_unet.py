"""diffusers' `UNet2DModel` (von Platen et al., huggingface/diffusers) as a raw network F(x, noise_cond,
class_labels), the optional extra `diffspace[diffusers]`.

`DiffusersUNet` adapts the call: F(x, c_noise, labels) = unet(x, c_noise, class_labels=labels).sample,
so a diffusers U-Net trains under any preset and preconditioning (model.network = "diffusers") and a
folder written by diffusers' `save_pretrained` is read as one (diffusers_io.py). Like every network
here it knows nothing of schedules: c_noise is whatever the preconditioner feeds it (a DDPM chain's
step index for the discrete presets, ln(sigma) / 4 for EDM).
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def import_diffusers():
    """The diffusers module, or a one-line error saying how to install the optional extra."""
    try:
        import diffusers
    except ImportError:
        raise ValueError("this needs the optional extra diffusers: pip install 'diffspace[diffusers]' "
                         "(or pip install diffusers)") from None
    return diffusers


class DiffusersUNet(nn.Module):
    """F(x, noise_cond, class_labels) = unet(x, noise_cond, class_labels).sample of a diffusers
    UNet2DModel. A class-conditional one built here has num_classes + 1 label rows, the last the null
    label of classifier-free guidance (nn.embeddings.Conditioning's convention; labels None = null);
    one read from a diffusers folder has its own `num_class_embeds` and no null label."""

    def __init__(self, unet: nn.Module, null_label: int | None = None):
        super().__init__()
        self.unet, self.null_label = unet, null_label

    def forward(self, x: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None) -> Tensor:
        c = torch.as_tensor(noise_cond, device=x.device)
        c = c.reshape(1).expand(x.shape[0]) if c.numel() == 1 else c
        if class_labels is None and self.null_label is not None:
            class_labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        rows = self.unet.config.num_class_embeds
        if rows and (class_labels is None or int(class_labels.max()) >= rows):
            raise ValueError(f"this UNet2DModel knows class labels 0..{rows - 1} and no null label: it needs a class "
                             "for every sample (--class), and classifier-free guidance is not possible with it "
                             "(autoguidance with --guide-run is)")
        return self.unet(x, c, class_labels=class_labels).sample


def unet_settings(in_channels: int, out_channels: int, image_size: int, base_channels: int, channel_mult: tuple,
                  num_blocks: int, attention_resolutions: tuple, dropout: float, num_classes: int | None,
                  groups: int) -> dict:
    """UNet2DModel's arguments for diffspace's U-Net settings: block_out_channels = base x mult,
    layers_per_block = num_blocks, attention blocks at the listed resolutions (image_size / 2^level),
    GroupNorm with `groups` groups, num_classes + 1 class rows (the null label last) if conditional."""
    levels = range(len(channel_mult))
    attn = [image_size // 2**k in attention_resolutions for k in levels]
    return dict(
        sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
        block_out_channels=tuple(base_channels * m for m in channel_mult), layers_per_block=num_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=dropout, norm_num_groups=groups, attention_head_dim=min(8, base_channels),
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def build_diffusers_unet(**settings) -> DiffusersUNet:
    """A fresh DiffusersUNet from `unet_settings(...)`."""
    unet = import_diffusers().UNet2DModel(**unet_settings(**settings))
    return DiffusersUNet(unet, settings["num_classes"] or None)
