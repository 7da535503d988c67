"""AFIDs: 32 anatomical fiducials of the brain on T1-weighted MRI, in BIDS layout (afids/afids-data).

Layout of each AFIDs dataset, as in the datasets' git trees (AFIDs-HCP, AFIDs-OASIS, LHSCPD = OpenNeuro
ds004471, SNSX = ds004470; sources in ``docs/datasets.md``)::

    sub-<id>/anat/sub-<id>[_acq-MP2RAGE][_run-01]_T1w.nii.gz
    derivatives/afids_groundtruth/sub-<id>/anat/sub-<id>[_acq-MP2RAGE_run-01]_space-T1w_desc-groundtruth_afids.fcsv
    derivatives/afids_rater/sub-<id>/anat/..._desc-rater01_afids.fcsv      (the raters' placements, not used)

The fiducial file's name may leave out entities of its image's name (LHSCPD: ``sub-087_space-T1w_...``
for ``sub-087_run-01_T1w.nii.gz``). A fiducial file is a 3D Slicer 4.10 ``.fcsv``, ``# Markups fiducial
file version = 4.6``, ``# CoordinateSystem = 0`` (RAS mm), whose ``label`` column holds the AFID number
(1-32) and ``desc`` its name ("AC", "PC", "R superior LMS", ...). The landmark names come from ``desc``
(``label`` where ``desc`` is empty); the positions from :func:`h3de.data.landmark_io.read_landmarks` (RAS
or LPS per the file's ``CoordinateSystem``), row by row. Every ``*_desc-groundtruth_afids.fcsv`` under
``derivatives/`` is paired with the one ``*_T1w.nii[.gz]`` outside ``derivatives/`` whose BIDS entities
(``sub``, and ``ses``, ``acq``, ``run`` where the fiducial file names them) agree; the case id is those
entities (``sub-C001_acq-MP2RAGE_run-01``, ``sub-087``). Fiducial files with no or several such images
are listed and skipped. The manifest lists the names in the files' (protocol) order. Mirrored pairs are
detected from the names (``R ...``/``L ...``, :mod:`h3de.data.mirrored`). AFIDs ships no splits: they are
drawn from the seed. ``SRC`` is one dataset's root (the folder holding ``sub-*/`` and ``derivatives/``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from h3de.data.images import read_header
from h3de.data.importer import (
    ImportReport,
    SourceCase,
    assign_splits,
    check_output_folder,
    check_split_fractions,
    choose_mirrored_pairs,
    name_disagreements,
    write_dataset,
)
from h3de.data.landmark_io import read_landmarks
from h3de.errors import DataError

__all__ = ["convert_afids"]

_GROUND_TRUTH = "_desc-groundtruth_afids.fcsv"


def convert_afids(
    src: str | os.PathLike, out: str | os.PathLike, split_fractions: Sequence[float] | None = None, seed: int = 0
) -> ImportReport:
    """Write the manifest of an AFIDs BIDS dataset under ``out``.

    Args:
        src: the BIDS dataset's root folder (holding ``sub-*/`` and ``derivatives/``).
        out: output folder, new or empty.
        split_fractions: (train, val, test) fractions of the seeded split (default 0.7, 0.15, 0.15).
        seed: seed of the split draw.

    Raises:
        DataError: no ground-truth fiducial file, none paired with an image, an unreadable file, a
            non-empty ``out``.
        ValueError: bad split fractions or seed.
    """
    if split_fractions is not None:
        check_split_fractions(split_fractions)
    out = check_output_folder(out)
    root = Path(src).resolve()
    derivatives = root / "derivatives"
    fiducials = sorted(derivatives.rglob(f"*{_GROUND_TRUTH}")) if derivatives.is_dir() else []
    if not fiducials:
        others = sorted(derivatives.rglob("*_afids.fcsv")) if derivatives.is_dir() else []
        found = f"; found {len(others)} other *_afids.fcsv (e.g. {others[0].name})" if others else ""
        raise DataError(f"{root}: no derivatives/**/*{_GROUND_TRUTH} (the AFIDs BIDS layout){found}")
    images = [
        (_entities(p.name.split(".")[0]), p)
        for p in sorted(root.rglob("*_T1w.nii*"))
        if p.name.endswith((".nii", ".nii.gz")) and "derivatives" not in p.relative_to(root).parts
    ]
    cases, warnings, unpaired = [], [], []
    for fcsv in fiducials:
        wanted = {k: v for k, v in _entities(fcsv.name[: -len(".fcsv")]).items() if k not in ("space", "desc")}
        matches = [p for entities, p in images if all(entities.get(k) == v for k, v in wanted.items())]
        if len(matches) != 1:
            unpaired.append(fcsv)
            if matches:
                listed = ", ".join(p.name for p in matches)
                warnings.append(f"{fcsv.name}: {len(matches)} T1w images match ({listed}); skipped")
            continue
        case_id = "_".join(f"{k}-{v}" for k, v in wanted.items())
        names, positions = read_landmarks(fcsv)  # names from desc: the labels are the AFID numbers
        cases.append(SourceCase(case_id, matches[0], read_header(matches[0]), names, positions, fcsv))
    if not cases:
        raise DataError(f"{root}: no ground-truth fiducial file has a T1w image ({len(fiducials)} fiducial files)")
    names = _protocol_order(cases)
    pairs, mirrored_warnings = choose_mirrored_pairs("auto", names)
    cases, splits = assign_splits(cases, split_fractions, seed)
    description = f"AFIDs anatomical fiducials, converted by h3de data convert afids from {root}"
    extra = {"convert": {"kind": "afids", "source": str(root), "splits": splits}}
    manifest, written = write_dataset(out, cases, names, pairs, "afids", description, extra)
    warnings = name_disagreements(cases, names) + mirrored_warnings + warnings + written
    return ImportReport(manifest, tuple(warnings), (), tuple(unpaired), splits)


def _protocol_order(cases: list[SourceCase]) -> tuple[str, ...]:
    """All cases' landmark names in the files' row order.

    AFIDs files list the fiducials in protocol order (labels 1-32) and leave out those not placed, so a
    name's last row over all files is its rank in the protocol (ties keep the first-seen order).
    """
    rank: dict[str, int] = {}
    for case in cases:
        for row, name in enumerate(case.names):
            rank[name] = max(rank.get(name, row), row)
    return tuple(sorted(rank, key=rank.__getitem__))


def _entities(stem: str) -> dict[str, str]:
    """BIDS entities of a file name without its extension: ``sub-01_ses-2_T1w`` -> {sub: 01, ses: 2}."""
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)
