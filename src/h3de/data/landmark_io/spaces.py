"""Coordinate systems, length units and coordinate cells shared by the landmark formats.

A file declares its coordinate system (RAS or LPS: the sign of the first two world axes) and its
length unit (mm, m or um); :func:`to_ras_mm` turns its positions into the RAS millimetres used
everywhere in h3de. Every refusal is a :class:`~h3de.errors.DataError` naming the file and the value.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from h3de.errors import DataError

__all__ = [
    "COORDINATE_SYSTEMS",
    "MM_PER_UNIT",
    "parse_system",
    "parse_units",
    "to_ras_mm",
    "parse_xyz",
    "is_xyz",
    "presence_note",
    "is_presence_note",
]

COORDINATE_SYSTEMS = ("RAS", "LPS")
MM_PER_UNIT = {"mm": 1.0, "m": 1000.0, "um": 1e-3, "µm": 1e-3, "μm": 1e-3}  # micro sign and Greek mu
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_PRESENCE_NOTE = re.compile(r"presence \d+(\.\d+)?")


def parse_system(path: Path, value: object, what: str = "coordinate system") -> str:
    """``value`` as "RAS" or "LPS" (any case), else a DataError naming ``path``, ``what`` and the value."""
    system = str(value).strip().upper()
    if system not in COORDINATE_SYSTEMS:
        raise DataError(f"{path}: unknown {what} '{value}' (expected RAS or LPS)")
    return system


def parse_units(path: Path, value: object, what: str = "units") -> float:
    """Millimetres per unit of ``value`` (mm, m, um or µm), else a DataError naming ``path`` and the value."""
    unit = str(value).strip()
    scale = MM_PER_UNIT.get(unit.lower())
    if scale is None:
        raise DataError(f"{path}: unknown {what} '{value}' (expected mm, m or um)")
    return scale


def to_ras_mm(positions: np.ndarray, system: str, mm_per_unit: float = 1.0) -> np.ndarray:
    """(L, 3) positions in ``system`` and a unit of ``mm_per_unit`` mm -> (L, 3) float64 RAS mm (NaN rows stay)."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3) * mm_per_unit
    return positions * _LPS_TO_RAS if system == "LPS" else positions


def parse_xyz(path: Path, where: str, cells: list[str]) -> list[float]:
    """Three text cells as [x, y, z]; all three empty or ``nan`` make an absent landmark (NaN row).

    Raises:
        DataError: a cell that is not a number ("abc"), or some but not all cells missing or infinite.
    """
    cells = [c.strip() for c in cells]
    if all(c == "" or c.lower() == "nan" for c in cells):
        return [math.nan] * 3
    values = []
    for cell in cells:
        try:
            values.append(float(cell))
        except ValueError:
            raise DataError(f"{path}: {where}: coordinate '{cell}' is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{path}: {where}: coordinates {cells} are partly missing or infinite")
    return values


def presence_note(presence: float) -> str:
    """The point description that carries a presence probability in the Slicer formats."""
    return f"presence {presence:.4f}"


def is_presence_note(text: str) -> bool:
    """Whether ``text`` is a :func:`presence_note` (never a landmark name)."""
    return _PRESENCE_NOTE.fullmatch(text.strip()) is not None


def is_xyz(value: object) -> bool:
    """Whether a parsed JSON ``value`` is a list of three finite numbers."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
