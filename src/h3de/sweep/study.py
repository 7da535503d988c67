"""``h3de sweep``: run a W&B-format sweep file on Optuna, without a W&B server.

Search: grid → every grid point enqueued once (``Study.enqueue_trial``) when the study is made, random →
``RandomSampler``, bayes → ``TPESampler``; W&B's ``early_terminate: {type: hyperband}`` → ``HyperbandPruner`` on
the metric reported after every validation. Workers share one study through an Optuna RDB storage URL
(``sqlite:///sweep.db`` on one machine, ``postgresql+psycopg://user@host/db`` on a cluster): each worker is one
``h3de sweep`` process with the same ``--storage`` and ``--study``; Optuna hands out the trials. A queued trial
is taken by moving it from WAITING to RUNNING in one transaction (``SELECT ... FOR UPDATE`` on PostgreSQL;
``BEGIN IMMEDIATE`` on SQLite, set here), so each grid point goes to exactly one worker. A running trial sends
a heartbeat every ``heartbeat`` seconds; one silent for twice that (its worker was killed or its node lost) is
set to FAIL by the next worker to start a trial, which queues it again (``RetryHeartbeatStaleTrialCallback``).
``--gpus 0,1`` starts one worker per GPU, each seeing only its GPU (``CUDA_VISIBLE_DEVICES``). Each trial is an
ordinary ``h3de train`` run (in the worker's process) in ``<output_dir>/<study>/trial_<number>/<name>/<timestamp>``,
logged like any run (W&B offline without credentials), grouped by the study name.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from h3de.errors import ConfigError, H3deError
from h3de.sweep.spec import Parameter, SweepSpec, load_sweep, override

__all__ = ["WorkerResult", "open_storage", "open_study", "run_worker", "launch_workers", "sweep"]

HEARTBEAT_S = 60  # a running trial's heartbeat period; silent for 2x this, it counts as dead and is queued again
RETRIES = 3  # most times a dead trial is queued again (a trial that kills its worker every time stops there)
SETUP_WAIT_S = 60  # how long a joining worker waits for the worker that made the study to queue its grid


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


class _QueueEmpty(Exception):
    """A grid worker asked for a trial after the last queued grid point was taken."""


class _SweepStorage(optuna.storages.RDBStorage):
    """An RDB storage that, for a grid (``queue_only``), makes no trial but queued ones.

    A grid's points are all enqueued when its study is made, so ``Study.ask`` with an empty queue (another worker
    took the last point between this worker's check and its ask) would make a trial that repeats a point; it is
    refused before it exists. Enqueued and retried trials (``add_trial``) come with a template and pass.
    ``_create_new_trial`` is the one method through which both ``create_new_trial`` and Optuna's cache of an RDB
    storage make trials (a test checks that a grid's ask with an empty queue is refused).
    """

    queue_only = False

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if template_trial is None and self.queue_only:
            raise _QueueEmpty
        return super()._create_new_trial(study_id, template_trial)


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_storage(url: str, heartbeat: int = HEARTBEAT_S, queue_only: bool = False) -> optuna.storages.RDBStorage:
    """Connect to an Optuna RDB storage (creating its tables if new); a clear error if it cannot be reached.

    Args:
        url: an SQLAlchemy URL, e.g. ``sqlite:///sweep.db``, ``postgresql+psycopg://user@host/db``.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for ``2 * heartbeat`` seconds is
            failed by the next worker to start a trial and queued again (at most ``RETRIES`` times).
        queue_only: run queued trials only (grid search: every point is queued when the study is made).
    """
    engine_kwargs: dict = {}
    sqlite = url.startswith("sqlite")
    if sqlite:  # wait for other workers' locks; the driver's own BEGIN is off: _begin_immediate replaces it
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    elif url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        storage = _connect(url, engine_kwargs, heartbeat)
    except Exception as e:  # sqlalchemy/driver errors of many classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "DB access module" in first and url.startswith("postgresql"):
            first += " (PostgreSQL: pip install 'h3de[postgres]', the psycopg driver)"
        raise H3deError(f"--storage {_redacted(url)} cannot be reached: {first}") from None
    if sqlite:
        # SQLite has no SELECT ... FOR UPDATE: without this, two workers can both read a trial as WAITING and
        # both take it (or both fail a dead trial and queue two retries). BEGIN IMMEDIATE takes the database's
        # write lock at the start of each transaction, so Optuna's read-check-write steps run one at a time.
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    storage.queue_only = queue_only
    return storage


def _connect(url: str, engine_kwargs: dict, heartbeat: int, attempts: int = 5) -> _SweepStorage:
    """The storage; tried again when workers starting together on a new database create its tables at once."""

    def make() -> _SweepStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat is "experimental" since 2.9
            return _SweepStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(RETRIES),
            )

    for _ in range(attempts - 1):
        try:
            return make()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as e:
            # the other worker made a table, a type or the row of Optuna's schema version meanwhile
            if not (isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)):
                raise
            time.sleep(0.5)
    return make()


def _signature(spec: SweepSpec) -> str:
    """What must match for two sweep files to share a study: method, metric, experiment, parameters."""
    parameters = {p.key: [p.distribution, [str(v) for v in p.values], p.low, p.high] for p in spec.parameters}
    body = {"method": spec.method, "metric": [spec.metric, spec.goal], "experiment": spec.experiment,
            "fixed": list(spec.fixed), "parameters": parameters}  # fmt: skip
    return json.dumps(body, sort_keys=True)


def _sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """Random or TPE; a grid samples nothing (its trials are queued with every parameter fixed)."""
    if spec.method == "bayes":
        return optuna.samplers.TPESampler()
    return optuna.samplers.RandomSampler()


def _grid_points(spec: SweepSpec) -> list[dict]:
    """Every combination of the grid's values, as Optuna params (``Parameter.choices``), in the file's order."""
    keys = [p.key for p in spec.parameters]
    combinations = itertools.product(*(p.choices() for p in spec.parameters))
    return [dict(zip(keys, values, strict=True)) for values in combinations]


def _pruner(spec: SweepSpec, max_epochs: int | None) -> optuna.pruners.BasePruner:
    """W&B's hyperband settings (in epochs: min_iter, or max_iter / eta**s; max_iter, eta) → HyperbandPruner."""
    if spec.hyperband is None:
        return optuna.pruners.NopPruner()
    hb = spec.hyperband
    eta = int(hb.get("eta", 3))
    max_iter = int(hb.get("max_iter", max_epochs))
    min_iter = int(hb["min_iter"]) if "min_iter" in hb else max(1, round(max_iter / eta ** float(hb["s"])))
    return optuna.pruners.HyperbandPruner(min_resource=min_iter, max_resource=max_iter, reduction_factor=eta)


def open_study(spec: SweepSpec, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Create the study (queueing a grid's points) or join it; refuse one made from a different sweep file.

    Raises:
        ConfigError: the study was made from a different sweep file.
        H3deError: the study exists but the worker that made it did not finish queueing its grid.
    """
    from h3de.config import load_config

    # the experiment's max_epochs only for hyperband (loading a config imports the networks: seconds per worker)
    max_epochs = load_config(spec.experiment, list(spec.fixed)).trainer.max_epochs if spec.hyperband else None
    sampler, pruner = _sampler(spec), _pruner(spec, max_epochs)
    signature = _signature(spec)
    try:  # exactly one worker makes the study (its name is unique in the storage): that one queues the grid
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, pruner=pruner, direction=spec.goal
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        saved = _wait_for_setup(study)
        if saved != signature or study.direction.name.lower() != spec.goal:
            raise ConfigError(
                f"study '{name}' was made from a different sweep file than {spec.path} (method, metric, "
                "experiment or parameters differ): give another --study"
            ) from None
        return study
    if spec.method == "grid":
        for point in _grid_points(spec):
            study.enqueue_trial(point)
    study.set_user_attr("h3de_sweep", signature)  # last: it tells joining workers that the study is ready
    return study


def _wait_for_setup(study: optuna.Study) -> str:
    """The joined study's sweep signature, once the worker that made it has written it (after its grid queue)."""
    deadline = time.monotonic() + SETUP_WAIT_S
    while (saved := study.user_attrs.get("h3de_sweep")) is None:
        if time.monotonic() > deadline:
            raise H3deError(
                f"study '{study.study_name}' exists but was never set up (the worker that made it stopped before "
                "queueing its trials): give another --study, or delete it (optuna delete-study --study-name "
                f"{study.study_name} --storage URL)"
            )
        time.sleep(0.1)
    return saved


def _suggest(trial: optuna.Trial, p: Parameter):
    if p.values:
        return trial.suggest_categorical(p.key, p.choices())
    if p.distribution == "int_uniform":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, float(p.low), float(p.high), log=p.distribution == "log_uniform_values")


def _objective(spec: SweepSpec, study_name: str):
    from h3de.config import load_config
    from h3de.sweep.pruning import OptunaReport  # imports Lightning: only where trials train
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
    started = [t for t in trials if t.state != TrialState.WAITING]
    if spec.run_cap is not None and len(started) >= spec.run_cap:
        return f"the sweep's run_cap of {spec.run_cap} trials is reached"
    if spec.method == "grid" and len(started) == len(trials):  # nothing queued: no point, no retry left
        return f"all {len(_grid_points(spec))} grid points have been run or are running"
    return None


def _fail_dead_trials(study: optuna.Study) -> None:
    """Set to FAIL the running trials whose heartbeat stopped, and queue them again (the storage's callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _check_single_device(spec: SweepSpec) -> None:
    from h3de.config import load_config

    devices = load_config(spec.experiment, list(spec.fixed)).trainer.devices
    if str(devices) != "1" or any(p.key in ("trainer.devices", "trainer.num_nodes") for p in spec.parameters):
        raise ConfigError(
            f"{spec.path}: h3de sweep runs each trial on one device (trainer.devices=1, got {devices}, not swept); "
            "use --gpus to run one trial per GPU"
        )


def run_worker(
    spec: SweepSpec, storage_url: str, study_name: str, trials: int | None = None, heartbeat: int = HEARTBEAT_S
) -> WorkerResult:
    """Run trials of the study in this process until ``trials`` are done, the grid or ``run_cap`` is used up."""
    storage = open_storage(storage_url, heartbeat, queue_only=spec.method == "grid")
    study = open_study(spec, storage, study_name)
    objective = _objective(spec, study_name)
    done, reason = 0, f"{trials} trial(s) run by this worker"
    while trials is None or done < trials:
        _fail_dead_trials(study)  # before the check: a dead trial's retry is work for this worker
        stop = _stop_reason(study, spec)
        if stop is not None:
            reason = stop
            break
        try:
            study.optimize(objective, n_trials=1, catch=(H3deError, RuntimeError))
        except _QueueEmpty:  # another worker took the last queued point first: check again
            continue
        except AssertionError:  # Optuna's "Should not reach" when it cannot record a result: see _taken_over
            trial = _taken_over(study)
            if trial is None:
                raise
            print(
                f"h3de sweep: trial {trial.number} finished here, but another worker had already failed it as dead "
                "(its heartbeat was late) and queued its point again; its result is not recorded",
                file=sys.stderr,
            )
        done += 1
    return _result(study, done, reason)


def _taken_over(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """This process's latest trial, if another worker failed it as dead while it ran (so Optuna could not tell its
    result); None otherwise."""
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("pid") == os.getpid()]
    return mine[-1] if mine and mine[-1].state == TrialState.FAIL else None


def _result(study: optuna.Study, done: int, reason: str) -> WorkerResult:
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return WorkerResult(study.study_name, done, reason, None, None, None)
    return WorkerResult(study.study_name, done, reason, best.value, best.params, best.user_attrs.get("run_dir"))


def launch_workers(
    spec: SweepSpec,
    storage_url: str,
    study_name: str,
    trials: int | None,
    gpus: Sequence[str],
    heartbeat: int = HEARTBEAT_S,
):
    """One ``h3de sweep`` worker process per GPU id, each with ``CUDA_VISIBLE_DEVICES`` set to it; wait for all."""
    command = [sys.executable, "-m", "h3de.cli", "sweep", str(spec.path), "--storage", storage_url,
               "--study", study_name, "--heartbeat", str(heartbeat)]  # fmt: skip
    command += ["--trials", str(trials)] if trials is not None else []
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
    heartbeat: int = HEARTBEAT_S,
) -> WorkerResult:
    """``h3de sweep``: check the sweep file and the storage, then run trials here or in one worker per GPU.

    Raises:
        ConfigError: a bad sweep file (see :func:`load_sweep`), a trial config with more than one device.
        H3deError: a storage URL that cannot be reached; ``trials`` or ``heartbeat`` < 1; a worker that failed.
    """
    if trials is not None and trials < 1:
        raise H3deError(f"--trials must be a positive number of trials, got {trials}")
    if heartbeat < 1:
        raise H3deError(f"--heartbeat must be a positive number of seconds, got {heartbeat}")
    spec = load_sweep(path)
    _check_single_device(spec)
    name = study or spec.name
    open_study(spec, open_storage(storage, heartbeat), name)  # a bad storage or study: refused before any worker
    if gpus:
        return launch_workers(spec, storage, name, trials, gpus, heartbeat)
    return run_worker(spec, storage, name, trials, heartbeat)
