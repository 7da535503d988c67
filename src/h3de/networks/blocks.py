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
from h3de.networks.tracing import is_tracing

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
    """Conv3d (k, stride, 'same'-style padding) -> norm -> activation (nn.Identity() when act is None).

    When no gradient is recorded (``torch.no_grad`` / ``torch.inference_mode``), a GroupNorm and a LeakyReLU
    run in place on the convolution's output, so a call holds one output-sized tensor instead of two.
    """

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D / stride, H / stride, W / stride)."""
        return self.norm_act(self[0](x))

    def norm_act(self, y: torch.Tensor) -> torch.Tensor:
        """The norm and activation of the convolution's output ``y`` (in place when no gradient is recorded)."""
        norm, act = self[1], self[2]
        in_place = isinstance(norm, nn.GroupNorm) and not (torch.is_grad_enabled() and y.requires_grad)
        # a non-contiguous output (batches > 1 on CPU) cannot be viewed as groups; an exported graph would not
        # write the in-place normalisation of a view back into the tensor
        if not in_place or not y.is_contiguous() or is_tracing():
            return act(norm(y))
        y = _group_norm_(y, norm)
        return F.leaky_relu_(y, act.negative_slope) if isinstance(act, nn.LeakyReLU) else act(y)


def _group_norm_(y: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(y)`` computed in place in ``y`` (B, C, D, H, W); for use without gradients."""
    B, C = y.shape[:2]
    groups = y.view(B, norm.num_groups, -1)  # (B, G, C / G * DHW)
    var, mean = torch.var_mean(groups, dim=-1, keepdim=True, correction=0)  # (B, G, 1)
    groups.sub_(mean).mul_(torch.rsqrt(var + norm.eps))
    if norm.affine:
        y.mul_(norm.weight.view(1, C, 1, 1, 1)).add_(norm.bias.view(1, C, 1, 1, 1))
    return y


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
        attention_scale: V-BRA softmax scale, "head" (head_dim^-0.5) or "width" (dim^-0.5).
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
        attention_scale: str = "head",
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
                attention_scale=attention_scale,
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

    The first convolution over the concatenation [up(x), skip] is computed as the sum of its two parts
    (the convolution of up(x) with the first ``out_ch`` input channels of its kernel plus that of the skip
    with the rest): the same result without a concatenated copy, which at full resolution is the largest
    tensor of the block.

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
        """(B, in_ch, D, H, W), skip (B, skip_ch, 2D, 2H, 2W) -> (B, out_ch, 2D, 2H, 2W)."""
        first, second = self.convs
        conv = first[0]
        x = self.up(x)  # (B, out_ch, 2D, 2H, 2W)
        w_up, w_skip = conv.weight.split([x.shape[1], skip.shape[1]], dim=1)
        y = F.conv3d(x, w_up, padding=conv.padding)  # (B, out_ch, 2D, 2H, 2W)
        del x  # freed before the skip's convolution when no gradient is recorded
        y += F.conv3d(skip, w_skip, padding=conv.padding)
        return second(first.norm_act(y))


class FeatureFusion(nn.Module):
    """Feature Fusion Module: decoder features of several scales brought to the finest and merged.

    Each input is projected (1x1x1 conv) to ``out_ch`` and trilinearly resized to the first input's
    size; "concat" concatenates and projects, "sum" takes a softmax-weighted sum (learned weights) and
    projects; then a LeakyReLU.

    Computed without the resized projections or their concatenation: the input projection and the share
    of the output projection that reads it are both 1x1x1 convolutions, and trilinear resizing (weights
    summing to one) commutes with them, so each input goes through one composed 1x1x1 convolution at its
    own resolution, is resized, and is summed into the output; the biases are added once at the end.

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
        """features (B, C_i, D_i, H_i, W_i), finest first -> (B, out_ch, D_0, H_0, W_0)."""
        size = features[0].shape[2:]
        out_conv = self.out[0]
        w_out = out_conv.weight.flatten(1)  # (out_ch, merged)
        if self.mode == "concat":
            parts = w_out.split(w_out.shape[0], dim=1)  # n x (out_ch, out_ch)
        else:
            parts = [w * w_out for w in torch.softmax(self.weights, dim=0)]
        y, bias = None, out_conv.bias
        for part, project, f in zip(parts, self.inputs, features, strict=True):
            weight = (part @ project.weight.flatten(1)).view(-1, f.shape[1], 1, 1, 1)  # (out_ch, C_i, 1, 1, 1)
            bias = bias + part @ project.bias
            z = F.conv3d(f, weight)  # (B, out_ch, D_i, H_i, W_i)
            if z.shape[2:] != size:
                z = F.interpolate(z, size=size, mode="trilinear")
            y = z if y is None else y.add_(z)
        return self.out[1](y.add_(bias.view(1, -1, 1, 1, 1)))
