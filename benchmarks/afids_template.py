"""The AFIDs brain example: the coarse-to-fine model beside the template baseline, on held-out synthetic subjects.

Trains experiments/afids_template.yaml on data/afids (`make data-afids`: the MNI152NLin2009cAsym T1w and T2w templates
with their expert AFIDs; val and test are synthetic subjects deformed from them), evaluates its best checkpoint (lowest
val MRE) on val and test through `h3de evaluate`'s path, and writes benchmarks/afids_template.md: MRE ± SD, median,
SDR 2 / 4 mm of the model and of the baseline that predicts every landmark at its template position (the training
images' landmarks, in world mm), and both per landmark on the test split (MRE, median, SDR 2 / 4 mm).

    make data-afids
    .venv/bin/python benchmarks/afids_template.py [--seed 0] [--epochs N] [--reuse]

``--reuse`` evaluates the newest finished run of the same seed and epochs under runs/benchmarks instead of training.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from fine_accuracy import best_val, trained_checkpoint
from report import write_report

from h3de.config import load_config
from h3de.data.afids import AFIDS_MIRRORED_PAIRS, template_baseline_errors
from h3de.data.manifest import load_manifest
from h3de.evaluate import evaluate
from h3de.metrics import summarize_errors

EXPERIMENT = "experiments/afids_template.yaml"
SPLITS = ("val", "test")


def stats(errors: np.ndarray) -> dict[str, float]:
    """MRE, SD, median, SDR 2 / 4 mm (%) of an (N, L) error matrix in mm (NaN = absent)."""
    summary = summarize_errors(torch.as_tensor(errors, dtype=torch.float64), (2.0, 4.0))
    summary["median_mm"] = float(np.nanmedian(errors))
    return summary


def landmark_cells(errors: np.ndarray) -> str:
    """MRE, median, SDR 2 / 4 mm of one landmark's errors over the subjects, as table cells."""
    present = errors[~np.isnan(errors)]
    sdr = [100.0 * float(np.mean(present <= r)) for r in (2.0, 4.0)]
    return f"{present.mean():.2f} | {np.median(present):.2f} | {sdr[0]:.0f}% | {sdr[1]:.0f}%"


def row(what: str, split: str, s: dict[str, float]) -> str:
    return (
        f"| {what} | {split} | {s['mre_mm']:.2f} ± {s['mre_sd_mm']:.2f} | {s['median_mm']:.2f} "
        f"| {s['sdr_2mm']:.1f}% | {s['sdr_4mm']:.1f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--reuse", action="store_true", help="evaluate a finished run where there is one")
    args = parser.parse_args()
    overrides = ["logger=csv", "output_dir=runs/benchmarks", "trainer.enable_progress_bar=false", f"seed={args.seed}"]
    overrides += [f"trainer.max_epochs={args.epochs}"] if args.epochs else []
    cfg = load_config(EXPERIMENT, overrides)
    manifest_path = Path(cfg.data.root) / cfg.data.manifest
    if not manifest_path.is_file():
        sys.exit(f"{manifest_path} is missing: run `make data-afids` first")
    manifest = load_manifest(manifest_path)

    best, minutes, reused = trained_checkpoint(cfg, args.reuse)
    # every landmark is present in every subject: all are scored (threshold 0), whatever the presence says
    model = {split: evaluate(best, split, presence_threshold=0.0).errors.numpy() for split in SPLITS}
    baseline = {split: template_baseline_errors(manifest, split) for split in SPLITS}
    names = list(manifest.landmark_names)
    paired = [names.index(n) for pair in AFIDS_MIRRORED_PAIRS for n in pair]

    counts = {split: len(manifest.split(split)) for split in ("train", *SPLITS)}
    lines = [
        "# The AFIDs brain example: model and template baseline",
        "",
        f"data/afids (`make data-afids`): trained on the {counts['train']} MNI152NLin2009cAsym templates (T1w, T2w: "
        f"one brain), tested on {counts['val']} val and {counts['test']} test synthetic subjects deformed from them "
        "(pose, elastic, bias field, contrast, noise; h3de.data.subjects), 32 AFIDs each. "
        f"`{EXPERIMENT}`, seed {args.seed}, {cfg.trainer.max_epochs} epochs of {cfg.data.samples_per_epoch} samples "
        f"(best val MRE {best_val(best):.2f} mm chose the checkpoint), trained in {minutes:.1f} min on "
        f"{torch.get_num_threads()} CPU threads ({platform.machine()}). Errors in world mm. Baseline: every landmark "
        "at its template position, what a model that learnt the template and nothing about the subject would score.",
        "",
        "| | split | MRE ± SD | median | SDR 2 mm | SDR 4 mm |",
        "|---|---|---:|---:|---:|---:|",
        *[
            row(what, split, stats(errors[split]))
            for split in SPLITS
            for what, errors in (("model", model), ("baseline", baseline))
        ],
        "",
        f"Left/right pairs ({len(paired)} landmarks), test MRE: model {np.nanmean(model['test'][:, paired]):.2f} mm, "
        f"baseline {np.nanmean(baseline['test'][:, paired]):.2f} mm.",
        "",
        f"## Per landmark, test split ({counts['test']} subjects; MRE and median in mm)",
        "",
        "| landmark | model MRE | model median | model SDR 2 mm | model SDR 4 mm | baseline MRE | baseline median "
        "| baseline SDR 2 mm | baseline SDR 4 mm |",
        "|---|" + "---:|" * 8,
        *[
            f"| {name} | " + " | ".join(landmark_cells(errors["test"][:, i]) for errors in (model, baseline)) + " |"
            for i, name in enumerate(names)
        ],
        "",
        f"Reproduce: `make data-afids && .venv/bin/python benchmarks/afids_template.py --seed {args.seed}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + "`"
        + (" (`--reuse`: a run finished earlier, evaluated with the current code)" if reused else ""),
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
