"""Voxel-index landmarks (``.npy``): an (L, 3) array of voxel indices into one image, read only.

The indices follow the axis order of the image's array as stored (NIfTI i, j, k; an NRRD's spatial
axes), voxel centres at integers. A row with a NaN or any negative value is an absent landmark (the
MML dataset writes -1000 for those). Indices mean nothing without their image: the image's affine
(:func:`h3de.data.images.read_header`, RAS mm, units scaled) maps them to world millimetres, so reading a
``.npy`` without ``image`` is refused. The file holds no names: the caller gives them, else L0..L{n-1}.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from h3de.data.images import read_header
from h3de.errors import DataError

__all__ = ["read_voxel_indices"]


def read_voxel_indices(
    path: Path, image: str | os.PathLike | None, names: Sequence[str] | None
) -> tuple[list[str], np.ndarray]:
    """Names and (L, 3) RAS mm positions (NaN = absent) of a ``.npy`` file of voxel indices into ``image``.

    Raises:
        DataError: no ``image``; an unreadable file or one that is not an (L, 3) array of real numbers;
            infinite values; a present row outside the image; a count of ``names`` that is not L; and
            whatever :func:`~h3de.data.images.read_header` refuses in ``image``.
    """
    if image is None:
        raise DataError(
            f"{path}: a .npy file holds voxel indices, which need the image they index to become world mm: "
            "read it with read_landmarks(path, image=...)"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the .npy file ({e})") from None
    if array.ndim != 2 or array.shape[1] != 3:
        raise DataError(f"{path}: expected an (L, 3) array of voxel indices, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: expected voxel indices as numbers, got dtype {array.dtype}")
    indices = array.astype(np.float64)
    if np.isinf(indices).any():
        raise DataError(f"{path}: rows {np.flatnonzero(np.isinf(indices).any(axis=1)).tolist()} hold infinite indices")
    names = [f"L{i}" for i in range(len(indices))] if names is None else [str(n) for n in names]
    if len(names) != len(indices):
        raise DataError(f"{path}: {len(indices)} rows of voxel indices but {len(names)} names were given")
    header = read_header(image)
    absent = np.isnan(indices).any(axis=1) | (indices < 0).any(axis=1)
    indices[absent] = np.nan
    outside = ~absent & (indices > np.asarray(header.shape) - 0.5).any(axis=1)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{path}: row {row} ({names[row]}) at voxel {indices[row].tolist()} lies outside {image} of shape "
            f"{header.shape}: are the indices in the axis order of the image's array?"
        )
    affine = np.asarray(header.affine, np.float64)
    return names, indices @ affine[:3, :3].T + affine[:3, 3]  # NaN rows stay NaN
