"""Converters of public benchmarks (MML, AFIDs, VerSe) on small fixtures written in each dataset's layout.

The expected world positions are computed by hand from the fixtures' affines, not by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from h3de.cli import main
from h3de.data.converters import convert_afids, convert_mml, convert_verse
from h3de.errors import DataError


def _volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)


def _nifti(path: Path, affine: np.ndarray, shape) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_volume(shape), affine), path)


def _landmarks(manifest, case_id: str) -> np.ndarray:
    return manifest.read_case_landmarks(next(c for c in manifest.cases if c.id == case_id))


# ----------------------------------------------------------------------------- MML

MML_SHAPE = (8, 9, 10)
MML_DIRECTIONS = np.diag([0.5, 0.6, 0.7])  # rows: the LPS step of one voxel along each array axis
MML_ORIGIN = np.array([10.0, 20.0, 30.0])  # LPS


def _mml_case(folder: Path, case_id: str, label: np.ndarray, spacing=(0.5, 0.6, 0.7)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "space": "left-posterior-superior",
        "space directions": MML_DIRECTIONS,
        "space origin": MML_ORIGIN,
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(folder / f"{case_id}_volume.nrrd"), _volume(MML_SHAPE), header)
    np.save(folder / f"{case_id}_label.npy", label)
    if spacing is not None:
        np.save(folder / f"{case_id}_spacing.npy", np.asarray(spacing))


def _mml_label(seed: int) -> np.ndarray:
    label = np.random.default_rng(seed).uniform(0, 7, (14, 3))
    label[0] = [2.0, 3.0, 4.0]
    return label


@pytest.fixture
def mml(tmp_path: Path) -> Path:
    root = tmp_path / "download" / "mmld_dataset"
    _mml_case(root / "train", "001", _mml_label(1))
    train2 = _mml_label(2)
    train2[5] = [-1000.0, -1000.0, -1000.0]  # absent
    _mml_case(root / "train", "002", train2, spacing=(0.7, 0.6, 0.5))  # reversed: disagrees with the header
    _mml_case(root / "val", "003", _mml_label(3), spacing=None)
    _mml_case(root / "test", "004", _mml_label(4))
    np.save(root / "test" / "005_label.npy", _mml_label(5))  # no volume
    return tmp_path / "download"


def test_mml_voxels_become_world_mm_through_the_nrrd_affine(mml, tmp_path):
    report = convert_mml(mml, tmp_path / "out")
    manifest = report.manifest
    assert manifest.landmark_names == tuple(f"mml_{i:02d}" for i in range(1, 15))
    assert manifest.mirrored_pairs == ()
    assert {c.id: c.split for c in manifest.cases} == {"001": "train", "002": "train", "003": "val", "004": "test"}
    # voxel (2, 3, 4): LPS (10 + 2*0.5, 20 + 3*0.6, 30 + 4*0.7) = (11, 21.8, 32.8) -> RAS (-11, -21.8, 32.8)
    np.testing.assert_allclose(_landmarks(manifest, "001")[0], [-11.0, -21.8, 32.8])
    second = _landmarks(manifest, "002")
    assert np.isnan(second[5]).all() and np.isfinite(np.delete(second, 5, axis=0)).all()
    assert [p.name for p in report.unpaired_landmarks] == ["005_label.npy"]
    spacing = next(line for line in report.warnings if "'002'" in line)
    assert "[0.7, 0.6, 0.5]" in spacing and "reversed axis order" in spacing
    assert any("'003'" in line and "no spacing file" in line for line in report.warnings)
    assert report.splits == "the source's folders"


def test_mml_splits_can_be_drawn_and_bad_labels_are_refused(mml, tmp_path):
    report = convert_mml(mml / "mmld_dataset", tmp_path / "drawn", split_fractions=(0.5, 0.25, 0.25), seed=0)
    assert sorted(c.split for c in report.manifest.cases) == ["test", "train", "train", "val"]
    np.save(mml / "mmld_dataset" / "val" / "003_label.npy", np.zeros((14, 2)))
    with pytest.raises(DataError, match="003_label.npy: expected an"):
        convert_mml(mml, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="no train/, val/ or test/"):
        convert_mml(tmp_path / "nowhere", tmp_path / "bad")


# ----------------------------------------------------------------------------- AFIDs

AFIDS_AFFINE = np.array([[1.0, 0, 0, -20.0], [0, 1.0, 0, -20.0], [0, 0, 1.0, -20.0], [0, 0, 0, 1]])
AFIDS = [(1, "AC", [0.0, 2.0, -1.0]), (2, "PC", [0.0, -8.0, -1.0]), (6, "R superior LMS", [6.0, -10.0, -5.0])]
AFIDS += [(7, "L superior LMS", [-6.0, -10.0, -5.0])]


def _fcsv(path: Path, rows, system: str = "0") -> None:
    """An AFIDs fiducial file: the AFID number in ``label``, the name in ``desc``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Markups fiducial file version = 4.6",
        f"# CoordinateSystem = {system}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for number, name, (x, y, z) in rows:
        lines.append(
            f"vtkMRMLMarkupsFiducialNode_{number},{x},{y},{z},0,0,0,1,1,1,1,{number},{name},vtkMRMLScalarVolumeNode1"
        )
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def afids(tmp_path: Path) -> Path:
    root = tmp_path / "ds004470"
    truth = root / "derivatives" / "afids_groundtruth"
    _nifti(root / "sub-C001" / "anat" / "sub-C001_T1w.nii.gz", AFIDS_AFFINE, (40, 40, 40))
    _fcsv(truth / "sub-C001" / "anat" / "sub-C001_space-T1w_desc-groundtruth_afids.fcsv", AFIDS)
    _nifti(root / "sub-C002" / "ses-01" / "anat" / "sub-C002_ses-01_T1w.nii.gz", AFIDS_AFFINE, (40, 40, 40))
    lps = [(n, name, [-x, -y, z]) for n, name, (x, y, z) in AFIDS if name != "PC"]  # PC not placed
    _fcsv(truth / "sub-C002" / "ses-01" / "anat" / "sub-C002_ses-01_space-T1w_desc-groundtruth_afids.fcsv", lps, "1")
    rater = root / "derivatives" / "afids_rater" / "sub-C001" / "anat" / "sub-C001_space-T1w_desc-rater01_afids.fcsv"
    _fcsv(rater, [(1, "AC", [50.0, 50.0, 50.0])])  # not the ground truth: ignored
    _fcsv(truth / "sub-C003" / "anat" / "sub-C003_space-T1w_desc-groundtruth_afids.fcsv", AFIDS)  # no image
    _nifti(root / "derivatives" / "other" / "sub-C003" / "anat" / "sub-C003_T1w.nii.gz", AFIDS_AFFINE, (4, 4, 4))
    return root


def test_afids_names_come_from_desc_and_pairs_from_the_sides(afids, tmp_path):
    report = convert_afids(afids, tmp_path / "out", split_fractions=(0.5, 0.5, 0.0), seed=0)
    manifest = report.manifest
    assert manifest.landmark_names == ("AC", "PC", "R superior LMS", "L superior LMS")
    assert manifest.mirrored_pairs == (("L superior LMS", "R superior LMS"),)
    assert sorted(c.id for c in manifest.cases) == ["sub-C001", "sub-C002_ses-01"]
    assert sorted(c.split for c in manifest.cases) == ["train", "val"]
    expected = np.array([xyz for _, _, xyz in AFIDS])
    np.testing.assert_allclose(_landmarks(manifest, "sub-C001"), expected)
    second = _landmarks(manifest, "sub-C002_ses-01")  # LPS in the file: the same RAS points
    np.testing.assert_allclose(np.delete(second, 1, axis=0), np.delete(expected, 1, axis=0))
    assert np.isnan(second[1]).all()
    assert [p.name for p in report.unpaired_landmarks] == ["sub-C003_space-T1w_desc-groundtruth_afids.fcsv"]
    assert any(line.startswith("landmark 'PC' is only in 1 of 2") for line in report.warnings)
    images = {c.id: c.image.resolve() for c in manifest.cases}
    assert images["sub-C002_ses-01"] == (afids / "sub-C002/ses-01/anat/sub-C002_ses-01_T1w.nii.gz").resolve()


def test_afids_without_ground_truth_is_an_error(tmp_path):
    _fcsv(tmp_path / "bids" / "derivatives" / "afids_rater" / "sub-1_desc-rater01_afids.fcsv", AFIDS)
    with pytest.raises(DataError, match="desc-groundtruth_afids.fcsv.*found 1 other"):
        convert_afids(tmp_path / "bids", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- VerSe

# image stored as P, I, R: axis 0 steps -1 mm in y, axis 1 -1 mm in z, axis 2 +2 mm in x
PIR_AFFINE = np.array([[0, 0, 2.0, -30.0], [-1.0, 0, 0, 50.0], [0, -1.0, 0, 40.0], [0, 0, 0, 1]])
RAS_AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _ctd(path: Path, direction, centroids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    items = [{"direction": direction}] + [{"label": n, "X": x, "Y": y, "Z": z} for n, x, y, z in centroids]
    path.write_text(json.dumps(items).replace('"NaN"', "NaN"))


@pytest.fixture
def verse(tmp_path: Path) -> Path:
    root = tmp_path / "verse"
    train, val, test = root / "01_training", root / "02_validation", root / "03_test"
    _nifti(train / "rawdata" / "sub-verse004" / "sub-verse004_ct.nii.gz", PIR_AFFINE, (60, 80, 30))
    _ctd(
        train / "derivatives" / "sub-verse004" / "sub-verse004_seg-subreg_ctd.json",
        ["P", "I", "R"],
        [(19, 10.0, 20.0, 5.0), (20, 12.0, 30.0, 5.0), (28, 11.0, 25.0, 5.0), (41, 1.0, 1.0, 1.0)],
    )
    _nifti(val / "rawdata" / "sub-verse010" / "sub-verse010_ct.nii.gz", RAS_AFFINE, (40, 30, 20))
    _ctd(
        val / "derivatives" / "sub-verse010" / "sub-verse010_seg-subreg_ctd.json", ["L", "P", "S"], [(8, 5.0, 7.0, 3.0)]
    )
    _nifti(test / "rawdata" / "sub-gl003" / "sub-gl003_dir-ax_ct.nii.gz", RAS_AFFINE, (40, 30, 20))
    _ctd(
        test / "derivatives" / "sub-gl003" / "sub-gl003_dir-ax_seg-subreg_ctd.json",
        ["R", "A", "S"],
        [(20, 4.0, 5.0, 6.0), (21, "NaN", "NaN", "NaN")],
    )
    _ctd(test / "derivatives" / "sub-gl999" / "sub-gl999_seg-subreg_ctd.json", ["R", "A", "S"], [(20, 1, 1, 1)])
    return root


def test_verse_centroids_follow_the_direction_codes(verse, tmp_path):
    report = convert_verse(verse, tmp_path / "out")
    manifest = report.manifest
    assert manifest.landmark_names == ("T1", "T12", "T13", "L1")  # top to bottom, only those found
    assert {c.id: c.split for c in manifest.cases} == {
        "sub-verse004": "train",
        "sub-verse010": "val",
        "sub-gl003_dir-ax": "test",
    }
    # PIR image, PIR centroids: world = origin + X*(0,-1,0) + Y*(0,0,-1) + Z*(2,0,0)
    first = _landmarks(manifest, "sub-verse004")
    np.testing.assert_allclose(first[1], [-30 + 10.0, 50 - 10.0, 40 - 20.0])  # T12 at (10, 20, 5)
    np.testing.assert_allclose(first[3], [-20.0, 50 - 12.0, 40 - 30.0])  # L1 at (12, 30, 5)
    np.testing.assert_allclose(first[2], [-20.0, 50 - 11.0, 40 - 25.0])  # T13 (label 28)
    assert np.isnan(first[0]).all()
    # RAS image (40, 30, 20), LPS-ordered centroids (5, 7, 3): voxel (40-1-5, 30-1-7, 3) = (34, 22, 3)
    np.testing.assert_allclose(_landmarks(manifest, "sub-verse010")[0], [34 * 1.5, 22 * 1.5, 3 * 2.0])
    third = _landmarks(manifest, "sub-gl003_dir-ax")
    np.testing.assert_allclose(third[3], [4 * 1.5, 5 * 1.5, 6 * 2.0])
    assert np.isnan(third[:3]).all()  # L2's NaN centroid is skipped: no landmark L2 at all
    assert [p.name for p in report.unpaired_landmarks] == ["sub-gl999_seg-subreg_ctd.json"]
    assert any("labels [41]" in line for line in report.warnings)
    assert manifest.mirrored_pairs == ()


def test_verse_without_direction_is_refused(verse, tmp_path):
    path = verse / "02_validation" / "derivatives" / "sub-verse010" / "sub-verse010_seg-subreg_ctd.json"
    path.write_text(json.dumps([{"label": 8, "X": 1.0, "Y": 2.0, "Z": 3.0}]))
    with pytest.raises(DataError, match="no 'direction' entry"):
        convert_verse(verse, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert(verse, tmp_path, capsys):
    assert main(["data", "convert", "verse", str(verse), "--out", str(tmp_path / "out"), "--split", "0.4,0.3,0.3"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "splits drawn with seed 0" in printed
    assert main(["data", "convert", "verse", str(verse), "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
