"""``train(cfg)``: validate the data and model, make the run directory, fit, return the results."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from h3de.callbacks import WandbPanels
from h3de.checkpoints import AtomicCheckpointIO
from h3de.config import save_config, to_container
from h3de.data.datamodule import LandmarkDataModule
from h3de.distributed import StopAllRanks, is_first_process, world_size
from h3de.errors import ConfigError
from h3de.io_utils import missing_folders, remove_empty_folders
from h3de.loggers import build_loggers, resolve_logger
from h3de.module import LandmarkModule
from h3de.networks import network_spec
from h3de.precision import check_precision
from h3de.progress import StderrProgressBar
from h3de.reproducibility import EpochSeeding, write_run_info
from h3de.resume import ResumePoint, continue_csv_log, wandb_run_id

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


def _remove_untrained_run_dir(run_dir: Path, made: list[Path]) -> None:
    """Delete a run directory that holds only what this run wrote before training, and the folders above it that
    ``make_run_dir`` made (``made``: output_dir/name, output_dir, ... deepest first) if they are left empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_empty_folders(made)


def train(cfg: DictConfig, resume: ResumePoint | None = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train the experiment ``cfg`` (a resolved config from :func:`h3de.config.load_config`).

    ``callbacks`` are added to the Trainer's own (e.g. a sweep's pruning callback).

    Everything that can fail on user input (manifest, images, landmark files, model arguments) is
    checked before the run directory is created. An error raised before the first optimiser step (a user-input
    error, or any other) removes the run directory again, and the folders above it that were made for it.

    With ``resume`` (:func:`h3de.resume.prepare_resume`), the run continues in its own directory from its checkpoint.
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
    if resume is not None:
        resume.check_landmarks(datamodule.landmark_names)
        os.environ[_RUN_DIR_ENV] = str(resume.run_dir)
    logger_cfg = resolve_logger(cfg, rank_zero=int(os.environ.get("LOCAL_RANK", "0")) == 0)  # W&B mode checked

    made = missing_folders(Path(cfg.output_dir) / cfg.name)  # output_dir/name and the parents it lacks
    run_dir = make_run_dir(cfg) if resume is None else resume.run_dir
    ranks = StopAllRanks()  # one error, and every process stopped, when one process fails
    try:
        trainer, checkpoint = _build_trainer(cfg, logger_cfg, run_dir, resume, [ranks, *callbacks])
    except BaseException:  # nothing trained yet: leave no run directory behind
        if resume is None and is_first_process():
            _remove_untrained_run_dir(run_dir, made)
        raise
    try:
        with warnings.catch_warnings(), ranks.errors():
            if resume is not None:  # the run's own checkpoints, overwritten as the run goes on
                warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume and resume.checkpoint, weights_only=True)
    except BaseException:  # also errors Lightning or torch raise at the first step: nothing trained, nothing kept
        if resume is None and trainer.is_global_zero and trainer.global_step == 0:
            _remove_untrained_run_dir(run_dir, made)
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    score = checkpoint.best_model_score
    spread = datamodule.mean_position_baseline_mm("val")
    score = float(score) if score is not None else None
    return TrainResult(run_dir, best, score, spread, trainer.is_global_zero, metrics)


def _build_trainer(
    cfg: DictConfig, logger_cfg: DictConfig, run_dir: Path, resume: ResumePoint | None, extra: Sequence[Callback] = ()
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Trainer writing into ``run_dir`` (config.yaml, run_info.json and the loggers' files are written here);
    ``logger_cfg`` is the logger section from :func:`h3de.loggers.resolve_logger`."""
    run_id = None  # W&B logs from rank 0 only
    if is_first_process():
        save_config(cfg, run_dir / "config.yaml")
        write_run_info(run_dir, resume and resume.describe())
        run_id = wandb_run_id(run_dir) if cfg.logger.name == "wandb" else None
    loggers = build_loggers(logger_cfg, run_dir, run_name=f"{cfg.name}-{run_dir.name}", run_id=run_id)
    if resume is not None and is_first_process():
        continue_csv_log(loggers, resume.global_step)
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
    callbacks = [checkpoint, last, EpochSeeding(cfg.seed), *extra] + ([LearningRateMonitor("step")] if loggers else [])
    callbacks += [StderrProgressBar()] if cfg.trainer.enable_progress_bar else []
    if logger_cfg.name == "wandb":
        callbacks.append(WandbPanels(cfg.sdr_radii_mm, logger_cfg.image_every_n_epochs, logger_cfg.log_checkpoint))
    t = cfg.trainer
    try:
        trainer = _trainer(t, run_dir, loggers, callbacks)
    except (ValueError, MisconfigurationException) as e:  # a trainer.* value that Lightning refuses
        raise ConfigError(f"Lightning refuses the trainer settings: {str(e).strip().splitlines()[0]}") from None
    return trainer, checkpoint


def _trainer(t: DictConfig, run_dir: Path, loggers: list, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
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
        plugins=[AtomicCheckpointIO()],
    )
