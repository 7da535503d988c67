"""``OptunaReport``: a Lightning callback that reports each validation's metric to an Optuna trial and stops
the trainer when the study's pruner says so (the caller then raises ``optuna.TrialPruned``)."""

from __future__ import annotations

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback

from h3de.errors import ConfigError

__all__ = ["OptunaReport"]


class OptunaReport(Callback):
    """Report ``metric`` after every validation as step = epochs completed; stop the fit when pruned.

    Args:
        trial: the running Optuna trial.
        metric: a key of ``trainer.callback_metrics`` logged by validation, e.g. ``val/mre_mm``.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.values: list[float] = []  # one per validation, in order
        self.pruned_at: int | None = None  # the epoch after which the pruner stopped the trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            logged = ", ".join(
                sorted(k for k in trainer.callback_metrics if k.startswith("val/") and k.count("/") == 1)
            )
            raise ConfigError(f"sweep metric '{self.metric}' is not logged by validation (logged: {logged})")
        epoch = trainer.current_epoch + 1
        self.values.append(float(value))
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True
