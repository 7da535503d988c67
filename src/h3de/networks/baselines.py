"""Comparison networks, wrapped from MONAI."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR, UNet
from torch import nn

from h3de.networks.registry import register_network
from h3de.networks.tracing import is_tracing

__all__ = ["PadToMultiple", "unet", "swin_unetr"]


class PadToMultiple(nn.Module):
    """Runs ``network`` on the input padded (edge-replicated) to a multiple of ``multiple`` per axis,
    then crops the output back, so any (B, C, D, H, W) size works.

    Args:
        network: a fully convolutional network whose input sides must be multiples of ``multiple``.
        multiple: the network's total downsampling factor.
    """

    def __init__(self, network: nn.Module, multiple: int) -> None:
        super().__init__()
        self.network, self.multiple = network, multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        extra = [(self.multiple - s % self.multiple) % self.multiple for s in size]
        if not is_tracing() and not any(extra):  # exported: pad (maybe by nothing) whatever the size
            return self.network(x)
        pad = [p for e in reversed(extra) for p in (e // 2, e - e // 2)]  # F.pad order: last axis first
        out = self.network(F.pad(x, pad, mode="replicate"))
        d0, h0, w0 = (e // 2 for e in extra)
        return out[..., d0 : d0 + size[0], h0 : h0 + size[1], w0 : w0 + size[2]]


@register_network("unet")
def unet(
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 1,
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI's residual 3D U-Net as a heatmap regressor (one output channel per landmark); any input
    size works (padded to a multiple of the total stride, output cropped back).

    Args:
        in_channels: image channels.
        out_channels: number of landmarks.
        channels: feature widths per level, deepest last.
        strides: downsampling factor between levels (``len(channels) - 1`` entries).
        num_res_units: residual units per block.
        norm: MONAI norm name ("instance", "batch", ...).
        dropout: dropout probability.
    """
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides {list(strides)} must have len(channels) - 1 = {len(channels) - 1} entries")
    network = UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )
    return PadToMultiple(network, math.prod(strides))


@register_network("swin_unetr")
def swin_unetr(
    in_channels: int,
    out_channels: int,
    feature_size: int = 24,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    use_v2: bool = False,
) -> nn.Module:
    """MONAI's SwinUNETR (shifted-window transformer encoder, CNN decoder); any input size works
    (padded to a multiple of 32).

    Args:
        feature_size: embedding width (divisible by 12).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side in tokens.
        use_v2: SwinUNETR-v2 (residual convolution blocks per stage).
    """
    network = SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=window_size,
        use_v2=use_v2,
        spatial_dims=3,
    )
    return PadToMultiple(network, 32)
