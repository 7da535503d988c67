"""Heatmap losses, averaged over the landmarks whose loss mask is set (present and inside the patch)."""

from __future__ import annotations

import torch
from torch import nn

from h3de.config import LossConfig

__all__ = ["WeightedMSELoss", "SpatialCrossEntropyLoss", "build_loss"]


def _masked_mean(per_landmark: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over ``mask``; zero (with gradient) when nothing is masked in."""
    weights = mask.to(per_landmark.dtype)
    return (per_landmark * weights).sum() / weights.sum().clamp_min(1.0)


class WeightedMSELoss(nn.Module):
    """MSE against Gaussian targets, with extra weight on the peak region (target > 0.1).

    Output heatmaps are decoded directly (``log_domain = False``).

    Args:
        foreground_weight: added weight where the target exceeds 0.1 (counters the tiny peak volume).
        target_scale: the targets' peak value.
    """

    log_domain = False

    def __init__(self, foreground_weight: float = 20.0, target_scale: float = 1.0) -> None:
        super().__init__()
        self.foreground_weight, self.target_scale = foreground_weight, target_scale

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prediction, target: (B, L, D, H, W); mask: (B, L) bool. Returns a scalar."""
        weight = 1.0 + self.foreground_weight * (target > 0.1).to(torch.float32)
        error = weight * (prediction.float() - self.target_scale * target.float()) ** 2
        return _masked_mean(error.flatten(2).mean(-1), mask)


class SpatialCrossEntropyLoss(nn.Module):
    """KL divergence between the normalised Gaussian target and a softmax over each landmark's volume.

    The network outputs logits; they are decoded in the log domain (``log_domain = True``).
    """

    log_domain = True

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prediction (logits), target: (B, L, D, H, W); mask: (B, L) bool. Returns a scalar."""
        log_p = torch.log_softmax(prediction.float().flatten(2), dim=-1)
        t = target.float().flatten(2)
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
        kl = (t * (torch.log(t.clamp_min(1e-12)) - log_p)).sum(-1)
        return _masked_mean(kl, mask)


def build_loss(cfg: LossConfig) -> nn.Module:
    if cfg.name == "weighted_mse":
        return WeightedMSELoss(cfg.foreground_weight, cfg.target_scale)
    if cfg.name == "spatial_ce":
        return SpatialCrossEntropyLoss()
    raise ValueError(f"unknown loss '{cfg.name}'")
