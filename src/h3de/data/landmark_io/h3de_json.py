"""h3de's own landmark JSON (``.json``)::

    {"format": "h3de-landmarks", "version": 1, "coordinate_system": "RAS", "units": "mm",
     "landmarks": [{"name": "nasion", "position": [x, y, z], "presence": 0.98},
                   {"name": "menton", "position": null, "presence": 0.12}]}

``coordinate_system`` (RAS or LPS) and ``units`` (mm, m or um) are required and honoured on read; a
``null`` position is an absent landmark; ``presence`` (a probability or ``null``) is informational.
Written in RAS mm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from h3de.data.landmark_io.spaces import is_xyz, parse_system, parse_units, to_ras_mm
from h3de.errors import DataError

__all__ = ["read_h3de_json", "h3de_json_text"]

FORMAT = "h3de-landmarks"
VERSION = 1


def read_h3de_json(path: Path, text: str) -> tuple[list[str], np.ndarray]:
    """Names and (L, 3) RAS mm positions (NaN = absent) of an h3de landmark ``.json`` file's text."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f'{path}: not an h3de landmark file (expected "format": "{FORMAT}")')
    if doc.get("version", VERSION) != VERSION:
        raise DataError(f"{path}: version {doc['version']!r} is not supported (expected {VERSION})")
    for key in ("coordinate_system", "units"):
        if key not in doc:
            raise DataError(f"{path}: '{key}' is missing (coordinate_system: RAS or LPS; units: mm, m or um)")
    system = parse_system(path, doc["coordinate_system"], "coordinate_system")
    mm_per_unit = parse_units(path, doc["units"])
    entries = doc.get("landmarks")
    if not isinstance(entries, list):
        raise DataError(f"{path}: 'landmarks' must be a list")
    names, positions = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{path}: landmark {i} has no string 'name'")
        position = entry.get("position")
        if position is None:
            position = [math.nan] * 3
        elif not is_xyz(position):
            raise DataError(f"{path}: landmark '{entry['name']}' has no valid 'position' [x, y, z] or null")
        names.append(entry["name"])
        positions.append(position)
    return names, to_ras_mm(np.asarray(positions, dtype=np.float64), system, mm_per_unit)


def h3de_json_text(names: list[str], positions: np.ndarray, presence: np.ndarray | None) -> str:
    """The ``.json`` text of (L, 3) RAS mm ``positions`` (NaN rows written as ``null``)."""
    entries = [
        {
            "name": name,
            "position": None if np.isnan(xyz).any() else [float(v) for v in xyz],
            "presence": None if presence is None else float(presence[i]),
        }
        for i, (name, xyz) in enumerate(zip(names, positions, strict=True))
    ]
    doc = {"format": FORMAT, "version": VERSION, "coordinate_system": "RAS", "units": "mm", "landmarks": entries}
    return json.dumps(doc, indent=2) + "\n"
