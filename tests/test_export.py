"""``h3de export``: ONNX and TorchScript files that agree with PyTorch at any size, the preprocessing recorded beside
them, ``h3de predict`` from an ONNX export giving the checkpoint's landmarks, and bad input refused."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from h3de.cli import main
from h3de.deploy.bundle import METADATA_FILE
from h3de.errors import H3deError
from h3de.evaluate import load_checkpoint
from h3de.export import export
from h3de.predict import predict
from inference_helpers import save_checkpoint, write_one_blob

NAMES = ["tip", "base", "side"]
TINY_UNET = ["model.unet.channels=[4,8]", "model.unet.strides=[2]"]
WHOLE = ["loss=spatial_ce", "data.spacing_mm=[3,3,3]", "data.patch_size=[16,16,16]", *TINY_UNET]
C2F = [
    *WHOLE,
    "detection.mode=coarse_to_fine",
    "local.spacing_mm=[1,1,1]",
    "local.patch_size=[12,12,12]",
    *(f"local.{o}" for o in TINY_UNET),
]
MODES = {
    "whole": WHOLE,
    "sliding_window": [*WHOLE, "detection.mode=sliding_window", "detection.overlap=0.25"],
    "coarse_to_fine": C2F,
    "coarse_to_fine_conditioned": [*C2F, "local.design=conditioned"],
}


def _checkpoint(tmp_path, mode: str):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", MODES[mode], NAMES)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_both_stages_are_exported_and_agree_with_pytorch_at_two_sizes(tmp_path, fmt):
    ckpt = _checkpoint(tmp_path, "coarse_to_fine_conditioned")
    result = export(tmp_path / "run", fmt)  # a run directory: its checkpoints/best.ckpt
    assert result.out_dir == tmp_path / "run" / f"export_{fmt}"
    suffix = {"onnx": "onnx", "torchscript": "pt"}[fmt]
    graphs = ["global", "local", "decode_global", "decode_local"]
    assert {k: p.name for k, p in result.files.items()} == {g: f"{g}.{suffix}" for g in graphs}
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(
        [*(f"{g}.{suffix}" for g in graphs), METADATA_FILE]
    )
    shapes = [(c["stage"], c["input_shape"]) for c in result.checks]
    assert shapes == [
        ("global", [1, 1, 16, 16, 16]),
        ("global", [2, 1, 19, 21, 23]),
        ("local", [1, 1, 12, 12, 12]),
        ("local", [2, 1, 15, 17, 19]),
        ("decode_global", [1, 3, 16, 16, 16]),  # the network's maps of those inputs
        ("decode_global", [2, 3, 19, 21, 23]),
        ("decode_local", [1, 1, 12, 12, 12]),  # the conditioned design: one map, asked for one landmark
        ("decode_local", [2, 1, 15, 17, 19]),
    ]
    assert all(c["max_abs_diff"] < 1e-4 for c in result.checks)

    meta = json.loads((result.out_dir / METADATA_FILE).read_text())
    assert meta["format"] == fmt and meta["landmark_names"] == NAMES
    assert meta["preprocessing"]["spacing_mm"] == [3.0, 3.0, 3.0] and meta["preprocessing"]["normalize"] == "zscore"
    assert meta["preprocessing"]["patch_size"] == [16, 16, 16]
    assert meta["detection"]["mode"] == "coarse_to_fine" and meta["local"]["design"] == "conditioned"
    assert meta["local"]["spacing_mm"] == [1.0, 1.0, 1.0] and meta["presence_threshold"] == 0.5
    assert meta["stages"]["local"]["inputs"] == ["image", "landmark"]
    assert meta["stages"]["decode_global"]["inputs"] == ["maps", "landmark"]
    assert meta["stages"]["decode_global"]["outputs"] == ["voxel", "presence"]
    assert meta["stages"]["global"]["checks"][1]["input_shape"] == [2, 1, 19, 21, 23]

    # a third size, run here directly: the graph is not tied to the sizes it was checked at
    module = load_checkpoint(ckpt)
    x = torch.randn(3, 1, 13, 22, 17)
    with torch.no_grad():
        expected = module.network(x)
        if fmt == "onnx":
            session = ort.InferenceSession(str(result.files["global"]), providers=["CPUExecutionProvider"])
            found = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        else:
            found = torch.jit.load(str(result.files["global"]))(x)
    assert found.shape == expected.shape == (3, len(NAMES), 13, 22, 17)
    assert float((found - expected).abs().max()) < 1e-4


@pytest.mark.parametrize("mode", list(MODES))
def test_predict_from_the_onnx_export_gives_the_checkpoints_landmarks(tmp_path, mode):
    affine = np.array([[1.1, 0, 0, -20.0], [0, 0.9, 0, 14.0], [0, 0, 1.3, -5.0], [0, 0, 0, 1]])
    write_one_blob(tmp_path / "data", "case", affine, (40, 44, 30), [21.3, 19.8, 14.4], sigma=2.0)
    image = tmp_path / "data" / "images" / "case.nii.gz"
    ckpt = _checkpoint(tmp_path, mode)
    exported = export(ckpt, "onnx", tmp_path / "export")
    from_ckpt = predict(ckpt, image, tmp_path / "pred_ckpt", fmt="json", progress=False)
    from_onnx = predict(exported.out_dir, image, tmp_path / "pred_onnx", fmt="json", progress=False)
    assert not from_ckpt.failures and not from_onnx.failures
    np.testing.assert_allclose(from_onnx.world["case"], from_ckpt.world["case"], atol=0.05)
    np.testing.assert_allclose(from_onnx.presence["case"], from_ckpt.presence["case"], atol=1e-4)
    assert json.loads((tmp_path / "pred_onnx" / "summary.json").read_text())["cases"] == ["case"]


def test_predict_from_a_torchscript_export_gives_the_checkpoints_landmarks(tmp_path):
    write_one_blob(tmp_path / "data", "case", np.eye(4), (36, 36, 36), [17.2, 19.6, 15.1], sigma=2.0)
    image = tmp_path / "data" / "images" / "case.nii.gz"
    ckpt = _checkpoint(tmp_path, "coarse_to_fine")
    exported = export(ckpt, "torchscript", tmp_path / "export")
    from_ckpt = predict(ckpt, image, tmp_path / "a", fmt="json", progress=False)
    from_export = predict(exported.out_dir, image, tmp_path / "b", fmt="json", progress=False)
    np.testing.assert_allclose(from_export.world["case"], from_ckpt.world["case"], atol=1e-6)


@pytest.mark.parametrize("regions", [["region_grid=[2,2,1]"], ["region_grid=null", "region_size=[2,2,2]"]])
def test_h3de_net_exports_with_dynamic_sizes(tmp_path, regions):
    overrides = ["model=h3de_net", "model.h3de_net.preset=tiny", *(f"model.h3de_net.{r}" for r in regions)]
    overrides += ["model.h3de_net.full_res_levels=0"]  # the heatmap upsampled from stride 4: faster
    ckpt = save_checkpoint(tmp_path / "m.ckpt", [*overrides, "data.patch_size=[64,64,32]"], NAMES)
    result = export(ckpt, "onnx", tmp_path / "export")
    # the network's padding to its stride 32, V-BRA's to whole regions and (region_size) its region count are
    # computed from the input's shape in the graph: an odd size works
    assert [c["input_shape"] for c in result.checks if c["stage"] == "global"] == [
        [1, 1, 64, 64, 32],
        [2, 1, 67, 69, 39],
    ]
    assert all(c["max_abs_diff"] < 1e-4 for c in result.checks)


def test_the_cli_exports_and_prints_the_differences(tmp_path, capsys):
    _checkpoint(tmp_path, "whole")
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "global: input 1x1x16x16x16: max abs diff to PyTorch" in out
    assert "global: input 2x1x19x21x23" in out and "decode_global: input 2x3x19x21x23" in out
    assert f"exported global.onnx, decode_global.onnx to {tmp_path / 'e'}" in out


def test_bad_input_is_refused_with_one_line_and_nothing_written(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "whole")
    assert main(["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "e")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "h3de: error: unknown export format 'tflite' (expected one of onnx, torchscript)"
    )
    with pytest.raises(H3deError, match="checkpoint not found"):
        export(tmp_path / "nothing.ckpt", "onnx", tmp_path / "e")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(H3deError, match="not a loadable h3de checkpoint"):
        export(tmp_path / "broken.ckpt", "onnx", tmp_path / "e")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(H3deError, match="cannot write the export there"):
        export(ckpt, "onnx", tmp_path / "a_file" / "export")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(H3deError, match="not empty and not an earlier export"):
        export(ckpt, "onnx", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "e").exists()


def test_an_export_is_replaced_whole_and_predict_refuses_one_without_its_json(tmp_path):
    write_one_blob(tmp_path / "data", "case", np.eye(4), (30, 30, 30), [15.0, 14.0, 16.0])
    ckpt = _checkpoint(tmp_path, "whole")
    out = tmp_path / "export"
    export(ckpt, "torchscript", out)
    export(ckpt, "onnx", out)  # an earlier export is replaced, not mixed
    assert sorted(p.name for p in out.iterdir()) == ["decode_global.onnx", "global.onnx", METADATA_FILE]
    (out / METADATA_FILE).unlink()
    with pytest.raises(
        H3deError, match=f"holds exported networks \\(decode_global.onnx, global.onnx\\) but no {METADATA_FILE}"
    ):
        predict(out, tmp_path / "data" / "images", tmp_path / "pred", progress=False)
    (out / METADATA_FILE).write_text("{")
    with pytest.raises(H3deError, match="cannot be read as JSON"):
        predict(out, tmp_path / "data" / "images", tmp_path / "pred", progress=False)
    assert not (tmp_path / "pred").exists()
