"""``h3de train [EXPERIMENT.yaml] resume=last|PATH``: continue a run where its last checkpoint left it.

A resumed run writes into the same run directory and W&B run (the id is kept in ``wandb_run_id``), and Lightning
restores the epoch, step, optimiser, LR scheduler and callback states from the checkpoint; the data order and every
random draw are functions of ``(seed, epoch)`` (:mod:`h3de.reproducibility`), so a run resumed from an epoch's end
continues as if it had never stopped. ``logs/metrics.csv`` keeps the rows logged before the checkpoint's step and
continues after them.

The run's saved ``config.yaml`` is the config. An experiment file or overrides given with ``resume=`` must agree
with it except for the budget and display keys :data:`MAY_CHANGE`; a different model or dataset is refused, before
any work starts. The cosine LR schedule spans the step budget fixed at the run's start, so with
``optim.scheduler=cosine`` only ``trainer.max_time`` of the budget may change.
"""

from __future__ import annotations

import csv
import secrets
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from h3de.checkpoints import newest_run, read_checkpoint
from h3de.config import config_from_dict, load_config
from h3de.errors import ConfigError, DataError
from h3de.io_utils import atomic_write, csv_text

__all__ = ["ResumePoint", "MAY_CHANGE", "prepare_resume", "split_resume", "wandb_run_id", "continue_csv_log"]

MAY_CHANGE = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.enable_progress_bar")
_STEP_BUDGET = ("trainer.max_epochs", "trainer.max_steps")
_IDENTITY = ("model", "data", "loss", "detection", "local")  # the sections that make the model and its dataset
_IGNORED = ("output_dir",)  # the run directory is where it is, whatever output_dir says now
_WANDB_ID_FILE = "wandb_run_id"


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: its directory, the checkpoint, and what the checkpoint holds."""

    run_dir: Path
    checkpoint: Path
    epoch: int
    global_step: int
    landmark_names: tuple[str, ...]

    def check_landmarks(self, names: list[str]) -> None:
        """Refuse a dataset whose landmarks differ from those the checkpoint was trained on."""
        if tuple(names) != self.landmark_names:
            raise DataError(
                f"resume: the dataset's landmarks {list(names)} differ from those of {self.checkpoint} "
                f"{list(self.landmark_names)}: it belongs to another dataset"
            )

    def describe(self) -> dict:
        return {"checkpoint": str(self.checkpoint.resolve()), "epoch": self.epoch, "global_step": self.global_step}


def split_resume(items: list[str]) -> tuple[str | None, list[str]]:
    """``resume=X`` taken out of a command's ``key=value`` list: (X or None, the other items)."""
    values = [item.split("=", 1)[1] for item in items if item.startswith("resume=")]
    if len(values) > 1:
        raise ConfigError(f"resume= given {len(values)} times: give one run directory, checkpoint or 'last'")
    if values and not values[0]:
        raise ConfigError("resume= needs a value: 'last', a run directory or a .ckpt file")
    return (values[0] if values else None), [item for item in items if not item.startswith("resume=")]


def _find_run(resume: str, cfg: DictConfig) -> tuple[Path, Path]:
    """(run directory, checkpoint) that ``resume`` names."""
    if resume == "last":
        base = Path(cfg.output_dir) / cfg.name
        run = newest_run(base, "checkpoints/last.ckpt")
        if run is None:
            raise ConfigError(f"resume=last: no run of experiment '{cfg.name}' in {base} has a checkpoints/last.ckpt")
        return run, run / "checkpoints" / "last.ckpt"
    path = Path(resume)
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise ConfigError(f"resume={resume}: no checkpoints/last.ckpt in this folder (give a run directory)")
        return path, checkpoint
    if path.is_file():
        run = path.parent.parent
        if path.parent.name != "checkpoints" or not (run / "config.yaml").is_file():
            raise ConfigError(
                f"resume={resume}: not a checkpoint of a run directory (<run>/checkpoints/*.ckpt beside "
                "<run>/config.yaml); only a run can be continued"
            )
        return run, path
    raise ConfigError(f"resume={resume}: no such run directory or checkpoint")


def _flat(cfg: DictConfig | dict) -> dict[str, object]:
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(values, "")
    return out


def _differences(saved: DictConfig | dict, other: DictConfig | dict) -> dict[str, tuple[object, object]]:
    a, b = _flat(saved), _flat(other)
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and k not in _IGNORED}


def _describe(differences: dict[str, tuple[object, object]], limit: int = 4) -> str:
    shown = [f"{k}={new!r} here, {old!r} in the run" for k, (old, new) in list(differences.items())[:limit]]
    more = f" and {len(differences) - limit} more" if len(differences) > limit else ""
    return "; ".join(shown) + more


def _check_same_run(saved: DictConfig, wanted: DictConfig, saved_path: Path) -> None:
    """Refuse ``wanted`` unless it differs from the run's ``saved`` config in :data:`MAY_CHANGE` keys only."""
    differences = _differences(saved, wanted)
    identity = {k: v for k, v in differences.items() if k.split(".")[0] in _IDENTITY}
    if identity:
        raise ConfigError(
            f"resume: the run {saved_path.parent} belongs to a different model or dataset: {_describe(identity)} "
            f"({saved_path})"
        )
    other = {k: v for k, v in differences.items() if k not in MAY_CHANGE}
    if other:
        raise ConfigError(
            f"resume: only {', '.join(MAY_CHANGE)} may differ from the run's config ({saved_path}): {_describe(other)}"
        )
    budget = [k for k in _STEP_BUDGET if k in differences]
    if budget and saved.optim.scheduler == "cosine":
        raise ConfigError(
            f"resume: {', '.join(budget)} cannot change with optim.scheduler=cosine: the schedule spans the step "
            "budget fixed when the run started (trainer.max_time may change; or start a new run)"
        )


def prepare_resume(resume: str, path: str | None, overrides: list[str]) -> tuple[DictConfig, ResumePoint]:
    """The config and checkpoint of the run that ``resume`` names, checked before any work starts.

    Args:
        resume: ``last`` (the newest run of the experiment under ``output_dir/name`` with a ``last.ckpt``), a run
            directory (its ``checkpoints/last.ckpt``) or a checkpoint inside a run directory.
        path: the experiment YAML given with it, or None (then the run's ``config.yaml`` is the base).
        overrides: ``key=value`` overrides; with the experiment file they must give the run's config, up to
            :data:`MAY_CHANGE`.

    Raises:
        ConfigError: no such run or checkpoint; a config that differs from the run's beyond :data:`MAY_CHANGE`
            (a different model or dataset is named as such).
        H3deError: a truncated or unreadable checkpoint (named).
    """
    located = load_config(path, overrides)
    run_dir, checkpoint = _find_run(resume, located)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume={resume}: {run_dir} has no config.yaml; it is not a run directory of h3de train")
    saved = load_config(saved_path)
    wanted = located if path is not None else load_config(saved_path, overrides)
    _check_same_run(saved, wanted, saved_path)
    state = read_checkpoint(checkpoint)
    hparams = state.get("hyper_parameters", {})
    if "config" not in hparams or "landmark_names" not in hparams or "epoch" not in state:
        raise ConfigError(f"resume: {checkpoint} is not a training checkpoint of h3de train")
    trained = config_from_dict(hparams["config"])
    identity = {k: v for k, v in _differences(saved, trained).items() if k.split(".")[0] in _IDENTITY}
    if identity:
        raise ConfigError(
            f"resume: {checkpoint} belongs to a different model or dataset than its run's config: {_describe(identity)}"
        )
    cfg = saved.copy()
    for key in MAY_CHANGE:
        OmegaConf.update(cfg, key, OmegaConf.select(wanted, key), merge=False)
    point = ResumePoint(
        run_dir, checkpoint, int(state["epoch"]), int(state["global_step"]), tuple(hparams["landmark_names"])
    )
    return cfg, point


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read from its ``wandb_run_id`` file, or made and written there."""
    path = run_dir / _WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
    atomic_write(path, run_id + "\n")
    return run_id


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer appending to an existing ``metrics.csv`` (it would delete it otherwise)."""

    def __init__(self, log_dir: str, keys: list[str]) -> None:
        super().__init__(log_dir)
        self.metrics_keys = list(keys)

    def _check_log_dir_exists(self) -> None:
        return None


def continue_csv_log(loggers: list[Logger], global_step: int) -> None:
    """Keep the rows of the run's ``metrics.csv`` logged before ``global_step`` and append the resumed run's after them.

    Rows of the interrupted epoch (at or after the checkpoint's step) are dropped: the resumed run logs them again.
    """
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        keys: list[str] = []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [row for row in reader if row.get("step") and int(float(row["step"])) < global_step]
                keys = list(reader.fieldnames or [])
            atomic_write(path, csv_text(keys, [[row[k] for k in keys] for row in rows]))
        logger._experiment = _ContinuedWriter(logger.log_dir, keys)
