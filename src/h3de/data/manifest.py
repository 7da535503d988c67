"""The dataset manifest (``dataset.json``): cases, splits, landmark names and mirrored pairs.

Example::

    {
      "name": "phantom",
      "landmarks": ["nose_tip", "orbit_L", "orbit_R", ...],
      "mirrored_pairs": [["orbit_L", "orbit_R"], ...],
      "cases": [
        {"id": "case_000", "image": "images/case_000.nii.gz",
         "landmarks": "landmarks/case_000.mrk.json", "split": "train"}
      ]
    }

Paths are relative to the manifest's folder. ``mirrored_pairs`` name landmarks that swap labels
under a left/right flip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h3de.data.landmark_io import read_landmarks
from h3de.errors import DataError
from h3de.io_utils import atomic_write

__all__ = ["Case", "Manifest", "load_manifest", "write_manifest", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Case:
    id: str
    image: Path  # absolute
    landmarks: Path  # absolute
    split: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    landmark_names: tuple[str, ...]
    mirrored_pairs: tuple[tuple[str, str], ...]
    cases: tuple[Case, ...]
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_landmarks(self) -> int:
        return len(self.landmark_names)

    def split(self, name: str) -> list[Case]:
        """Cases of one split ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}' (expected one of {', '.join(SPLITS)})")
        return [c for c in self.cases if c.split == name]

    def mirror_permutation(self) -> list[int]:
        """Index permutation that swaps every mirrored pair (identity elsewhere)."""
        index = {n: i for i, n in enumerate(self.landmark_names)}
        perm = list(range(self.num_landmarks))
        for left, right in self.mirrored_pairs:
            perm[index[left]], perm[index[right]] = index[right], index[left]
        return perm

    def read_case_landmarks(self, case: Case) -> np.ndarray:
        """(L, 3) RAS mm positions of ``case`` in manifest order (NaN = absent).

        Raises:
            DataError: when the file's landmark names or count disagree with the manifest.
        """
        names, positions = read_landmarks(case.landmarks)
        expected = list(self.landmark_names)
        if sorted(names) != sorted(expected):
            missing = [n for n in expected if n not in names]
            unknown = [n for n in names if n not in expected]
            raise DataError(
                f"{case.landmarks}: landmarks disagree with the manifest {self.path} "
                f"(file has {len(names)}, manifest {len(expected)}; "
                f"missing from file: {missing or 'none'}; not in manifest: {unknown or 'none'})"
            )
        order = [names.index(n) for n in expected]
        return positions[order]


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Load and validate ``dataset.json`` (structure, names, pairs, splits, that files exist).

    Raises:
        DataError: naming the manifest and the offending key or case.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: the manifest must be a JSON object")
    for key in ("landmarks", "cases"):
        if key not in doc:
            raise DataError(f"{path}: missing key '{key}'")
    names = doc["landmarks"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: 'landmarks' must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: 'landmarks' has duplicate names")
    pairs = []
    for pair in doc.get("mirrored_pairs", []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in names for p in pair) and pair[0] != pair[1]):
            raise DataError(f"{path}: mirrored pair {pair} must be two different names from 'landmarks'")
        pairs.append((pair[0], pair[1]))
    paired = [n for p in pairs for n in p]
    if len(set(paired)) != len(paired):
        raise DataError(f"{path}: a landmark appears in more than one mirrored pair")
    if not isinstance(doc["cases"], list) or not doc["cases"]:
        raise DataError(f"{path}: 'cases' must be a non-empty list")
    cases, ids = [], set()
    for i, entry in enumerate(doc["cases"]):
        where = f"{path}: case {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be an object")
        for key in ("id", "image", "landmarks", "split"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"{where} has no string '{key}'")
        if entry["id"] in ids:
            raise DataError(f"{path}: case id '{entry['id']}' appears twice")
        ids.add(entry["id"])
        if entry["split"] not in SPLITS:
            raise DataError(f"{path}: case '{entry['id']}' has split '{entry['split']}' (expected one of {SPLITS})")
        image, landmarks = path.parent / entry["image"], path.parent / entry["landmarks"]
        for what, file in (("image", image), ("landmark file", landmarks)):
            if not file.is_file():
                raise DataError(f"{path}: case '{entry['id']}': {what} not found: {file}")
        cases.append(Case(entry["id"], image, landmarks, entry["split"]))
    known = {"name", "description", "landmarks", "mirrored_pairs", "cases"}
    return Manifest(
        path=path,
        name=str(doc.get("name", path.parent.name)),
        landmark_names=tuple(names),
        mirrored_pairs=tuple(pairs),
        cases=tuple(cases),
        description=str(doc.get("description", "")),
        extra={k: v for k, v in doc.items() if k not in known},
    )


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest`` as ``dataset.json`` atomically, with paths relative to its folder."""
    path = Path(path).resolve()
    doc = {
        "name": manifest.name,
        "description": manifest.description,
        "landmarks": list(manifest.landmark_names),
        "mirrored_pairs": [list(p) for p in manifest.mirrored_pairs],
        "cases": [
            {
                "id": c.id,
                "image": os.path.relpath(c.image, path.parent),
                "landmarks": os.path.relpath(c.landmarks, path.parent),
                "split": c.split,
            }
            for c in manifest.cases
        ],
        **manifest.extra,
    }
    atomic_write(path, json.dumps(doc, indent=2) + "\n")
