"""Training throughput of an experiment and the share of step time spent waiting on data.

Runs the experiment's real Trainer, DataModule and LandmarkModule (no logger, no validation, no
checkpoints) under Lightning's SimpleProfiler: data wait is the time in the training loop's
``train_dataloader_next`` (loading, augmentation, targets, collation), the step is
``run_training_batch`` (forward, loss, backward, optimiser). Volumes/s is over the wall-clock time of
the epochs. The first epoch is a warm-up and is not counted. Rewrites benchmarks/train_throughput.md.

    .venv/bin/python benchmarks/train_throughput.py [EXPERIMENT.yaml] [--epochs 6] [--workers 0 1]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import lightning as L
import torch
from epoch_clock import EpochClock
from lightning.pytorch.profilers import SimpleProfiler
from report import write_report

from h3de.config import load_config, to_container
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.phantom import generate_phantom
from h3de.module import LandmarkModule


def measure(experiment: Path, epochs: int, workers: int) -> dict:
    cfg = load_config(experiment, [f"data.num_workers={workers}", "logger.name=none"])
    if not (Path(cfg.data.root) / cfg.data.manifest).is_file():
        generate_phantom(cfg.data.root, seed=0)
    L.seed_everything(0, verbose=False)
    datamodule = LandmarkDataModule(cfg.data)
    module = LandmarkModule(to_container(cfg), datamodule.landmark_names)
    clock, profiler = EpochClock(), SimpleProfiler()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        logger=False,
        callbacks=[clock],
        profiler=profiler,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    warmup = trainer.num_training_batches  # the first epoch's batches are not counted
    durations = profiler.recorded_durations
    wait = sum(durations["[_TrainingEpochLoop].train_dataloader_next"][warmup:])
    step = sum(durations["run_training_batch"][warmup:])
    steps = len(durations["run_training_batch"][warmup:])
    return {
        "workers": workers,
        "batch": cfg.data.batch_size,
        "patch": "x".join(str(p) for p in cfg.data.patch_size),
        "volumes_per_s": clock.samples / clock.seconds,
        "step_ms": 1000 * step / steps,
        "wait_ms": 1000 * wait / steps,
        "wait_share": 100 * wait / (wait + step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="experiments/phantom_unet.yaml")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    rows = [measure(Path(args.experiment), args.epochs, w) for w in args.workers]
    lines = [
        "# Training throughput",
        "",
        f"Experiment `{args.experiment}`, {args.epochs - 1} timed epochs after one warm-up epoch, "
        f"{torch.get_num_threads()} torch threads, {platform.machine()} CPU, torch {torch.__version__}. "
        "Data wait = time the training loop waits for the next batch (Lightning SimpleProfiler "
        "`train_dataloader_next`); step = forward + loss + backward + optimiser (`run_training_batch`).",
        "",
        "| num_workers | batch | patch | volumes/s | step (ms) | data wait (ms) | data wait (% of step) |",
        "|---:|---:|---|---:|---:|---:|---:|",
        *[
            f"| {r['workers']} | {r['batch']} | {r['patch']} | {r['volumes_per_s']:.2f} | {r['step_ms']:.0f} "
            f"| {r['wait_ms']:.1f} | {r['wait_share']:.1f} |"
            for r in rows
        ],
        "",
        "Goal: data wait < 10% of step time.",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/train_throughput.py {args.experiment} "
        f"--epochs {args.epochs} --workers {' '.join(map(str, args.workers))}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
