"""Experiment loggers from config: W&B (offline without credentials, never prompting), CSV, or none.

W&B modes (``logger.mode``, or the ``WANDB_MODE`` environment variable, which wins):

- ``auto``: online when credentials exist (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or a ``wandb login``
  netrc entry for the server) and the server answers within ``logger.connect_timeout_s``; otherwise offline, with
  a warning when credentials exist but the server does not answer.
- ``online``: the same checks, but a failing one is a :class:`~h3de.errors.ConfigError` (one line, before the run
  directory exists).
- ``offline``: the run is written under ``<run dir>/wandb/offline-run-*`` (upload later with ``wandb sync``);
  nothing leaves the machine: W&B's own telemetry and error reporting are switched off for the process.
- ``disabled``: W&B calls do nothing.

The W&B run is finished when training ends, so the next ``train`` in the same process starts a new one.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _flatten_dict
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from h3de.errors import ConfigError

__all__ = ["H3deWandbLogger", "build_loggers", "resolve_logger", "wandb_mode"]


def _has_wandb_credentials(base_url: str) -> bool:
    """An API key or identity token in the environment, or a ``wandb login`` netrc entry for ``base_url``."""
    import wandb
    from wandb.sdk.lib.wbauth import wbnetrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return wbnetrc.read_netrc_auth(host=base_url) is not None
    except wandb.Error:  # an entry in a bad format: wandb.init names it
        return True


def _base_url() -> str:
    """The W&B server that ``wandb.init`` would use (``WANDB_BASE_URL``, ``wandb login --host``, or W&B's cloud)."""
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings.base_url


def server_unreachable(url: str, timeout_s: float) -> str | None:
    """None if an HTTP server answers at ``url`` (any status) within ``timeout_s``, else why not.

    The request runs in a daemon thread so that a stalled DNS lookup is bounded by ``timeout_s`` too.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # it answered
            outcome.append(None)
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            outcome.append(str(reason) or type(reason).__name__)

    thread = threading.Thread(target=probe, name="h3de-wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def _quiet_wandb(offline: bool) -> None:
    """Environment for wandb (it reads these itself, also in its wandb-core service process): no console noise; no
    SDK telemetry or crash reports unless WANDB_ERROR_REPORTING says otherwise, and never in an offline run (the
    telemetry exporter probes the W&B server even then)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    if offline:
        os.environ["WANDB_ERROR_REPORTING"] = "false"
    else:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


def wandb_mode(cfg: DictConfig) -> str:
    """The W&B mode asked for, before any check: ``WANDB_MODE`` if set, else ``cfg.mode`` (a logger section)."""
    return os.environ.get("WANDB_MODE") or cfg.mode


def _check_online(mode: str, timeout_s: float) -> str:
    """ "online" or "offline" for a run asked to be ``mode`` ("auto", or "online"/"run": then failures are errors)."""
    _quiet_wandb(offline=False)
    url = _base_url()
    source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "logger.mode"
    fallback = "or set logger.mode=offline and upload the run later with `wandb sync`"
    if not _has_wandb_credentials(url):
        if mode == "auto":
            return "offline"
        raise ConfigError(
            f"{source}={mode} needs W&B credentials for {url}: set WANDB_API_KEY or run `wandb login`, {fallback}"
        )
    problem = server_unreachable(url, timeout_s)
    if problem is None:
        return "online"
    if mode != "auto":
        raise ConfigError(f"{source}={mode}: the W&B server {url} does not answer ({problem}); {fallback}")
    warnings.warn(
        f"the W&B server {url} does not answer ({problem}): logging offline instead (upload the run later with "
        "`wandb sync`)",
        UserWarning,
        stacklevel=3,
    )
    return "offline"


def resolve_logger(cfg: DictConfig, rank_zero: bool = True) -> DictConfig:
    """The experiment's ``logger`` section ready for :func:`build_loggers`: the W&B mode settled and checked.

    Call it before the run directory exists. ``auto`` becomes online with credentials and an answering server, and
    offline otherwise (with a warning when credentials exist but the server does not answer). ``online`` without
    credentials or without an answering server is a :class:`ConfigError`. The group defaults to the experiment
    name, so a dashboard groups the runs of one experiment file. Processes other than rank zero log nothing to W&B
    and skip the checks.
    """
    logger = OmegaConf.create(OmegaConf.to_container(cfg.logger))
    logger.group = logger.group or cfg.name
    if logger.name != "wandb":
        return logger
    mode = wandb_mode(logger)
    if mode not in ("auto", "online", "offline", "disabled", "dryrun", "run"):
        raise ConfigError(f"WANDB_MODE={mode!r} is not one of online, offline, disabled")
    if mode == "dryrun":
        mode = "offline"
    elif mode in ("auto", "online", "run"):
        mode = _check_online(mode, logger.connect_timeout_s) if rank_zero else "offline"
    logger.mode = mode
    return logger


class H3deWandbLogger(WandbLogger):
    """Lightning's WandbLogger with the resolved config as flat ``section.key`` run config (the names that
    ``key=value`` overrides and W&B sweep parameters use), W&B errors turned into one-line ConfigErrors, and
    the run finished when training ends."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; Lightning passes it, wandb warns about it

    @property
    def experiment(self) -> Any:
        import wandb

        try:
            return super().experiment
        except (wandb.Error, TimeoutError) as error:
            raise ConfigError(f"W&B: {str(error).strip().splitlines()[0]}") from None

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        params = dict(vars(params) if isinstance(params, Namespace) else params)
        config = params.pop("config", None)
        if isinstance(config, dict):
            params.update(_flatten_dict(config, delimiter="."))
        super().log_hyperparams(params)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and status in ("success", "failed", "finished"):
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str, run_id: str | None = None) -> list[Logger]:
    """Loggers writing into ``run_dir``: logs/metrics.csv always (unless "none"), plus W&B for "wandb" (run ``run_id``,
    resumed if it exists).

    ``cfg`` is the logger section from :func:`resolve_logger` (its mode settled).
    """
    if cfg.name == "none":
        return []
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.name == "wandb":
        mode = cfg.mode
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode={mode!r}: pass the logger section through resolve_logger first")
        _quiet_wandb(offline=mode != "online")
        wandb = H3deWandbLogger(
            name=run_name,
            id=run_id,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            job_type="train",
            save_dir=str(run_dir),
            mode=mode,
            log_model=False,
        )
        loggers.insert(0, wandb)
    return loggers
