"""Heatmap losses. Positions are trained on the landmarks whose loss mask is set (present and inside the
patch); presence on every landmark, the others ("not in this image") being trained as absent.

Each loss also says how its network output is read: ``decodable(output)`` is what
``h3de.targets.decode_heatmaps`` decodes (in the log domain when ``log_domain``), and
``presence(output)`` is a (B, L) trained presence probability in [0, 1], for a threshold of 0.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from h3de.config import LossConfig

__all__ = ["WeightedMSELoss", "SpatialCrossEntropyLoss", "BallHardNegativeLoss", "build_loss"]


def _masked_mean(per_landmark: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over ``mask``; zero (with gradient) when nothing is masked in."""
    weights = mask.to(per_landmark.dtype)
    return (per_landmark * weights).sum() / weights.sum().clamp_min(1.0)


class WeightedMSELoss(nn.Module):
    """MSE against Gaussian targets, with extra weight on the peak region (target > 0.1).

    Every landmark is supervised: those outside the loss mask (absent from the file or outside the
    patch) against an all-zero heatmap, so the heatmap peak is trained to say whether the landmark is in
    the image. Output heatmaps are decoded directly (``log_domain = False``).

    Args:
        foreground_weight: added weight where the target exceeds 0.1 (counters the tiny peak volume).
        target_scale: the targets' peak value.
    """

    log_domain = False

    def __init__(self, foreground_weight: float = 20.0, target_scale: float = 1.0) -> None:
        super().__init__()
        self.foreground_weight, self.target_scale = foreground_weight, target_scale

    def decodable(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def presence(self, output: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) heatmap peak relative to the target peak, clamped to [0, 1] (``landmarks``: unused, no
        per-landmark values)."""
        return (output.detach().float().flatten(2).amax(-1) / self.target_scale).clamp(0.0, 1.0)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prediction, target: (B, L, D, H, W); mask: (B, L) bool, False = all-zero target. Returns a scalar."""
        target = torch.where(mask[..., None, None, None], target.float(), 0.0)
        weight = 1.0 + self.foreground_weight * (target > 0.1).to(torch.float32)
        error = weight * (prediction.float() - self.target_scale * target) ** 2
        return error.flatten(2).mean(-1).mean()


class SpatialCrossEntropyLoss(nn.Module):
    """Cross-entropy of a softmax over each landmark's N voxels plus one learned "absent" category.

    The network outputs logits ``x`` (B, L, D, H, W); landmark l's absent category has the logit
    ``log N + absent_logit[l]`` (a parameter, saved with the model; 0 at the start, so a flat output
    starts at presence 0.5 whatever the volume size). A landmark in the loss mask has the normalised
    Gaussian as its target (no mass on "absent"); any other landmark (absent from the file, or outside
    the patch) puts all its mass on "absent". With the presence logit
    ``z = logsumexp(x) - log N - absent_logit`` that cross-entropy splits exactly into

    - the KL divergence between the normalised Gaussian and the softmax over the voxels (present
      landmarks only; averaged over the landmarks in the mask, as without the absent category), and
    - a binary cross-entropy of ``sigmoid(z)`` against the mask (every landmark; averaged over all).

    ``presence = 1 - p(absent) = sigmoid(z)``. The softmax over the voxels, and so the decoded position
    (in the log domain, ``log_domain = True``), does not depend on the absent category. Everything is
    computed in fp32 with autocast off. ``log N`` is that of the training patches (remembered in a buffer
    saved with the model), so a larger scan at inference, which adds voxels of low logit, does not shift
    the presence probability by the log of the size ratio.

    Args:
        num_landmarks: L, one absent logit each.
    """

    log_domain = True

    def __init__(self, num_landmarks: int) -> None:
        super().__init__()
        self.absent_logit = nn.Parameter(torch.zeros(num_landmarks))
        self.register_buffer("train_log_voxels", torch.tensor(float("nan")))  # log N of the training patches

    def decodable(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def presence_logit(self, output: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) fp32 ``z = logsumexp(x) - log N - absent_logit`` of (B, L, D, H, W) logits; ``landmarks`` (L,)
        are the indices of the landmarks of ``output``'s channels (default: all, in order)."""
        absent = self.absent_logit if landmarks is None else self.absent_logit[landmarks]
        with torch.autocast(device_type=output.device.type, enabled=False):
            flat = output.float().flatten(2)  # (B, L, N)
            if torch.isfinite(self.train_log_voxels):  # a trained model's: a constant of the model
                log_voxels = self.train_log_voxels
            else:  # untrained: log N of this output, as a tensor op so that an exported graph holds at any size
                log_voxels = torch.ones_like(flat[0, 0]).sum().log()
            return torch.logsumexp(flat, dim=-1) - log_voxels - absent.float()

    def presence(self, output: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) probability that the landmark is in the volume, ``sigmoid(z)`` (``landmarks``: as
        :meth:`presence_logit`)."""
        return torch.sigmoid(self.presence_logit(output.detach(), landmarks)).detach()

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prediction (logits), target: (B, L, D, H, W); mask: (B, L) bool. Returns a scalar."""
        self.train_log_voxels.fill_(math.log(prediction[0, 0].numel()))
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            log_p = torch.log_softmax(prediction.float().flatten(2), dim=-1)  # (B, L, N)
            t = target.float().flatten(2)
            t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
            kl = (t * (torch.log(t.clamp_min(1e-12)) - log_p)).sum(-1)  # (B, L)
            z = self.presence_logit(prediction)
            presence = F.binary_cross_entropy_with_logits(z, mask.float())
        return _masked_mean(kl, mask) + presence


class BallHardNegativeLoss(nn.Module):
    """The H3DE-Net reference's anchor-free target and loss, on per-voxel logits.

    Target: the Gaussian heatmap inside a ball of ``radius`` voxels around the landmark, zero outside.
    Loss (binary cross-entropy with logits, per landmark): the mean over the ball's voxels, plus the
    mean over the hardest negatives only (highest loss outside the ball): ``negative_ratio`` times as
    many as the ball has voxels for a landmark in the loss mask, ``hard_negatives`` for one that is
    absent from the patch. Absent landmarks are thus trained toward "nowhere", so the peak sigmoid is
    a presence probability.

    Args:
        sigma: the Gaussian targets' sigma in voxels (``data.heatmap_sigma``): the ball is where the
            target is at least exp(-radius^2 / (2 sigma^2)).
        radius: ball radius in voxels (>= 1).
        negative_ratio: mined negatives per positive voxel of a present landmark.
        hard_negatives: mined negatives per absent landmark.
    """

    log_domain = True

    def __init__(self, sigma: float, radius: float = 3.0, negative_ratio: float = 3.0, hard_negatives: int = 15):
        super().__init__()
        if radius < 1:
            raise ValueError(f"ball radius must be at least 1 voxel, got {radius}")
        if negative_ratio <= 0 or hard_negatives < 1:
            raise ValueError(
                f"negative_ratio ({negative_ratio}) and hard_negatives ({hard_negatives}) must be positive"
            )
        self.threshold = math.exp(-(radius**2) / (2 * sigma**2))
        self.negative_ratio, self.hard_negatives = negative_ratio, hard_negatives

    def decodable(self, output: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(output.float())

    def presence(self, output: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Sigmoid of each landmark's highest logit (``landmarks``: unused, no per-landmark values)."""
        return torch.sigmoid(output.detach().float().flatten(2).amax(-1))

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prediction (logits), target (Gaussian heatmaps): (B, L, D, H, W); mask: (B, L) bool. Scalar."""
        logits, heat = prediction.float().flatten(2), target.float().flatten(2)  # (B, L, N)
        ball = (heat >= self.threshold) & mask[..., None]  # (B, L, N)
        bce = F.binary_cross_entropy_with_logits(logits, torch.where(ball, heat, 0.0), reduction="none")
        positives = ball.sum(-1)  # (B, L)
        positive_loss = (bce * ball).sum(-1) / positives.clamp_min(1)

        # STEP: hardest negatives, a per-landmark count of them
        count = torch.where(mask, (self.negative_ratio * positives).ceil().long(), self.hard_negatives)
        count = count.clamp(max=logits.shape[-1])  # (B, L)
        hardest = bce.masked_fill(ball, float("-inf")).topk(int(count.max()), dim=-1).values  # (B, L, K)
        keep = torch.arange(hardest.shape[-1], device=hardest.device) < count[..., None]
        negative_loss = torch.where(keep, hardest, 0.0).sum(-1) / count.clamp_min(1)
        return (positive_loss + negative_loss).mean()


def build_loss(cfg: LossConfig, heatmap_sigma: float, num_landmarks: int) -> nn.Module:
    """The heatmap loss named by ``cfg.name`` (targets of ``heatmap_sigma`` voxels, ``num_landmarks`` of them)."""
    if cfg.name == "weighted_mse":
        return WeightedMSELoss(cfg.foreground_weight, cfg.target_scale)
    if cfg.name == "spatial_ce":
        return SpatialCrossEntropyLoss(num_landmarks)
    if cfg.name == "ball_ohnm":
        return BallHardNegativeLoss(heatmap_sigma, cfg.ball_radius, cfg.negative_ratio, cfg.hard_negatives)
    raise ValueError(f"unknown loss '{cfg.name}'")
