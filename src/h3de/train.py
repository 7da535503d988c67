"""``train(cfg)``: validate the data and model, make the run directory, fit, return the results."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from h3de.config import save_config, to_container
from h3de.data.datamodule import LandmarkDataModule
from h3de.distributed import StopAllRanks, is_first_process, world_size
from h3de.errors import H3deError
from h3de.loggers import build_loggers
from h3de.module import LandmarkModule
from h3de.networks import network_spec
from h3de.precision import check_precision

__all__ = ["TrainResult", "train", "make_run_dir"]

_RUN_DIR_ENV = "H3DE_RUN_DIR"  # lets re-launched DDP workers write into rank 0's run directory


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    best_val_mre_mm: float | None
    val_spread_mm: float  # MRE of predicting each landmark at its mean training position
    is_global_zero: bool  # False in the other processes of a multi-process run
    metrics: dict[str, float] = field(default_factory=dict)


def make_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/name/<timestamp>`` (new, unique), made by the first process of a launch only.

    The other processes write nothing there: Lightning's re-launched DDP workers get rank 0's path; under torchrun
    or SLURM, which start every process at once, they get the path uncreated (their checkpoint callback takes rank
    0's folder by broadcast).
    """
    base = Path(cfg.output_dir) / cfg.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if not is_first_process():
        return Path(os.environ.get(_RUN_DIR_ENV, base / stamp))
    run_dir, n = base / stamp, 1
    while run_dir.exists():
        run_dir, n = base / f"{stamp}-{n}", n + 1
    run_dir.mkdir(parents=True)
    os.environ[_RUN_DIR_ENV] = str(run_dir)
    return run_dir


def _remove_untrained_run_dir(run_dir: Path) -> None:
    """Delete a run directory that holds only what this run wrote before training, and its parent if empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # output_dir/name, when this run made it


def train(cfg: DictConfig) -> TrainResult:
    """Train the experiment ``cfg`` (a resolved config from :func:`h3de.config.load_config`).

    Everything that can fail on user input (manifest, images, landmark files, model arguments) is
    checked before the run directory is created. A user-input error raised while fitting, before the
    first optimiser step, removes the run directory again.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    heatmaps = network_spec(cfg.model.name).output == "heatmap"
    datamodule = LandmarkDataModule(
        cfg.data, heatmaps=heatmaps, detection=cfg.detection, local=cfg.local, seed=cfg.seed
    )
    module = LandmarkModule(to_container(cfg), datamodule.landmark_names)
    check_precision(cfg.trainer)
    datamodule.check_world_size(world_size(cfg.trainer))  # devices this machine has, and work they can share
    datamodule.setup("fit")  # reads and checks every train and val image before anything is written

    run_dir = make_run_dir(cfg)
    if is_first_process():
        save_config(cfg, run_dir / "config.yaml")
    loggers = build_loggers(cfg.logger, run_dir, run_name=f"{cfg.name}-{run_dir.name}")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/mre_mm",
        mode="min",
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(  # every epoch's end, whether val improved or not
        dirpath=run_dir / "checkpoints",
        filename="last",
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    ranks = StopAllRanks()
    callbacks = [checkpoint, last, ranks] + ([LearningRateMonitor("step")] if loggers else [])
    t = cfg.trainer
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=loggers or False,
        callbacks=callbacks,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time=t.max_time,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches if t.limit_train_batches != 1.0 else None,
        limit_val_batches=t.limit_val_batches if t.limit_val_batches != 1.0 else None,
        fast_dev_run=t.fast_dev_run,
        deterministic=t.deterministic,
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
    )
    try:
        with ranks.errors():
            trainer.fit(module, datamodule=datamodule)
    except H3deError:
        if trainer.is_global_zero and trainer.global_step == 0:
            _remove_untrained_run_dir(run_dir)
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    score = checkpoint.best_model_score
    spread = datamodule.mean_position_baseline_mm("val")
    score = float(score) if score is not None else None
    return TrainResult(run_dir, best, score, spread, trainer.is_global_zero, metrics)
