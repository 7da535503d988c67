"""VerSe: vertebra centroids in spine CT (VerSe'19 and VerSe'20, anjany/verse), the restructured release.

Layout of each split folder (``01_training``, ``02_validation``, ``03_test``, or the downloads'
``dataset-verse19training`` ...)::

    rawdata/sub-<id>/sub-<id>[_<entity>...]_ct.nii.gz
    derivatives/sub-<id>/sub-<id>[_<entity>...]_seg-subreg_ctd.json     (beside _seg-vert_msk.nii.gz)

A centroid file is a JSON list: ``{"direction": ["P", "I", "R"]}`` (nibabel axis codes: the direction in
which each axis increases), then ``{"label": n, "X": x, "Y": y, "Z": z}`` per vertebra. As the dataset's
README and notebook say, the centroids are voxel coordinates "in the same orientation and spacing as the
image": X, Y, Z run along the axes of the image's array reoriented to ``direction`` (nibabel's
``apply_orientation``: a flipped axis reads index ``i`` as ``size - 1 - i``). When ``direction`` is the
image's own orientation, as in the files we know of, they are the array's indices and the world position
is simply the image affine applied to them. (VerSe's own ``reorient_centroids_to`` flips with ``size - i``,
one voxel from ``apply_orientation``'s grid; h3de follows the array.) Centroids with NaN are skipped.

Labels: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 27 coccyx (both unlabelled in VerSe), 28 T13.
The manifest lists the vertebrae found in any file, top to bottom (T13 after T12); a vertebra outside a
scan's field of view is absent (NaN) there. A centroid file is paired with the ``*_ct.nii[.gz]`` outside
``derivatives/`` of the same name entities (``seg-*`` dropped); the case id is that name
(``sub-verse004``, ``sub-gl003_dir-ax``). The split of a case is the split folder it lies in (a folder
name with ``train``, ``valid`` or ``test``) unless ``split_fractions`` is given or a case has none.
Vertebrae have no mirrored pairs. The MICCAI-challenge annotation format (without ``direction``) is
refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nibabel.orientations import io_orientation

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

__all__ = ["convert_verse", "VERSE_LABELS"]

VERSE_LABELS = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 7)},
    26: "Sacrum",
    27: "Cocc",
    28: "T13",
}
_TOP_TO_BOTTOM = (*range(1, 20), 28, *range(20, 28))  # T13 follows T12
_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
_SPLIT_WORDS = (("train", "train"), ("valid", "val"), ("test", "test"))


def convert_verse(
    src: str | os.PathLike, out: str | os.PathLike, split_fractions: Sequence[float] | None = None, seed: int = 0
) -> ImportReport:
    """Write the manifest of a VerSe download (one or several split folders) under ``out``.

    Args:
        src: a folder holding split folders, or one split folder (with ``rawdata/`` and ``derivatives/``).
        out: output folder, new or empty.
        split_fractions: draw (train, val, test) splits from ``seed`` instead of using the split folders.
        seed: seed of that draw.

    Raises:
        DataError: no centroid file or none with an image, a malformed centroid file (no ``direction``,
            bad labels or coordinates), two images of one name, a non-empty ``out``.
        ValueError: bad split fractions or seed.
    """
    if split_fractions is not None:
        check_split_fractions(split_fractions)
    out = check_output_folder(out)
    root = Path(src).resolve()
    images = _images(root)
    centroids = sorted(p for p in root.rglob("*_ctd.json") if not p.name.startswith("."))
    if not centroids:
        raise DataError(f"{root}: no centroid file (derivatives/sub-*/*_ctd.json, the VerSe layout)")
    cases, warnings, unpaired = [], [], []
    for path in centroids:
        case_id = "_".join(p for p in path.name[: -len("_ctd.json")].split("_") if not p.startswith("seg-"))
        if case_id not in images:
            unpaired.append(path)
            continue
        header = read_header(images[case_id])
        doc = _load(path)
        labels, voxels, skipped = _read_centroids(doc, path)
        if skipped:
            warnings.append(f"{path.name}: labels {skipped} are not vertebrae 1-28, skipped")
        voxels = _voxels_in_image(voxels, _direction(doc, path), header)
        world = voxels @ header.affine[:3, :3].T + header.affine[:3, 3]
        names = tuple(VERSE_LABELS[label] for label in labels)
        cases.append(SourceCase(case_id, images[case_id], header, names, world, path, _split_of(path, root)))
    if not cases:
        raise DataError(f"{root}: no centroid file has an image *_ct.nii.gz of the same name ({len(centroids)} files)")
    found = {n for c in cases for n in c.names}
    names = tuple(VERSE_LABELS[i] for i in _TOP_TO_BOTTOM if VERSE_LABELS[i] in found)
    cases, splits = assign_splits(cases, split_fractions, seed)
    description = f"VerSe vertebra centroids, converted by h3de data convert verse from {root}"
    extra = {"convert": {"kind": "verse", "source": str(root), "splits": splits}}
    manifest, written = write_dataset(out, cases, names, (), "verse", description, extra)
    unpaired_images = tuple(sorted(set(images.values()) - {c.image for c in cases}))
    return ImportReport(manifest, tuple(warnings + written), unpaired_images, tuple(unpaired), splits)


def _images(root: Path) -> dict[str, Path]:
    """Image name without ``_ct.nii[.gz]`` -> the CT, for every CT outside ``derivatives/``."""
    images: dict[str, Path] = {}
    for path in sorted(root.rglob("*_ct.nii*")):
        if not path.name.endswith((".nii", ".nii.gz")) or "derivatives" in path.relative_to(root).parts:
            continue
        key = path.name[: path.name.rindex("_ct.nii")]
        if key in images:
            raise DataError(f"two images of case '{key}': {images[key]} and {path}")
        images[key] = path
    return images


def _load(path: Path) -> list:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the centroid JSON ({e})") from None
    if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
        raise DataError(f"{path}: a VerSe centroid file is a JSON list of objects")
    return doc


def _direction(doc: list, path: Path) -> tuple[str, str, str]:
    """The axis codes of the centroid file's ``direction`` entry."""
    codes = next((item["direction"] for item in doc if "direction" in item), None)
    if codes is None:
        raise DataError(
            f"{path}: no 'direction' entry; only the restructured VerSe annotations (with the axis codes of the "
            "centroids' voxel grid) are supported, not the MICCAI-challenge format"
        )
    valid = isinstance(codes, list) and len(codes) == 3 and all(c in _AXES for c in codes)
    if not valid or len({_AXES[c][0] for c in codes}) != 3:
        raise DataError(f"{path}: 'direction' {codes} is not three axis codes of R/L, A/P, S/I")
    return tuple(codes)


def _read_centroids(doc: list, path: Path) -> tuple[list[int], np.ndarray, list]:
    """Vertebra labels, their (N, 3) voxel coordinates, and the labels skipped as not vertebrae 1-28."""
    labels, voxels, skipped = [], [], []
    for item in doc:
        if "direction" in item:
            continue
        label, xyz = item.get("label"), [item.get(k) for k in ("X", "Y", "Z")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xyz):
            if any(isinstance(v, str) and v.lower() == "nan" for v in xyz):
                continue  # VerSe skips NaN centroids
            raise DataError(f"{path}: centroid {item} has no numeric X, Y, Z")
        if any(math.isnan(v) for v in xyz):
            continue
        if not isinstance(label, int) or isinstance(label, bool) or label not in VERSE_LABELS:
            skipped.append(label)
            continue
        if label in labels:
            raise DataError(f"{path}: vertebra label {label} appears twice")
        labels.append(label)
        voxels.append(xyz)
    return labels, np.asarray(voxels, dtype=np.float64).reshape(-1, 3), skipped


def _voxels_in_image(coords: np.ndarray, direction: Sequence[str], header: ImageHeader) -> np.ndarray:
    """(N, 3) indices into the image's array of (N, 3) coordinates on its grid reoriented to ``direction``."""
    image_axes = io_orientation(header.affine)  # (3, 2): per array axis, (world axis, +1 or -1)
    voxels = np.empty_like(coords)
    for k, code in enumerate(direction):
        world_axis, sign = _AXES[code]
        j = int(np.flatnonzero(image_axes[:, 0] == world_axis)[0])
        same = image_axes[j, 1] == sign
        voxels[:, j] = coords[:, k] if same else header.shape[j] - 1 - coords[:, k]
    return voxels


def _split_of(path: Path, root: Path) -> str | None:
    """The split named by the first folder (from ``root`` down, then ``root`` itself) with a split word."""
    for folder in (*path.relative_to(root).parts[:-1], root.name):
        for word, split in _SPLIT_WORDS:
            if word in folder.lower():
                return split
    return None
