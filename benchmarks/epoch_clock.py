"""Shared by the training benchmarks: wall-clock seconds, steps and samples of the epochs after the first."""

from __future__ import annotations

import time

import lightning as L


class EpochClock(L.Callback):
    """Wall-clock seconds (on_train_epoch_start to on_train_epoch_end), optimiser batches and samples of this
    process, over every training epoch after the first (which pays for warm-up and caching)."""

    def __init__(self) -> None:
        self.seconds, self.steps, self.samples, self._start = 0.0, 0, 0, 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch > 0:
            self.steps += 1
            self.samples += len(batch["image"])

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch > 0:
            self.seconds += time.perf_counter() - self._start
