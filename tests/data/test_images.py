import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from conftest import blob_affine
from h3de.cli import main
from h3de.config import load_config, to_container
from h3de.data.images import read_header, read_volume
from h3de.data.pipelines import LoadVolumed, build_transforms
from h3de.errors import DataError
from h3de.module import LandmarkModule
from tiny_configs import SMALL_RUN

SHAPE = (12, 10, 8)
TO_RAS = {  # sign of each named space's axes relative to RAS
    "left-posterior-superior": (-1, -1, 1),
    "LPS": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "right-anterior-superior": (1, 1, 1),
}


def volume(seed=0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine=None, pixdim=None) -> Path:
    """NIfTI with ``affine`` as its sform, or only a qform from ``pixdim``; stored as given, nothing fixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, None)
    if pixdim is None:
        image.header.set_sform(affine if affine is not None else np.eye(4), code=2)
    else:
        image.header.set_qform(np.eye(4), code=1)
        image.header["pixdim"][1:4] = pixdim
    nib.save(image, path)
    return path


def write_nrrd(path: Path, data: np.ndarray, ras_affine: np.ndarray, space: str, **extra) -> Path:
    """The same voxels and world geometry as a NIfTI with ``ras_affine``, stored in the NRRD ``space``."""
    flip = np.diag(TO_RAS[space]).astype(float)
    header = {
        "space": space,
        "space directions": (flip @ ras_affine[:3, :3]).T,  # one row per array axis
        "space origin": flip @ ras_affine[:3, 3],
        **extra,
    }
    nrrd.write(str(path), data, header, index_order="F", detached_header=path.suffix == ".nhdr")
    return path


def voxel_world(affine, voxel) -> np.ndarray:
    return (np.asarray(affine, dtype=np.float64) @ np.array([*voxel, 1.0]))[:3]


def test_nifti_volume_and_header(tmp_path):
    data, affine = volume(), blob_affine("oblique")
    path = write_nifti(tmp_path / "a.nii.gz", data, affine)
    header = read_header(path)
    assert header.shape == SHAPE and np.allclose(header.affine, nib.load(path).affine)
    loaded, same = read_volume(path)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, data) and np.array_equal(same.affine, header.affine)
    one_volume = write_nifti(tmp_path / "b.nii", data[..., None], affine)  # 4D with one volume is a 3D volume
    assert read_volume(one_volume)[0].shape == SHAPE


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.nii", "bad.nrrd"])
def test_corrupt_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image file at all" * 20)
    for read in (read_header, read_volume):
        with pytest.raises(DataError, match="cannot read image") as info:
            read(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii", "cut.nrrd"])
def test_truncated_file_fails_on_reading_the_data(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".nrrd"):
        write_nrrd(path, volume(), np.eye(4), "LPS")
    else:
        write_nifti(path, volume(), np.eye(4))
    path.write_bytes(path.read_bytes()[: -len(path.read_bytes()) // 3])
    assert read_header(path).shape == SHAPE  # the header is intact
    with pytest.raises(DataError, match="cannot read image") as info:
        read_volume(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("shape", [(10, 12), (8, 9, 10, 3), (8, 9, 10, 1, 2)])
def test_anything_but_one_3d_volume_is_refused(tmp_path, shape):
    path = write_nifti(tmp_path / "x.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(DataError, match=re.escape(f"expected a 3D volume, got shape {shape}")) as info:
        read_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "pixdim, shown",
    [((1, 0, 1), "[1.0, 0.0, 1.0]"), ((1, -2, 1), "[1.0, -2.0, 1.0]"), ((1, np.nan, 1), "[1.0, nan, 1.0]")],
)
def test_bad_pixdim_is_refused_without_nibabel_messages(tmp_path, capfd, pixdim, shown):
    path = write_nifti(tmp_path / "p.nii.gz", volume(), pixdim=pixdim)
    capfd.readouterr()
    for read in (read_header, read_volume):
        with pytest.raises(DataError, match="pixdim\\[1:4\\]\\) must be positive and finite") as info:
            read(path)
        assert str(path) in str(info.value) and shown in str(info.value)
    assert capfd.readouterr().err == ""  # nibabel's "pixdim[1,2,3] should be ..." names no file: silenced


def test_singular_and_non_finite_affines_are_refused(tmp_path):
    singular = np.diag([2.0, 2.0, 2.0, 1.0])
    singular[:3, 1] = singular[:3, 0]  # axes 0 and 1 step the same way
    with pytest.raises(DataError, match="affine is singular") as info:
        read_header(write_nifti(tmp_path / "s.nii.gz", volume(), singular))
    assert str(tmp_path / "s.nii.gz") in str(info.value)
    flat = np.diag([2.0, 0.0, 2.0, 1.0])
    with pytest.raises(DataError, match=re.escape("spacing must be positive, got [2.0, 0.0, 2.0] mm")):
        read_header(write_nifti(tmp_path / "z.nii.gz", volume(), flat))
    infinite = np.eye(4)
    infinite[0, 3] = np.inf
    with pytest.raises(DataError, match="affine is not finite"):
        read_header(write_nifti(tmp_path / "i.nii.gz", volume(), infinite))


def test_voxels_nan_infinite_or_constant_are_refused(tmp_path):
    size = int(np.prod(SHAPE))
    cases = {
        "all_nan": (np.full(SHAPE, np.nan, np.float32), f"all {size} voxels are NaN"),
        "some_bad": (volume(), f"3 NaN and 1 infinite voxels \\(of {size}\\)"),
        "constant": (np.full(SHAPE, 7.0, np.float32), f"all {size} voxels equal 7 \\(a blank image\\)"),
    }
    cases["some_bad"][0].flat[[5, 17, 300]] = np.nan
    cases["some_bad"][0].flat[40] = -np.inf
    for name, (data, message) in cases.items():
        path = write_nifti(tmp_path / f"{name}.nii.gz", data)
        assert read_header(path).shape == SHAPE  # the header check reads no voxels
        with pytest.raises(DataError, match=message) as info:
            LoadVolumed("image")({"image": str(path)})
        assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("space, name", [(s, "v.nrrd") for s in TO_RAS] + [("left-posterior-superior", "v.nhdr")])
def test_nrrd_space_gives_the_nifti_world_coordinates(tmp_path, space, name):
    data, affine = volume(), blob_affine("oblique")
    nifti = write_nifti(tmp_path / "v.nii.gz", data, affine)
    other = write_nrrd(tmp_path / name, data, affine, space)
    voxel = (3, 7, 5)
    expected = voxel_world(affine, voxel)
    assert np.allclose(voxel_world(read_header(other).affine, voxel), expected, atol=1e-5)  # header check
    loaded = {p: LoadVolumed("image")({"image": str(p)})["image"] for p in (nifti, other)}  # the MONAI chain
    for image in loaded.values():
        assert image.shape == (1, *SHAPE) and image[0][voxel] == data[voxel]
        assert np.allclose(voxel_world(image.affine, voxel), expected, atol=1e-5)


def test_nrrd_lps_and_nifti_ras_give_the_same_samples(tmp_path):
    data, affine = volume(), blob_affine("lps")
    world = voxel_world(affine, (5.5, 4.0, 3.2))[None, None]  # (1, 1, 3) mm
    cfg = load_config(None, ["data.spacing_mm=[2,2,2]", "data.patch_size=[24,24,24]"]).data
    transform = build_transforms(cfg, [0], train=False, heatmaps=False)
    paths = write_nifti(tmp_path / "v.nii.gz", data, affine), write_nrrd(tmp_path / "v.nrrd", data, affine, "LPS")
    samples = [transform({"image": str(p), "landmarks_world": torch.as_tensor(world), "case_id": "v"}) for p in paths]
    assert torch.allclose(samples[0]["image"], samples[1]["image"], atol=1e-5)
    assert torch.allclose(samples[0]["affine"], samples[1]["affine"], atol=1e-6)
    assert torch.allclose(samples[0]["landmarks_voxel"], samples[1]["landmarks_voxel"], atol=1e-5)


@pytest.mark.parametrize("unit, per_mm", [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0), ("unknown", 1.0)])
def test_nifti_spatial_units_are_scaled_to_mm(tmp_path, unit, per_mm):
    """0.001 m (or 1000 um) voxels and offsets read as 1 mm; an unset unit means mm, as NIfTI viewers assume."""
    mm_affine = blob_affine("oblique", spacing=(1.0, 2.0, 0.5), origin=(-40.0, 30.0, -25.0))
    file_affine = mm_affine.copy()
    file_affine[:3] *= per_mm
    image = nib.Nifti1Image(volume(), file_affine)
    image.header.set_xyzt_units(xyz=unit, t="sec")
    nib.save(image, tmp_path / "u.nii.gz")
    for read in (read_header, lambda p: read_volume(p)[1]):
        np.testing.assert_allclose(read(tmp_path / "u.nii.gz").affine, mm_affine, rtol=1e-6, atol=1e-5)


def test_nrrd_space_units_are_scaled_to_mm(tmp_path):
    affine = blob_affine("oblique")
    metres = affine.copy()
    metres[:3] /= 1000.0
    path = write_nrrd(tmp_path / "m.nrrd", volume(), metres, "LPS", **{"space units": ["m", "m", "m"]})
    np.testing.assert_allclose(read_header(path).affine, affine, atol=1e-6)
    write_nrrd(path, volume(), affine, "LPS", **{"space units": ["cm", "mm", "mm"]})
    with pytest.raises(DataError, match=re.escape("'space units' ['cm', 'mm', 'mm'] are not three of mm, m")) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_nrrd_geometry_problems(tmp_path):
    data = volume()
    one = write_nrrd(tmp_path / "one.nrrd", data[None], np.eye(4), "LPS")  # a leading axis of size 1...
    header = nrrd.read_header(str(one))
    header["space directions"] = np.vstack([np.full(3, np.nan), np.diag([-1.0, -1.0, 1.0])])  # ...that is "none"
    nrrd.write(str(one), data[None], header, index_order="F")
    assert read_header(one).shape == SHAPE and read_volume(one)[0].shape == SHAPE
    path = tmp_path / "scanner.nrrd"
    nrrd.write(str(path), data, {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)})
    with pytest.raises(DataError, match="NRRD header has space 'scanner-xyz'; h3de needs an anatomical space"):
        read_header(path)
    nrrd.write(str(path), data, {"spacings": [1.0, 1.0, 1.0]})
    with pytest.raises(DataError, match="has no 'space directions'"):
        read_header(path)
    with pytest.raises(DataError, match="unsupported image format"):
        read_header(tmp_path / "v.mha")


# --- through the CLI: train and evaluate refuse the same inputs, with one line and exit 2 ---

SMALL = [*SMALL_RUN, "trainer.max_epochs=1", "logger.name=csv"]


def spoil(path: Path, how: str) -> None:
    """Rewrite the blob image at ``path`` into a bad one."""
    image = nib.load(path)
    data, affine = image.get_fdata().astype(np.float32), image.affine
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "nan":
        write_nifti(path, np.full_like(data, np.nan), affine)
    elif how == "constant":
        write_nifti(path, np.zeros_like(data), affine)
    elif how == "zero_pixdim":
        write_nifti(path, data, pixdim=(2.0, 0.0, 2.0))
    elif how == "singular":
        affine[:3, 2] = affine[:3, 0]
        write_nifti(path, data, affine)
    elif how == "4d":
        write_nifti(path, np.stack([data, data], -1), affine)


@pytest.mark.parametrize("how", ["nan", "constant", "zero_pixdim", "singular", "4d", "truncated"])
def test_train_refuses_a_bad_image_before_writing_anything(blob_dataset, tmp_path, capsys, how):
    image = blob_dataset.parent / "images" / "case_2.nii.gz"
    spoil(image, how)
    out = tmp_path / "runs"
    assert main(["train", f"data.root={blob_dataset.parent}", f"output_dir={out}", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"h3de: error: {image}: ") and "\n" not in err
    assert not out.exists()


def test_train_removes_its_run_dir_when_an_uncached_image_fails(blob_dataset, tmp_path, capsys):
    image = blob_dataset.parent / "images" / "case_4.nii.gz"  # the val case, read in the sanity check
    spoil(image, "nan")
    out = tmp_path / "runs"
    out.mkdir()
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={out}", "data.cache_rate=0", *SMALL]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"h3de: error: {image}: all {28 * 32 * 20} voxels are NaN"
    assert list(out.iterdir()) == []


def test_train_with_a_truncated_image_exits_2_without_abort(blob_dataset, tmp_path):
    image = blob_dataset.parent / "images" / "case_0.nii.gz"
    spoil(image, "truncated")
    out = tmp_path / "runs"
    out.mkdir()
    command = [sys.executable, "-m", "h3de.cli", "train", f"data.root={blob_dataset.parent}", f"output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([*command, *SMALL], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr  # an abort would be -6 (134 from a shell)
    assert "terminate called" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("h3de: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"h3de: error: {image}: cannot read image")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("how", ["nan", "truncated", "zero_pixdim"])
def test_evaluate_refuses_the_same_images(blob_dataset, tmp_path, capsys, how):
    cfg = load_config(None, [f"data.root={blob_dataset.parent}", *SMALL])
    module = LandmarkModule(to_container(cfg), ["a_L", "a_R", "top", "front"])
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, checkpoint)
    image = blob_dataset.parent / "images" / "case_5.nii.gz"  # the test case
    spoil(image, how)
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoint), "--split", "test", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"h3de: error: {image}: ") and "\n" not in err
    assert not out.exists()
