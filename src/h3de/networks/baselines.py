"""Comparison networks, wrapped from MONAI."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet
from torch import nn

from h3de.networks.registry import register_network

__all__ = ["unet"]


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
    """MONAI's residual 3D U-Net as a heatmap regressor (one output channel per landmark).

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
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )
