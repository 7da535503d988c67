"""A tiny real training run on a small phantom: validation error must fall clearly."""

import csv

from h3de.config import load_config
from h3de.data.phantom import generate_phantom
from h3de.evaluate import evaluate
from h3de.train import train


def test_tiny_phantom_training_learns(tmp_path):
    generate_phantom(tmp_path / "phantom", seed=1, num_cases=12, voxel_mm=6.0)
    cfg = load_config(
        None,
        [
            f"data.root={tmp_path / 'phantom'}",
            f"output_dir={tmp_path / 'runs'}",
            "data.spacing_mm=[8,8,8]",
            "data.patch_size=[32,32,32]",
            "data.batch_size=2",
            "data.augment.enabled=false",
            "model.unet.channels=[8,16,32]",
            "model.unet.strides=[2,2]",
            "loss=spatial_ce",
            "optim.lr=0.005",
            "trainer.max_epochs=15",
            "trainer.enable_progress_bar=false",
            "logger=csv",
        ],
    )
    result = train(cfg)
    with open(result.run_dir / "logs" / "metrics.csv") as f:
        val = [float(r["val/mre_mm"]) for r in csv.DictReader(f) if r["val/mre_mm"]]
    assert len(val) == 15
    assert val[-1] < 0.5 * val[0], val
    assert result.best_val_mre_mm == min(val)
    # the best checkpoint reproduces its validation error through the evaluation path
    summary = evaluate(result.best_checkpoint, "val", tmp_path / "eval").summary
    assert abs(summary["mre_mm"] - result.best_val_mre_mm) < 1e-3
