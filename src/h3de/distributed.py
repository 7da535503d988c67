"""Multi-process runs on Lightning's own launchers: the device count checked before any work, and one error for all.

- :func:`world_size` reads ``trainer.devices`` and ``trainer.num_nodes``, refusing more devices than the machine has
  (on the CPU a device is a process: at most one per usable core) and, under ``torchrun`` or SLURM, a device count
  that disagrees with the launcher's (Lightning's own rule, checked here before the run directory exists).
- :class:`StopAllRanks` makes a failure in any process end every process with that one error. Lightning's
  launcher (``strategy=ddp`` started as one command) runs rank 0 in the command's process and starts the others as
  children. The failing process prints its own error; the peers blocked in a collective then fail with
  "connection closed by peer": rank 0 reports which rank failed in one line, instead of its own traceback, and
  stops the other children, which never print theirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, ListConfig

from h3de.errors import ConfigError, H3deError

__all__ = [
    "RankFailedError",
    "StopAllRanks",
    "available_devices",
    "is_first_process",
    "resolve_accelerator",
    "world_size",
]

_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "connection refused")  # gloo's, when a peer is gone
_CHILD_EXIT_WAIT_S = 10.0  # how long rank 0 waits for a failing child process to exit


class RankFailedError(H3deError):
    """Another process of a multi-process run failed (and printed its own error)."""


def is_first_process() -> bool:
    """Whether this process is the first (global rank 0) of its launch, or runs alone: the one that makes the run
    directory. Read from the launchers' environment: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun), ``NODE_RANK`` and
    ``LOCAL_RANK`` (Lightning's own launcher)."""
    return all(int(os.environ.get(key, "0")) == 0 for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def resolve_accelerator(accelerator: str) -> str:
    """The device kind Lightning runs ``trainer.accelerator`` on: "cpu", "cuda", "mps", or the name as given."""
    name = str(accelerator).lower()
    if name in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu" if name == "auto" else "cuda"
    return name


def available_devices(kind: str) -> int | None:
    """Devices of ``kind`` this machine has (for "cpu": the cores this process may use); None for kinds not known."""
    if kind == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    return None


def _devices_per_node(devices: Any, kind: str, available: int | None) -> int:
    """Processes per node that ``trainer.devices`` asks for, refused beyond ``available``."""
    ids = None
    if isinstance(devices, ListConfig | list | tuple) or (isinstance(devices, str) and "," in devices):
        items = devices.split(",") if isinstance(devices, str) else list(devices)
        try:
            ids = [int(str(d).strip()) for d in items if str(d).strip()]
        except ValueError:
            raise ConfigError(f"trainer.devices={devices!r} is not a list of device ids") from None
    if ids is not None:
        if kind == "cpu":
            raise ConfigError(f"trainer.devices={list(ids)}: on the CPU, devices is a process count, not a list of ids")
        if available is not None and any(not 0 <= i < available for i in ids):
            raise ConfigError(
                f"trainer.devices={list(ids)} names a {kind} device this machine lacks ({available} found)"
            )
        if len(set(ids)) != len(ids):
            raise ConfigError(f"trainer.devices={list(ids)} names a device twice")
        return len(ids)
    text = str(devices).strip()
    if text == "auto":
        return 1 if kind == "cpu" or available is None else max(available, 1)
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"trainer.devices={devices!r} is not a count, a list of device ids or 'auto'") from None
    if count == -1 and kind != "cpu" and available is not None:
        count = available
    if count < 1:
        every = "" if kind == "cpu" else f" (or -1: every {kind} device)"
        raise ConfigError(f"trainer.devices={devices!r} must be a positive count{every}")
    if available is not None and count > available:
        what = "usable CPU cores (one process per device)" if kind == "cpu" else f"{kind} devices"
        raise ConfigError(f"trainer.devices={count} is more than this machine has: {available} {what}")
    return count


def world_size(trainer: DictConfig) -> int:
    """Processes of the run (``devices`` per node x ``num_nodes``), after checking them against this machine and,
    under ``torchrun`` or SLURM, against the launcher's process counts.

    Raises:
        ConfigError: more devices than the machine has, a device id it lacks, or counts the launcher disagrees with.
    """
    kind = resolve_accelerator(trainer.accelerator)
    available = available_devices(kind)
    if kind == "cuda" and not available:
        raise ConfigError(f"trainer.accelerator={trainer.accelerator} needs a CUDA GPU, and none is visible")
    if trainer.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be positive, got {trainer.num_nodes}")
    per_node = _devices_per_node(trainer.devices, kind, available)
    for environment in (SLURMEnvironment, TorchElasticEnvironment):  # Lightning's order
        if environment.detect():
            try:
                environment().validate_settings(per_node, trainer.num_nodes)
            except ValueError as e:  # Lightning's message names Trainer arguments: name the config keys
                message = str(e).replace("`devices=", "`trainer.devices=").replace("`num_nodes=", "`trainer.num_nodes=")
                raise ConfigError(message) from None
            break
    return per_node * trainer.num_nodes


def _peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the run is gone."""
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistError | RuntimeError) and any(p in text for p in _PEER_LOST)


class StopAllRanks(L.Callback):
    """On an error in any process of a multi-process run, end every process, with the failing process's error
    shown once.

    In rank 0 of Lightning's launcher (which started the other local ranks as child processes), an error waits up
    to 10 s for a child to exit with an error of its own: if one did, the child has printed its error, and
    :meth:`errors` raises a one-line :class:`RankFailedError` naming it instead of rank 0's "connection closed"
    traceback. Either way the other children are killed (a process blocked in a collective cannot be stopped
    otherwise), before Lightning's process observer would kill rank 0 itself. In the other ranks, an error that only
    says a peer is gone becomes the one line ``stopped: another process of the run failed``. Under ``torchrun`` or
    SLURM, which start every process themselves, the launcher stops the others.
    """

    def __init__(self) -> None:
        self.failed: tuple[int, int] | None = None  # (global rank, exit code) of the child that failed first
        self.peer_lost = False  # this process's error only says another process is gone

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.peer_lost = _peer_lost(exception)
        procs: list[subprocess.Popen] | None = getattr(trainer.strategy.launcher, "procs", None)
        if not procs:
            return
        children = list(procs)
        procs.clear()  # Lightning's process observer watches this list: it must not kill rank 0 while it reports
        deadline = time.monotonic() + (_CHILD_EXIT_WAIT_S if self.peer_lost else 0.0)
        while True:
            codes = [child.poll() for child in children]
            failed = [(i, code) for i, code in enumerate(codes) if code]
            if failed or time.monotonic() >= deadline or all(code is not None for code in codes):
                break
            time.sleep(0.05)
        if failed:
            local_rank, code = failed[0]
            self.failed = (trainer.node_rank * trainer.num_devices + local_rank + 1, code)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Around ``trainer.fit``: turns the errors that only report another process's failure into one line."""
        try:
            yield
        except Exception:
            if not self.peer_lost:
                raise
            if self.failed is not None:
                rank, code = self.failed
                raise RankFailedError(
                    f"rank {rank} failed (exit code {code}; its error is shown above): every process was stopped"
                ) from None
            raise RankFailedError("stopped: another process of the run failed (its error is shown)") from None
