"""Accuracy at fine resolution, side by side: coarse only, sliding window and coarse-to-fine on the 1 mm phantom.

Trains each experiment once per seed on data/phantom_1mm (`make data-fine`), evaluates its best checkpoint (lowest
val MRE of the full prediction) on the test split through `h3de evaluate`'s path, and writes the table of seed means
to benchmarks/fine_accuracy.md, with the training wall time and, as a trivial baseline, the MRE of predicting every
landmark at its mean training position.

    make data-fine
    .venv/bin/python benchmarks/fine_accuracy.py [EXPERIMENT.yaml[:SEEDS] ...] [--seeds 3] [--epochs N] [--report MD]

``EXPERIMENT.yaml:N`` trains that experiment with seeds 0..N-1 instead of ``--seeds``, ``EXPERIMENT.yaml:A-B`` with
seeds A..B. The report is rewritten after
each experiment, so an interrupted run keeps what it finished. ``--reuse`` evaluates the newest finished run of each
experiment and seed under runs/benchmarks where there is one (after a change to inference only, or to add seeds) and
trains the others; a reused run's training minutes are its own, from its config.yaml's time to its last written file.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from report import write_report

from h3de.config import load_config
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.phantom import PHANTOM_MIRRORED_PAIRS
from h3de.evaluate import evaluate
from h3de.train import train

DEFAULT = [
    "experiments/phantom_1mm_coarse.yaml",
    "experiments/phantom_1mm_sliding.yaml",
    "experiments/phantom_1mm_c2f.yaml",
    "experiments/phantom_1mm_c2f_unet.yaml",
    "experiments/phantom_1mm_c2f_conditioned.yaml",
]
KEYS = (
    "val",
    "test",
    "sd",
    "median",
    "max",
    "sdr2",
    "sdr4",
    "paired",
    "absent_f1",
    "presence_accuracy",
    "minutes",
    "missed",
)


def finished_run(cfg) -> tuple[Path, float] | None:
    """(best checkpoint, training minutes) of the newest finished run of ``cfg`` (same seed and epochs), if any."""
    for run_dir in sorted((Path(cfg.output_dir) / cfg.name).glob("*/"), reverse=True):
        saved = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        done = (run_dir / "checkpoints" / "best.ckpt").is_file() and _last_epoch(run_dir) == cfg.trainer.max_epochs - 1
        if saved is None or not done or saved.seed != cfg.seed or saved.trainer.max_epochs != cfg.trainer.max_epochs:
            continue
        last = max(p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and "eval_" not in str(p))
        return run_dir / "checkpoints" / "best.ckpt", (last - (run_dir / "config.yaml").stat().st_mtime) / 60
    return None


def _last_epoch(run_dir: Path) -> int | None:
    """The last epoch in the run's metrics.csv (a run killed part-way has checkpoints too, but fewer epochs)."""
    try:
        with (run_dir / "logs" / "metrics.csv").open() as f:
            return max(int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch"))
    except (OSError, ValueError, KeyError):  # no file, no rows, no epoch column
        return None


def run(experiment: str, seed: int, epochs: int | None, reuse: bool = False) -> dict:
    """Train (or, ``reuse``, find the finished run of) and test one experiment with one seed."""
    overrides = ["logger=csv", "output_dir=runs/benchmarks", "trainer.enable_progress_bar=false", f"seed={seed}"]
    overrides += [f"trainer.max_epochs={epochs}"] if epochs else []
    cfg = load_config(experiment, overrides)
    best, minutes, _ = trained_checkpoint(cfg, reuse)
    evaluation = evaluate(best, "test")
    errors = evaluation.errors[~torch.isnan(evaluation.errors)]
    names = list(evaluation.summary["per_landmark_mre_mm"])
    paired = [names.index(n) for pair in PHANTOM_MIRRORED_PAIRS for n in pair]
    s = evaluation.summary
    return {
        "experiment": Path(experiment).stem,
        "mode": cfg.detection.mode,
        "model": cfg.model.name + (f" + {cfg.local.model.name}" if cfg.detection.mode == "coarse_to_fine" else ""),
        "epochs": cfg.trainer.max_epochs,
        "val": best_val(best),
        "test": s["mre_mm"],
        "sd": s["mre_sd_mm"],
        "median": errors.median().item(),
        "max": errors.max().item(),
        "sdr2": s["sdr_2mm"],
        "sdr4": s["sdr_4mm"],
        "paired": torch.nanmean(evaluation.errors[:, paired]).item(),
        "absent_f1": s.get("absent_f1"),
        "presence_accuracy": s.get("presence_accuracy"),
        "absent": s["absent"],
        "missed": s.get("present_called_absent", 0),
        "minutes": minutes,
        "baseline": baseline(cfg),
        "landmarks": {n: torch.nanmean(evaluation.errors[:, i]).item() for i, n in enumerate(names)},
        "axes": axis_errors(evaluation.out_dir / "errors.csv"),
    }


def axis_errors(predictions: Path) -> dict[str, list[float]]:
    """Per landmark, the mean absolute error (mm) along each RAS axis, from evaluate's errors.csv."""
    with predictions.open() as f:
        rows = [r for r in csv.DictReader(f) if r["present"] == "1" and r["called_present"] == "1"]
    out = {}
    for name in dict.fromkeys(r["landmark"] for r in rows):
        mine = [r for r in rows if r["landmark"] == name]
        out[name] = [statistics.fmean(abs(float(r[f"pred_{a}"]) - float(r[f"gt_{a}"])) for r in mine) for a in "xyz"]
    return out


def trained_checkpoint(cfg, reuse: bool) -> tuple[Path, float, bool]:
    """(best checkpoint, training minutes, reused) of ``cfg``: the newest finished run when ``reuse`` finds one,
    else a run trained now."""
    found = finished_run(cfg) if reuse else None
    if found is not None:
        return *found, True
    start = time.perf_counter()
    best = train(cfg).best_checkpoint
    return best, (time.perf_counter() - start) / 60, False


def best_val(checkpoint: Path) -> float:
    """The best val MRE (mm) that chose ``checkpoint``, from the state its ModelCheckpoint saved in it."""
    states = torch.load(checkpoint, weights_only=True)["callbacks"]
    return next(float(v["best_model_score"]) for k, v in states.items() if "'monitor': 'val/mre_mm'" in k)


def baseline(cfg) -> float:
    """Test MRE (mm) of predicting every landmark at its mean training position."""
    datamodule = LandmarkDataModule(cfg.data, heatmaps=False)
    return datamodule.mean_position_baseline_mm("test")


def mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.fmean(values) if values else None


def mean_of(values: list):
    """Mean of numbers, or element-wise of equal-length lists."""
    if isinstance(values[0], list):
        return [statistics.fmean(v) for v in zip(*values, strict=True)]
    return statistics.fmean(values)


def seed_list(spec: str, default: int) -> list[int]:
    """The seeds of ``EXPERIMENT.yaml:SPEC``: "N" is 0..N-1, "A-B" is A..B, "" is 0..default-1."""
    if "-" in spec:
        first, last = spec.split("-")
        return list(range(int(first), int(last) + 1))
    return list(range(int(spec) if spec else default))


def per_seed(row: dict) -> str:
    """ "0.93 (seed 0), 0.86 (seed 1) (SD 0.05)": each seed's test MRE and their SD."""
    tests = ", ".join(f"{t:.2f} (seed {i})" for i, t in zip(row["seeds"], row["tests"], strict=True))
    return f"{tests} (SD {row['seed_sd']:.2f})"


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=DEFAULT)
    parser.add_argument("--seeds", type=int, default=3, help="train each experiment with seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs where they exist")
    parser.add_argument("--report", default=None, help="write the table here instead of benchmarks/fine_accuracy.md")
    args = parser.parse_args()
    if not Path("data/phantom_1mm/dataset.json").is_file():
        sys.exit("data/phantom_1mm is missing: run `make data-fine` first")
    rows = []
    for item in args.experiments:
        experiment, _, seeds = item.partition(":")
        seed_ids = seed_list(seeds, args.seeds)
        runs = [run(experiment, seed, args.epochs, args.reuse) for seed in seed_ids]
        row = {**runs[0], **{k: mean(runs, k) for k in KEYS}, "tests": [r["test"] for r in runs], "seeds": seed_ids}
        for part in ("landmarks", "axes"):  # seed means, per landmark
            names = dict.fromkeys(n for r in runs for n in r[part])  # a seed may call a landmark absent everywhere
            row[part] = {n: mean_of([r[part][n] for r in runs if n in r[part]]) for n in names}
        row["seed_sd"] = statistics.stdev(row["tests"]) if len(runs) > 1 else float("nan")
        rows.append(row)
        report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    first = rows[0]
    lines = [
        "# Accuracy at fine resolution, side by side",
        "",
        f"Test split of data/phantom_1mm (seed 0: 28 train / 6 val / 6 test cases, voxels of about 1 x 1 x 1.5 mm, "
        f"{first['absent']} absent landmarks in the test split), each experiment trained once per seed (the seeds "
        f"named in the per-seed column) on {torch.get_num_threads()} CPU threads ({platform.machine()}); errors in "
        "world mm over the landmarks present, seed means. Paired: MRE of the three left/right pairs, which only global "
        "context tells apart. Missed: present landmarks called absent (presence below the default threshold 0.5), "
        "which get no error and are left out of the MRE (`h3de.report.score`); absent F1 and presence accuracy at that "
        f"threshold. Baseline: every landmark at its mean training position, {first['baseline']:.2f} mm.",
        "",
        "| experiment | mode | networks | epochs | train minutes | best val MRE | test MRE ± SD | per seed "
        "| median | max | SDR 2 mm | SDR 4 mm | paired MRE | missed | absent F1 | presence accuracy |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['experiment']} | {r['mode']} | {r['model']} | {r['epochs']} | {r['minutes']:.1f} | {r['val']:.2f} "
            f"| {r['test']:.2f} ± {r['sd']:.2f} | {per_seed(r)} "
            f"| {r['median']:.2f} | {r['max']:.2f} | {r['sdr2']:.1f}% | {r['sdr4']:.1f}% | {r['paired']:.2f} "
            f"| {r['missed']:.1f} "
            f"| {fmt(r['absent_f1'], '.2f')} | {fmt(r['presence_accuracy'], '.3f')} |"
            for r in rows
        ],
        "",
        "Per landmark, test MRE (mm), seed means:",
        "",
        "| experiment | " + " | ".join(first["landmarks"]) + " |",
        "|---|" + "---:|" * len(first["landmarks"]),
        *[f"| {r['experiment']} | " + " | ".join(f"{v:.2f}" for v in r["landmarks"].values()) + " |" for r in rows],
        "",
        "Each experiment's worst landmark, its mean absolute error along each RAS axis (mm), seed means:",
        "",
        "| experiment | landmark | x (left-right) | y (posterior-anterior) | z (inferior-superior) |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {r['experiment']} | {worst} | " + " | ".join(f"{v:.2f}" for v in r["axes"][worst]) + " |"
            for r in rows
            for worst in [max(r["axes"], key=lambda n: r["landmarks"][n])]
        ],
        "",
        "The phantom's menton is the lowest point of the chin's arc at the midline. The smooth warp that makes each "
        "head different moves it along that arc, where the image has no feature to mark it, so its left-right "
        "position can only be inferred from the context of the whole head.",
        "",
        f"Reproduce: `make data-fine && .venv/bin/python benchmarks/fine_accuracy.py {' '.join(args.experiments)}"
        + ("" if all(":" in e for e in args.experiments) else f" --seeds {args.seeds}")
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + (f" --report {args.report}" if args.report else "")
        + "`"
        + (
            " (`--reuse` evaluated the runs finished earlier with the current code, and trained the others)"
            if args.reuse
            else ""
        ),
        "",
    ]
    write_report(__file__, lines, args.report)


if __name__ == "__main__":
    main()
