"""``h3de data import``: pairing, names, LPS/RAS check, mirrored pairs, splits, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from h3de.cli import main
from h3de.data import importer
from h3de.data.importer import import_dataset, random_splits
from h3de.data.landmark_io import read_landmarks, write_landmarks
from h3de.errors import DataError

NAMES = ["nose", "ear_L", "ear_R"]
SHAPE = (20, 20, 20)
AFFINE = np.array([[2.0, 0, 0, 10.0], [0, 2.0, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])  # x 9..49, y 19..59
INSIDE = np.array([[30.0, 40.0, -10.0], [20.0, 30.0, -20.0], [40.0, 30.0, -20.0]])  # RAS mm


def write_nifti(path: Path, affine: np.ndarray = AFFINE, shape=SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 100, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_nrrd_lps(path: Path) -> Path:
    """An NRRD in LPS space with the same voxel grid (in RAS) as ``AFFINE``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(path), np.random.default_rng(1).integers(0, 100, SHAPE).astype(np.int16), header)
    return path


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, Path]:
    """Images and landmark files of five cases in several formats (one NRRD), all consistent."""
    images, landmarks = tmp_path / "images", tmp_path / "landmarks"
    for i, suffix in enumerate([".mrk.json", ".fcsv", ".csv", ".json", ".mrk.json"]):
        write_nifti(images / f"c{i}.nii.gz") if i != 3 else write_nrrd_lps(images / f"c{i}.nrrd")
        write_landmarks(landmarks / f"c{i}{suffix}", NAMES, INSIDE + i)
    return images, landmarks


def test_import_writes_a_manifest_that_references_the_sources(source, tmp_path):
    images, landmarks = source
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    report = import_dataset(images, landmarks, tmp_path / "out", seed=3, name="heads")
    manifest = report.manifest
    assert manifest.name == "heads"
    assert manifest.path == (tmp_path / "out" / "dataset.json").resolve()
    assert manifest.landmark_names == tuple(NAMES)
    assert manifest.mirrored_pairs == (("ear_L", "ear_R"),)
    assert [c.id for c in manifest.cases] == [f"c{i}" for i in range(5)]
    assert [c.image.resolve() for c in manifest.cases] == [next(images.glob(f"c{i}.*")).resolve() for i in range(5)]
    assert report.warnings == () and report.unpaired_images == () and report.unpaired_landmarks == ()
    for i, case in enumerate(manifest.cases):
        assert case.landmarks == tmp_path.resolve() / "out" / "landmarks" / f"c{i}.json"
        np.testing.assert_allclose(manifest.read_case_landmarks(case), INSIDE + i)
    doc = json.loads(manifest.path.read_text())
    assert doc["cases"][0]["image"] == "../images/c0.nii.gz"  # relative to dataset.json
    assert {p: p.read_bytes() for p in before} == before  # the sources are untouched


def test_splits_follow_the_seed_and_the_fractions(tmp_path):
    ids = [f"case{i:02d}" for i in range(10)]
    splits = random_splits(ids, (0.7, 0.15, 0.15), seed=0)
    assert sorted(splits.values()).count("train") == 7 and list(splits.values()).count("test") == 1
    assert random_splits(list(reversed(ids)), (0.7, 0.15, 0.15), 0) == splits  # not the listing order
    assert random_splits(ids, (0.7, 0.15, 0.15), 1) != splits
    assert set(random_splits(ids[:3], (0.8, 0.1, 0.1), 0).values()) == {"train", "val", "test"}
    assert set(random_splits(ids, (1.0, 0.0, 0.0), 0).values()) == {"train"}


def test_a_mislabelled_name_is_reported_with_its_file(source, tmp_path):
    images, landmarks = source
    (landmarks / "c2.csv").unlink()
    write_landmarks(landmarks / "c2.csv", ["nose", "eat_L", "ear_R"], INSIDE)  # a typo
    report = import_dataset(images, landmarks, tmp_path / "out")
    assert report.manifest.landmark_names == ("nose", "ear_L", "ear_R", "eat_L")
    typo = next(line for line in report.warnings if line.startswith("landmark 'eat_L'"))
    assert "only in 1 of 5 landmark files (c2.csv)" in typo and "typo" in typo and "'ear_L'" in typo
    missing = next(line for line in report.warnings if line.startswith("landmark 'ear_L'"))
    assert "missing from 1 of 5 landmark files (c2.csv)" in missing
    c2 = report.manifest.read_case_landmarks(report.manifest.cases[2])
    assert np.isnan(c2[1]).all() and np.isfinite(c2[3]).all()  # ear_L absent in c2, eat_L present


def test_lps_given_as_ras_is_reported_naming_the_case(source, tmp_path):
    images, landmarks = source
    (landmarks / "c1.fcsv").unlink()
    write_landmarks(landmarks / "c1.csv", NAMES, INSIDE * [-1, -1, 1])  # LPS numbers in a RAS-only format
    report = import_dataset(images, landmarks, tmp_path / "out")
    (line,) = report.warnings
    assert line.startswith("case 'c1': landmarks outside its image")
    assert all(f"'{n}'" in line for n in NAMES)
    assert "looks like LPS coordinates given as RAS" in line
    np.testing.assert_allclose(read_landmarks(report.manifest.cases[1].landmarks)[1], INSIDE * [-1, -1, 1])


def test_far_landmarks_without_a_sign_flip_are_reported_without_the_lps_hint(source, tmp_path):
    images, landmarks = source
    write_landmarks(landmarks / "c4.mrk.json", NAMES, INSIDE + [0, 0, 500.0])
    (line,) = import_dataset(images, landmarks, tmp_path / "out").warnings
    assert "case 'c4'" in line and "'nose' (481 mm)" in line and "LPS coordinates given as RAS" not in line


def test_unpaired_files_are_listed_and_skipped(source, tmp_path):
    images, landmarks = source
    write_nifti(images / "lonely.nii")
    write_landmarks(landmarks / "orphan.csv", NAMES, INSIDE)
    (images / "notes.txt").write_text("not an image")
    report = import_dataset(images, landmarks, tmp_path / "out")
    assert [p.name for p in report.unpaired_images] == ["lonely.nii"]
    assert [p.name for p in report.unpaired_landmarks] == ["orphan.csv"]
    assert len(report.manifest.cases) == 5


def test_images_and_landmarks_may_share_a_folder(source, tmp_path):
    images, landmarks = source
    for path in landmarks.iterdir():
        path.rename(images / path.name)
    assert len(import_dataset(images, images, tmp_path / "out").manifest.cases) == 5


@pytest.mark.parametrize(
    ("mirrored", "pairs"), [("none", ()), ("ear_R:ear_L", (("ear_R", "ear_L"),)), ("auto", (("ear_L", "ear_R"),))]
)
def test_mirrored_option(source, tmp_path, mirrored, pairs):
    assert import_dataset(*source, tmp_path / "out", mirrored=mirrored).manifest.mirrored_pairs == pairs


def test_empty_folders_are_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "landmarks").mkdir()
    with pytest.raises(DataError, match="no images"):
        import_dataset(tmp_path / "images", tmp_path / "landmarks", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "mirrored", "error", "fragment"),
    [
        (lambda i, l: (l / "c1.fcsv").write_text("not,a\nfiducial"), "auto", DataError, "c1.fcsv"),
        (lambda i, l: (i / "c2.nii.gz").write_bytes(b"truncated"), "auto", DataError, "c2.nii.gz"),
        (lambda i, l: write_landmarks(l / "c0.csv", NAMES, INSIDE), "auto", DataError, "'c0' has two landmark files"),
        (lambda i, l: [p.rename(p.with_name("x" + p.name)) for p in list(l.iterdir())], "auto", DataError, "no image"),
        (lambda i, l: None, "ear_L:nope", ValueError, "'nope', which is not a landmark"),
    ],
)
def test_errors_before_writing_leave_no_output_folder(source, tmp_path, edit, mirrored, error, fragment):
    images, landmarks = source
    edit(images, landmarks)
    with pytest.raises(error) as caught:
        import_dataset(images, landmarks, tmp_path / "out" / "nested", mirrored=mirrored)
    assert fragment in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_value_errors(source, tmp_path):
    for kwargs, named in [({"split_fractions": (0.5, 0.6, 0.1)}, "split fractions"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=named):
            import_dataset(*source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_folder_is_refused_and_kept(source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        import_dataset(*source, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_a_failure_while_writing_removes_what_was_written(source, tmp_path, monkeypatch):
    def failing(path, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(importer, "write_manifest", failing)
    with pytest.raises(OSError, match="disk full"):
        import_dataset(*source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        import_dataset(*source, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_cli_prints_the_report_and_exits_2_on_errors(source, tmp_path, capsys):
    images, landmarks = source
    write_nifti(images / "lonely.nii.gz")
    assert main(["data", "import", str(images), str(landmarks), "--out", str(tmp_path / "out"), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 images without a landmark file, skipped" in printed and "lonely.nii.gz" in printed
    assert "mirrored pairs: ear_L:ear_R" in printed and "with 5 cases" in printed
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["name"] == "out"
    args = ["data", "import", str(images), str(landmarks), "--out", str(tmp_path / "other")]
    assert main([*args, "--split", "0.5,x,0.5"]) == 2
    assert main([*args, "--mirrored", "ear_L"]) == 2
    assert "--mirrored item 'ear_L'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
