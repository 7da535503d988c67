"""The inference chain's geometry in numpy: the RAS grid at the model's spacing, trilinear sampling of a volume on
any grid (the resampled scan, the coarse-to-fine patches), padding to the patch size, voxels to world mm.

Each function computes what the training code's torch/MONAI step does, named in its docstring. They are written
again here because a deployment runs without torch; ``tests/deploy`` holds each equal to its counterpart. Sampling
is three 1D linear passes when the grid's axes run along the volume's (the RAS grid and the patches of a scan that is
not oblique), else ``scipy.ndimage.affine_transform``.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["ras_grid", "sample", "pad_to", "patch_affines", "voxel_to_world", "to_ras"]

_AFFINE_TOL = 1e-3  # MONAI's tolerance when it looks for the output grid's origin corner


def _ras_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation transform from the axes of ``affine`` to RAS (as MONAI's ``Orientation("RAS")``)."""
    return nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` (X, Y, Z) with its axes permuted and flipped to RAS, and its new affine (MONAI's ``Orientation``)."""
    ornt = _ras_orientation(affine)
    return nib.orientations.apply_orientation(volume, ornt), affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)


def ras_grid(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The grid of ``h3de.data.patches.ResampleRASd``: MONAI's ``Orientation("RAS")`` then ``Spacing(spacing)``.

    Args:
        affine: (4, 4) voxel-to-world matrix of the volume.
        shape: (3,) its voxels per axis.
        spacing: (3,) mm of the output grid.

    Returns:
        The output grid's (4, 4) float64 affine and (3,) shape: its axes are the volume's, reordered and flipped to
        RAS, with their rotation kept and their length set to ``spacing``; it spans the volume's voxel centres.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = _ras_orientation(affine)
    oriented = affine @ nib.orientations.inv_ornt_aff(ornt, tuple(shape))
    in_shape = np.asarray(shape, dtype=np.float64)[np.argsort(ornt[:, 0])]
    # the rotation of the axes without their zoom and shear (MONAI's zoom_affine), scaled to the new spacing
    linear = oriented[:3, :3]
    zoom = np.linalg.cholesky(linear.T @ linear).T
    out = np.eye(4)
    out[:3, :3] = linear @ np.linalg.inv(zoom) @ np.diag(np.sign(np.diag(zoom)) * np.abs(np.asarray(spacing, float)))
    # the extent of the input's voxel centres on the new axes (MONAI's compute_shape_offset, scale_extent=False)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in in_shape], indexing="ij")).reshape(3, -1)
    corners = np.concatenate([corners, np.ones_like(corners[:1])])
    on_grid = np.linalg.solve(out, oriented) @ corners
    out_shape = np.round(np.ptp(on_grid[:3], axis=1) + 1.0)
    world = oriented @ corners
    offset = None
    for i in range(corners.shape[1]):  # the corner lowest along every new axis becomes the origin, if there is one
        if np.allclose(np.min(on_grid[:3] - on_grid[:3, i : i + 1], 1), 0.0, rtol=_AFFINE_TOL):
            offset = world[:3, i]
            break
    if offset is None:  # otherwise the centres of both grids coincide
        offset = oriented[:3, :3] @ (in_shape / 2.0) + oriented[:3, 3] - out[:3, :3] @ (out_shape / 2.0)
    out[:3, 3] = offset
    return out, tuple(int(n) for n in out_shape)


def sample(
    volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, shape: Sequence[int], padding: str = "zeros"
) -> np.ndarray:
    """Trilinear samples of ``volume`` at the voxels of a grid (``h3de.data.patches.sample_patches``, one patch).

    Args:
        volume: (X, Y, Z) float32.
        affine: (4, 4) its voxel-to-world matrix.
        grid_affine: (4, 4) voxel-to-world matrix of the grid.
        shape: (3,) voxels of the grid.
        padding: the value outside the volume: "zeros" (neighbours outside count as 0), or "border" (the nearest
            edge voxel's).

    Returns:
        (*shape) float32.
    """
    to_source = np.linalg.solve(np.asarray(affine, np.float64), np.asarray(grid_affine, np.float64))
    axes = _axis_aligned(to_source[:3, :3])
    if axes is not None:  # the grid's axes run along the volume's (any order and sign): one pass per axis
        volume = volume.transpose(axes)
        coords = [to_source[axes[axis], axis] * np.arange(n) + to_source[axes[axis], 3] for axis, n in enumerate(shape)]
        # only the block between the first and last voxels read (a patch reads a small part of the scan)
        block = []
        for c, size in zip(coords, volume.shape, strict=True):
            first = int(np.clip(np.floor(c.min()), 0, size - 1))
            block.append(slice(first, int(np.clip(np.floor(c.max()) + 1, 0, size - 1)) + 1))
            c -= first
        volume = volume[tuple(block)]
        for axis, c in enumerate(coords):
            volume = _interpolate_axis(volume, axis, c, padding)
        return np.ascontiguousarray(volume, dtype=np.float32)
    mode = {"zeros": "grid-constant", "border": "nearest"}[padding]
    return ndimage.affine_transform(
        volume, to_source[:3, :3], to_source[:3, 3], output_shape=tuple(shape), output=np.float32, order=1, mode=mode
    )


def _axis_aligned(linear: np.ndarray) -> list[int] | None:
    """For a (3, 3) grid-to-volume map that sends each grid axis along one volume axis, the volume axis of each grid
    axis; None for an oblique map."""
    nonzero = np.abs(linear) > 1e-9 * np.abs(linear).max()
    if not ((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all()):
        return None
    return [int(i) for i in np.argmax(nonzero, axis=0)]


def _interpolate_axis(volume: np.ndarray, axis: int, coords: np.ndarray, padding: str) -> np.ndarray:
    """Linear interpolation of ``volume`` along ``axis`` at ``coords`` (voxels): trilinear sampling is separable on
    an axis-aligned grid, and three 1D passes over the block read cost a fraction of scipy's per-voxel 3D
    interpolation."""
    size = volume.shape[axis]
    if padding == "zeros":  # one zero voxel each side: a neighbour outside counts as 0, and farther out both are
        widths = [(0, 0)] * volume.ndim
        widths[axis] = (1, 1)
        volume, coords, size = np.pad(volume, widths), coords + 1, size + 2
    coords = np.clip(coords, 0, size - 1)
    lower = np.minimum(np.floor(coords).astype(np.int64), max(size - 2, 0))
    upper = np.minimum(lower + 1, size - 1)
    weight = (coords - lower).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(volume.ndim)])
    low = np.take(volume, lower, axis=axis)
    return low + weight * (np.take(volume, upper, axis=axis) - low)


def pad_to(volume: np.ndarray, affine: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` padded with zeros to at least ``size``, half before and half after (MONAI's ``SpatialPad``, the
    extra voxel of an odd difference after), and the affine of the padded grid."""
    before = [max(s - n, 0) // 2 for s, n in zip(size, volume.shape, strict=True)]
    widths = [(b, max(s - n, 0) - b) for b, s, n in zip(before, size, volume.shape, strict=True)]
    if not any(any(w) for w in widths):
        return volume, affine
    shifted = np.array(affine, dtype=np.float64)
    shifted[:3, 3] -= shifted[:3, :3] @ np.asarray(before, np.float64)
    return np.pad(volume, widths), shifted


def patch_affines(centres: np.ndarray, spacing: Sequence[float], size: Sequence[int]) -> np.ndarray:
    """(K, 4, 4) affines of RAS-aligned patches of ``spacing`` mm and ``size`` voxels centred on ``centres`` (K, 3)
    world mm: voxel ``(size - 1) / 2`` lies on the centre (``h3de.data.patches.patch_affines``)."""
    centres = np.asarray(centres, np.float64).reshape(-1, 3)
    out = np.tile(np.eye(4), (len(centres), 1, 1))
    out[:, :3, :3] = np.diag(np.asarray(spacing, np.float64))
    out[:, :3, 3] = centres - np.asarray(spacing, np.float64) * (np.asarray(size, np.float64) - 1) / 2
    return out


def voxel_to_world(voxels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(..., 3) voxel coordinates to world mm through (..., 4, 4) ``affine`` (``h3de.geometry.voxel_to_world``)."""
    voxels, affine = np.asarray(voxels, np.float64), np.asarray(affine, np.float64)
    return np.einsum("...ij,...j->...i", affine[..., :3, :3], voxels) + affine[..., :3, 3]
