"""Experiment loggers from config: W&B (offline without credentials, never prompting), CSV, or none."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from h3de.config import LoggerConfig

__all__ = ["build_loggers", "wandb_mode"]


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: LoggerConfig) -> str:
    """The W&B mode to run in: ``WANDB_MODE`` if set, else the config's, with "auto" resolved."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _has_wandb_credentials() else "offline"


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, run_id: str | None = None) -> list[Logger]:
    """Loggers writing into ``run_dir``: logs/metrics.csv always (unless "none"), plus W&B for "wandb" (run ``run_id``,
    resumed if it exists)."""
    if cfg.name == "none":
        return []
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.name == "wandb":
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb = WandbLogger(
            name=run_name,
            id=run_id,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            save_dir=str(run_dir),
            mode=wandb_mode(cfg),
            log_model=False,
        )
        loggers.insert(0, wandb)
    return loggers
