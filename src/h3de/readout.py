"""How a network's output is trained and read, per output kind of the network registry.

A readout owns the loss on a packed batch and the decoding of the output to continuous INPUT-voxel
positions plus a per-landmark presence score; the LightningModule maps positions to world mm.

- ``HeatmapReadout``: heatmaps or per-voxel logits (``h3de.targets``, ``h3de.losses``). The presence
  probability is trained on every landmark, those outside the loss mask as absent: the heatmap peak
  (weighted_mse, against all-zero targets), one minus the probability of the learned "absent" category
  beside the softmax over the voxels (spatial_ce), or the peak sigmoid (ball_ohnm, by hard-negative
  mining).
- ``AnchorReadout``: anchor maps (``h3de.anchors``); presence is the sigmoid of the best anchor logit,
  trained against absent landmarks by hard-negative mining.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from h3de.anchors import AnchorLoss, decode_anchors
from h3de.config import LossConfig
from h3de.losses import build_loss
from h3de.targets import decode_heatmaps

__all__ = ["HeatmapReadout", "AnchorReadout", "build_readout"]


class HeatmapReadout(nn.Module):
    """Heatmap output (B, L, D, H, W): masked heatmap loss, arg-max + log-parabola decoding."""

    def __init__(self, cfg: LossConfig, heatmap_sigma: float, num_landmarks: int) -> None:
        super().__init__()
        self.criterion = build_loss(cfg, heatmap_sigma, num_landmarks)

    def loss(self, output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.criterion(output, batch["heatmap"], batch["loss_mask"])

    def decode(self, output: torch.Tensor, landmarks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, L, 3) voxel positions, (B, L) presence probability) of the maps ``output``, whose channels are the
        landmarks of the indices ``landmarks`` ((L,) long; default: all, in order; a sliding window decodes the
        landmarks in chunks)."""
        decodable = self.criterion.decodable(output.detach())
        voxels = decode_heatmaps(decodable, log_input=self.criterion.log_domain)
        return voxels, self.criterion.presence(output, landmarks)


class AnchorReadout(nn.Module):
    """Anchor output (B, L*A*4, d, h, w): BCE + hard-negative mining + smooth-L1; voted decoding.

    Args:
        num_landmarks: L.
        anchor_sizes: anchor sides in cells (A of them, as the network was built with).
        stride: input voxels per cell of the anchor map.
        cfg: the loss config (hard_negatives, offset_weight, top_candidates).
    """

    def __init__(self, num_landmarks: int, anchor_sizes: Sequence[float], stride: int, cfg: LossConfig) -> None:
        super().__init__()
        self.num_landmarks, self.anchor_sizes, self.stride = num_landmarks, tuple(anchor_sizes), stride
        self.top_candidates = cfg.top_candidates
        self.criterion = AnchorLoss(
            self.anchor_sizes, stride, hard_negatives=cfg.hard_negatives, offset_weight=cfg.offset_weight
        )

    def loss(self, output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.criterion(output, batch["landmarks_voxel"], batch["loss_mask"]).total

    def decode(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, L, 3) voxel positions, (B, L) presence probability)."""
        return decode_anchors(output, self.num_landmarks, self.stride, self.anchor_sizes, self.top_candidates)


def build_readout(
    output: str, cfg: LossConfig, num_landmarks: int, network_params: Any, heatmap_sigma: float
) -> nn.Module:
    """The readout for a network whose registry ``output`` kind is "heatmap" or "anchor"."""
    if output == "anchor":
        return AnchorReadout(num_landmarks, network_params.anchor_sizes, 4, cfg)
    return HeatmapReadout(cfg, heatmap_sigma, num_landmarks)
