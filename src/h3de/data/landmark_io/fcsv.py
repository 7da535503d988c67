"""3D Slicer fiducial CSV (``.fcsv``), the Slicer 4.x and 5.x versions.

Header lines: ``# Markups fiducial file version = 4.6 | 4.10 | 4.11 | 5.x``, ``# CoordinateSystem = 0 | 1 |
RAS | LPS`` (0 = RAS, 1 = LPS; RAS when absent, as the Slicer versions that left it out stored) and
``# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID``, whose order is followed
(Slicer's order when the line is absent; extra columns are ignored). Positions are millimetres.

The name of a point is its ``label``, or its ``desc`` when the label is empty. Files in the AFIDs style
number their labels (1..32) and name the points in ``desc`` ("AC", "PC"): when every label is an integer
and every ``desc`` is a distinct non-empty name, the names come from ``desc``.

The format has no "missing" state: absent landmarks are left out when writing, so a file of one case
cannot tell them from unknown ones (the manifest's landmark list can).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from h3de.data.landmark_io.spaces import is_presence_note, parse_system, parse_xyz, presence_note, to_ras_mm
from h3de.errors import DataError

__all__ = ["read_fcsv", "fcsv_text"]

SLICER_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"  # Slicer's fixed order
_SYSTEM_CODES = {"0": "RAS", "1": "LPS"}
_INTEGER = re.compile(r"[+-]?\d+")


def read_fcsv(path: Path, text: str) -> tuple[list[str], np.ndarray]:
    """Names and (L, 3) RAS mm positions of a ``.fcsv`` file's text."""
    system, columns, lines = "RAS", SLICER_COLUMNS.lower().split(","), []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = parse_system(path, _SYSTEM_CODES.get(value, value), "CoordinateSystem")
            elif key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
        elif line.strip():
            lines.append(line)
    at = {c: i for i, c in reversed(list(enumerate(columns)))}  # the first of a repeated column
    missing = [c for c in ("x", "y", "z") if c not in at]
    if "label" not in at and "desc" not in at:
        missing.append("label")
    if missing:
        raise DataError(f"{path}: the '# columns =' line lacks the column(s) {', '.join(missing)}")
    needed = max(at["x"], at["y"], at["z"]) + 1
    labels, descs, positions = [], [], []
    for number, row in enumerate(csv.reader(lines), start=1):
        if len(row) < needed:
            raise DataError(f"{path}: point {number} has {len(row)} columns, too few to hold x, y and z")
        labels.append(_cell(row, at.get("label")))
        descs.append(_cell(row, at.get("desc")))
        positions.append(parse_xyz(path, f"point {number}", [row[at[c]] for c in ("x", "y", "z")]))
    return _names(labels, descs), to_ras_mm(np.asarray(positions, dtype=np.float64), system)


def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""


def _names(labels: list[str], descs: list[str]) -> list[str]:
    """Labels, or the descriptions when the labels only number the points (the AFIDs files)."""
    numbered = all(_INTEGER.fullmatch(label) for label in labels)
    named = all(descs) and len(set(descs)) == len(descs) and not any(is_presence_note(d) for d in descs)
    if labels and numbered and named:
        return descs
    return [label or desc for label, desc in zip(labels, descs, strict=True)]


def fcsv_text(names: list[str], positions: np.ndarray, presence: np.ndarray | None) -> str:
    """A Slicer 5 ``.fcsv`` of (L, 3) RAS mm ``positions``; NaN rows (absent landmarks) are left out."""
    buffer = io.StringIO()
    buffer.write("# Markups fiducial file version = 5.0\n# CoordinateSystem = RAS\n")
    buffer.write(f"# columns = {SLICER_COLUMNS}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for i, (name, xyz) in enumerate(zip(names, positions, strict=True)):
        if np.isnan(xyz).any():
            continue
        desc = "" if presence is None else presence_note(float(presence[i]))
        # orientation 0,0,0,1 (angle 0 about z), visible, selected, unlocked: what Slicer writes for a new point
        writer.writerow([i + 1, *(repr(float(v)) for v in xyz), 0, 0, 0, 1, 1, 1, 0, name, desc, ""])
    return buffer.getvalue()
