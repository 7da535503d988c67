"""``h3de sweep``: run a W&B-format sweep file on Optuna, without a W&B server.

Search: grid → ``GridSampler``, random → ``RandomSampler``, bayes → ``TPESampler``; W&B's
``early_terminate: {type: hyperband}`` → ``HyperbandPruner`` on the metric reported after every validation.
Workers share one study through an Optuna RDB storage URL (``sqlite:///sweep.db`` on one machine,
``postgresql+psycopg://user@host/db`` on a cluster): each worker is one ``h3de sweep`` process with the same
``--storage`` and ``--study``; Optuna hands out the trials. ``--gpus 0,1`` starts one such worker per GPU,
each seeing only its GPU (``CUDA_VISIBLE_DEVICES``). Each trial is an ordinary ``h3de train`` run (in the
worker's process) in ``<output_dir>/<study>/trial_<number>/<name>/<timestamp>``, logged like any run
(W&B offline without credentials), grouped by the study name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna

from h3de.errors import ConfigError, H3deError
from h3de.sweep.pruning import OptunaReport
from h3de.sweep.spec import Parameter, SweepSpec, load_sweep, override

__all__ = ["WorkerResult", "open_storage", "open_study", "run_worker", "launch_workers", "sweep"]


@dataclass
class WorkerResult:
    study: str
    trials_run: int  # by this worker (or, for --gpus, by all of its workers)
    stop_reason: str
    best_value: float | None  # the study's best so far (all workers)
    best_params: dict | None
    best_run_dir: str | None


def _redacted(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: shown as given
        return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Connect to an Optuna RDB storage (creating its tables if new); a clear error if it cannot be reached."""
    engine_kwargs: dict = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for other workers' locks
    elif url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as e:  # sqlalchemy/driver errors of many classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "DB access module" in first and url.startswith("postgresql"):
            first += " (PostgreSQL: pip install 'h3de[postgres]', the psycopg driver)"
        raise H3deError(f"--storage {_redacted(url)} cannot be reached: {first}") from None


def _signature(spec: SweepSpec) -> str:
    """What must match for two sweep files to share a study: method, metric, experiment, parameters."""
    parameters = {p.key: [p.distribution, [str(v) for v in p.values], p.low, p.high] for p in spec.parameters}
    body = {"method": spec.method, "metric": [spec.metric, spec.goal], "experiment": spec.experiment,
            "fixed": list(spec.fixed), "parameters": parameters}  # fmt: skip
    return json.dumps(body, sort_keys=True)


def _sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    if spec.method == "grid":
        return optuna.samplers.GridSampler({p.key: p.choices() for p in spec.parameters})
    if spec.method == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler()


def _pruner(spec: SweepSpec, max_epochs: int) -> optuna.pruners.BasePruner:
    """W&B's hyperband settings (in epochs: min_iter, or max_iter / eta**s; max_iter, eta) → HyperbandPruner."""
    if spec.hyperband is None:
        return optuna.pruners.NopPruner()
    hb = spec.hyperband
    eta = int(hb.get("eta", 3))
    max_iter = int(hb.get("max_iter", max_epochs))
    min_iter = int(hb["min_iter"]) if "min_iter" in hb else max(1, round(max_iter / eta ** float(hb["s"])))
    return optuna.pruners.HyperbandPruner(min_resource=min_iter, max_resource=max_iter, reduction_factor=eta)


def open_study(spec: SweepSpec, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Create the study or join it; refuse one made from a different sweep file."""
    from h3de.config import load_config

    max_epochs = load_config(spec.experiment, list(spec.fixed)).trainer.max_epochs
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=_sampler(spec),
        pruner=_pruner(spec, max_epochs),
        direction=spec.goal,
        load_if_exists=True,
    )
    signature = _signature(spec)
    saved = study.user_attrs.get("h3de_sweep")
    if saved is None:
        study.set_user_attr("h3de_sweep", signature)
    elif saved != signature or study.direction.name.lower() != spec.goal:
        raise ConfigError(
            f"study '{name}' was made from a different sweep file than {spec.path} (method, metric, experiment "
            "or parameters differ): give another --study"
        )
    return study


def _suggest(trial: optuna.Trial, p: Parameter):
    if p.values:
        return trial.suggest_categorical(p.key, p.choices())
    if p.distribution == "int_uniform":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, float(p.low), float(p.high), log=p.distribution == "log_uniform_values")


def _objective(spec: SweepSpec, study_name: str):
    from h3de.config import load_config
    from h3de.train import train

    def objective(trial: optuna.Trial) -> float:
        items = [*spec.fixed, *(override(p.key, _suggest(trial, p)) for p in spec.parameters)]
        trial.set_user_attr("overrides", items)
        trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
        trial.set_user_attr("pid", os.getpid())
        cfg = load_config(spec.experiment, items)
        cfg.output_dir = str(Path(cfg.output_dir) / study_name / f"trial_{trial.number:04d}")
        if cfg.logger.group is None:
            cfg.logger.group = study_name
        report = OptunaReport(trial, spec.metric)
        try:
            result = train(cfg, callbacks=[report])
        finally:
            _finish_wandb()
        trial.set_user_attr("run_dir", str(result.run_dir))
        if report.pruned_at is not None:
            raise optuna.TrialPruned(f"{spec.metric} {report.values[-1]:.4g} after epoch {report.pruned_at}")
        if not report.values:
            raise H3deError(f"trial {trial.number}: no validation ran, so {spec.metric} has no value")
        return min(report.values) if spec.goal == "minimize" else max(report.values)

    return objective


def _finish_wandb() -> None:
    """End this trial's W&B run (if any), so the next trial in this process starts its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _stop_reason(study: optuna.Study, spec: SweepSpec) -> str | None:
    trials = study.get_trials(deepcopy=False)
    if spec.run_cap is not None and len(trials) >= spec.run_cap:
        return f"the sweep's run_cap of {spec.run_cap} trials is reached"
    if spec.method == "grid":
        size = 1
        for p in spec.parameters:
            size *= len(p.values)
        started = {json.dumps(t.params, sort_keys=True, default=str) for t in trials if t.params}
        if len(started) >= size:
            return f"all {size} grid points have been run or are running"
    return None


def _check_single_device(spec: SweepSpec) -> None:
    from h3de.config import load_config

    devices = load_config(spec.experiment, list(spec.fixed)).trainer.devices
    if str(devices) != "1" or any(p.key in ("trainer.devices", "trainer.num_nodes") for p in spec.parameters):
        raise ConfigError(
            f"{spec.path}: h3de sweep runs each trial on one device (trainer.devices=1, got {devices}, not swept); "
            "use --gpus to run one trial per GPU"
        )


def run_worker(spec: SweepSpec, storage_url: str, study_name: str, trials: int | None = None) -> WorkerResult:
    """Run trials of the study in this process until ``trials`` are done, the grid or ``run_cap`` is used up."""
    study = open_study(spec, open_storage(storage_url), study_name)
    objective = _objective(spec, study_name)
    done, reason = 0, f"{trials} trial(s) run by this worker"
    while trials is None or done < trials:
        stop = _stop_reason(study, spec)
        if stop is not None:
            reason = stop
            break
        study.optimize(objective, n_trials=1, catch=(H3deError, RuntimeError))
        done += 1
    return _result(study, done, reason)


def _result(study: optuna.Study, done: int, reason: str) -> WorkerResult:
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return WorkerResult(study.study_name, done, reason, None, None, None)
    return WorkerResult(study.study_name, done, reason, best.value, best.params, best.user_attrs.get("run_dir"))


def launch_workers(spec: SweepSpec, storage_url: str, study_name: str, trials: int | None, gpus: Sequence[str]):
    """One ``h3de sweep`` worker process per GPU id, each with ``CUDA_VISIBLE_DEVICES`` set to it; wait for all."""
    command = [sys.executable, "-m", "h3de.cli", "sweep", str(spec.path), "--storage", storage_url,
               "--study", study_name] + (["--trials", str(trials)] if trials is not None else [])  # fmt: skip
    processes = [subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus]
    try:
        codes = [p.wait() for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = [f"GPU {gpu} (exit {code})" for gpu, code in zip(gpus, codes, strict=True) if code != 0]
    if failed:
        raise H3deError(f"sweep workers failed: {', '.join(failed)}")
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    return _result(study, len(study.get_trials(deepcopy=False)), f"all {len(gpus)} workers finished")


def sweep(
    path: str | os.PathLike,
    storage: str,
    study: str | None = None,
    trials: int | None = None,
    gpus: Sequence[str] | None = None,
) -> WorkerResult:
    """``h3de sweep``: check the sweep file and the storage, then run trials here or in one worker per GPU.

    Raises:
        ConfigError: a bad sweep file (see :func:`load_sweep`), a trial config with more than one device.
        H3deError: a storage URL that cannot be reached; ``trials`` < 1; a worker that failed.
    """
    if trials is not None and trials < 1:
        raise H3deError(f"--trials must be a positive number of trials, got {trials}")
    spec = load_sweep(path)
    _check_single_device(spec)
    name = study or spec.name
    open_study(spec, open_storage(storage), name)  # refuses a bad storage or study before any worker starts
    if gpus:
        return launch_workers(spec, storage, name, trials, gpus)
    return run_worker(spec, storage, name, trials)
