"""Training throughput of an experiment and the share of step time spent waiting on data.

Runs the experiment's real Trainer, DataModule and LandmarkModule (no logger, no validation, no
checkpoints) and times, per training batch, the wait for the batch (from the end of the previous
step to the start of this one: loader, collation, transfer) and the step itself (forward, loss,
backward, optimiser). The first epoch is a warm-up and is not counted. Rewrites
benchmarks/train_throughput.md.

    .venv/bin/python benchmarks/train_throughput.py [EXPERIMENT.yaml] [--epochs 3] [--workers 0 1]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import lightning as L
import torch

from h3de.config import load_config, to_container
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.phantom import generate_phantom
from h3de.module import LandmarkModule


class StepTimer(L.Callback):
    """Accumulates data-wait and step seconds over the training batches after the first epoch."""

    def __init__(self) -> None:
        self.wait = self.step = 0.0
        self.samples = 0
        self._last_end = self._start = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if trainer.current_epoch > 0:
            self.wait += self._start - self._last_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        if trainer.current_epoch > 0:
            self.step += self._last_end - self._start
            self.samples += len(batch["image"])


def measure(experiment: Path, epochs: int, workers: int) -> dict:
    cfg = load_config(experiment, [f"data.num_workers={workers}", "logger.name=none"])
    if not (Path(cfg.data.root) / cfg.data.manifest).is_file():
        generate_phantom(cfg.data.root, seed=0)
    L.seed_everything(0, verbose=False)
    datamodule = LandmarkDataModule(cfg.data)
    module = LandmarkModule(to_container(cfg), datamodule.landmark_names)
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    total = timer.wait + timer.step
    return {
        "workers": workers,
        "batch": cfg.data.batch_size,
        "patch": "x".join(str(p) for p in cfg.data.patch_size),
        "samples": timer.samples,
        "volumes_per_s": timer.samples / total,
        "step_ms": 1000 * timer.step / (timer.samples / cfg.data.batch_size),
        "wait_share": 100 * timer.wait / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="experiments/phantom_unet.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    rows = [measure(Path(args.experiment), args.epochs, w) for w in args.workers]
    lines = [
        "# Training throughput",
        "",
        f"Experiment `{args.experiment}`, {args.epochs - 1} timed epochs after one warm-up epoch, "
        f"{torch.get_num_threads()} torch threads, {platform.machine()} CPU, torch {torch.__version__}. "
        "Data wait = time from the end of one training step to the start of the next (loader, collation, "
        "transfer); step = forward + loss + backward + optimiser.",
        "",
        "| data.num_workers | batch | patch | volumes/s | step (ms) | data wait (% of step time) |",
        "|---:|---:|---|---:|---:|---:|",
        *[
            f"| {r['workers']} | {r['batch']} | {r['patch']} | {r['volumes_per_s']:.2f} | {r['step_ms']:.0f} "
            f"| {r['wait_share']:.1f} |"
            for r in rows
        ],
        "",
        "Goal: data wait < 10% of step time.",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/train_throughput.py {args.experiment} "
        f"--epochs {args.epochs} --workers {' '.join(map(str, args.workers))}`",
        "",
    ]
    text = "\n".join(lines)
    Path(__file__).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
