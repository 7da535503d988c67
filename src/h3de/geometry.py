"""World (RAS millimetre) <-> voxel conversions through a 4x4 image affine.

Landmarks live in world mm everywhere outside the network; these two functions are the only way
between the two spaces. NaN rows (missing landmarks) stay NaN.
"""

from __future__ import annotations

import torch

__all__ = ["voxel_to_world", "world_to_voxel"]


def voxel_to_world(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Map voxel indices to world mm.

    Args:
        points: (..., N, 3) continuous voxel coordinates (index space, voxel centres at integers).
        affine: (..., 4, 4) voxel-to-world matrix, broadcast against the leading dims of ``points``.

    Returns:
        (..., N, 3) world coordinates in mm, in the dtype of ``affine``'s promotion with ``points``.
    """
    dtype = torch.promote_types(points.dtype, affine.dtype)
    points, affine = points.to(dtype), affine.to(dtype)
    return points @ affine[..., :3, :3].transpose(-1, -2) + affine[..., None, :3, 3]


def world_to_voxel(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Map world mm to continuous voxel coordinates: the inverse of :func:`voxel_to_world`.

    Args:
        points: (..., N, 3) world coordinates in mm.
        affine: (..., 4, 4) voxel-to-world matrix.

    Returns:
        (..., N, 3) continuous voxel coordinates.
    """
    dtype = torch.promote_types(points.dtype, affine.dtype)
    points, affine = points.to(dtype), affine.to(dtype)
    inverse = torch.linalg.inv(affine)
    return points @ inverse[..., :3, :3].transpose(-1, -2) + inverse[..., None, :3, 3]
