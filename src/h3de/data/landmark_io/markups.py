"""3D Slicer markups JSON (``.mrk.json``): the control points of every point list in the file.

A file's ``markups`` list may hold several markups. The point lists (``type`` "Fiducial", or no
``type``) are read in file order and their control points merged; a name in two lists is refused (naming
both lists), and other markup types (Line, Angle, Curve, ClosedCurve, Plane, ROI) are skipped, as their
control points are shape handles, not landmarks. A file with no point list is refused, naming the types
found. Read per markup: ``coordinateSystem`` RAS or LPS (LPS when absent, as in Slicer's schema), ``coordinateUnits``
mm, m or um (a string, or Slicer's ``[code, scheme, meaning]`` list; mm when absent);
``positionStatus`` "missing" or "undefined" marks an absent landmark. Written in RAS mm with every
landmark listed, absent ones as ``positionStatus: "missing"``, so the file opens in Slicer as-is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from h3de.data.landmark_io.spaces import is_xyz, parse_system, parse_units, presence_note, to_ras_mm
from h3de.errors import DataError

__all__ = ["read_markups", "markups_text"]

_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_ABSENT_STATUS = ("missing", "undefined")
_POINT_LIST = "Fiducial"  # Slicer's type name of a point list


def read_markups(path: Path, text: str) -> tuple[list[str], np.ndarray]:
    """Names and (L, 3) RAS mm positions (NaN = absent) of a ``.mrk.json`` file's text."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups or not all(isinstance(m, dict) for m in markups):
        raise DataError(f"{path}: not a Slicer markups file (no 'markups' list)")
    point_lists = [(i, m) for i, m in enumerate(markups) if m.get("type", _POINT_LIST) == _POINT_LIST]
    if not point_lists:
        types = ", ".join(sorted({str(m.get("type")) for m in markups}))
        raise DataError(f"{path}: no point list (markup of type '{_POINT_LIST}') among its markups ({types})")
    names, positions, owner = [], [], {}
    for index, markup in point_lists:
        where = _describe(index, markup)
        list_names, list_positions = _read_point_list(path, markup, where)
        for name in list_names:
            if name in owner:
                raise DataError(f"{path}: landmark '{name}' is in two point lists ({owner[name]} and {where})")
            owner[name] = where
        names += list_names
        positions.append(list_positions)
    return names, np.concatenate(positions, axis=0)


def _describe(index: int, markup: dict) -> str:
    """How an error names a markup: its ``name`` and its place in the file."""
    name = markup.get("name")
    return f"markup {index + 1} '{name}'" if isinstance(name, str) and name else f"markup {index + 1}"


def _read_point_list(path: Path, markup: dict, where: str) -> tuple[list[str], np.ndarray]:
    """Names and (N, 3) RAS mm positions of one point list."""
    system = parse_system(path, markup.get("coordinateSystem", "LPS"), "coordinateSystem")
    units = markup.get("coordinateUnits", "mm")
    if isinstance(units, list) and units:
        units = units[0]  # ["mm", "UCUM", "millimeter"]
    mm_per_unit = parse_units(path, units, "coordinateUnits")
    points = markup.get("controlPoints")
    if not isinstance(points, list):
        raise DataError(f"{path}: {where} has no 'controlPoints' list")
    names, positions = [], []
    for i, point in enumerate(points):
        if not isinstance(point, dict) or "label" not in point:
            raise DataError(f"{path}: control point {i} of {where} has no 'label'")
        names.append(str(point["label"]))
        if point.get("positionStatus", "defined") in _ABSENT_STATUS:
            positions.append([math.nan] * 3)
            continue
        position = point.get("position")
        if not is_xyz(position):
            raise DataError(f"{path}: control point '{point['label']}' has no valid 'position' [x, y, z]")
        positions.append(position)
    array = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return names, to_ras_mm(array, system, mm_per_unit)


def markups_text(names: list[str], positions: np.ndarray, presence: np.ndarray | None) -> str:
    """A ``.mrk.json`` document of (L, 3) RAS mm ``positions`` (NaN rows written as "missing")."""
    points = []
    for i, (name, xyz) in enumerate(zip(names, positions, strict=True)):
        absent = bool(np.isnan(xyz).any())
        point = {
            "id": str(i + 1),
            "label": name,
            "position": [0.0, 0.0, 0.0] if absent else [float(v) for v in xyz],
            "positionStatus": "missing" if absent else "defined",
        }
        if presence is not None:
            point["description"] = presence_note(float(presence[i]))
        points.append(point)
    markup = {"type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "mm", "controlPoints": points}
    return json.dumps({"@schema": _SCHEMA, "markups": [markup]}, indent=2) + "\n"
