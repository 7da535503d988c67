"""H3DE-Net: a hybrid 3D CNN + volumetric bi-level routing attention network for landmark detection.

Encoder: a stride-4 convolutional stem, then four stages (strides 4, 8, 16, 32) of hybrid blocks
(depthwise-conv positional encoding, V-BRA, MLP) joined by strided convolutions. Decoder: x2
upsampling (super-resolution block or trilinear) with encoder skips back to stride 4, then two levels
whose skips are convolutions of the input itself. A Feature Fusion Module merges decoder scales
before the head. Two heads:

- anchor-free (``h3de_net``): one full-resolution heatmap per landmark;
- anchor-based (``h3de_net_anchor``): on the stride-4 map, per cell and anchor, 3 bounded offsets and
  one logit per landmark (see ``h3de.anchors``); the two full-resolution decoder levels are skipped.

Every part is switchable for ablations (attention, super-resolution, fusion, region mode, sizes).
Presets: "reference" (the published sizes, and the original code's attention scale width^-0.5) and
"tiny" (trains on a CPU in minutes; scale head_dim^-0.5); explicitly given sizes and scale override the
preset's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from h3de.anchors import anchor_channels, init_anchor_head_
from h3de.networks.attention import ATTENTION_SCALES
from h3de.networks.blocks import ChannelLayerNorm, ConvNormAct, DecoderBlock, FeatureFusion, HybridBlock
from h3de.networks.registry import register_network
from h3de.networks.tracing import is_tracing

__all__ = ["PRESETS", "H3DENet", "stage_token_grids", "h3de_net", "h3de_net_anchor"]

PRESETS: dict[str, dict] = {
    "reference": {
        "widths": (64, 128, 256, 512),
        "depths": (2, 2, 4, 2),
        "topk": (1, 4, 16, 16),
        "decoder_widths": (256, 128, 64, 32, 16),
        "attention_scale": "width",  # the original code's softmax scale
    },
    "tiny": {
        "widths": (16, 32, 64, 128),
        "depths": (1, 1, 2, 1),
        "topk": (4, 4, 1, 1),
        "decoder_widths": (64, 32, 16, 16, 8),
        "attention_scale": "head",
    },
}
STRIDES = (4, 8, 16, 32)


def stage_token_grids(input_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Token grid (D, H, W) of each encoder stage for an input of ``input_size`` voxels."""
    padded = [math.ceil(s / 32) * 32 for s in input_size]
    return [tuple(p // stride for p in padded) for stride in STRIDES]


class H3DENet(nn.Module):
    """H3DE-Net (see the module docstring).

    Args:
        in_channels: image channels.
        num_landmarks: landmarks L.
        head: "heatmap" (output (B, L, D, H, W)) or "anchor" (output (B, A*L*4, D/4, H/4, W/4)).
        widths: channels of the four encoder stages.
        depths: hybrid blocks per stage.
        topk: routed regions per stage.
        decoder_widths: channels of the five decoder levels (strides 16, 8, 4, 2, 1).
        head_dim: channels per attention head.
        attention_scale: V-BRA softmax scale, "head" (head_dim^-0.5) or "width" (stage width^-0.5, the
            original H3DE-Net code's scale: its attention uses qk_dim^-0.5 with qk_dim the whole width).
        region_grid: fixed region count per axis (the reference, 4x4x2), or None.
        region_size: fixed tokens per region per axis, or None; exactly one of the two is set.
        mlp_ratio: MLP width relative to the block width.
        attention: False gives the "CNN only" ablation.
        lce_kernel: V-BRA local-context kernel (0 disables).
        upsample: "sr" (super-resolution block) or "trilinear" decoder upsampling.
        fusion: "concat", "sum" or "none" (Feature Fusion Module over the last three decoder levels).
        full_res_levels: how many of the two input-skip decoder levels run (2: full resolution;
            1 or 0: the heatmap is predicted at stride 2 or 4 and trilinearly upsampled). Heatmap head only.
        num_anchors: anchors per cell (anchor head).
        norm: normalisation of the decoder's convolutions (the encoder uses per-token LayerNorm).
        recompute_full_res: when gradients are recorded, the full-resolution decoder level (stride 1, with
            its input skip) keeps none of its activations and is recomputed in the backward pass
            (``torch.utils.checkpoint``): the same result and gradients for less memory and more time.
    """

    def __init__(
        self,
        in_channels: int,
        num_landmarks: int,
        head: str = "heatmap",
        widths: Sequence[int] = PRESETS["reference"]["widths"],
        depths: Sequence[int] = PRESETS["reference"]["depths"],
        topk: Sequence[int] = PRESETS["reference"]["topk"],
        decoder_widths: Sequence[int] = PRESETS["reference"]["decoder_widths"],
        head_dim: int = 8,
        attention_scale: str = PRESETS["reference"]["attention_scale"],
        region_grid: Sequence[int] | None = (4, 4, 2),
        region_size: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        attention: bool = True,
        lce_kernel: int = 5,
        upsample: str = "sr",
        fusion: str = "concat",
        full_res_levels: int = 2,
        num_anchors: int = 4,
        norm: str = "group",
        recompute_full_res: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(head, widths, depths, topk, decoder_widths, head_dim, fusion, full_res_levels, num_anchors)
        if attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"attention_scale '{attention_scale}' is not one of {', '.join(ATTENTION_SCALES)}")
        self.head_kind, self.full_res_levels = head, full_res_levels if head == "heatmap" else 0
        self.recompute_full_res = recompute_full_res
        w, dw = list(widths), list(decoder_widths)

        # the encoder normalises each token over its channels (valid down to a 1x1x1 deepest stage)
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, w[0] // 2, 3, stride=2, norm="layer", act="gelu"),
            ConvNormAct(w[0] // 2, w[0], 3, stride=2, norm="layer", act=None),
        )
        self.downsamples = nn.ModuleList(
            ConvNormAct(w[i], w[i + 1], 3, stride=2, norm="layer", act=None) for i in range(3)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *[
                    HybridBlock(
                        w[i],
                        topk[i],
                        head_dim,
                        region_grid,
                        region_size,
                        mlp_ratio,
                        attention,
                        lce_kernel,
                        attention_scale,
                    )
                    for _ in range(depths[i])
                ]
            )
            for i in range(4)
        )
        self.stage_norms = nn.ModuleList(ChannelLayerNorm(c) for c in w)

        # decoder: strides 32 -> 16 -> 8 -> 4 with encoder skips, then -> 2 -> 1 with input skips
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(w[3], w[2], dw[0], upsample, norm),
                DecoderBlock(dw[0], w[1], dw[1], upsample, norm),
                DecoderBlock(dw[1], w[0], dw[2], upsample, norm),
            ]
        )
        self.input_skips = nn.ModuleList()
        for level in range(self.full_res_levels):  # level 0: stride 2, level 1: stride 1
            stride = 2 if level == 0 else 1
            self.input_skips.append(
                ConvNormAct(in_channels, dw[3 + level], 3, stride=stride, norm=norm, act="leaky_relu")
            )
            self.decoder.append(DecoderBlock(dw[2 + level], dw[3 + level], dw[3 + level], upsample, norm))

        levels = dw[: 3 + self.full_res_levels]
        fused = levels[-1]
        self.fusion = FeatureFusion(levels[::-1][:3], fused, fusion) if fusion != "none" else None
        if head == "heatmap":
            self.head = nn.Conv3d(fused, num_landmarks, 1)
        else:
            self.head = nn.Sequential(
                ConvNormAct(fused, fused, 3, norm=norm, act="leaky_relu"),
                nn.Conv3d(fused, anchor_channels(num_landmarks, num_anchors), 1),
            )
            init_anchor_head_(self.head[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> heatmaps (B, L, D, H, W) or anchor maps (B, A*L*4, ceil(D/4), ...)."""
        size = x.shape[2:]
        extra = [(32 - s % 32) % 32 for s in size]  # non-negative operands: exportable
        x = (
            F.pad(x, [p for e in reversed(extra) for p in (0, e)], mode="replicate")
            if is_tracing() or any(extra)
            else x
        )

        features = []
        y = self.stem(x)  # (B, w0, D/4, H/4, W/4)
        for i, stage in enumerate(self.stages):
            if i > 0:
                y = self.downsamples[i - 1](y)
            y = self.stage_norms[i](stage(y))
            features.append(y)

        # every tensor is dropped once no later step reads it (without gradients it is then freed), and the
        # input skips are computed just before their level: at full resolution they dominate the memory
        y, skips = features.pop(), features[::-1]
        del features
        kept = 3 if self.fusion is not None else 1
        levels = []  # the last `kept` decoder outputs, finest last
        for i, block in enumerate(self.decoder):
            if i == 4 and self.recompute_full_res and torch.is_grad_enabled():
                y = checkpoint(self._input_level, i, y, x, use_reentrant=False)  # (B, dw4, D, H, W)
            elif skips:
                y = block(y, skips.pop(0))
            else:
                y = self._input_level(i, y, x)
            levels = [*levels[1 - kept :], y] if kept > 1 else [y]
        del y
        if self.fusion is not None:
            levels = [self.fusion(levels[::-1])]
        out = self.head(levels.pop())

        if self.head_kind == "anchor":
            # ceil(size / 4) in integer arithmetic: an exported graph computes it from the input's size
            return out[..., : (size[0] + 3) // 4, : (size[1] + 3) // 4, : (size[2] + 3) // 4]
        if self.full_res_levels < 2:
            out = F.interpolate(out, scale_factor=2 ** (2 - self.full_res_levels), mode="trilinear")
        return out[..., : size[0], : size[1], : size[2]]

    def _input_level(self, i: int, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Decoder level ``i`` (3: stride 2, 4: stride 1) on ``y`` with its skip computed from the input ``x``."""
        return self.decoder[i](y, self.input_skips[i - 3](x))


def _check_sizes(head, widths, depths, topk, decoder_widths, head_dim, fusion, full_res_levels, num_anchors) -> None:
    if head not in ("heatmap", "anchor"):
        raise ValueError(f"head '{head}' is not one of heatmap, anchor")
    for name, values, count in (("widths", widths, 4), ("depths", depths, 4), ("topk", topk, 4)):
        if len(values) != count or any(v < 1 for v in values):
            raise ValueError(f"{name} {list(values)} must be {count} positive integers (one per stage)")
    if len(decoder_widths) != 5 or any(v < 1 for v in decoder_widths):
        raise ValueError(f"decoder_widths {list(decoder_widths)} must be 5 positive integers (strides 16..1)")
    for i, width in enumerate(widths):
        if width % head_dim:
            raise ValueError(f"widths[{i}]={width} is not divisible by head_dim={head_dim}")
    if widths[0] % 2:
        raise ValueError(f"widths[0]={widths[0]} must be even (the stem's first conv has widths[0] / 2 channels)")
    if fusion not in ("concat", "sum", "none"):
        raise ValueError(f"fusion '{fusion}' is not one of concat, sum, none")
    if full_res_levels not in (0, 1, 2):
        raise ValueError(f"full_res_levels={full_res_levels} must be 0, 1 or 2")
    if num_anchors < 1:
        raise ValueError(f"num_anchors={num_anchors} must be positive")


def _resolve(preset: str, sizes: dict) -> dict:
    """The preset's sizes (and attention scale), overridden by the explicitly given (non-None) ones."""
    if preset not in PRESETS:
        raise ValueError(f"preset '{preset}' is not one of {', '.join(PRESETS)}")
    given = {k: v if isinstance(v, str) else tuple(v) for k, v in sizes.items() if v is not None}
    return {**PRESETS[preset], **given}


def _check_input(params: dict, input_size: list[int]) -> None:
    """Every stage's token grid must hold the region grid, and each stage's top-k its regions."""
    sizes = _resolve(params.get("preset", "reference"), {k: params.get(k) for k in PRESETS["reference"]})
    if sizes["attention_scale"] not in ATTENTION_SCALES:
        raise ValueError(f"attention_scale '{sizes['attention_scale']}' is not one of {', '.join(ATTENTION_SCALES)}")
    grid, size = params.get("region_grid"), params.get("region_size")
    for stage, (tokens, k) in enumerate(zip(stage_token_grids(input_size), sizes["topk"], strict=True)):
        where = f"stage {stage + 1} (stride {STRIDES[stage]}) has {'x'.join(map(str, tokens))} tokens"
        if grid is not None:
            if any(t < g for t, g in zip(tokens, grid, strict=True)):
                raise ValueError(f"{where}, fewer than the region_grid {list(grid)}: use region_size or a larger patch")
            regions = math.prod(grid)
        else:
            regions = math.prod(math.ceil(t / s) for t, s in zip(tokens, size, strict=True))
        if k > regions:
            raise ValueError(f"{where} in {regions} regions, fewer than topk[{stage}]={k}")


def _build(in_channels: int, out_channels: int, head: str, preset: str, anchor_sizes, **params) -> H3DENet:
    sizes = _resolve(preset, {k: params.pop(k, None) for k in PRESETS["reference"]})
    return H3DENet(in_channels, out_channels, head=head, num_anchors=len(anchor_sizes), **sizes, **params)


@register_network("h3de_net", check_input=_check_input)
def h3de_net(
    in_channels: int,
    out_channels: int,
    preset: str = "reference",
    anchor_sizes=(0.5, 0.75, 1.0, 1.25),
    **params,
):
    """Anchor-free H3DE-Net: one full-resolution heatmap per landmark."""
    return _build(in_channels, out_channels, "heatmap", preset, anchor_sizes, **params)


@register_network("h3de_net_anchor", config_key="h3de_net", output="anchor", check_input=_check_input)
def h3de_net_anchor(
    in_channels: int,
    out_channels: int,
    preset: str = "reference",
    anchor_sizes=(0.5, 0.75, 1.0, 1.25),
    **params,
):
    """Anchor-based H3DE-Net: per stride-4 cell and anchor, 3 bounded offsets and a logit per landmark."""
    return _build(in_channels, out_channels, "anchor", preset, anchor_sizes, **params)
