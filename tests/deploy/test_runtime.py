"""``h3de predict EXPORT_DIR`` without torch: the checkpoint's landmarks from the exported graphs, in a process
that cannot import torch, MONAI or Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from h3de.deploy.bundle import METADATA_FILE
from h3de.errors import H3deError
from h3de.export import export
from h3de.predict import predict
from inference_helpers import save_checkpoint, write_one_blob

NAMES = ["tip", "base", "side"]
TINY_UNET = ["model.unet.channels=[4,8]", "model.unet.strides=[2]"]
WHOLE = ["data.spacing_mm=[3,3,3]", "data.patch_size=[16,16,16]", *TINY_UNET]
BLOCKED = ("torch", "monai", "lightning", "torchmetrics", "wandb", "einops", "optuna")

_WITHOUT_TORCH = textwrap.dedent(
    f"""
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"{{name}} is not installed here")

    sys.meta_path.insert(0, Blocked())
    from h3de.cli import main

    code = main(sys.argv[1:])
    assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
    sys.exit(code)
    """
)


def _scan(tmp_path: Path) -> Path:
    affine = np.array([[0, 0, -1.2, 30.0], [1.1, 0, 0, -20.0], [0, -0.9, 0, 14.0], [0, 0, 0, 1]])  # permuted, flipped
    write_one_blob(tmp_path / "data", "case", affine, (40, 44, 30), [21.3, 19.8, 14.4], sigma=2.0)
    return tmp_path / "data" / "images" / "case.nii.gz"


@pytest.mark.parametrize(
    "overrides",
    [
        # sliding windows, landmarks decoded one chunk at a time, spatial_ce's per-landmark absent logits
        [*WHOLE, "detection.mode=sliding_window", "detection.overlap=0.25", "detection.max_heatmap_gib=0.0002"],
        # coarse-to-fine, the conditioned local stage, ball_ohnm's decoding
        [
            *WHOLE,
            "loss=ball_ohnm",
            "detection.mode=coarse_to_fine",
            "local.design=conditioned",
            "local.spacing_mm=[1,1,1]",
            "local.patch_size=[12,12,12]",
            *(f"local.{o}" for o in TINY_UNET),
        ],
    ],
    ids=["sliding_window_chunked", "coarse_to_fine_conditioned"],
)
def test_predict_from_an_onnx_export_runs_without_torch_and_gives_the_checkpoints_landmarks(tmp_path, overrides):
    image = _scan(tmp_path)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", overrides, NAMES)
    exported = export(ckpt, "onnx", tmp_path / "export").out_dir
    expected = predict(ckpt, image, tmp_path / "from_ckpt", fmt="json", progress=False)
    out = tmp_path / "from_export"
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, "predict", str(exported), str(image), "--out", str(out)]
        + ["--format", "csv", "--qc", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "predicted 1 of 1 cases" in run.stdout
    rows = [line.split(",") for line in (out / "predictions.csv").read_text().splitlines()[1:]]
    world = np.array([[float(v) for v in row[2:5]] for row in rows])
    presence = np.array([float(row[5]) for row in rows])
    np.testing.assert_allclose(world, expected.world["case"], atol=0.02)
    np.testing.assert_allclose(presence, expected.presence["case"], atol=1e-3)
    assert (out / "case_qc.png").stat().st_size > 1000 and (out / "case.csv").is_file()


def test_an_anchor_models_export_gives_the_checkpoints_landmarks(tmp_path):
    image = _scan(tmp_path)
    torch.manual_seed(0)
    overrides = ["model=h3de_net_anchor", "loss=anchor", "model.h3de_net.preset=tiny"]
    overrides += ["model.h3de_net.region_grid=[2,2,1]", "data.patch_size=[64,64,32]", "data.spacing_mm=[1,1,1.5]"]
    ckpt = save_checkpoint(tmp_path / "m.ckpt", overrides, NAMES)
    exported = export(ckpt, "onnx", tmp_path / "export")
    assert json.loads((exported.out_dir / METADATA_FILE).read_text())["stages"]["decode_global"]["inputs"] == ["maps"]
    expected = predict(ckpt, image, tmp_path / "a", fmt="json", progress=False)
    found = predict(exported.out_dir, image, tmp_path / "b", fmt="json", progress=False)
    np.testing.assert_allclose(found.world["case"], expected.world["case"], atol=0.02)
    np.testing.assert_allclose(found.presence["case"], expected.presence["case"], atol=1e-4)


def test_an_export_of_an_older_version_is_refused_with_what_to_do(tmp_path):
    image = _scan(tmp_path)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", WHOLE, NAMES)
    out = export(ckpt, "onnx", tmp_path / "export").out_dir
    meta = json.loads((out / METADATA_FILE).read_text())
    (out / METADATA_FILE).write_text(json.dumps({**meta, "h3de_export": 1}))
    with pytest.raises(
        H3deError, match="an export of version 1, this h3de reads version 2: export the checkpoint again"
    ):
        predict(out, image, tmp_path / "pred", progress=False)
    (out / "decode_global.onnx").unlink()
    (out / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(H3deError, match="decode_global.onnx: missing from the export"):
        predict(out, image, tmp_path / "pred", progress=False)
    assert not (tmp_path / "pred").exists()
