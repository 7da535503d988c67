"""MML: the mandibular molar landmark CT dataset on which H3DE-Net (and YOLOL before it) was evaluated.

Layout as shipped (``mmld_dataset`` of the download linked from ECNUACRush/H3DE-Net and ithet1007/mmld_code;
sources and reasoning in ``docs/datasets.md``): ``train/``, ``val/`` and ``test/`` (458/100/100 cases),
each holding per case

- ``<id>_volume.nrrd``: the CT, read by the reference code with ``nrrd.read`` (pynrrd, Fortran order: the
  array's axes are the NRRD's axes in file order). Its header carries no spacing and no orientation;
- ``<id>_label.npy``: (14, 3) voxel indices into that array (``img[i, j, k]``), 0-based; an absent
  landmark is a row of large negative values (the reference skips rows whose mean is below -100);
- ``<id>_spacing.npy``: (3,) mm per voxel along the same axes (the reference multiplies index errors by it).

The landmarks are named as in the reference's result table: ``L0``, ``La`` .. ``Lf``, ``R0``, ``Ra`` ..
``Rf`` (second and third molars, left and right), with the mirrored pairs ``L0:R0`` .. ``Lf:Rf``.

World frame: a volume whose NRRD header has no ``space directions`` (the shipped files) gets a detached
header ``images/<id>.nhdr`` under the output folder (:mod:`.nrrd_geometry`): it reads the original voxels
and places them the way ITK and 3D Slicer place an NRRD without orientation, identity directions in LPS,
origin 0, with the spacing file's spacing. A landmark's RAS mm is then that header's affine applied to its
indices, and errors in mm equal the reference's (indices difference times spacing). That LPS labelling
is assumed (array axis 0 toward the patient's left, axis 1 posterior, axis 2 superior): the converter
reports cases whose L* and R* landmarks do not lie apart along world x, where the left/right flip of
training (``augment.flip_prob``) would not mirror the anatomy. A volume whose header does give its
geometry (``space``, ``space directions``, ``space origin``) is used as it is, and the spacing file is only
compared with it. Splits are the folders' unless ``split_fractions`` is given. ``SRC`` is the folder
holding ``train/``, ``val/``, ``test/`` (or its parent holding ``mmld_dataset/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h3de.data.converters.nrrd_geometry import has_geometry, read_nrrd_fields, write_geometry_header
from h3de.data.images import ImageHeader, read_header
from h3de.data.importer import (
    ImportReport,
    SourceCase,
    assign_splits,
    check_output_folder,
    check_split_fractions,
    write_dataset,
)
from h3de.errors import DataError

__all__ = ["convert_mml", "MML_NAMES", "MML_MIRRORED_PAIRS"]

MML_NAMES = ("L0", "La", "Lb", "Lc", "Ld", "Le", "Lf", "R0", "Ra", "Rb", "Rc", "Rd", "Re", "Rf")
MML_MIRRORED_PAIRS = tuple((f"L{s}", f"R{s}") for s in "0abcdef")
_SPLIT_FOLDERS = ("train", "val", "test")
_ABSENT_BELOW = -100.0  # a row whose mean is below this is an absent landmark, as in the reference code


@dataclass(frozen=True)
class _Found:
    """One case as read, before anything is written."""

    id: str
    split: str
    volume: Path
    label: Path
    voxels: np.ndarray  # (14, 3) indices, NaN rows absent
    spacing: np.ndarray | None  # (3,) mm, None without a spacing file
    fields: dict  # the NRRD header
    header: ImageHeader | None  # the NRRD's own geometry, None when it has none


def convert_mml(
    src: str | os.PathLike, out: str | os.PathLike, split_fractions: Sequence[float] | None = None, seed: int = 0
) -> ImportReport:
    """Write the manifest of an MML download under ``out``.

    Args:
        src: the ``mmld_dataset`` folder (or its parent).
        out: output folder, new or empty: ``dataset.json``, ``landmarks/``, and ``images/<id>.nhdr`` for
            volumes without geometry.
        split_fractions: draw (train, val, test) splits from ``seed`` instead of using the folders.
        seed: seed of that draw.

    Raises:
        DataError: no split folder or no case; a label file that is not a (14, 3) array; a spacing file
            that is not 3 positive numbers, or missing where the NRRD has no geometry; an unreadable NRRD;
            a non-empty ``out``. Every file is checked before anything is written.
        ValueError: bad split fractions or seed.
    """
    if split_fractions is not None:
        check_split_fractions(split_fractions)
    out = check_output_folder(out)
    root = _root(Path(src))
    found, unpaired_images, unpaired_labels = [], [], []
    for split in _SPLIT_FOLDERS:
        folder = root / split
        if not folder.is_dir():
            continue
        volumes = {p.name[: -len("_volume.nrrd")]: p for p in sorted(folder.glob("*_volume.nrrd"))}
        labels = {p.name[: -len("_label.npy")]: p for p in sorted(folder.glob("*_label.npy"))}
        unpaired_images += [volumes[i] for i in sorted(set(volumes) - set(labels))]
        unpaired_labels += [labels[i] for i in sorted(set(labels) - set(volumes))]
        found += [_read_case(i, split, volumes[i], labels[i]) for i in sorted(set(volumes) & set(labels))]
    if not found:
        raise DataError(f"{root}: no case (<id>_volume.nrrd with <id>_label.npy) in train/, val/ or test/")
    created = not out.exists()
    try:
        cases, warnings = _source_cases(found, out)
        cases, splits = assign_splits(cases, split_fractions, seed)
        description = f"MML mandibular molar landmarks, converted by h3de data convert mml from {root}"
        extra = {"convert": {"kind": "mml", "source": str(root), "splits": splits}}
        manifest, written = write_dataset(out, cases, MML_NAMES, MML_MIRRORED_PAIRS, "mml", description, extra)
    except BaseException:
        _remove_output(out, created)
        raise
    warnings += _side_warnings(cases)
    return ImportReport(manifest, tuple(warnings + written), tuple(unpaired_images), tuple(unpaired_labels), splits)


def _root(src: Path) -> Path:
    """The folder holding the split folders: ``src`` or ``src/mmld_dataset``."""
    for root in (src, src / "mmld_dataset"):
        if any((root / s).is_dir() for s in _SPLIT_FOLDERS):
            return root.resolve()
    raise DataError(f"{src}: no train/, val/ or test/ folder (the MML layout: mmld_dataset/{{train,val,test}})")


def _read_case(case_id: str, split: str, volume: Path, label: Path) -> _Found:
    """Read and check one case's files (nothing written)."""
    fields = read_nrrd_fields(volume)
    header = read_header(volume) if has_geometry(fields) else None
    spacing_file = volume.parent / f"{case_id}_spacing.npy"
    spacing = _spacing(spacing_file) if spacing_file.is_file() else None
    if header is None and spacing is None:
        raise DataError(
            f"{spacing_file}: not found, and {volume.name} has no 'space directions': the voxel spacing of "
            f"case '{case_id}' is unknown"
        )
    return _Found(case_id, split, volume, label, _voxels(label), spacing, fields, header)


def _voxels(path: Path) -> np.ndarray:
    """(14, 3) float64 voxel indices of a label file; absent rows NaN."""
    voxels = _load(path, "label array")
    if voxels.shape != (len(MML_NAMES), 3) or not np.issubdtype(voxels.dtype, np.number):
        raise DataError(
            f"{path}: expected a ({len(MML_NAMES)}, 3) array of voxel indices (one row per landmark "
            f"{', '.join(MML_NAMES)}), got {voxels.dtype} {voxels.shape}"
        )
    voxels = voxels.astype(np.float64)
    absent = ~np.isfinite(voxels).all(axis=1) | (np.nan_to_num(voxels).mean(axis=1) < _ABSENT_BELOW)
    voxels[absent] = np.nan
    return voxels


def _spacing(path: Path) -> np.ndarray:
    """(3,) positive mm of a spacing file."""
    spacing = _load(path, "spacing array")
    if spacing.size != 3 or not np.issubdtype(spacing.dtype, np.number):
        raise DataError(f"{path}: expected 3 voxel spacings in mm, got {spacing.dtype} {spacing.shape}")
    spacing = spacing.astype(np.float64).reshape(3)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise DataError(f"{path}: voxel spacings must be positive and finite, got {spacing.tolist()}")
    return spacing


def _load(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the {what} ({e})") from None


def _source_cases(found: Sequence[_Found], out: Path) -> tuple[list[SourceCase], list[str]]:
    """The cases with their images' geometry (writing ``images/<id>.nhdr`` where needed), and warnings."""
    cases, warnings = [], []
    for case in found:
        image, header = case.volume, case.header
        if header is None:
            image = out / "images" / f"{case.id}.nhdr"
            write_geometry_header(image, case.volume, case.fields, case.spacing)
            header = read_header(image)
        elif (warning := _spacing_disagreement(case, header)) is not None:
            warnings.append(warning)
        world = case.voxels @ header.affine[:3, :3].T + header.affine[:3, 3]  # NaN rows stay NaN
        cases.append(SourceCase(case.id, image, header, MML_NAMES, world, case.label, case.split))
    return cases, warnings


def _spacing_disagreement(case: _Found, header: ImageHeader) -> str | None:
    """A warning when a volume with its own geometry has no spacing file or one that disagrees."""
    name = f"{case.id}_spacing.npy"
    if case.spacing is None:
        return f"case '{case.id}': no spacing file {name}; the NRRD header's spacing is used unchecked"
    from_header = np.linalg.norm(header.affine[:3, :3], axis=0)
    if np.allclose(case.spacing, from_header, rtol=1e-3, atol=1e-4):
        return None
    hint = " (in reversed axis order)" if np.allclose(case.spacing[::-1], from_header, rtol=1e-3) else ""
    return (
        f"case '{case.id}': {name} holds spacing {np.round(case.spacing, 4).tolist()} mm{hint} but the NRRD "
        f"header {np.round(from_header, 4).tolist()} mm; the header's is used"
    )


def _side_warnings(cases: Sequence[SourceCase]) -> list[str]:
    """Warnings for cases whose left (L*) and right (R*) landmarks do not lie apart along world x."""
    left = [MML_NAMES.index(a) for a, _ in MML_MIRRORED_PAIRS]
    right = [MML_NAMES.index(b) for _, b in MML_MIRRORED_PAIRS]
    across, reversed_ = [], []
    for case in cases:
        both = ~np.isnan(case.positions[left]).any(axis=1) & ~np.isnan(case.positions[right]).any(axis=1)
        if not both.any():
            continue
        apart = (case.positions[right][both] - case.positions[left][both]).mean(axis=0)  # (3,) mm, R - L
        axis = int(np.argmax(np.abs(apart)))
        if axis != 0:
            across.append(f"{case.id} ({'xyz'[axis]})")
        elif apart[0] < 0:
            reversed_.append(case.id)
    lines = []
    if across:
        lines.append(
            f"{len(across)} cases have their L* and R* landmarks apart mainly along another world axis than x "
            f"({_first(across)}): the left/right flip of training mirrors along x, so set augment.flip_prob to "
            "0 for these images"
        )
    if reversed_:
        lines.append(
            f"{len(reversed_)} cases have their R* landmarks on the patient's left of the L* ones (smaller RAS x; "
            f"{_first(reversed_)}): their left-right axis may be reversed (without NRRD geometry, array axis 0 is "
            "assumed to point to the patient's left)"
        )
    return lines


def _first(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _remove_output(out: Path, created: bool) -> None:
    """Remove what a failed conversion wrote into the (new or empty) output folder."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir() if out.is_dir() else ():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
