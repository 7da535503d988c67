"""Building blocks of H3DE-Net: conv units, the hybrid transformer block, upsampling, decoder, fusion.

All blocks take and return channels-first (B, C, D, H, W) tensors; the transformer block switches to
channels-last (B, D, H, W, C) internally for its LayerNorms, attention and MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from h3de.networks.attention import VolumetricBRA

__all__ = [
    "norm3d",
    "ChannelLayerNorm",
    "ConvNormAct",
    "HybridBlock",
    "PixelShuffle3d",
    "SuperResolutionUp",
    "TrilinearUp",
    "DecoderBlock",
    "FeatureFusion",
]


def norm3d(kind: str, channels: int) -> nn.Module:
    """A channels-first 3D normalisation: "instance" (affine), "batch", "group" (8 groups or fewer) or
    "layer" (over the channels of each voxel; works on any spatial size, even 1x1x1)."""
    if kind == "layer":
        return ChannelLayerNorm(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm '{kind}' is not one of instance, batch, group, layer")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel of a channels-first (B, C, D, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class ConvNormAct(nn.Sequential):
    """Conv3d (k, stride, 'same'-style padding) -> norm -> activation (nn.Identity() when act is None)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        norm: str = "instance",
        act: str | None = "gelu",
    ) -> None:
        activation = {"gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(0.01, inplace=True), None: nn.Identity()}[act]
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            norm3d(norm, out_ch),
            activation,
        )


class HybridBlock(nn.Module):
    """H3DE-Net encoder block (pre-norm): depthwise-conv positional encoding, V-BRA, MLP.

        x = x + DWConv3d(x);  x = x + V-BRA(LN(x));  x = x + MLP(LN(x))

    Args:
        dim: channels.
        topk: regions each region attends to.
        head_dim: channels per attention head.
        region_grid: fixed number of regions per axis (reference mode), or None.
        region_size: fixed tokens per region per axis, or None (exactly one of the two is set).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        attention: False gives the "CNN only" ablation (the attention branch is omitted).
        lce_kernel: kernel of V-BRA's local context enhancement (0 disables it).
    """

    def __init__(
        self,
        dim: int,
        topk: int,
        head_dim: int = 8,
        region_grid: Sequence[int] | None = (4, 4, 2),
        region_size: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        attention: bool = True,
        lce_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.pos = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim) if attention else nn.Identity()
        self.attn = (
            VolumetricBRA(
                dim,
                topk=topk,
                head_dim=head_dim,
                region_grid=tuple(region_grid) if region_grid is not None else None,
                region_size=tuple(region_size) if region_size is not None else None,
                lce_kernel=lce_kernel,
            )
            if attention
            else None
        )
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        x = x + self.pos(x)
        x = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W)


class PixelShuffle3d(nn.Module):
    """(B, C*r^3, D, H, W) -> (B, C, D*r, H*r, W*r): the 3D sub-pixel rearrangement (torch has 2D only)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        r = self.factor
        x = x.reshape(b, c // r**3, r, r, r, d, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, D, r, H, r, W, r)
        return x.reshape(b, c // r**3, d * r, h * r, w * r)


class SuperResolutionUp(nn.Sequential):
    """Learned x``factor`` upsampling: pointwise conv to C*r^3 channels, norm, activation, 3D pixel
    shuffle (each coarse voxel's channels become its r^3 fine voxels)."""

    def __init__(self, in_ch: int, out_ch: int, factor: int = 2, norm: str = "instance") -> None:
        super().__init__(ConvNormAct(in_ch, out_ch * factor**3, 1, norm=norm, act="leaky_relu"), PixelShuffle3d(factor))


class TrilinearUp(nn.Module):
    """Trilinear x``factor`` upsampling followed by a 1x1x1 conv to ``out_ch`` channels."""

    def __init__(self, in_ch: int, out_ch: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv3d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.interpolate(x, scale_factor=self.factor, mode="trilinear", align_corners=False))


class DecoderBlock(nn.Module):
    """Upsample x2 (super-resolution or trilinear), concatenate the skip, two conv-norm-LeakyReLU.

    Args:
        in_ch: channels of the coarser input.
        skip_ch: channels of the skip connection (at twice the resolution).
        out_ch: output channels.
        upsample: "sr" (super-resolution block) or "trilinear".
        norm: normalisation kind.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, upsample: str = "sr", norm: str = "instance") -> None:
        super().__init__()
        if upsample == "sr":
            self.up = SuperResolutionUp(in_ch, out_ch, 2, norm)
        elif upsample == "trilinear":
            self.up = TrilinearUp(in_ch, out_ch, 2)
        else:
            raise ValueError(f"upsample '{upsample}' is not one of sr, trilinear")
        self.convs = nn.Sequential(
            ConvNormAct(out_ch + skip_ch, out_ch, 3, norm=norm, act="leaky_relu"),
            ConvNormAct(out_ch, out_ch, 3, norm=norm, act="leaky_relu"),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.convs(torch.cat([x, skip], dim=1))


class FeatureFusion(nn.Module):
    """Feature Fusion Module: decoder features of several scales brought to the finest and merged.

    Each input is projected (1x1x1 conv) to ``out_ch`` and trilinearly resized to the first input's
    size; "concat" concatenates and projects, "sum" takes a softmax-weighted sum (learned weights) and
    projects.

    Args:
        in_channels: channels of each input, finest scale first.
        out_ch: output channels.
        mode: "concat" or "sum".
    """

    def __init__(self, in_channels: Sequence[int], out_ch: int, mode: str = "concat") -> None:
        super().__init__()
        if mode not in ("concat", "sum"):
            raise ValueError(f"fusion mode '{mode}' is not one of concat, sum")
        self.mode = mode
        self.inputs = nn.ModuleList(nn.Conv3d(c, out_ch, 1) for c in in_channels)
        self.weights = nn.Parameter(torch.zeros(len(in_channels))) if mode == "sum" else None
        merged = out_ch * len(in_channels) if mode == "concat" else out_ch
        self.out = nn.Sequential(nn.Conv3d(merged, out_ch, 1), nn.LeakyReLU(0.01, inplace=True))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        resized = [
            project(f) if f.shape[2:] == size else F.interpolate(project(f), size=size, mode="trilinear")
            for project, f in zip(self.inputs, features, strict=True)
        ]
        if self.mode == "concat":
            return self.out(torch.cat(resized, dim=1))
        weights = torch.softmax(self.weights, dim=0)
        return self.out(sum(w * f for w, f in zip(weights, resized, strict=True)))
