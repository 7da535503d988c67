"""Reproducible runs: per-epoch seeding (so a resumed run draws what an uninterrupted one would) and run_info.json.

Every random draw of training comes from ``(seed, epoch)`` and the place in the epoch: the sample order and each
sample's augmentation seed are :class:`h3de.data.sampling.EpochSampler`'s, a function of ``(seed, epoch)``, and the
sample's random transforms are seeded with its own seed just before it is drawn
(:class:`h3de.data.sampling.SeededSamples`), in whichever loader worker (``data.num_workers``) draws it; before the
epoch's first step, :class:`EpochSeeding` seeds the global torch, numpy and Python generators from
``(seed, epoch, rank)``. Nothing random carries over from one epoch to the next, so a run resumed at an epoch boundary
continues exactly, with or without loader workers, and a run draws the same samples whatever their number.
"""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from h3de.io_utils import atomic_write

__all__ = ["EpochSeeding", "epoch_seed", "run_info", "write_run_info"]

_PACKAGES = ("h3de", "torch", "lightning", "monai", "numpy", "torchmetrics", "omegaconf", "wandb")


def epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A 32-bit seed of its own for each (seed, epoch, rank, stream)."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


class EpochSeeding(L.Callback):
    """Seed the global generators (dropout, anything drawn in the training step) from ``(seed, epoch, rank)``.

    They are seeded at the epoch's first ``on_train_batch_start``, after the loader's iterator exists (Lightning
    makes it before the epoch hooks when resuming and after them otherwise; making it draws from the global
    generator). The augmentation is seeded per sample by the sampler (:mod:`h3de.data.sampling`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            seed = epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank, 1)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)  # every device's generator too


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """Output of ``git args`` run in the folder of the h3de source, or None (no git, not a checkout)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_info() -> dict[str, Any]:
    """Versions of Python and the packages a run depends on, and the git commit of the h3de source, if any.

    ``git.dirty`` is true when tracked files differ from the commit (untracked files are ignored).
    """
    commit = _git("rev-parse", "HEAD")
    git = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        git = {"commit": commit, "dirty": None if status is None else bool(status)}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cuda": torch.version.cuda,
        "git": git,
    }


def write_run_info(run_dir: Path, resumed_from: dict[str, Any] | None = None) -> None:
    """Append this session's :func:`run_info` to ``run_dir/run_info.json`` (atomically).

    The file holds ``{"sessions": [...]}``: the run's start, then one entry per resume, each with the checkpoint,
    epoch and step it resumed from, so a run continued under other code or versions says so.
    """
    path = run_dir / "run_info.json"
    sessions = json.loads(path.read_text())["sessions"] if path.is_file() else []
    info = run_info()
    if resumed_from is not None:
        info["resumed_from"] = resumed_from
    atomic_write(path, json.dumps({"sessions": [*sessions, info]}, indent=2) + "\n")
