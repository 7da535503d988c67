"""A tiny real training run on a small phantom: validation error must fall clearly."""

import csv
import math

import pytest

from h3de.config import load_config
from h3de.data.phantom import generate_phantom
from h3de.evaluate import evaluate
from h3de.train import train


def small_phantom_config(tmp_path, overrides: list[str]):
    """Config for the phantom under ``tmp_path/phantom``: 32^3 patches of 8 mm, batch 2, no augmentation."""
    common = [
        f"data.root={tmp_path / 'phantom'}",
        f"output_dir={tmp_path / 'runs'}",
        "data.spacing_mm=[8,8,8]",
        "data.patch_size=[32,32,32]",
        "data.batch_size=2",
        "data.augment.enabled=false",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    return load_config(None, common + overrides)


def test_tiny_phantom_training_learns(tmp_path):
    generate_phantom(tmp_path / "phantom", seed=1, num_cases=12, voxel_mm=6.0)
    cfg = small_phantom_config(
        tmp_path,
        [
            "model.unet.channels=[8,16,32]",
            "model.unet.strides=[2,2]",
            "loss=spatial_ce",
            "optim.lr=0.005",
            "trainer.max_epochs=15",
        ],
    )
    result = train(cfg)
    with open(result.run_dir / "logs" / "metrics.csv") as f:
        val = [float(r["val/mre_mm"]) for r in csv.DictReader(f) if r["val/mre_mm"]]
    assert len(val) == 15
    assert val[-1] < 0.5 * val[0], val
    assert result.best_val_mre_mm == min(val)
    # the best checkpoint reproduces its validation error through the evaluation path (threshold 0: every
    # present landmark scored, as val/mre_mm)
    summary = evaluate(result.best_checkpoint, "val", tmp_path / "eval", presence_threshold=0.0).summary
    assert abs(summary["mre_mm"] - result.best_val_mre_mm) < 1e-3


@pytest.mark.parametrize("model, loss", [("h3de_net", "spatial_ce"), ("h3de_net_anchor", "anchor")])
def test_both_h3de_heads_train_on_the_phantom(tmp_path, model, loss):
    generate_phantom(tmp_path / "phantom", seed=2, num_cases=6, voxel_mm=8.0)
    cfg = small_phantom_config(
        tmp_path,
        [
            f"model={model}",
            f"loss={loss}",
            "model.h3de_net.preset=tiny",
            "model.h3de_net.region_grid=null",
            "model.h3de_net.region_size=[2,2,2]",
            "model.h3de_net.topk=[2,2,1,1]",
            "optim.lr=0.003",
            "trainer.max_epochs=4",
            "trainer.log_every_n_steps=1",
        ],
    )
    result = train(cfg)
    with open(result.run_dir / "logs" / "metrics.csv") as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    out = evaluate(result.best_checkpoint, "val", tmp_path / "eval", presence_threshold=0.0)  # 4 epochs: score all
    assert out.summary["count"] > 0 and math.isfinite(out.summary["mre_mm"])
    with open(tmp_path / "eval" / "errors.csv") as f:
        scores = [float(r["presence_score"]) for r in csv.DictReader(f)]
    assert all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("design", ["shared", "conditioned"])
def test_coarse_to_fine_trains_evaluates_and_predicts_on_a_tiny_phantom(tmp_path, design):
    from h3de.predict import predict

    generate_phantom(tmp_path / "phantom", seed=3, num_cases=5, voxel_mm=3.0)
    cfg = small_phantom_config(
        tmp_path,
        [
            "model.unet.channels=[8,16,32]",
            "model.unet.strides=[2,2]",
            "detection.mode=coarse_to_fine",
            f"local.design={design}",
            "local.spacing_mm=[2,2,2]",
            "local.patch_size=[16,16,16]",
            "local.offset_mm=6",
            "local.model.unet.channels=[8,16]",
            "local.model.unet.strides=[2]",
            "trainer.max_epochs=3",
            "trainer.log_every_n_steps=1",
        ],
    )
    result = train(cfg)
    with open(result.run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    local = [float(r["train/local_loss"]) for r in rows if r.get("train/local_loss")]
    assert len(local) == 3 and local[-1] < local[0], local
    accuracy = [float(r["val/presence_accuracy"]) for r in rows if r.get("val/presence_accuracy")]
    assert len(accuracy) == 3 and all(0.0 <= a <= 1.0 for a in accuracy)
    summary = evaluate(result.best_checkpoint, "val", tmp_path / "eval", presence_threshold=0.0).summary
    assert abs(summary["mre_mm"] - result.best_val_mre_mm) < 1e-3
    out = predict(result.best_checkpoint, tmp_path / "phantom" / "images", tmp_path / "pred", progress=False)
    assert not out.failures and len(out.case_ids) == 5
    assert all((tmp_path / "pred" / f"{case}.mrk.json").is_file() for case in out.case_ids)
