"""Heatmap targets and their decoding, both exact to a fraction of a voxel.

Targets are separable: a 3D Gaussian centred at a continuous position is the outer product of three
1D Gaussians, so a (D, H, W) heatmap costs three length-D/H/W vectors and one broadcasted product.
Written here (not MONAI's ``GenerateHeatmap``) because MONAI rounds the centre to a voxel and filters
the whole volume: this is sub-voxel exact and ~100x faster (benchmarks/heatmap_targets.py).

Decoding takes the arg-max voxel and refines each axis with a 3-point parabola through the log of
the heatmap; the log of a Gaussian is a parabola, so a Gaussian target decodes to its exact centre.
"""

from __future__ import annotations

import torch

__all__ = ["gaussian_heatmaps", "decode_heatmaps", "points_in_volume"]


def gaussian_heatmaps(points: torch.Tensor, spatial_size: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Unnormalised Gaussian heatmaps (peak value 1 at the continuous point) for each landmark.

    Args:
        points: (..., L, 3) continuous voxel coordinates; NaN rows give all-zero heatmaps.
        spatial_size: (D, H, W) of the output grid.
        sigma: standard deviation in voxels.

    Returns:
        (..., L, D, H, W) float32 heatmaps on ``points.device``.
    """
    finite = torch.isfinite(points).all(dim=-1, keepdim=True)  # (..., L, 1)
    centres = torch.where(finite, points, torch.zeros_like(points)).to(torch.float32)
    factors = []
    for axis, size in enumerate(spatial_size):
        grid = torch.arange(size, dtype=torch.float32, device=points.device)
        factors.append(torch.exp(-0.5 * ((grid - centres[..., axis : axis + 1]) / sigma) ** 2))  # (..., L, n)
    factors[0] = factors[0] * finite.to(torch.float32)
    gx, gy, gz = factors
    return gx[..., :, None, None] * gy[..., None, :, None] * gz[..., None, None, :]


def points_in_volume(points: torch.Tensor, spatial_size: tuple[int, int, int]) -> torch.Tensor:
    """(..., L) bool: the voxel coordinate is finite and inside the grid [-0.5, size - 0.5)."""
    size = torch.as_tensor(spatial_size, dtype=points.dtype, device=points.device)
    inside = (points >= -0.5) & (points < size - 0.5)
    return inside.all(dim=-1) & torch.isfinite(points).all(dim=-1)


def decode_heatmaps(heatmaps: torch.Tensor, log_input: bool = False) -> torch.Tensor:
    """Continuous voxel position of each heatmap's peak.

    Args:
        heatmaps: (B, L, D, H, W) heatmaps (any positive scale), or log-heatmaps/logits when
            ``log_input``.
        log_input: the values are already logarithms (e.g. spatial-softmax logits).

    Returns:
        (B, L, 3) float32 voxel coordinates: arg-max plus a per-axis parabolic offset in [-0.5, 0.5].
    """
    b, l, *spatial = heatmaps.shape
    flat = heatmaps.detach().float().reshape(b, l, -1)
    index = flat.argmax(dim=-1)  # (B, L)
    strides = (spatial[1] * spatial[2], spatial[2], 1)
    coords = []
    for size, stride in zip(spatial, strides, strict=True):
        position = (index // stride) % size  # (B, L)
        lower = torch.where(position > 0, index - stride, index)
        upper = torch.where(position < size - 1, index + stride, index)
        values = torch.stack([flat.gather(-1, i[..., None])[..., 0] for i in (lower, index, upper)])
        if not log_input:
            positive = (values > 0).all(dim=0)
            values = torch.where(positive, values.clamp_min(1e-30).log(), values)
        v_lower, v_centre, v_upper = values  # (B, L) each
        curvature = v_lower - 2 * v_centre + v_upper
        interior = (position > 0) & (position < size - 1) & (curvature < 0)
        offset = 0.5 * (v_lower - v_upper) / torch.where(interior, curvature, torch.ones_like(curvature))
        offset = torch.where(interior, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))
        coords.append(position.float() + offset)
    return torch.stack(coords, dim=-1)
