"""A detached NRRD header (``.nhdr``) that gives the voxels of an NRRD without geometry a world position.

Some datasets ship NRRD volumes whose header has no ``space``, ``space directions`` or ``space origin``
(MML: the voxel spacing is in a separate ``.npy``). h3de needs every image's voxel-to-world affine, and
the converters never change or copy a source file, so :func:`write_geometry_header` writes a small header
that names the original file as its ``data file`` and skips its attached header with ``line skip``: any
NRRD reader (pynrrd, ITK, 3D Slicer) then reads the original voxels with the geometry given here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nrrd

from h3de.errors import DataError
from h3de.io_utils import atomic_write

__all__ = ["read_nrrd_fields", "has_geometry", "write_geometry_header"]

_MAX_HEADER_LINES = 10_000  # an attached header longer than this is not a header


def read_nrrd_fields(path: Path) -> dict:
    """The parsed header fields of an NRRD file (pynrrd's dict).

    Raises:
        DataError: the file cannot be read or parsed as NRRD.
    """
    try:
        return nrrd.read_header(str(path))
    except Exception as e:  # pynrrd raises NRRDError, OSError, ValueError, UnicodeDecodeError
        raise DataError(f"{path}: cannot read the NRRD header ({type(e).__name__}: {e})") from None


def has_geometry(fields: dict) -> bool:
    """Whether an NRRD header places its voxels in the world itself (``space directions``)."""
    return "space directions" in fields


def write_geometry_header(
    path: Path, data_file: Path, fields: dict, spacing: Sequence[float], space: str = "left-posterior-superior"
) -> None:
    """Write ``path`` (``.nhdr``): ``data_file``'s voxels on axes of ``spacing`` mm along ``space``'s axes.

    The affine is diagonal: array axis k steps ``spacing[k]`` mm along world axis k of ``space``, and voxel
    (0, 0, 0) sits at the origin. ``data_file`` is named relative to ``path``'s folder.

    Args:
        path: the header to write (atomically).
        data_file: the attached-header NRRD holding the voxels.
        fields: ``data_file``'s header fields (:func:`read_nrrd_fields`).
        spacing: (3,) positive mm per voxel along the array axes in file order.
        space: the NRRD anatomical space the axes are labelled with.

    Raises:
        DataError: ``data_file`` is not one 3D volume with an attached header.
    """
    sizes = [int(s) for s in fields["sizes"]]
    if int(fields["dimension"]) != 3 or len(sizes) != 3:
        raise DataError(f"{data_file}: expected a 3D volume, got NRRD sizes {sizes}")
    if "data file" in fields or "datafile" in fields:
        raise DataError(f"{data_file}: is itself a detached header; expected the volume with its attached header")
    skip = _attached_header_lines(data_file) + int(fields.get("line skip", fields.get("lineskip", 0)))
    rows = [[float(s) if i == k else 0.0 for i in range(3)] for k, s in enumerate(spacing)]
    directions = " ".join("(" + ",".join(repr(v) for v in row) + ")" for row in rows)
    lines = [
        "NRRD0004",
        f"# geometry given by h3de for the voxels of {data_file.name}, which is not changed",
        f"type: {fields['type']}",
        "dimension: 3",
        f"space: {space}",
        "sizes: " + " ".join(str(s) for s in sizes),
        f"space directions: {directions}",
        "kinds: domain domain domain",
    ]
    if "endian" in fields:
        lines.append(f"endian: {fields['endian']}")
    lines.append(f"encoding: {fields['encoding']}")
    lines.append("space origin: (0,0,0)")
    lines.append(f"line skip: {skip}")
    if "byte skip" in fields or "byteskip" in fields:
        lines.append(f"byte skip: {int(fields.get('byte skip', fields.get('byteskip')))}")
    lines.append(f"data file: {_relative(data_file, path.parent)}")
    atomic_write(path, "\n".join(lines) + "\n")


def _attached_header_lines(path: Path) -> int:
    """Lines of ``path``'s attached header, the blank line that ends it included."""
    with open(path, "rb") as f:
        for count in range(1, _MAX_HEADER_LINES + 1):
            line = f.readline()
            if not line:
                break
            if line in (b"\n", b"\r\n"):
                return count
    raise DataError(f"{path}: no blank line ends an NRRD header (not an attached-header .nrrd file)")


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when both are on one drive, else absolute, with ``/`` separators."""
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.resolve().as_posix()
