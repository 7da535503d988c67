"""Landmarks outside their image: the sign of an LPS/RAS or voxel/mm mix-up.

A landmark file and its image meet only in world RAS millimetres, so a file written in LPS and read as
RAS, or holding voxel indices instead of millimetres, still reads without error: its points just lie
somewhere else, often far outside the image. :func:`outside_mm` measures how far, and
:func:`describe_outside` turns that into one message naming the case and the landmarks, with a hint
when the x/y sign-flipped points (LPS given as RAS, or the reverse) would lie inside.

The image's extent is the box of its voxels' edges (indices -0.5 to size - 0.5 on each axis), so a
landmark anywhere on the image counts as inside, whatever the orientation or obliquity; a point is
*outside* when it lies more than :data:`OUTSIDE_TOLERANCE_MM` beyond that box (annotations at the edge of
the field of view stay in). ``h3de data import`` and the converters report such landmarks; the data
module also keeps them out of training and the metrics (:func:`h3de.data.datamodule.check_case`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from h3de.data.images import ImageHeader

__all__ = ["OUTSIDE_TOLERANCE_MM", "outside_mm", "far_outside", "describe_outside"]

OUTSIDE_TOLERANCE_MM = 5.0
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def outside_mm(header: ImageHeader, positions: np.ndarray) -> np.ndarray:
    """Distance of each landmark from the image, in mm.

    Args:
        header: the image's geometry (``affine`` voxel -> world RAS mm, ``shape``).
        positions: (L, 3) world RAS mm; NaN rows are absent landmarks.

    Returns:
        (L,) float64: 0 inside the box of the voxels' edges, the distance beyond it otherwise (along each
        voxel axis, scaled by that axis's spacing: exact for orthogonal axes), NaN for absent landmarks.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    inverse = np.linalg.inv(header.affine)
    voxels = positions @ inverse[:3, :3].T + inverse[:3, 3]  # (L, 3) continuous indices
    size = np.asarray(header.shape, dtype=np.float64)
    beyond = np.maximum(-0.5 - voxels, 0.0) + np.maximum(voxels - (size - 0.5), 0.0)  # (L, 3) voxels
    spacing = np.linalg.norm(header.affine[:3, :3], axis=0)  # (3,) mm per voxel along each axis
    return np.linalg.norm(beyond * spacing, axis=1)  # NaN rows stay NaN


def far_outside(header: ImageHeader, positions: np.ndarray, tolerance_mm: float = OUTSIDE_TOLERANCE_MM) -> np.ndarray:
    """(L,) bool: present landmarks more than ``tolerance_mm`` outside the image (absent ones are False)."""
    distance = outside_mm(header, positions)
    return np.nan_to_num(distance, nan=0.0) > tolerance_mm


def describe_outside(
    case_id: str,
    names: Sequence[str],
    header: ImageHeader,
    positions: np.ndarray,
    tolerance_mm: float = OUTSIDE_TOLERANCE_MM,
) -> str | None:
    """One line naming the case's landmarks that lie outside its image, or None when there are none.

    The line gives each landmark's distance from the image and, when every such landmark would lie within
    the image with x and y negated, says that the file looks like LPS given as RAS (or the reverse).
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    far = far_outside(header, positions, tolerance_mm)
    if not far.any():
        return None
    distance = outside_mm(header, positions)
    listed = ", ".join(f"'{names[i]}' ({distance[i]:.0f} mm)" for i in np.flatnonzero(far))
    message = f"case '{case_id}': landmarks outside its image {header.path}: {listed}"
    flipped = far_outside(header, positions * _LPS_TO_RAS, tolerance_mm)
    if not flipped[far].any():
        message += (
            "; with x and y negated they would lie inside: the file looks like LPS coordinates given as RAS "
            "(or the reverse)"
        )
    else:
        message += "; check the coordinate system (RAS/LPS) and units (mm, not voxels) of the landmark file"
    return message
