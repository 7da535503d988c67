"""Read and write landmark files in world RAS millimetres; the suffix picks the format.

Every reader returns ``(names, positions)``: the names in file order and an (L, 3) float64 array of
world RAS millimetres with NaN rows for absent landmarks, whatever coordinate system and unit the file
declares. ``docs/formats.md`` describes each format, its declaration and how it writes an absent landmark.

- ``.mrk.json``: 3D Slicer markups (:mod:`.markups`).
- ``.fcsv``: 3D Slicer fiducial CSV, 4.x and 5.x (:mod:`.fcsv`).
- ``.csv``: ``name,x,y,z[,presence]`` with ``# coordinate_system`` / ``# units`` lines (:mod:`.table`).
- ``.json``: h3de's own (:mod:`.h3de_json`).
- ``.npy``: voxel indices into an image, read only, with that image (:mod:`.voxels`).

A problem in a file is a :class:`~h3de.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from h3de.data.landmark_io.fcsv import fcsv_text, read_fcsv
from h3de.data.landmark_io.h3de_json import h3de_json_text, read_h3de_json
from h3de.data.landmark_io.markups import markups_text, read_markups
from h3de.data.landmark_io.table import read_table, table_text
from h3de.data.landmark_io.voxels import read_voxel_indices
from h3de.errors import DataError
from h3de.io_utils import atomic_write

__all__ = ["read_landmarks", "write_landmarks", "LANDMARK_SUFFIXES", "VOXEL_SUFFIXES"]

LANDMARK_SUFFIXES = (".mrk.json", ".fcsv", ".csv", ".json")  # world-mm formats, read and written; .mrk.json first
VOXEL_SUFFIXES = (".npy",)  # voxel indices: read only, with their image

_Reader = Callable[[Path, str], tuple[list[str], np.ndarray]]
_Writer = Callable[[list[str], np.ndarray, np.ndarray | None], str]
_READERS: dict[str, _Reader] = {
    ".mrk.json": read_markups,
    ".fcsv": read_fcsv,
    ".csv": read_table,
    ".json": read_h3de_json,
}
_WRITERS: dict[str, _Writer] = {
    ".mrk.json": markups_text,
    ".fcsv": fcsv_text,
    ".csv": table_text,
    ".json": h3de_json_text,
}


def _format(path: Path, suffixes: tuple[str, ...]) -> str:
    name = path.name.lower()
    for suffix in suffixes:
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported landmark file type (expected one of {', '.join(suffixes)})")


def read_landmarks(
    path: str | os.PathLike, image: str | os.PathLike | None = None, names: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Read a landmark file.

    Args:
        path: a ``.mrk.json``, ``.fcsv``, ``.csv``, ``.json`` or ``.npy`` file.
        image: the NIfTI or NRRD image the landmarks belong to. Needed by ``.npy`` voxel indices, whose
            affine maps them to world mm; unused by the world-mm formats.
        names: names of the rows of a ``.npy`` file (it holds none; default ``L0``..``L{n-1}``). The other
            formats carry their names, so giving ``names`` with them is a ValueError.

    Returns:
        names: landmark names in file order.
        positions: (L, 3) float64 world RAS mm; NaN rows for absent landmarks.

    Raises:
        DataError: a missing, empty, unreadable or malformed file; an unknown coordinate system or unit;
            empty or repeated names; a ``.npy`` without ``image``.
    """
    path = Path(path)
    kind = _format(path, LANDMARK_SUFFIXES + VOXEL_SUFFIXES)
    if names is not None and kind not in VOXEL_SUFFIXES:
        raise ValueError(f"names= is only for .npy files, which hold no names; {path} names its landmarks")
    if not path.is_file():
        raise DataError(f"{path}: landmark file not found")
    if kind in VOXEL_SUFFIXES:
        found, positions = read_voxel_indices(path, image, names)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")  # Excel's CSV starts with a byte-order mark
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read landmark file ({e})") from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        found, positions = _READERS[kind](path, text)
    _check_names(path, found)
    return found, np.asarray(positions, dtype=np.float64).reshape(len(found), 3)


def _check_names(path: Path, names: list[str]) -> None:
    if not names:
        raise DataError(f"{path}: no landmarks in file")
    seen = set()
    for name in names:
        if not name:
            raise DataError(f"{path}: a landmark has an empty name")
        if name in seen:
            raise DataError(f"{path}: landmark '{name}' appears twice (duplicate landmark name)")
        seen.add(name)


def write_landmarks(
    path: str | os.PathLike, names: list[str], positions: np.ndarray, presence: np.ndarray | None = None
) -> None:
    """Write landmarks atomically in world RAS mm; the format follows the suffix (``LANDMARK_SUFFIXES``).

    Args:
        path: the file to write.
        names: L distinct, non-empty landmark names.
        positions: (L, 3) world RAS mm; NaN rows are absent landmarks, written as the format says
            "absent" (``.mrk.json`` "missing", ``.json`` null, ``.csv`` empty cells; ``.fcsv`` leaves them out).
        presence: optional (L,) probabilities, kept where the format has a place for them: the point
            description (``.mrk.json``, ``.fcsv``), a column (``.csv``), a field (``.json``).

    Raises:
        DataError: a suffix that is not a writable format.
        ValueError: names and positions (or presence) of different lengths, empty or repeated names.
    """
    path = Path(path)
    kind = _format(path, LANDMARK_SUFFIXES)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    names = list(names)
    if len(names) != len(positions):
        raise ValueError(f"{len(names)} names but {len(positions)} positions")
    if presence is not None and len(presence) != len(names):
        raise ValueError(f"{len(names)} names but {len(presence)} presence values")
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"landmark names must be non-empty and distinct, got {names}")
    atomic_write(path, _WRITERS[kind](names, positions, presence))
