import json

import nibabel as nib
import numpy as np
import pytest

from h3de.config import load_config
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.landmark_io import write_landmarks
from h3de.data.manifest import load_manifest
from h3de.errors import DataError


def edit_manifest(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def datamodule(manifest_path, *overrides):
    cfg = load_config(None, [f"data.root={manifest_path.parent}", "data.patch_size=[32,32,32]", *overrides])
    return LandmarkDataModule(cfg.data)


def test_manifest_loads_splits_and_mirror_permutation(blob_dataset):
    manifest = load_manifest(blob_dataset)
    assert manifest.landmark_names == ("a_L", "a_R", "top", "front")
    assert [len(manifest.split(s)) for s in ("train", "val", "test")] == [4, 1, 1]
    assert manifest.mirror_permutation() == [1, 0, 2, 3]
    assert all(c.image.is_absolute() and c.image.is_file() for c in manifest.cases)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda d: d.pop("landmarks"), "missing key 'landmarks'"),
        (lambda d: d.update(landmarks=["a", "a"]), "duplicate"),
        (lambda d: d.update(mirrored_pairs=[["a_L", "nope"]]), "mirrored pair"),
        (lambda d: d["cases"][0].update(split="training"), "split 'training'"),
        (lambda d: d["cases"][1].update(id="case_0"), "'case_0' appears twice"),
        (lambda d: d["cases"][0].update(image="images/missing.nii.gz"), "image not found"),
        (lambda d: d["cases"][0].pop("landmarks"), "no string 'landmarks'"),
        (lambda d: d.update(cases=[]), "non-empty"),
    ],
)
def test_bad_manifest_names_the_problem(blob_dataset, change, fragment):
    edit_manifest(blob_dataset, change)
    with pytest.raises(DataError) as info:
        load_manifest(blob_dataset)
    assert str(blob_dataset) in str(info.value) and fragment in str(info.value)


def test_not_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path / "dataset.json")


def test_landmark_file_disagreeing_with_manifest(blob_dataset):
    bad = blob_dataset.parent / "landmarks" / "case_2.mrk.json"
    write_landmarks(bad, ["a_L", "a_R", "top"], np.zeros((3, 3)))
    with pytest.raises(DataError) as info:
        datamodule(blob_dataset)
    assert str(bad) in str(info.value) and "front" in str(info.value)
    write_landmarks(bad, ["a_L", "a_R", "top", "back"], np.zeros((4, 3)))
    with pytest.raises(DataError, match="not in manifest: \\['back'\\]"):
        datamodule(blob_dataset)


def test_image_that_is_not_3d(blob_dataset):
    path = blob_dataset.parent / "images" / "case_3.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12), np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match="expected a 3D volume") as info:
        datamodule(blob_dataset)
    assert str(path) in str(info.value)


def test_corrupt_image_header(blob_dataset):
    path = blob_dataset.parent / "images" / "case_0.nii.gz"
    path.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match="cannot read image") as info:
        datamodule(blob_dataset)
    assert str(path) in str(info.value)


def test_truncated_image_data_fails_at_caching_naming_the_file(blob_dataset):
    path = blob_dataset.parent / "images" / "case_4.nii.gz"  # the val case
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dm = datamodule(blob_dataset)  # the header is intact
    with pytest.raises(DataError, match="cannot read image") as info:
        dm.setup("validate")
    assert str(path) in str(info.value)


def test_batch_is_divided_over_devices(odd_val_dataset):  # 3 val cases: one per process at least
    class FakeTrainer:
        world_size = 2

    dm = datamodule(odd_val_dataset, "data.batch_size=4")
    dm.trainer = FakeTrainer()
    dm.setup("validate")
    assert dm.batch_size_per_device == 2
    dm = datamodule(odd_val_dataset, "data.batch_size=3")
    dm.trainer = FakeTrainer()
    with pytest.raises(DataError, match="data.batch_size=3 is not divisible by the device count"):
        dm.setup("validate")
