"""Presence at the default threshold 0.5 on a small phantom, per heatmap loss.

Generates a phantom (8 mm voxels, half of the cases held out so that val and test hold absent
landmarks), trains a small U-Net with each loss, evaluates the best checkpoint on val and test, and
reports from ``errors.csv`` (``predictions.csv`` in versions before it, so it runs on those too): MRE over
the scored landmarks (present; with ``errors.csv``, also called present), presence AUROC, and at threshold 0.5
the presence accuracy and the absent class's precision, recall and F1.

    PYTHONPATH=src .venv/bin/python benchmarks/presence.py [--losses spatial_ce weighted_mse] [--epochs 20]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from h3de.config import load_config
from h3de.data.phantom import generate_phantom
from h3de.evaluate import evaluate
from h3de.train import train


def _rates(rows: list[dict], threshold: float) -> dict:
    present = [r["present"] == "1" for r in rows]
    score = [float(r["presence_score"]) for r in rows]
    called_absent = [s < threshold for s in score]
    tp = sum(a and not p for a, p in zip(called_absent, present, strict=True))
    fp = sum(a and p for a, p in zip(called_absent, present, strict=True))
    fn = sum(not a and not p for a, p in zip(called_absent, present, strict=True))
    absent = sum(not p for p in present)
    return {
        "absent": absent,
        "accuracy": 1 - (fp + fn) / len(rows),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / absent if absent else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan"),
        "present_min": min((s for s, p in zip(score, present, strict=True) if p), default=float("nan")),
        "present_median": statistics.median(s for s, p in zip(score, present, strict=True) if p),
        "absent_max": max((s for s, p in zip(score, present, strict=True) if not p), default=float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--losses", nargs="+", default=["spatial_ce", "weighted_mse"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--out", default="runs/presence")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    root = out / "phantom"
    if not (root / "dataset.json").is_file():
        generate_phantom(root, seed=0, num_cases=args.cases, voxel_mm=8.0, split_fractions=(0.5, 0.25, 0.25))
    for loss in args.losses:
        overrides = [
            f"data.root={root}",
            f"output_dir={out / 'runs'}",
            "data.spacing_mm=[8,8,8]",
            "data.patch_size=[32,32,32]",
            "data.heatmap_sigma=1.0",
            "data.batch_size=2",
            "data.augment.enabled=false",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "model.unet.channels=[8,16,32]",
            "model.unet.strides=[2,2]",
            f"loss={loss}",
            "optim.lr=0.005",
            f"trainer.max_epochs={args.epochs}",
        ]
        start = time.perf_counter()
        result = train(load_config(None, overrides))
        minutes = (time.perf_counter() - start) / 60
        held_out = []
        for split in ("val", "test", "val+test"):
            if split == "val+test":
                rows, mre = held_out, statistics.fmean(float(r["error_mm"]) for r in held_out if r["error_mm"])
                auroc = None
            else:
                evaluation = evaluate(result.best_checkpoint, split, out / f"eval_{loss}_{split}")
                table = evaluation.out_dir / "errors.csv"
                with open(table if table.exists() else evaluation.out_dir / "predictions.csv") as f:
                    rows = list(csv.DictReader(f))
                held_out += rows
                mre, auroc = evaluation.summary["mre_mm"], evaluation.summary["presence_auroc"]
            rates = _rates(rows, 0.5)
            print(
                f"{loss:12s} {split:8s} train {minutes:.1f} min  MRE {mre:.2f} mm  "
                f"AUROC {auroc if auroc is None else round(auroc, 3)}  absent {rates['absent']}/{len(rows)}  "
                f"acc {rates['accuracy']:.3f}  absent P/R/F1 {rates['precision']:.2f}/{rates['recall']:.2f}/"
                f"{rates['f1']:.2f}  present score min/median {rates['present_min']:.3f}/"
                f"{rates['present_median']:.3f}  absent max {rates['absent_max']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
