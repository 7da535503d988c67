"""``h3de predict``: new scans in any geometry, no ground truth, files that read back, bad input refused."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from h3de.cli import main
from h3de.data.landmark_io import read_landmarks
from h3de.errors import H3deError
from h3de.evaluate import evaluate
from h3de.predict import predict
from inference_helpers import save_checkpoint, write_one_blob

BLOB_NAMES = ["a_L", "a_R", "top", "front"]
C2F_PROBE = [
    "model.name=intensity_probe",
    "loss=weighted_mse",
    "detection.mode=coarse_to_fine",
    "data.spacing_mm=[4,4,4]",
    "data.patch_size=[16,16,16]",
    "local.model.name=intensity_probe",
    "local.loss.name=weighted_mse",
    "local.spacing_mm=[0.7,0.7,0.7]",
]


def _reoriented(src, dst, codes):
    image = nib.load(src)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(codes))
    nib.save(image.as_reoriented(ornt), dst)


def test_predict_gives_the_same_world_points_whatever_the_storage_orientation(tmp_path):
    affine = np.array([[1.2, 0, 0, -30.0], [0, 0.9, 0, 12.0], [0, 0, 1.5, -8.0], [0, 0, 0, 1]])
    world = write_one_blob(tmp_path / "src", "case", affine, (50, 60, 36), [31.3, 22.8, 17.4], sigma=2.0)
    original = tmp_path / "src" / "images" / "case.nii.gz"
    folder = tmp_path / "variants"
    folder.mkdir()
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("S", "R", "A"), ("R", "A", "I"), ("P", "I", "L")):
        _reoriented(original, folder / f"{''.join(codes)}.nii.gz", codes)
    ckpt = save_checkpoint(tmp_path / "probe.ckpt", C2F_PROBE, ["tip"])
    result = predict(ckpt, folder, tmp_path / "out", fmt="json", progress=False)
    assert not result.failures and len(result.case_ids) == 5
    reference = result.world["RAS"][0]
    assert np.linalg.norm(reference - world) < 0.3
    for case in result.case_ids:
        assert np.linalg.norm(result.world[case][0] - reference) < 0.1, case


def test_predicted_files_read_back_give_the_errors_of_evaluate(tmp_path, blob_dataset):
    overrides = [f"data.root={blob_dataset.parent}", "loss=weighted_mse", "data.spacing_mm=[3,3,3]"]
    overrides += ["data.patch_size=[16,16,16]", "model.unet.channels=[4,8]", "model.unet.strides=[2]"]
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "m.ckpt", overrides, BLOB_NAMES)
    evaluated = evaluate(ckpt, "train", tmp_path / "eval", presence_threshold=0.0)  # every landmark scored
    images = tmp_path / "train_images"
    images.mkdir()
    for case in evaluated.case_ids:
        os.symlink(blob_dataset.parent / "images" / f"{case}.nii.gz", images / f"{case}.nii.gz")
    out = tmp_path / "pred"
    predict(ckpt, images, out, fmt="csv", presence_threshold=0.0, progress=False)
    for c, case in enumerate(evaluated.case_ids):
        names, predicted = read_landmarks(out / f"{case}.csv")
        truth_names, truth = read_landmarks(blob_dataset.parent / "landmarks" / f"{case}.mrk.json")
        assert names == truth_names == BLOB_NAMES
        errors = np.linalg.norm(predicted - truth, axis=-1)
        np.testing.assert_allclose(errors, evaluated.errors[c].numpy(), atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("fmt", ["mrk.json", "fcsv", "csv", "json"])
def test_every_format_is_written_with_qc_and_summary(tmp_path, fmt):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    world = write_one_blob(tmp_path, "case_7", affine, (40, 40, 40), [20.2, 18.7, 21.1], sigma=2.0)
    ckpt = save_checkpoint(tmp_path / "probe.ckpt", C2F_PROBE, ["tip"])
    out = tmp_path / "out"
    predict(ckpt, tmp_path / "images" / "case_7.nii.gz", out, fmt=fmt, qc=True, truth=tmp_path / "landmarks")
    names, positions = read_landmarks(out / f"case_7.{fmt}")
    assert names == ["tip"] and np.linalg.norm(positions[0] - world) < 0.3
    assert (out / "case_7_qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == ["case_7"] and summary["failures"] == {}
    assert summary["seconds"]["network"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_bad_case_in_a_folder_is_skipped_and_named(tmp_path, capsys):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in range(2):
        write_one_blob(tmp_path, f"good_{i}", affine, (32, 32, 32), [16.0 + i, 15.0, 14.0])
    data = (tmp_path / "images" / "good_0.nii.gz").read_bytes()
    (tmp_path / "images" / "broken.nii.gz").write_bytes(data[: len(data) // 3])
    ckpt = save_checkpoint(tmp_path / "probe.ckpt", C2F_PROBE, ["tip"])
    code = main(["predict", str(ckpt), str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 of 3 cases failed" in err and "broken" in err
    assert (tmp_path / "out" / "good_0.mrk.json").is_file() and (tmp_path / "out" / "good_1.mrk.json").is_file()
    assert not (tmp_path / "out" / "broken.mrk.json").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failures"].keys() == {"broken"}


def test_bad_checkpoints_inputs_and_outputs_are_refused_before_any_output(tmp_path, capsys):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    write_one_blob(tmp_path, "case", affine, (32, 32, 32), [16.0, 15.0, 14.0])
    image = str(tmp_path / "images" / "case.nii.gz")
    ckpt = save_checkpoint(tmp_path / "probe.ckpt", C2F_PROBE, ["tip"])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:500])
    no_local = tmp_path / "no_local.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("local_network.")}
    torch.save(state, no_local)
    unknown = tmp_path / "unknown.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["config"]["model"]["name"] = "no_such_net"
    torch.save(state, unknown)
    (tmp_path / "empty").mkdir()
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [
        ([str(corrupt), image], "not a loadable h3de checkpoint"),
        ([str(no_local), image], "holds no local stage weights"),
        ([str(unknown), image], "no_such_net"),
        ([str(ckpt), str(tmp_path / "empty")], "no images in the folder"),
        ([str(ckpt), str(tmp_path / "missing.nii.gz")], "no such image or folder"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append(([str(ckpt), image, "--out", str(read_only / "sub")], "cannot write predictions there"))
    for args, message in cases:
        out = tmp_path / "out"
        argv = ["predict", *args] + ([] if "--out" in args else ["--out", str(out)])
        assert main([*argv, "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists() or not any(out.iterdir())


def test_predict_refuses_an_unknown_format(tmp_path):
    ckpt = save_checkpoint(tmp_path / "probe.ckpt", C2F_PROBE, ["tip"])
    with pytest.raises(H3deError, match="unknown format"):
        predict(ckpt, tmp_path, tmp_path / "out", fmt="xlsx")


def _bad_images(folder):
    """name -> (path, words of the expected message) of images predict must refuse."""
    folder.mkdir(parents=True, exist_ok=True)
    good = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    nan = np.full((24, 24, 24), np.nan, dtype=np.float32)
    bad = {
        "flat": (np.ones((24, 24), np.float32), np.eye(4), "3D"),
        "series": (np.zeros((24, 24, 24, 3), np.float32) + good[..., None], np.eye(4), "3D"),
        "zero_spacing": (good, None, "pixdim"),
        "all_nan": (nan, np.eye(4), "NaN"),
        "constant": (np.full((24, 24, 24), 7.0, np.float32), np.eye(4), "constant"),
    }
    out = {}
    for name, (data, affine, words) in bad.items():
        path = folder / f"{name}.nii.gz"
        image = nib.Nifti1Image(data, None)
        if name == "zero_spacing":  # a qform from pixdim only, stored as it is
            image.header.set_qform(np.eye(4), code=1)
            image.header["pixdim"][1:4] = (1.0, 0.0, 1.0)
        else:
            image.header.set_sform(affine, code=2)
        nib.save(image, path)
        out[name] = (path, words)
    whole = folder / "whole.nii.gz"
    nib.save(nib.Nifti1Image(good, np.eye(4)), whole)
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(whole.read_bytes()[:300])
    out["truncated"] = (truncated, "truncated.nii.gz")
    return out


@pytest.mark.parametrize("source", ["checkpoint", "onnx_export"])  # the torch path, and the numpy one (h3de.deploy)
def test_one_bad_image_gives_one_line_naming_it_and_writes_nothing(tmp_path, capsys, source):
    model = save_checkpoint(tmp_path / "probe.ckpt", C2F_PROBE, ["tip"])
    if source == "onnx_export":
        from h3de.export import export

        model = export(model, "onnx", tmp_path / "export").out_dir
    for name, (path, words) in _bad_images(tmp_path / "bad").items():
        out = tmp_path / f"out_{name}"
        assert main(["predict", str(model), str(path), "--out", str(out), "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path.name in err and words.lower() in err.lower(), (name, err)
        assert "DataError" not in err and "Traceback" not in err and not out.exists(), (name, err)
