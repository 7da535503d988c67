"""Read and write landmark files in world millimetres.

Formats (chosen by suffix):
- ``.mrk.json``: 3D Slicer markups (``coordinateSystem`` RAS or LPS; ``positionStatus`` "missing"
  or "undefined" marks an absent landmark).
- ``.fcsv``: 3D Slicer fiducial CSV (``# CoordinateSystem = RAS|LPS|0|1`` header, 0 = RAS, 1 = LPS; the name
  from ``label``, or ``desc`` where labels are empty). It has no "missing" state: absent landmarks are left out
  when writing, and a reader of one file cannot tell them from unknown ones.
- ``.csv``: header ``name,x,y,z`` in RAS mm; empty or ``nan`` coordinates mark an absent landmark; an optional
  ``presence`` column is written by ``h3de predict``.
- ``.json``: h3de's own: ``{"format": "h3de-landmarks", "version": 1, "coordinate_system": "RAS", "units": "mm",
  "landmarks": [{"name": ..., "position": [x, y, z] or null, "presence": p or null}, ...]}``.

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

LANDMARK_SUFFIXES = (".mrk.json", ".fcsv", ".csv", ".json")  # .mrk.json before .json
_H3DE_FORMAT = "h3de-landmarks"
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
    reader = {".mrk.json": _read_markups, ".fcsv": _read_fcsv, ".csv": _read_csv, ".json": _read_h3de_json}[kind]
    names, positions = reader(path, text)
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


def _read_fcsv(path: Path, text: str) -> tuple[list[str], list[list[float]]]:
    system, columns, rows = "RAS", None, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(next(csv.reader([line])))
    if system not in ("RAS", "LPS"):
        raise DataError(f"{path}: CoordinateSystem '{system}' is not RAS, LPS, 0 or 1")
    columns = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc"]
    missing = [c for c in ("x", "y", "z", "label") if c not in columns]
    if missing:
        raise DataError(f"{path}: the '# columns =' header lacks {', '.join(missing)}")
    at = {c: i for i, c in enumerate(columns)}
    names, positions = [], []
    for number, row in enumerate(rows, start=1):
        if len(row) <= max(at["x"], at["y"], at["z"], at["label"]):
            raise DataError(f"{path}: point {number} has {len(row)} columns, fewer than the header's {len(columns)}")
        label = row[at["label"]].strip()
        if not label and "desc" in at and len(row) > at["desc"]:
            label = row[at["desc"]].strip()
        cells = [row[at[c]].strip() for c in ("x", "y", "z")]
        try:
            xyz = np.asarray([float(c) for c in cells])
        except ValueError:
            raise DataError(f"{path}: point '{label}' has coordinates {cells} that are not numbers") from None
        if not np.isfinite(xyz).all():
            raise DataError(f"{path}: point '{label}' has coordinates {cells} that are not all finite")
        names.append(label)
        positions.append(list(xyz * _LPS_TO_RAS if system == "LPS" else xyz))
    return names, positions


def _read_h3de_json(path: Path, text: str) -> tuple[list[str], list[list[float]]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != _H3DE_FORMAT:
        raise DataError(f'{path}: not an h3de landmark file (expected "format": "{_H3DE_FORMAT}")')
    if doc.get("coordinate_system") not in ("RAS", "LPS") or doc.get("units") != "mm":
        raise DataError(f"{path}: coordinate_system must be RAS or LPS and units mm")
    entries = doc.get("landmarks")
    if not isinstance(entries, list):
        raise DataError(f"{path}: 'landmarks' must be a list")
    names, positions = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{path}: landmark {i} has no string 'name'")
        position = entry.get("position")
        if position is None:
            xyz = [math.nan] * 3
        elif _is_xyz(position):
            xyz = list(
                np.asarray(position, dtype=np.float64) * (_LPS_TO_RAS if doc["coordinate_system"] == "LPS" else 1)
            )
        else:
            raise DataError(f"{path}: landmark '{entry['name']}' has no valid 'position' [x, y, z] or null")
        names.append(entry["name"])
        positions.append(xyz)
    return names, positions


def write_landmarks(
    path: str | os.PathLike, names: list[str], positions: np.ndarray, presence: np.ndarray | None = None
) -> None:
    """Write landmarks (RAS mm, NaN rows = absent) atomically; the format follows the suffix.

    ``.mrk.json`` files are written in RAS with ``positionStatus: "missing"`` for absent landmarks,
    so they open in 3D Slicer as-is. ``presence`` ((L,) probabilities) is written where the format has a
    place for it: a ``presence`` column (.csv), a field (.json), the point description (.mrk.json, .fcsv).
    """
    path = Path(path)
    kind = _format(path)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(names) != len(positions):
        raise ValueError(f"{len(names)} names but {len(positions)} positions")
    if presence is not None and len(presence) != len(names):
        raise ValueError(f"{len(names)} names but {len(presence)} presence values")
    absent = np.isnan(positions).any(axis=1)
    scores = [None if presence is None else float(p) for p in (presence if presence is not None else names)]
    if kind == ".mrk.json":
        points = []
        for i, (name, xyz, gone, score) in enumerate(zip(names, positions, absent, scores, strict=True)):
            point = {"id": str(i + 1), "label": name, "position": [0.0, 0.0, 0.0] if gone else xyz.tolist()}
            point["positionStatus"] = "missing" if gone else "defined"
            if score is not None:
                point["description"] = f"presence {score:.4f}"
            points.append(point)
        markup = {
            "type": "Fiducial",
            "coordinateSystem": "RAS",
            "coordinateUnits": "mm",
            "controlPoints": points,
        }
        text = json.dumps({"@schema": _SLICER_SCHEMA, "markups": [markup]}, indent=2)
    elif kind == ".fcsv":
        lines = [
            "# Markups fiducial file version = 4.11",
            "# CoordinateSystem = RAS",
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for i, (name, xyz, gone, score) in enumerate(zip(names, positions, absent, scores, strict=True)):
            if not gone:
                desc = "" if score is None else f"presence {score:.4f}"
                writer.writerow(
                    [
                        f"vtkMRMLMarkupsFiducialNode_{i}",
                        *(repr(float(v)) for v in xyz),
                        0,
                        0,
                        0,
                        1,
                        1,
                        1,
                        0,
                        name,
                        desc,
                        "",
                    ]
                )
        text = "\n".join(lines) + "\n" + buffer.getvalue()
    elif kind == ".json":
        entries = [
            {"name": name, "position": None if gone else xyz.tolist(), "presence": score}
            for name, xyz, gone, score in zip(names, positions, absent, scores, strict=True)
        ]
        doc = {"format": _H3DE_FORMAT, "version": 1, "coordinate_system": "RAS", "units": "mm", "landmarks": entries}
        text = json.dumps(doc, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "x", "y", "z"] + ([] if presence is None else ["presence"]))
        for name, xyz, gone, score in zip(names, positions, absent, scores, strict=True):
            row = [name, "", "", ""] if gone else [name, *(repr(float(v)) for v in xyz)]
            writer.writerow(row + ([] if score is None else [f"{score:.6f}"]))
        text = buffer.getvalue()
    atomic_write(path, text)
