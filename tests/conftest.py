"""Shared test fixtures: small datasets written to tmp_path (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from h3de.data.landmark_io import write_landmarks
from h3de.data.manifest import Case, Manifest, load_manifest, write_manifest

BLOB_NAMES = ["a_L", "a_R", "top", "front"]
BLOB_PAIRS = (("a_L", "a_R"),)


def blob_affine(kind: str, spacing=(3.0, 2.5, 4.0), origin=(-40.0, 30.0, -25.0)) -> np.ndarray:
    """A voxel-to-world affine: 'ras', 'lps' (flipped x, y), 'oblique' (rotated) or 'permuted' axes."""
    affine = np.eye(4)
    axes = np.diag(spacing)
    if kind == "lps":
        axes = np.diag([-spacing[0], -spacing[1], spacing[2]])
    elif kind == "oblique":
        a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        axes = rz @ rx @ np.diag(spacing)
    elif kind == "permuted":
        axes = np.array([[0, 0, -spacing[2]], [spacing[0], 0, 0], [0, -spacing[1], 0]], dtype=float)
    affine[:3, :3] = axes
    affine[:3, 3] = origin
    return affine


def write_blob_case(folder: Path, case_id: str, affine: np.ndarray, shape, voxels: np.ndarray, absent=()):
    """Image with one Gaussian blob of amplitude (i + 1) per landmark i at continuous ``voxels``[i]."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    image = np.zeros(shape, dtype=np.float32)
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    for i, v in enumerate(voxels):
        if i in absent:
            world[i] = np.nan
            continue
        image += (i + 1) * np.exp(-((grid - v) ** 2).sum(-1) / (2 * 1.2**2)).astype(np.float32)
    image_path = folder / "images" / f"{case_id}.nii.gz"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), image_path)
    landmark_path = folder / "landmarks" / f"{case_id}.mrk.json"
    write_landmarks(landmark_path, BLOB_NAMES, world)
    return image_path, landmark_path, world


@pytest.fixture
def blob_dataset(tmp_path: Path) -> Path:
    """Six blob cases (RAS, LPS, oblique, permuted affines), split 4/1/1; returns the manifest path."""
    return write_blob_dataset(tmp_path)


def write_blob_dataset(tmp_path: Path) -> Path:
    """The blob_dataset fixture's data, written into ``tmp_path`` (for fixtures of a wider scope)."""
    rng = np.random.default_rng(0)
    shape = (28, 32, 20)
    cases = []
    for i, kind in enumerate(["ras", "lps", "oblique", "permuted", "ras", "lps"]):
        centre = np.array(shape) / 2
        voxels = np.array([[-6.0, 0, 0], [6.0, 0, 0], [0, 0, 5.0], [0, 7.0, 0]]) + centre + rng.uniform(-1, 1, (4, 3))
        absent = (3,) if i == 1 else ()
        image, landmarks, _ = write_blob_case(tmp_path, f"case_{i}", blob_affine(kind), shape, voxels, absent)
        split = "train" if i < 4 else ("val" if i == 4 else "test")
        cases.append(Case(f"case_{i}", image, landmarks, split))
    manifest = Manifest(tmp_path / "dataset.json", "blobs", tuple(BLOB_NAMES), BLOB_PAIRS, tuple(cases))
    write_manifest(tmp_path / "dataset.json", manifest)
    return tmp_path / "dataset.json"


@pytest.fixture
def odd_val_dataset(blob_dataset: Path) -> Path:
    """The blob cases split 3 train / 3 val: an odd val split, which 2 processes cannot share evenly."""
    manifest = load_manifest(blob_dataset)
    splits = ["train"] * 3 + ["val"] * 3
    cases = tuple(dataclasses.replace(case, split=split) for case, split in zip(manifest.cases, splits, strict=True))
    write_manifest(blob_dataset, dataclasses.replace(manifest, cases=cases))
    return blob_dataset
