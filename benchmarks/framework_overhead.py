"""The framework's own cost per training step: h3de's Trainer against a bare PyTorch loop doing the same work.

Both run the same network, loss, optimiser (AdamW with the experiment's cosine schedule stepped every step) and the
same pre-collated training batches, held in memory (drawn once from the experiment's DataModule on a small generated
phantom), so data loading is out of both. The bare loop is forward, the readout's loss, zero_grad, backward, step,
scheduler step. h3de is ``lightning.Trainer.fit`` of the LandmarkModule with what ``h3de train`` adds per step: the
CSV logger, the LR monitor, the per-step decoding of the training predictions to world mm for the train MRE, the
metric updates and logging (no progress bar). Time is the wall clock of each epoch's steps, from the epoch's start to
its end: the work done once an epoch (the train MRE summary; in ``h3de train`` also the checkpoints) is left out.
The first epoch of each is a warm-up. The two alternate, round after round (each going first in turn), on fresh
copies of the same initial weights, so a change in the machine's load hits both; the ratio of each round is
reported, and their median. Rewrites benchmarks/framework_overhead.md.

    .venv/bin/python benchmarks/framework_overhead.py [--steps 8] [--epochs 4] [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from epoch_clock import EpochClock
from lightning.pytorch.callbacks import LearningRateMonitor
from report import write_report

from h3de.config import load_config, to_container
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.phantom import generate_phantom
from h3de.loggers import build_loggers
from h3de.module import LandmarkModule
from h3de.networks import network_spec

SETTINGS = {  # name -> overrides of experiments/phantom_unet.yaml
    "U-Net 48^3 (phantom_unet)": [],
    "small U-Net 32^3": ["data.patch_size=[32,32,32]", "model.unet.channels=[8,16,32]", "model.unet.strides=[2,2]"],
}


class Batches:
    """The collated batches as one iterable of known length (a plain list would be read as several loaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _batches(cfg, steps: int) -> tuple[list[dict], list[str]]:
    """``steps`` augmented training batches, collated, and the landmark names."""
    datamodule = LandmarkDataModule(
        cfg.data, heatmaps=network_spec(cfg.model.name).output == "heatmap", detection=cfg.detection, seed=0
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    return list(itertools.islice(itertools.cycle(loader), steps)), datamodule.landmark_names


def bare_loop(module: LandmarkModule, batches: list[dict], epochs: int) -> float:
    """Seconds per step of forward, loss, backward, optimiser and scheduler steps, after a warm-up epoch."""
    cfg = module.cfg.optim
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(batches))
    module.train()
    seconds = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        for batch in batches:
            loss = module.readout.loss(module.network(batch["image"]), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if epoch > 0:
            seconds += time.perf_counter() - start
    return seconds / ((epochs - 1) * len(batches))


def h3de_fit(module: LandmarkModule, batches: list[dict], epochs: int, run_dir: Path) -> float:
    """Seconds per step of ``Trainer.fit`` as ``h3de train`` sets it up (no validation, no progress bar)."""
    clock = EpochClock()
    loggers = build_loggers(module.cfg.logger, run_dir, run_name="overhead")
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=[clock, LearningRateMonitor("step")],
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        log_every_n_steps=module.cfg.trainer.log_every_n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=Batches(batches))
    return clock.seconds / clock.steps


def measure(name: str, overrides: list[str], root: Path, args: argparse.Namespace) -> dict:
    cfg = load_config(
        "experiments/phantom_unet.yaml",
        [f"data.root={root}", "data.num_workers=0", "logger=csv", *overrides],
    )
    L.seed_everything(0, verbose=False)
    batches, names = _batches(cfg, args.steps)
    template = LandmarkModule(to_container(cfg), names)
    bare, framework = [], []
    for r in range(args.rounds):
        for side in ("bare", "h3de") if r % 2 == 0 else ("h3de", "bare"):  # either goes first in turn
            if side == "bare":
                bare.append(bare_loop(copy.deepcopy(template), batches, args.epochs))
                continue
            with tempfile.TemporaryDirectory() as run_dir:
                framework.append(h3de_fit(copy.deepcopy(template), batches, args.epochs, Path(run_dir)))
        print(f"{name}, round {r + 1}: bare {1000 * bare[-1]:.1f} ms, h3de {1000 * framework[-1]:.1f} ms a step")
    ratios = [f / b for f, b in zip(framework, bare, strict=True)]
    return {
        "name": name,
        "batch": cfg.data.batch_size,
        "bare_ms": 1000 * statistics.median(bare),
        "h3de_ms": 1000 * statistics.median(framework),
        "ratios": ratios,
        "overhead": 100 * (statistics.median(ratios) - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training batches an epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each run, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=4, help="alternating bare / h3de measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantom"
        generate_phantom(root, seed=0, num_cases=8, voxel_mm=4.0)
        rows = [measure(name, overrides, root, args) for name, overrides in SETTINGS.items()]
    command = (
        f".venv/bin/python benchmarks/framework_overhead.py --steps {args.steps} --epochs {args.epochs} "
        f"--rounds {args.rounds} --threads {args.threads}"
    )
    lines = [
        "# Framework overhead per training step",
        "",
        f"{args.steps} pre-collated batches an epoch held in memory, {args.epochs - 1} timed epochs after a warm-up, "
        f"{args.rounds} rounds alternating a bare PyTorch loop and h3de's Trainer on the same batches and initial "
        f"weights; {args.threads} torch thread(s), {platform.machine()} CPU, torch {torch.__version__}, lightning "
        f"{L.__version__}. Measured on a shared machine under load from other jobs: the absolute times vary with "
        "it; the ratio of each round, bare and h3de measured side by side, is the result. See the script's "
        "docstring for what each side does.",
        "",
        "| setting | batch | bare loop (ms/step) | h3de (ms/step) | h3de / bare, each round | overhead (median) |",
        "|---|---:|---:|---:|---|---:|",
        *[
            f"| {r['name']} | {r['batch']} | {r['bare_ms']:.1f} | {r['h3de_ms']:.1f} | "
            f"{', '.join(f'{x:.3f}' for x in r['ratios'])} | {r['overhead']:+.1f}% |"
            for r in rows
        ],
        "",
        "Goal: overhead <= 10%.",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
