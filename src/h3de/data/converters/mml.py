"""MML: the mandibular molar landmark CT dataset on which H3DE-Net (and YOLOL before it) was evaluated.

Layout as shipped (the ``mmld_dataset`` folder of the download linked from ECNUACRush/H3DE-Net):
``train/``, ``val/`` and ``test/`` (458/100/100 cases), each holding per case

- ``<id>_volume.nrrd``: the CT;
- ``<id>_label.npy``: (14, 3) voxel indices of the 14 landmarks (crowns and roots of the second and third
  mandibular molars) into the NRRD's array, along its axes in file order (as ``pynrrd`` reads it by
  default); an absent landmark is a row of large negative values (the reference code tests mean < -100);
- ``<id>_spacing.npy``: (3,) mm per voxel along the same axes (the reference multiplies index errors by it).

Each landmark becomes world RAS mm through the NRRD's own affine (``space directions``, ``space origin``
and ``space``, read by :func:`h3de.data.images.read_header`); absent rows become NaN. The spacing file is
compared with the header's spacing and a disagreement is reported. The dataset ships no landmark names,
so they are ``mml_01`` .. ``mml_14`` in file order, with no mirrored pairs. Splits are the folders'
unless ``split_fractions`` is given. ``SRC`` is the folder holding ``train/``, ``val/``, ``test/`` (or its
parent holding ``mmld_dataset/``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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

__all__ = ["convert_mml"]

_SPLIT_FOLDERS = ("train", "val", "test")
_ABSENT_BELOW = -100.0  # a row whose mean is below this is an absent landmark, as in the reference code


def convert_mml(
    src: str | os.PathLike, out: str | os.PathLike, split_fractions: Sequence[float] | None = None, seed: int = 0
) -> ImportReport:
    """Write the manifest of an MML download under ``out``.

    Args:
        src: the ``mmld_dataset`` folder (or its parent).
        out: output folder, new or empty.
        split_fractions: draw (train, val, test) splits from ``seed`` instead of using the folders.
        seed: seed of that draw.

    Raises:
        DataError: no split folder or no case, a label file that is not an (L, 3) array of one L for all
            cases, an unreadable NRRD (one without an anatomical space included), a non-empty ``out``.
        ValueError: bad split fractions or seed.
    """
    if split_fractions is not None:
        check_split_fractions(split_fractions)
    out = check_output_folder(out)
    root = _root(Path(src))
    cases, warnings, unpaired_images, unpaired_labels = [], [], [], []
    for split in _SPLIT_FOLDERS:
        folder = root / split
        if not folder.is_dir():
            continue
        volumes = {p.name[: -len("_volume.nrrd")]: p for p in sorted(folder.glob("*_volume.nrrd"))}
        labels = {p.name[: -len("_label.npy")]: p for p in sorted(folder.glob("*_label.npy"))}
        unpaired_images += [volumes[i] for i in sorted(set(volumes) - set(labels))]
        unpaired_labels += [labels[i] for i in sorted(set(labels) - set(volumes))]
        for case_id in sorted(set(volumes) & set(labels)):
            header = read_header(volumes[case_id])
            positions = _world(labels[case_id], header)
            warning = _check_spacing(case_id, folder / f"{case_id}_spacing.npy", header)
            warnings += [warning] if warning else []
            names = tuple(f"mml_{i + 1:02d}" for i in range(len(positions)))
            cases.append(SourceCase(case_id, volumes[case_id], header, names, positions, labels[case_id], split))
    if not cases:
        raise DataError(f"{root}: no case (<id>_volume.nrrd with <id>_label.npy) in train/, val/ or test/")
    counts = {len(c.names) for c in cases}
    if len(counts) > 1:
        raise DataError(f"{root}: label files hold different numbers of landmarks: {sorted(counts)}")
    cases, splits = assign_splits(cases, split_fractions, seed)
    description = f"MML mandibular molar landmarks, converted by h3de data convert mml from {root}"
    extra = {"convert": {"kind": "mml", "source": str(root), "splits": splits}}
    manifest, written = write_dataset(out, cases, cases[0].names, (), "mml", description, extra)
    return ImportReport(manifest, tuple(warnings + written), tuple(unpaired_images), tuple(unpaired_labels), splits)


def _root(src: Path) -> Path:
    """The folder holding the split folders: ``src`` or ``src/mmld_dataset``."""
    for root in (src, src / "mmld_dataset"):
        if any((root / s).is_dir() for s in _SPLIT_FOLDERS):
            return root.resolve()
    raise DataError(f"{src}: no train/, val/ or test/ folder (the MML layout: mmld_dataset/{{train,val,test}})")


def _world(path: Path, header: ImageHeader) -> np.ndarray:
    """(L, 3) world RAS mm of the voxel indices in ``path``; absent rows NaN."""
    try:
        voxels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the label array ({e})") from None
    if voxels.ndim != 2 or voxels.shape[1] != 3 or not np.issubdtype(voxels.dtype, np.number):
        raise DataError(f"{path}: expected an (L, 3) array of voxel indices, got {voxels.dtype} {voxels.shape}")
    voxels = voxels.astype(np.float64)
    absent = ~np.isfinite(voxels).all(axis=1) | (np.nan_to_num(voxels).mean(axis=1) < _ABSENT_BELOW)
    world = voxels @ header.affine[:3, :3].T + header.affine[:3, 3]
    world[absent] = np.nan
    return world


def _check_spacing(case_id: str, path: Path, header: ImageHeader) -> str | None:
    """A warning when the spacing file is missing or disagrees with the NRRD header, else None."""
    if not path.is_file():
        return f"case '{case_id}': no spacing file {path.name}; the NRRD header's spacing is used unchecked"
    try:
        spacing = np.load(path, allow_pickle=False).astype(np.float64).reshape(-1)
    except (OSError, ValueError) as e:
        return f"case '{case_id}': cannot read {path.name} ({e}); the NRRD header's spacing is used unchecked"
    from_header = np.linalg.norm(header.affine[:3, :3], axis=0)
    if spacing.shape == (3,) and np.allclose(spacing, from_header, rtol=1e-3, atol=1e-4):
        return None
    hint = (
        " (in reversed axis order)" if spacing.shape == (3,) and np.allclose(spacing[::-1], from_header, 1e-3) else ""
    )
    return (
        f"case '{case_id}': {path.name} holds spacing {np.round(spacing, 4).tolist()} mm{hint} but the NRRD header "
        f"{np.round(from_header, 4).tolist()} mm; the header's is used"
    )
