"""Training volumes/s at 1 and at 2 processes (Lightning DDP, gloo) on this machine's CPU.

Each process trains on 2 volumes a step (the global batch grows with the processes: 2, then 4) of a small generated
phantom, one torch thread per process, no loader workers, no validation; both run the same number of steps.
Volumes/s counts every process's volumes over the wall clock of rank 0's epochs after a warm-up epoch, data loading
and augmentation included. Every run is a fresh process (the 2-process one started by Lightning's own launcher, as
``h3de train trainer.strategy=ddp trainer.devices=2``). The 1- and 2-process runs alternate, round after round, so
a change in the machine's load hits both; the speed-up of each round is reported, and their median. Rewrites
benchmarks/scaling.md.

    .venv/bin/python benchmarks/scaling.py [--experiment experiments/phantom_unet.yaml] [--steps 8] [--epochs 3]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from epoch_clock import EpochClock
from report import write_report

from h3de.config import load_config, to_container
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.phantom import generate_phantom
from h3de.module import LandmarkModule
from h3de.networks import network_spec

PER_PROCESS_BATCH = 2


def worker(args: argparse.Namespace) -> None:
    """One training run on ``args.devices`` processes; rank 0 prints ``RESULT {json}``."""
    devices = args.devices
    cfg = load_config(
        args.experiment,
        [
            f"data.root={args.root}",
            "data.num_workers=0",
            f"data.batch_size={PER_PROCESS_BATCH * devices}",
            f"data.samples_per_epoch={PER_PROCESS_BATCH * devices * args.steps}",
            "logger=none",
        ],
    )
    L.seed_everything(0, verbose=False)
    heatmaps = network_spec(cfg.model.name).output == "heatmap"
    datamodule = LandmarkDataModule(cfg.data, heatmaps=heatmaps, detection=cfg.detection, seed=0)
    module = LandmarkModule(to_container(cfg), datamodule.landmark_names)
    clock = EpochClock()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        volumes = clock.samples * trainer.world_size
        result = {"devices": devices, "volumes_per_s": volumes / clock.seconds}
        print("RESULT " + json.dumps(result), flush=True)


def run(devices: int, root: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--devices", str(devices), "--root", str(root)]
    command += ["--experiment", args.experiment, "--steps", str(args.steps), "--epochs", str(args.epochs)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per process (Lightning then leaves the count alone)
    load = os.getloadavg()[0]  # the machine's 1-minute load average as the run starts
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"the {devices}-process run failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[0].removeprefix("RESULT ")), "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/phantom_unet.yaml")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps an epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1- and 2-process runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantom"
        generate_phantom(root, seed=0, num_cases=14, voxel_mm=4.0)
        for r in range(args.rounds):
            one, two = run(1, root, args), run(2, root, args)
            rounds.append((one, two))
            print(f"round {r + 1}: {one['volumes_per_s']:.2f} volumes/s on 1 process, {two['volumes_per_s']:.2f} on 2")
    speedups = [two["volumes_per_s"] / one["volumes_per_s"] for one, two in rounds]
    command = (
        f".venv/bin/python benchmarks/scaling.py --experiment {args.experiment} --steps {args.steps} "
        f"--epochs {args.epochs} --rounds {args.rounds}"
    )
    lines = [
        "# Scaling: training volumes/s on 1 and 2 processes (DDP, gloo, CPU)",
        "",
        f"Experiment `{args.experiment}` on a generated 14-case phantom, {PER_PROCESS_BATCH} volumes a step per "
        f"process, {args.steps} steps an epoch, {args.epochs - 1} timed epochs after a warm-up, one torch thread per "
        f"process; {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, lightning "
        f"{L.__version__}. Measured on a shared machine under load from other jobs: the absolute rates vary with "
        "it; the speed-up of each round, the 1- and 2-process runs measured one after the other, is the result.",
        "",
        "| round | 1 process (volumes/s) | 2 processes (volumes/s) | speed-up | load average as each starts |",
        "|---:|---:|---:|---:|---|",
        *[
            f"| {i + 1} | {one['volumes_per_s']:.2f} | {two['volumes_per_s']:.2f} | {speedup:.2f} "
            f"| {one['load']:.1f}, {two['load']:.1f} |"
            for i, ((one, two), speedup) in enumerate(zip(rounds, speedups, strict=True))
        ],
        "",
        f"Median speed-up: {statistics.median(speedups):.2f} (ideal: 2.00). The load average is the machine's "
        "1-minute average, in processes wanting a core: where it is near the core count before the run, other jobs "
        "hold the cores a second process would need. CPU only: no GPU was available to this measurement.",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
