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
from h3de.data.images import read_volume
from h3de.errors import DataError


def _volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)


def _nifti(path: Path, affine: np.ndarray, shape) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_volume(shape), affine), path)


def _landmarks(manifest, case_id: str) -> np.ndarray:
    return manifest.read_case_landmarks(next(c for c in manifest.cases if c.id == case_id))


# ----------------------------------------------------------------------------- MML
# As shipped (docs/datasets.md): an NRRD without spacing or orientation, read by the reference with pynrrd
# (array axes in file order); labels index that array; spacing.npy in the same axis order.

MML_SHAPE = (11, 7, 5)  # non-cubic, so an axis mix-up moves or drops a landmark
MML_SPACING = (0.4, 0.25, 1.5)  # anisotropic, so a reversed spacing changes the mm
MML_BRIGHT = (8, 2, 3)  # the voxel landmark La sits on


def _mml_volume(bright=MML_BRIGHT) -> np.ndarray:
    volume = _volume(MML_SHAPE).clip(0, 500)
    volume[bright] = 3000
    return volume


def _mml_label(left=(8.0, 3.0, 2.0), right=(2.0, 3.0, 2.0), seed=0) -> np.ndarray:
    """(14, 3) indices: L* around ``left`` (axis 0 points to the patient's left in the LPS frame), R* around
    ``right``; La on the bright voxel when ``left`` is the default."""
    rng = np.random.default_rng(seed)
    label = np.concatenate([np.add(left, rng.uniform(-1, 1, (7, 3))), np.add(right, rng.uniform(-1, 1, (7, 3)))])
    if left == (8.0, 3.0, 2.0):
        label[1] = MML_BRIGHT
    return label


def _mml_case(folder: Path, case_id: str, label: np.ndarray, spacing=MML_SPACING, header=None, bright=MML_BRIGHT):
    """One case in the shipped layout: a bare NRRD (unless ``header`` gives geometry), label and spacing."""
    folder.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(folder / f"{case_id}_volume.nrrd"), _mml_volume(bright), header or {})
    np.save(folder / f"{case_id}_label.npy", label)
    if spacing is not None:
        np.save(folder / f"{case_id}_spacing.npy", np.asarray(spacing))


@pytest.fixture
def mml(tmp_path: Path) -> Path:
    root = tmp_path / "download" / "mmld_dataset"
    _mml_case(root / "train", "0001", _mml_label())
    second = _mml_label()
    second[5] = [-1000.0, -1000.0, -1000.0]  # Le absent
    _mml_case(root / "train", "0002", second)
    _mml_case(root / "val", "0003", _mml_label())
    _mml_case(root / "test", "0004", _mml_label())
    np.save(root / "test" / "0005_label.npy", _mml_label())  # no volume
    return tmp_path / "download"


def _voxel_of(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    inverse = np.linalg.inv(affine)
    return world @ inverse[:3, :3].T + inverse[:3, 3]


def test_mml_landmark_lands_on_its_voxel_through_the_image_h3de_reads(mml, tmp_path):
    report = convert_mml(mml, tmp_path / "out")
    manifest = report.manifest
    assert manifest.landmark_names == (
        "L0",
        "La",
        "Lb",
        "Lc",
        "Ld",
        "Le",
        "Lf",
        "R0",
        "Ra",
        "Rb",
        "Rc",
        "Rd",
        "Re",
        "Rf",
    )
    assert ("La", "Ra") in manifest.mirrored_pairs and len(manifest.mirrored_pairs) == 7
    assert {c.id: c.split for c in manifest.cases} == {"0001": "train", "0002": "train", "0003": "val", "0004": "test"}
    case = next(c for c in manifest.cases if c.id == "0001")
    assert case.image.resolve() == (tmp_path / "out" / "images" / "0001.nhdr").resolve()
    volume, header = read_volume(case.image)  # the original voxels through the written geometry
    np.testing.assert_array_equal(volume, _mml_volume().astype(np.float32))
    # identity directions in LPS with the spacing file's spacing: RAS = (-0.4 i, -0.25 j, 1.5 k)
    np.testing.assert_allclose(header.affine, np.diag([-0.4, -0.25, 1.5, 1.0]))
    world = manifest.read_case_landmarks(case)
    np.testing.assert_allclose(world[1], [-8 * 0.4, -2 * 0.25, 3 * 1.5])
    voxel = np.rint(_voxel_of(world[1], header.affine)).astype(int)
    assert tuple(voxel) == MML_BRIGHT and volume[tuple(voxel)] == volume.max()
    label = np.load(mml / "mmld_dataset" / "train" / "0001_label.npy")  # errors in mm are the reference's
    reference = np.linalg.norm((label[0] - label[7]) * np.asarray(MML_SPACING))
    assert np.linalg.norm(world[0] - world[7]) == pytest.approx(reference)
    second = _landmarks(manifest, "0002")
    assert np.isnan(second[5]).all() and np.isfinite(np.delete(second, 5, axis=0)).all()
    assert [p.name for p in report.unpaired_landmarks] == ["0005_label.npy"]
    assert report.splits == "the source's folders" and report.warnings == ()
    assert sorted(p.name for p in (mml / "mmld_dataset" / "train").iterdir()) == [
        "0001_label.npy",
        "0001_spacing.npy",
        "0001_volume.nrrd",
        "0002_label.npy",
        "0002_spacing.npy",
        "0002_volume.nrrd",
    ]  # nothing written beside the sources


def test_mml_volume_with_its_own_oblique_geometry_keeps_it(tmp_path):
    # axis 0 steps along LPS y, axis 1 along -x, axis 2 along z: a permuted, flipped, anisotropic grid
    directions = np.array([[0.0, 0.4, 0.0], [-0.25, 0.0, 0.0], [0.0, 0.0, 1.5]])
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": [5.0, 6.0, 7.0]}
    root = tmp_path / "mmld_dataset"
    _mml_case(root / "train", "0001", _mml_label(), header=header)
    _mml_case(root / "val", "0002", _mml_label(), spacing=MML_SPACING[::-1], header=header)
    report = convert_mml(root, tmp_path / "out")
    case = next(c for c in report.manifest.cases if c.id == "0001")
    assert case.image.resolve() == (root / "train" / "0001_volume.nrrd").resolve()  # used as it is
    volume, image = read_volume(case.image)
    world = report.manifest.read_case_landmarks(case)[1]
    lps = np.array([5.0, 6.0, 7.0]) + np.array(MML_BRIGHT) @ directions  # by hand: origin + sum of index * row
    np.testing.assert_allclose(world, lps * [-1, -1, 1])
    assert volume[tuple(np.rint(_voxel_of(world, image.affine)).astype(int))] == volume.max()
    assert report.warnings[0] == (
        "case '0002': 0002_spacing.npy holds spacing [1.5, 0.25, 0.4] mm (in reversed axis order) but the NRRD "
        "header [0.4, 0.25, 1.5] mm; the header's is used"
    )
    # this header's axis 0 runs along world y, so the sides (apart along axis 0) are apart along y
    assert any("apart mainly along another world axis than x (0001 (y), 0002 (y))" in w for w in report.warnings)


def test_mml_warns_when_left_and_right_are_not_apart_along_x(tmp_path):
    root = tmp_path / "mmld_dataset"
    _mml_case(root / "train", "0001", _mml_label(left=(5.0, 5.0, 2.0), right=(5.0, 1.0, 2.0)))  # apart along y
    _mml_case(root / "train", "0002", _mml_label(left=(1.0, 3.0, 2.0), right=(8.0, 3.0, 2.0)))  # R* toward left
    _mml_case(root / "train", "0003", _mml_label())
    warnings = [w for w in convert_mml(root, tmp_path / "out").warnings if "split has no cases" not in w]
    assert len(warnings) == 2
    assert warnings[0].startswith("1 cases have their L* and R* landmarks apart mainly along another world axis")
    assert "(0001 (y))" in warnings[0] and "flip_prob" in warnings[0]
    assert warnings[1].startswith("1 cases have their R* landmarks on the patient's left") and "0002)" in warnings[1]


def test_mml_splits_can_be_drawn(mml, tmp_path):
    report = convert_mml(mml / "mmld_dataset", tmp_path / "drawn", split_fractions=(0.5, 0.25, 0.25), seed=0)
    assert sorted(c.split for c in report.manifest.cases) == ["test", "train", "train", "val"]
    assert report.splits == "drawn with seed 0"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: np.save(d / "0003_label.npy", np.zeros((14, 2))), r"0003_label.npy: expected a \(14, 3\) array"),
        (lambda d: np.save(d / "0003_label.npy", np.zeros((13, 3))), r"0003_label.npy: expected a \(14, 3\) array"),
        (lambda d: (d / "0003_label.npy").write_bytes(b"junk"), "0003_label.npy: cannot read the label array"),
        (lambda d: (d / "0003_spacing.npy").unlink(), "0003_spacing.npy: not found, and 0003_volume.nrrd has no"),
        (lambda d: np.save(d / "0003_spacing.npy", [0.4, 0.0, 1.0]), "0003_spacing.npy: voxel spacings must be"),
        (lambda d: np.save(d / "0003_spacing.npy", [0.4, 0.5]), "0003_spacing.npy: expected 3 voxel spacings"),
        (lambda d: (d / "0003_volume.nrrd").write_text("not nrrd"), "0003_volume.nrrd: cannot read the NRRD"),
    ],
)
def test_mml_bad_files_are_refused_by_name_and_nothing_is_written(mml, tmp_path, change, message):
    change(mml / "mmld_dataset" / "val")
    with pytest.raises(DataError, match=message):
        convert_mml(mml, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_mml_failure_while_writing_leaves_the_empty_output_folder_empty(mml, tmp_path, monkeypatch):
    import h3de.data.converters.mml as module

    def fail(*args, **kwargs):
        raise DataError("disk full")

    monkeypatch.setattr(module, "write_dataset", fail)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="disk full"):
        convert_mml(mml, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_mml_without_split_folders_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no train/, val/ or test/"):
        convert_mml(tmp_path / "nowhere", tmp_path / "bad")


# ----------------------------------------------------------------------------- AFIDs
# Layout of the four AFIDs datasets (docs/datasets.md): the image keeps entities (acq, run) the fiducial
# file's name leaves out; files are Slicer 4.10 ``.fcsv`` version 4.6, CoordinateSystem = 0 (RAS).

# permuted, flipped and anisotropic: axis 0 runs along -z, axis 1 along +x, axis 2 along +y
AFIDS_AFFINE = np.array([[0, 0.9, 0, -20.0], [0, 0, 1.2, -25.0], [-1.5, 0, 0, 30.0], [0, 0, 0, 1]])
AFIDS_SHAPE = (30, 44, 36)
AFIDS_BRIGHT = (21, 29, 18)  # the voxel AC sits on
AC = (AFIDS_AFFINE[:3, :3] @ AFIDS_BRIGHT + AFIDS_AFFINE[:3, 3]).tolist()  # (6.1, -3.4, -1.5) RAS
AFIDS = [(1, "AC", AC), (2, "PC", [0.0, -8.0, -1.0]), (6, "R superior LMS", [6.0, -10.0, -5.0])]
AFIDS += [(7, "L superior LMS", [-6.0, -10.0, -5.0])]


def _fcsv(path: Path, rows, system: str = "0") -> None:
    """An AFIDs fiducial file as Slicer 4.10 wrote them: the AFID number in ``label``, the name in ``desc``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Markups fiducial file version = 4.6",
        f"# CoordinateSystem = {system}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for number, name, (x, y, z) in rows:
        lines.append(
            f"vtkMRMLMarkupsFiducialNode_{number},{x},{y},{z},0,0,0,1,1,1,0,{number},{name},vtkMRMLScalarVolumeNode1"
        )
    path.write_text("\n".join(lines) + "\n")


def _t1w(path: Path) -> None:
    volume = _volume(AFIDS_SHAPE).clip(0, 500)
    volume[AFIDS_BRIGHT] = 3000
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, AFIDS_AFFINE), path)


@pytest.fixture
def afids(tmp_path: Path) -> Path:
    root = tmp_path / "afids"
    truth = root / "derivatives" / "afids_groundtruth"
    # SNSX (ds004470): acq and run in both names
    _t1w(root / "sub-C001" / "anat" / "sub-C001_acq-MP2RAGE_run-01_T1w.nii.gz")
    _fcsv(truth / "sub-C001" / "anat" / "sub-C001_acq-MP2RAGE_run-01_space-T1w_desc-groundtruth_afids.fcsv", AFIDS)
    # LHSCPD (ds004471): run only in the image's name; this file in LPS, PC not placed
    _t1w(root / "sub-087" / "anat" / "sub-087_run-01_T1w.nii.gz")
    lps = [(n, name, [-x, -y, z]) for n, name, (x, y, z) in AFIDS if name != "PC"]
    _fcsv(truth / "sub-087" / "anat" / "sub-087_space-T1w_desc-groundtruth_afids.fcsv", lps, "1")
    rater = root / "derivatives" / "afids_rater" / "sub-C001" / "anat"
    _fcsv(rater / "sub-C001_acq-MP2RAGE_run-01_space-T1w_desc-rater01_afids.fcsv", [(1, "AC", [50.0, 50.0, 50.0])])
    _fcsv(truth / "sub-C003" / "anat" / "sub-C003_space-T1w_desc-groundtruth_afids.fcsv", AFIDS)  # no image
    _nifti(root / "derivatives" / "other" / "sub-C003" / "anat" / "sub-C003_T1w.nii.gz", AFIDS_AFFINE, (4, 4, 4))
    return root


def test_afids_names_come_from_desc_and_pairs_from_the_sides(afids, tmp_path):
    report = convert_afids(afids, tmp_path / "out", split_fractions=(0.5, 0.5, 0.0), seed=0)
    manifest = report.manifest
    assert manifest.landmark_names == ("AC", "PC", "R superior LMS", "L superior LMS")
    assert manifest.mirrored_pairs == (("L superior LMS", "R superior LMS"),)
    assert sorted(c.id for c in manifest.cases) == ["sub-087", "sub-C001_acq-MP2RAGE_run-01"]
    assert sorted(c.split for c in manifest.cases) == ["train", "val"]
    expected = np.array([xyz for _, _, xyz in AFIDS])
    np.testing.assert_allclose(_landmarks(manifest, "sub-C001_acq-MP2RAGE_run-01"), expected)
    second = _landmarks(manifest, "sub-087")  # LPS in the file: the same RAS points
    np.testing.assert_allclose(np.delete(second, 1, axis=0), np.delete(expected, 1, axis=0))
    assert np.isnan(second[1]).all()
    assert [p.name for p in report.unpaired_landmarks] == ["sub-C003_space-T1w_desc-groundtruth_afids.fcsv"]
    assert any(line.startswith("landmark 'PC' is only in 1 of 2") for line in report.warnings)
    images = {c.id: c.image.resolve() for c in manifest.cases}
    assert images["sub-087"] == (afids / "sub-087/anat/sub-087_run-01_T1w.nii.gz").resolve()
    for case in manifest.cases:  # AC on its bright voxel through the oriented image, from RAS and LPS files
        volume, header = read_volume(case.image)
        voxel = np.rint(_voxel_of(manifest.read_case_landmarks(case)[0], header.affine)).astype(int)
        assert tuple(voxel) == AFIDS_BRIGHT and volume[tuple(voxel)] == volume.max()


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


@pytest.mark.parametrize(
    "affine, direction, coordinates",
    [
        (PIR_AFFINE, ["P", "I", "R"], (17.0, 41.0, 9.0)),  # as VerSe ships: the image's own orientation
        (RAS_AFFINE, ["R", "A", "S"], (17.0, 41.0, 9.0)),
        (RAS_AFFINE, ["L", "P", "S"], (60 - 1 - 17.0, 50 - 1 - 41.0, 9.0)),  # another orientation: flipped grid
        (RAS_AFFINE, ["A", "S", "L"], (41.0, 9.0, 60 - 1 - 17.0)),  # and permuted
    ],
)
def test_verse_centroid_lands_on_its_voxel_through_the_image_h3de_reads(tmp_path, affine, direction, coordinates):
    shape, bright = (60, 50, 12), (17, 41, 9)  # non-cubic; PIR_AFFINE's spacing is anisotropic (1, 1, 2)
    volume = _volume(shape).clip(0, 500)
    volume[bright] = 3000
    image = tmp_path / "verse" / "rawdata" / "sub-verse500" / "sub-verse500_dir-ax_ct.nii.gz"
    image.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, affine), image)
    ctd = tmp_path / "verse" / "derivatives" / "sub-verse500" / "sub-verse500_dir-ax_seg-subreg_ctd.json"
    _ctd(ctd, direction, [(20, *coordinates)])
    manifest = convert_verse(tmp_path / "verse", tmp_path / "out").manifest
    case = manifest.cases[0]
    data, header = read_volume(case.image)
    voxel = np.rint(_voxel_of(manifest.read_case_landmarks(case)[0], header.affine)).astype(int)
    assert tuple(voxel) == bright and data[bright] == data.max()


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


@pytest.mark.parametrize("encoding", ["raw", "gzip", "bzip2", "ascii"])
def test_mml_detached_header_reads_the_original_voxels_whatever_their_encoding(tmp_path, encoding):
    folder = tmp_path / "mmld_dataset" / "test"
    folder.mkdir(parents=True)
    nrrd.write(str(folder / "0001_volume.nrrd"), _mml_volume(), {"encoding": encoding, "content": "CT"})
    np.save(folder / "0001_label.npy", _mml_label())
    np.save(folder / "0001_spacing.npy", np.asarray(MML_SPACING))
    case = convert_mml(tmp_path, tmp_path / "out").manifest.cases[0]
    volume, header = read_volume(case.image)
    np.testing.assert_array_equal(volume, _mml_volume().astype(np.float32))
    np.testing.assert_allclose(header.affine, np.diag([-0.4, -0.25, 1.5, 1.0]))
