"""Landmark CSV (``.csv``): a header ``name,x,y,z`` (any order; an optional ``presence`` column; other
columns ignored) and one row per landmark; all three coordinates empty or ``nan`` = absent.

The coordinate system and unit are declared in ``# key = value`` lines before the header:
``# coordinate_system = RAS | LPS`` and ``# units = mm | m | um`` (RAS and mm when a line is absent, so a
bare ``name,x,y,z`` file is RAS mm). Other keys are refused (a misspelt key would silently mean RAS mm);
comment lines without ``=`` are free text. Written in RAS mm, with both lines.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from h3de.data.landmark_io.spaces import parse_system, parse_units, parse_xyz, to_ras_mm
from h3de.errors import DataError

__all__ = ["read_table", "table_text"]

_DECLARATIONS = ("coordinate_system", "units")
_COLUMNS = ("name", "x", "y", "z")


def read_table(path: Path, text: str) -> tuple[list[str], np.ndarray]:
    """Names and (L, 3) RAS mm positions (NaN = absent) of a landmark ``.csv`` file's text."""
    stream = io.StringIO(text)
    declared, skipped = _declarations(path, stream)
    system = parse_system(path, declared.get("coordinate_system", "RAS"), "coordinate_system")
    mm_per_unit = parse_units(path, declared.get("units", "mm"))
    reader = csv.reader(stream)
    header = [c.strip().lower() for c in next(reader)]
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: the header lacks the column(s) {', '.join(missing)} (expected name,x,y,z[,presence])")
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: the header repeats the column(s) {', '.join(repeated)}")
    at = {c: header.index(c) for c in _COLUMNS}
    names, positions = [], []
    for row in reader:
        line = skipped + reader.line_num
        if all(not c.strip() for c in row):
            continue
        if len(row) <= max(at.values()):
            raise DataError(f"{path}: line {line}: expected {len(header)} columns as in the header, got {len(row)}")
        names.append(row[at["name"]].strip())
        positions.append(parse_xyz(path, f"line {line}", [row[at[c]] for c in "xyz"]))
    return names, to_ras_mm(np.asarray(positions, dtype=np.float64), system, mm_per_unit)


def _declarations(path: Path, stream: io.StringIO) -> tuple[dict[str, str], int]:
    """The ``# key = value`` lines before the header, and how many lines precede it; ``stream`` is left at it."""
    declared, skipped = {}, 0
    while True:
        start = stream.tell()
        line = stream.readline()
        if not line:
            raise DataError(f"{path}: no header line 'name,x,y,z'")
        text = line.strip()
        if text and not text.startswith("#"):
            stream.seek(start)
            return declared, skipped
        skipped += 1
        key, equals, value = text[1:].partition("=")
        key = key.strip().lower()
        if not equals:
            continue
        if key not in _DECLARATIONS:
            known = " or ".join(_DECLARATIONS)
            raise DataError(f"{path}: line {skipped}: unknown declaration '{key}' (expected {known})")
        if key in declared:
            raise DataError(f"{path}: line {skipped}: '{key}' is declared twice")
        declared[key] = value.strip()


def table_text(names: list[str], positions: np.ndarray, presence: np.ndarray | None) -> str:
    """The ``.csv`` text of (L, 3) RAS mm ``positions`` (NaN rows written with empty coordinates)."""
    buffer = io.StringIO()
    buffer.write("# coordinate_system = RAS\n# units = mm\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_COLUMNS, *([] if presence is None else ["presence"])])
    for i, (name, xyz) in enumerate(zip(names, positions, strict=True)):
        cells = ["", "", ""] if np.isnan(xyz).any() else [repr(float(v)) for v in xyz]
        writer.writerow([name, *cells, *([] if presence is None else [f"{float(presence[i]):.6f}"])])
    return buffer.getvalue()
