"""Anchor-based landmark head of H3DE-Net: target encoding, loss and decoding.

Reference: Huang et al., "H3DE-Net: Efficient and Accurate 3D Landmark Detection in Medical Imaging"
(arXiv:2502.14221), anchor-based variant. All positions are continuous INPUT-voxel coordinates with
voxel centres at integers (as in :mod:`h3de.targets`); the caller maps them to world mm.

Conventions:

- Cells. The head runs on a stride-``s`` grid of (d, h, w) cells. Along an axis, cell ``i`` covers the
  input voxels ``[s*i, s*i + s)``, i.e. the continuous interval ``[s*i - 0.5, s*(i + 1) - 0.5)``, and its
  centre is ``c_i = s*(i + 0.5) - 0.5``. The grid covers ``[-0.5, s*n - 0.5)`` along an axis of n cells.
- Anchors. Anchor ``a`` of a cell is the axis-aligned cube of side ``size_a`` cells (``ANCHOR_SIZES``)
  centred on the cell centre; its half-extent is ``r_a = s * size_a / 2`` input voxels.
- Containment. Anchor a of cell c is POSITIVE for landmark p iff ``|p - c| <= r_a`` on every axis (closed
  cube); every other anchor is negative. A point of the grid lies within ``s/2`` of its own cell centre
  on every axis, so with a largest anchor of at least 1 cell (enforced) every point has a positive.
- Offsets. The head predicts an unbounded ``u`` per axis; the decoded position ``c + r_a * tanh(u)``
  stays strictly inside the anchor's cube. The offset target is the normalised displacement
  ``t = (p - c) / r_a`` in [-1, 1], compared with ``tanh(u)``.
- Layout. Channel ``(l * A + a) * 4 + k`` of the (B, L*A*4, d, h, w) output holds, for landmark l and
  anchor a, the logit (k = 0) or the raw offset ``u`` along voxel axis k - 1 (k = 1, 2, 3: d, h, w).
- Missing landmarks (``present`` False, non-finite, or outside the grid) have no positive anchor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ANCHOR_SIZES",
    "AnchorTargets",
    "AnchorLossParts",
    "AnchorLoss",
    "anchor_channels",
    "split_anchor_output",
    "init_anchor_head_",
    "encode_anchor_targets",
    "vote_candidates",
    "decode_anchors",
]

ANCHOR_SIZES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)
ANCHOR_PRIOR = 1e-4  # initial anchor probability: ~3 positives among 16k-65k anchors per landmark and patch
_VALUES_PER_ANCHOR = 4  # logit + 3 offsets


def _check_stride(stride: int) -> int:
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    return int(stride)


def _check_anchor_sizes(anchor_sizes: Sequence[float]) -> tuple[float, ...]:
    sizes = tuple(float(size) for size in anchor_sizes)
    if not sizes or not all(math.isfinite(size) and size > 0 for size in sizes):
        raise ValueError(f"anchor_sizes must be non-empty positive sizes in cells, got {anchor_sizes!r}")
    if max(sizes) < 1.0:
        raise ValueError(
            f"the largest of anchor_sizes must be >= 1 cell so that every point has a positive anchor, "
            f"got {anchor_sizes!r}"
        )
    return sizes


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _cell_centres(num_cells: int, stride: int, device: torch.device) -> torch.Tensor:
    """(num_cells,) float64 input-voxel coordinate of each cell centre, ``stride * (i + 0.5) - 0.5``."""
    return stride * (torch.arange(num_cells, dtype=torch.float64, device=device) + 0.5) - 0.5


def anchor_channels(num_landmarks: int, num_anchors: int) -> int:
    """Output channels of the anchor head: ``num_landmarks * num_anchors * 4``."""
    num_landmarks = _check_positive_int("num_landmarks", num_landmarks)
    num_anchors = _check_positive_int("num_anchors", num_anchors)
    return num_landmarks * num_anchors * _VALUES_PER_ANCHOR


def split_anchor_output(
    output: torch.Tensor, num_landmarks: int, num_anchors: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the head output into logits and raw (unsquashed) offsets; views, no copy.

    Args:
        output: (B, L*A*4, d, h, w) head output in the layout of the module docstring.
        num_landmarks: L.
        num_anchors: A.

    Returns:
        logits (B, L, A, d, h, w) and raw offsets (B, L, A, 3, d, h, w), offset axes in (d, h, w) order.
    """
    expected = anchor_channels(num_landmarks, num_anchors)
    if output.ndim != 5:
        raise ValueError(f"output must be (B, C, d, h, w), got shape {tuple(output.shape)}")
    if output.shape[1] != expected:
        raise ValueError(
            f"output has {output.shape[1]} channels, expected num_landmarks * num_anchors * 4 = "
            f"{num_landmarks} * {num_anchors} * 4 = {expected}"
        )
    b, _, *grid = output.shape
    per_anchor = output.reshape(b, num_landmarks, num_anchors, _VALUES_PER_ANCHOR, *grid)  # (B, L, A, 4, ...)
    return per_anchor[:, :, :, 0], per_anchor[:, :, :, 1:]


def init_anchor_head_(conv: nn.Conv3d, prior: float = ANCHOR_PRIOR) -> None:
    """Set the head's biases in place: ``logit(prior)`` on every logit channel, 0 on every offset channel.

    The weights keep their initialisation, so at the start the anchors' probabilities scatter around
    ``prior`` (the median stays close to it). With the unbalanced BCE of :class:`AnchorLoss`, logits
    starting near 0 (probability 0.5) would spend the first steps pushing ~10^4 negatives per landmark
    down; starting them near a small prior lets the positives drive learning from the first step.

    Args:
        conv: the head's last layer, whose output channels follow the layout of the module docstring.
        prior: initial probability in (0, 1).
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior!r}")
    if conv.bias is None or conv.out_channels % _VALUES_PER_ANCHOR:
        raise ValueError(f"the anchor head needs a bias and a multiple of 4 output channels, got {conv}")
    with torch.no_grad():
        conv.bias.zero_()
        conv.bias[0::_VALUES_PER_ANCHOR] = math.log(prior / (1.0 - prior))


@dataclass(frozen=True)
class AnchorTargets:
    """Training targets of the anchor head for one batch.

    Attributes:
        positive: (B, L, A, d, h, w) bool, anchors containing the landmark (the classification labels).
        offsets: (B, L, A, 3, d, h, w) float32 normalised displacement ``(p - c) / r_a`` in [-1, 1] at the
            positives, 0 elsewhere.
        present: (B, L) bool, landmarks with positives: present, finite and inside the grid.
    """

    positive: torch.Tensor
    offsets: torch.Tensor
    present: torch.Tensor


def encode_anchor_targets(
    points_voxel: torch.Tensor,
    present: torch.Tensor | None,
    grid_size: Sequence[int],
    stride: int,
    anchor_sizes: Sequence[float] = ANCHOR_SIZES,
) -> AnchorTargets:
    """Positive anchors and offset targets of each landmark (conventions in the module docstring).

    Args:
        points_voxel: (B, L, 3) continuous input-voxel coordinates; NaN rows are missing.
        present: (B, L) bool, False for missing landmarks; None means every finite point is present.
        grid_size: (d, h, w) cells of the head output.
        stride: input voxels per cell along each axis.
        anchor_sizes: anchor side lengths in cells; the largest must be >= 1.

    Returns:
        :class:`AnchorTargets` on ``points_voxel.device``. A landmark outside the grid
        ``[-0.5, stride * size - 0.5)`` is treated as missing.
    """
    stride = _check_stride(stride)
    sizes = _check_anchor_sizes(anchor_sizes)
    grid = tuple(grid_size)
    if len(grid) != 3 or not all(isinstance(n, numbers.Integral) and n >= 1 for n in grid):
        raise ValueError(f"grid_size must be three integers >= 1, got {grid_size!r}")
    if points_voxel.ndim != 3 or points_voxel.shape[-1] != 3:
        raise ValueError(f"points_voxel must be (B, L, 3), got shape {tuple(points_voxel.shape)}")
    if present is None:
        present = torch.ones(points_voxel.shape[:2], dtype=torch.bool, device=points_voxel.device)
    if present.shape != points_voxel.shape[:2]:
        raise ValueError(f"present must be (B, L) = {tuple(points_voxel.shape[:2])}, got {tuple(present.shape)}")
    device = points_voxel.device
    points = points_voxel.detach().to(torch.float64)
    extent = stride * torch.tensor(grid, dtype=torch.float64, device=device) - 0.5
    inside = ((points >= -0.5) & (points < extent)).all(dim=-1)  # False for NaN
    valid = present.to(torch.bool) & inside  # (B, L)
    points = torch.where(valid[..., None], points, torch.zeros_like(points))
    half = stride * torch.tensor(sizes, dtype=torch.float64, device=device) / 2  # (A,) voxels

    contained, normalised = [], []
    for axis, num_cells in enumerate(grid):
        displacement = points[..., axis, None, None] - _cell_centres(num_cells, stride, device)  # (B, L, 1, n)
        contained.append(displacement.abs() <= half[:, None])  # (B, L, A, n)
        normalised.append(displacement / half[:, None])  # (B, L, A, n)
    positive = contained[0][..., :, None, None] & contained[1][..., None, :, None] & contained[2][..., None, None, :]
    positive = positive & valid[..., None, None, None, None]  # (B, L, A, d, h, w)
    shape = positive.shape
    offsets = torch.stack(
        [
            normalised[0][..., :, None, None].expand(shape),
            normalised[1][..., None, :, None].expand(shape),
            normalised[2][..., None, None, :].expand(shape),
        ],
        dim=3,
    )  # (B, L, A, 3, d, h, w)
    offsets = torch.where(positive[:, :, :, None], offsets, torch.zeros_like(offsets)).to(torch.float32)
    return AnchorTargets(positive=positive, offsets=offsets, present=valid)


@dataclass(frozen=True)
class AnchorLossParts:
    """Scalar parts of :class:`AnchorLoss`: ``total = cls + offset_weight * offset``."""

    total: torch.Tensor
    cls: torch.Tensor
    offset: torch.Tensor


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values``; zero (still attached to the graph) when empty."""
    return values.sum() / max(values.numel(), 1)


class AnchorLoss(nn.Module):
    """Classification (BCE with logits) plus smooth-L1 offset loss of the anchor head, computed in fp32.

    ``cls`` has two terms:

    - present landmarks: BCE toward 1 at every positive anchor and toward 0 at every other anchor,
      summed and divided by the number of positives of the batch (as RetinaNet normalises; under DDP,
      of each process's batch). The BCE is NOT
      re-balanced: weighting the few positives up to match the ~10^4 negatives per landmark makes
      every ambiguous location score high, and the decoder's arg-max then lands on false peaks
      (benchmarks/anchor_loss.md fits one phantom batch with both). Its first steps rely on the head's
      prior-probability bias (:func:`init_anchor_head_`) instead.
    - missing landmarks: online hard-negative mining. A missing landmark has no positive, so only its
      ``hard_negatives`` highest logits (the false detections the decoder would report) get BCE toward
      0, averaged over all mined anchors, times ``missing_weight``.

    ``offset`` is smooth-L1 between ``tanh(u)`` and the normalised target, summed over the 3 axes and
    averaged over the positives; negatives' offsets get no gradient.

    Args:
        anchor_sizes: anchor side lengths in cells (the network's ``num_anchors`` is their count).
        stride: input voxels per cell.
        hard_negatives: anchors mined per missing landmark and sample (capped at A*d*h*w); the default
            matches the decoder's 15 candidates.
        offset_weight: weight of the offset loss in ``total``.
        missing_weight: weight of the mined missing-landmark term in ``cls``.
        offset_beta: smooth-L1 transition point, in normalised offset units (1 = half an anchor).
    """

    def __init__(
        self,
        anchor_sizes: Sequence[float] = ANCHOR_SIZES,
        stride: int = 4,
        hard_negatives: int = 15,
        offset_weight: float = 1.0,
        missing_weight: float = 1.0,
        offset_beta: float = 0.1,
    ) -> None:
        super().__init__()
        self.anchor_sizes = _check_anchor_sizes(anchor_sizes)
        self.stride = _check_stride(stride)
        self.hard_negatives = _check_positive_int("hard_negatives", hard_negatives)
        for name, value in (("offset_weight", offset_weight), ("missing_weight", missing_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (math.isfinite(offset_beta) and offset_beta > 0):
            raise ValueError(f"offset_beta must be finite and > 0, got {offset_beta!r}")
        self.offset_weight, self.missing_weight, self.offset_beta = offset_weight, missing_weight, offset_beta

    def forward(
        self, output: torch.Tensor, points_voxel: torch.Tensor, present: torch.Tensor | None
    ) -> AnchorLossParts:
        """Loss of a batch.

        Args:
            output: (B, L*A*4, d, h, w) head output (any float dtype; computed in fp32).
            points_voxel: (B, L, 3) input-voxel coordinates; NaN rows are missing.
            present: (B, L) bool, or None (every finite point is present).

        Returns:
            :class:`AnchorLossParts` of fp32 scalars.
        """
        if points_voxel.ndim != 3:
            raise ValueError(f"points_voxel must be (B, L, 3), got shape {tuple(points_voxel.shape)}")
        num_landmarks, num_anchors = points_voxel.shape[1], len(self.anchor_sizes)
        with torch.autocast(device_type=output.device.type, enabled=False):
            logits, raw = split_anchor_output(output.float(), num_landmarks, num_anchors)
            targets = encode_anchor_targets(
                points_voxel, present, tuple(logits.shape[-3:]), self.stride, self.anchor_sizes
            )
            positive = targets.positive  # (B, L, A, d, h, w)
            of_present = targets.present[..., None, None, None, None].expand_as(positive)

            # STEP 1: classification; BCE toward 1 is softplus(-x), toward 0 is softplus(x)
            present_bce = F.softplus(-logits[positive]).sum() + F.softplus(logits[of_present & ~positive]).sum()
            missing_logits = logits[~targets.present].flatten(1)  # (M, A*d*h*w)
            k = min(self.hard_negatives, missing_logits.shape[-1])
            hardest = missing_logits.topk(k, dim=-1).values  # (M, k)
            cls = present_bce / max(int(positive.sum()), 1) + self.missing_weight * _mean(F.softplus(hardest))

            # STEP 2: offsets of the positives only
            predicted = torch.tanh(raw.movedim(3, -1)[positive])  # (N, 3)
            target = targets.offsets.movedim(3, -1)[positive]  # (N, 3)
            error = F.smooth_l1_loss(predicted, target, reduction="none", beta=self.offset_beta).sum(-1)
            offset = _mean(error)
        return AnchorLossParts(total=cls + self.offset_weight * offset, cls=cls, offset=offset)


def vote_candidates(candidates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The candidate with the minimum (weighted) summed distance to the others: a robust medoid vote.

    Args:
        candidates: (..., K, 3) positions, ordered by decreasing confidence.
        weights: (..., K) non-negative weight of each candidate as a voter, or None for equal weights.

    Returns:
        (..., 3) the winning candidate, ``argmin_i sum_j w_j * |x_i - x_j|``. Ties go to the earliest
        candidate (the most confident one); so do all-zero weights.
    """
    distances = torch.linalg.vector_norm(candidates[..., :, None, :] - candidates[..., None, :, :], dim=-1)
    if weights is not None:
        distances = distances * weights[..., None, :]  # (..., K, K)
    winner = distances.sum(dim=-1).argmin(dim=-1)  # (...), first index on ties
    index = winner[..., None, None].expand(*winner.shape, 1, 3)
    return candidates.gather(-2, index).squeeze(-2)


def decode_anchors(
    output: torch.Tensor,
    num_landmarks: int,
    stride: int,
    anchor_sizes: Sequence[float] = ANCHOR_SIZES,
    top_candidates: int = 15,
    weighted_vote: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmark positions and presence probabilities from the anchor head output.

    Per landmark, the ``top_candidates`` anchors with the highest logits over all cells and anchors are
    decoded to ``c + r_a * tanh(u)`` and voted on by :func:`vote_candidates`, each candidate weighted by
    its sigmoid probability (``weighted_vote``) so that confident candidates dominate the vote.

    Args:
        output: (B, L*A*4, d, h, w) head output.
        num_landmarks: L.
        stride: input voxels per cell.
        anchor_sizes: anchor side lengths in cells (A of them).
        top_candidates: candidates per landmark (capped at A*d*h*w).
        weighted_vote: weight the voters by probability; False gives the plain (unweighted) medoid.

    Returns:
        positions (B, L, 3) float32 input-voxel coordinates and presence (B, L) float32, the sigmoid of
        each landmark's best logit.
    """
    stride = _check_stride(stride)
    sizes = _check_anchor_sizes(anchor_sizes)
    top_candidates = _check_positive_int("top_candidates", top_candidates)
    logits, raw = split_anchor_output(output.detach().float(), num_landmarks, len(sizes))
    b, l, a, d, h, w = logits.shape

    # STEP 1: the best anchors of each landmark over all cells
    scores, index = logits.reshape(b, l, -1).topk(min(top_candidates, a * d * h * w), dim=-1)  # (B, L, K)
    raw_flat = raw.movedim(3, 2).reshape(b, l, 3, -1)  # (B, L, 3, A*d*h*w)
    u = raw_flat.gather(-1, index[:, :, None].expand(-1, -1, 3, -1)).movedim(2, -1)  # (B, L, K, 3)

    # STEP 2: their positions, cell centre plus the bounded offset
    anchor, cell = index // (d * h * w), index % (d * h * w)  # (B, L, K)
    cell_index = torch.stack([cell // (h * w), (cell // w) % h, cell % w], dim=-1)  # (B, L, K, 3)
    centres = stride * (cell_index.to(torch.float32) + 0.5) - 0.5
    half = stride * torch.tensor(sizes, dtype=torch.float32, device=output.device)[anchor] / 2  # (B, L, K)
    candidates = centres + half[..., None] * torch.tanh(u)  # (B, L, K, 3)

    # STEP 3: vote, and presence from the best logit
    probabilities = torch.sigmoid(scores)  # (B, L, K)
    positions = vote_candidates(candidates, probabilities if weighted_vote else None)  # (B, L, 3)
    presence = probabilities[..., 0]
    return positions, presence
