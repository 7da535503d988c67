"""The training progress bar on stderr, so that stdout carries only results and can be piped."""

from __future__ import annotations

import contextlib
import sys

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StderrProgressBar"]


class StderrProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, drawn on stderr (Lightning's own draws on stdout)."""

    def init_sanity_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):  # Lightning passes file=sys.stdout, read at this call
            return super().init_sanity_tqdm()

    def init_train_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def init_test_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_test_tqdm()

    def init_predict_tqdm(self):
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()
