"""Sweeps: W&B-format sweep files (``spec``), run on Optuna without a W&B server (``study``)."""

from h3de.sweep.spec import SweepSpec, load_sweep, override
from h3de.sweep.study import WorkerResult, sweep

__all__ = ["SweepSpec", "WorkerResult", "load_sweep", "override", "sweep"]
