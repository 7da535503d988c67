"""Read and write landmark files in world millimetres.

Formats (chosen by suffix):
- ``.mrk.json``: 3D Slicer markups (``coordinateSystem`` RAS or LPS; ``positionStatus`` "missing"
  or "undefined" marks an absent landmark).
- ``.csv``: header ``name,x,y,z`` in RAS mm; empty or ``nan`` coordinates mark an absent landmark.

Every reader returns ``(names, positions)`` with positions an (L, 3) float64 RAS-mm array, NaN rows
for absent landmarks. Errors name the file and the offending entry.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from h3de.errors import DataError
from h3de.io_utils import atomic_write

__all__ = ["read_landmarks", "write_landmarks", "LANDMARK_SUFFIXES"]

LANDMARK_SUFFIXES = (".mrk.json", ".csv")
_SLICER_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _format(path: Path) -> str:
    name = path.name.lower()
    for suffix in LANDMARK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported landmark file type (expected one of {', '.join(LANDMARK_SUFFIXES)})")


def read_landmarks(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a landmark file.

    Returns:
        names: landmark labels in file order.
        positions: (L, 3) float64 RAS world mm; NaN rows for absent landmarks.

    Raises:
        DataError: missing, unreadable or malformed file, duplicate or empty names.
    """
    path = Path(path)
    kind = _format(path)
    if not path.is_file():
        raise DataError(f"{path}: landmark file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read landmark file ({e})") from None
    names, positions = _read_markups(path, text) if kind == ".mrk.json" else _read_csv(path, text)
    if not names:
        raise DataError(f"{path}: no landmarks in file")
    seen = set()
    for name in names:
        if not name:
            raise DataError(f"{path}: a landmark has an empty name")
        if name in seen:
            raise DataError(f"{path}: landmark '{name}' appears twice")
        seen.add(name)
    return names, np.asarray(positions, dtype=np.float64).reshape(len(names), 3)


def _read_markups(path: Path, text: str) -> tuple[list[str], list[list[float]]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups or not isinstance(markups[0], dict):
        raise DataError(f"{path}: not a Slicer markups file (no 'markups' list)")
    markup = markups[0]
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    if system not in ("RAS", "LPS"):
        raise DataError(f"{path}: coordinateSystem '{system}' is not RAS or LPS")
    units = markup.get("coordinateUnits", "mm")
    if units != "mm":
        raise DataError(f"{path}: coordinateUnits '{units}' is not 'mm'")
    points = markup.get("controlPoints")
    if not isinstance(points, list):
        raise DataError(f"{path}: markup has no 'controlPoints' list")
    names, positions = [], []
    for i, point in enumerate(points):
        if not isinstance(point, dict) or "label" not in point:
            raise DataError(f"{path}: control point {i} has no 'label'")
        names.append(str(point["label"]))
        status = point.get("positionStatus", "defined")
        if status in ("missing", "undefined"):
            positions.append([math.nan] * 3)
            continue
        position = point.get("position")
        if not _is_xyz(position):
            raise DataError(f"{path}: control point '{point['label']}' has no valid 'position' [x, y, z]")
        xyz = np.asarray(position, dtype=np.float64)
        positions.append(list(xyz * _LPS_TO_RAS if system == "LPS" else xyz))
    return names, positions


def _is_xyz(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _read_csv(path: Path, text: str) -> tuple[list[str], list[list[float]]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0]][:4] != ["name", "x", "y", "z"]:
        raise DataError(f"{path}: the first line must be the header 'name,x,y,z'")
    names, positions = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 4:
            raise DataError(f"{path}:{line}: expected 4 columns name,x,y,z, got {len(row)}")
        names.append(row[0].strip())
        cells = [c.strip() for c in row[1:4]]
        if all(c == "" or c.lower() == "nan" for c in cells):
            positions.append([math.nan] * 3)
            continue
        try:
            xyz = [float(c) for c in cells]
        except ValueError:
            raise DataError(f"{path}:{line}: coordinates {cells} are not numbers") from None
        if not all(math.isfinite(v) for v in xyz):
            raise DataError(f"{path}:{line}: coordinates {cells} are not all finite")
        positions.append(xyz)
    return names, positions


def write_landmarks(path: str | os.PathLike, names: list[str], positions: np.ndarray) -> None:
    """Write landmarks (RAS mm, NaN rows = absent) atomically; the format follows the suffix.

    ``.mrk.json`` files are written in RAS with ``positionStatus: "missing"`` for absent landmarks,
    so they open in 3D Slicer as-is.
    """
    path = Path(path)
    kind = _format(path)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(names) != len(positions):
        raise ValueError(f"{len(names)} names but {len(positions)} positions")
    absent = np.isnan(positions).any(axis=1)
    if kind == ".mrk.json":
        points = []
        for i, (name, xyz, gone) in enumerate(zip(names, positions, absent, strict=True)):
            point = {"id": str(i + 1), "label": name, "position": [0.0, 0.0, 0.0] if gone else xyz.tolist()}
            point["positionStatus"] = "missing" if gone else "defined"
            points.append(point)
        markup = {
            "type": "Fiducial",
            "coordinateSystem": "RAS",
            "coordinateUnits": "mm",
            "controlPoints": points,
        }
        text = json.dumps({"@schema": _SLICER_SCHEMA, "markups": [markup]}, indent=2)
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "x", "y", "z"])
        for name, xyz, gone in zip(names, positions, absent, strict=True):
            writer.writerow([name, "", "", ""] if gone else [name, *(repr(float(v)) for v in xyz)])
        text = buffer.getvalue()
    atomic_write(path, text)
