"""``h3de sweep`` end to end: a tiny grid on SQLite, pruning, bad storage, workers racing for grid points, a
killed worker's trial run again, and two workers on a real PostgreSQL."""

import csv
import itertools
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from h3de.cli import main
from h3de.config import load_config
from h3de.errors import ConfigError, H3deError
from h3de.sweep import load_sweep, study
from h3de.sweep.pruning import OptunaReport
from h3de.train import train
from tiny_configs import SMALL_RUN

TINY = [*SMALL_RUN, "trainer.num_sanity_val_steps=0"]


def write_sweep(blob_dataset: Path, tmp_path: Path, logger: str = "csv", epochs: int = 2, **changes) -> Path:
    """A sweep over the blob dataset: a grid of two learning rates by default."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {"name": "blobs", "data": {"root": str(blob_dataset.parent)}, "output_dir": str(tmp_path / "runs")}
        )
    )
    body = {
        "method": "grid",
        "metric": {"name": "val/mre_mm", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [0.003, 0.01]}},
        "command": ["${env}", "h3de", "train", str(experiment), *TINY, f"trainer.max_epochs={epochs}",
                    f"logger={logger}", "logger.mode=offline", "${args_no_hyphens}"],
    }  # fmt: skip
    body.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def val_mre(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["val/mre_mm"]) for r in csv.DictReader(f) if r.get("val/mre_mm")]


def test_tiny_grid_on_sqlite_end_to_end(blob_dataset, tmp_path, capsys):
    path = write_sweep(blob_dataset, tmp_path, logger="wandb")
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    assert main(["sweep", str(path), "--storage", storage, "--study", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "study tiny: 2 trial(s) run; stopped: all 2 grid points have been run or are running" in out
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(t.params["optim.lr"] for t in trials) == [0.003, 0.01]
    for trial in trials:
        run_dir = Path(trial.user_attrs["run_dir"])  # a normal run directory, one per trial
        assert run_dir.parent.parent == tmp_path / "runs" / "tiny" / f"trial_{trial.number:04d}"
        assert load_config(run_dir / "config.yaml").optim.lr == trial.params["optim.lr"]
        assert (run_dir / "checkpoints" / "best.ckpt").is_file()
        curve = val_mre(run_dir)
        assert len(curve) == 2 and trial.value == pytest.approx(min(curve))  # the best epoch, as best.ckpt
        assert trial.intermediate_values == pytest.approx({1: curve[0], 2: curve[1]})
        offline = list((run_dir / "wandb").glob("offline-run-*"))  # also logged to W&B offline
        assert len(offline) == 1
    # the grid is used up: a further worker stops at once, without training
    assert main(["sweep", str(path), "--storage", storage, "--study", "tiny"]) == 0
    assert "0 trial(s) run; stopped: all 2 grid points" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="tiny", storage=storage).get_trials()) == 2


def test_the_report_callback_stops_a_pruned_trial(blob_dataset, tmp_path):
    cfg = load_config(None, [f"data.root={blob_dataset.parent}", f"output_dir={tmp_path}", *TINY,
                             "trainer.max_epochs=3", "logger=csv"])  # fmt: skip
    pruned = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any MRE > 0 mm is pruned
    trial = pruned.ask()
    report = OptunaReport(trial, "val/mre_mm")
    result = train(cfg, callbacks=[report])
    assert report.pruned_at == 1 and len(val_mre(result.run_dir)) == 1  # stopped after the first epoch of three
    assert trial.should_prune() and pruned.trials[0].intermediate_values == {1: pytest.approx(report.values[0])}

    kept = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e6))
    report = OptunaReport(kept.ask(), "val/mre_mm")
    result = train(cfg, callbacks=[report])
    assert report.pruned_at is None and val_mre(result.run_dir) == pytest.approx(report.values)
    assert len(report.values) == 3


def test_a_pruned_trial_is_recorded_as_pruned_with_its_run_dir(blob_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "_pruner", lambda spec, max_epochs: optuna.pruners.ThresholdPruner(upper=0.0))
    path = write_sweep(blob_dataset, tmp_path, parameters={"optim.lr": {"values": [0.003]}}, epochs=3)
    result = study.sweep(path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert result.trials_run == 1 and result.best_value is None  # nothing completed
    (trial,) = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'db.sqlite'}").get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert len(val_mre(Path(trial.user_attrs["run_dir"]))) == 1


def test_hyperband_settings_map_to_optuna(blob_dataset, tmp_path):
    spec = load_sweep(
        write_sweep(blob_dataset, tmp_path, early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})
    )
    pruner = study._pruner(spec, max_epochs=40)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (2, 40, 2)
    spec = load_sweep(
        write_sweep(blob_dataset, tmp_path, early_terminate={"type": "hyperband", "max_iter": 27, "s": 2})
    )
    pruner = study._pruner(spec, max_epochs=40)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (3, 27, 3)
    assert isinstance(study._pruner(load_sweep(write_sweep(blob_dataset, tmp_path)), 40), optuna.pruners.NopPruner)


@pytest.mark.parametrize("method, sampler", [("random", "RandomSampler"), ("bayes", "TPESampler")])
def test_methods_map_to_optuna_samplers(blob_dataset, tmp_path, method, sampler):
    spec = load_sweep(write_sweep(blob_dataset, tmp_path, method=method))
    assert type(study._sampler(spec)).__name__ == sampler


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_grid_is_queued_once_when_its_study_is_made(blob_dataset, tmp_path):
    grid = {"optim.lr": {"values": [0.003, 0.01]}, "trainer.max_epochs": {"values": [1, 2, 3]}}
    spec = load_sweep(write_sweep(blob_dataset, tmp_path, parameters=grid))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    made = study.open_study(spec, study.open_storage(storage), "q")
    study.open_study(spec, study.open_storage(storage), "q")  # joining queues nothing more
    queued = [t.system_attrs["fixed_params"] for t in made.get_trials()]
    assert [t.state for t in made.get_trials()] == [optuna.trial.TrialState.WAITING] * 6
    assert queued == [{"optim.lr": a, "trainer.max_epochs": b} for a in (0.003, 0.01) for b in (1, 2, 3)]
    # a grid worker makes no trial but queued ones: with the queue empty, ask is refused before a trial exists
    grid_storage = study.open_storage(storage, queue_only=True)
    for _ in range(6):
        made.ask()
    with pytest.raises(study._QueueEmpty):
        optuna.load_study(study_name="q", storage=grid_storage).ask()
    assert len(made.get_trials()) == 6


def test_a_study_left_half_made_is_refused_after_a_wait(blob_dataset, tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    optuna.create_study(study_name="half", storage=storage)  # made, but never given its sweep file or queue
    monkeypatch.setattr(study, "SETUP_WAIT_S", 0.5)
    with pytest.raises(H3deError, match="study 'half' exists but was never set up"):
        study.sweep(write_sweep(blob_dataset, tmp_path), storage, study="half")


# ---- several worker processes on one study: a fake objective (no training) so that they start in a second -----

_FAKE_WORKER = """
import os, pickle, sys, time
from pathlib import Path
from h3de.sweep import study

spec, storage, name, start, seconds, marks, heartbeat = sys.argv[1:]


def objective_for(spec, study_name):
    def objective(trial):
        for p in spec.parameters:
            study._suggest(trial, p)
        trial.set_user_attr("pid", os.getpid())
        Path(marks, f"{trial.number}.running").touch()
        time.sleep(float(seconds))
        return 0.0

    return objective


study._objective = objective_for
spec = pickle.loads(Path(spec).read_bytes())  # the test's load_sweep (its config checks import torch: seconds)
time.sleep(max(0.0, float(start) - time.time()))
result = study.run_worker(spec, storage, name, heartbeat=int(heartbeat))
print(result.trials_run)
"""


def fake_worker(spec: Path, storage: str, start: float, seconds: float, marks: Path, heartbeat: int = 60):
    """A worker process (on the pickled SweepSpec ``spec``) whose trials suggest their parameters, sleep ``seconds``."""
    marks.mkdir(exist_ok=True)
    command = [sys.executable, "-c", _FAKE_WORKER, str(spec), storage, "s", str(start), str(seconds), str(marks),
               str(heartbeat)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(study.__file__).parents[2]), *sys.path])}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def pickled_spec(path: Path) -> Path:
    spec = path.with_suffix(".pickle")
    spec.write_bytes(pickle.dumps(load_sweep(path)))
    return spec


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_racing_workers_run_each_grid_point_exactly_once(blob_dataset, tmp_path, request, backend):
    values = {"optim.lr": [0.001, 0.002, 0.003], "optim.weight_decay": [0.0, 0.1, 0.2]}
    spec = pickled_spec(write_sweep(blob_dataset, tmp_path, parameters={k: {"values": v} for k, v in values.items()}))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    start = time.time() + 3  # after every worker has imported optuna: they make or join the study at once
    # trials that take no time: the workers ask for trials over and over at the same moments
    workers = [fake_worker(spec, storage, start, 0.0, tmp_path / "marks") for _ in range(3)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 3
    runs = [int(out.split()[-1]) for out in outputs]
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and sum(runs) == len(trials) == 9
    points = sorted((t.params["optim.lr"], t.params["optim.weight_decay"]) for t in trials)
    assert points == sorted(itertools.product(*values.values()))  # each point once: none twice, none missed
    assert len({t.user_attrs["pid"] for t in trials}) > 1


def test_a_killed_workers_trial_fails_and_its_grid_point_runs_again(blob_dataset, tmp_path):
    path = write_sweep(blob_dataset, tmp_path, epochs=1)  # a grid of two learning rates
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    marks = tmp_path / "marks"
    # a worker whose first trial would take 10 minutes
    killed = fake_worker(pickled_spec(path), storage, 0.0, 600.0, marks, heartbeat=1)
    deadline = time.time() + 60
    while not (marks / "0.running").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (marks / "0.running").exists()
    time.sleep(1.5)  # the trial's heartbeat thread has written its heartbeat
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (dead,) = optuna.load_study(study_name="s", storage=storage).get_trials(states=[optuna.trial.TrialState.RUNNING])
    time.sleep(4)  # more than the grace period of 2 heartbeats (timestamps in SQLite are whole seconds)

    result = study.sweep(path, storage, study="s", heartbeat=1)  # another worker, with the real training
    assert result.trials_run == 2 and result.stop_reason == "all 2 grid points have been run or are running"
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    states = optuna.trial.TrialState
    assert [t.state for t in trials] == [states.FAIL, states.COMPLETE, states.COMPLETE]
    assert trials[0].number == dead.number == 0 and trials[0].user_attrs["pid"] == killed.pid
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == dead.params  # the dead trial's point again
    assert retry.user_attrs["pid"] == os.getpid() and Path(retry.user_attrs["run_dir"]).is_dir()
    complete = [t.params["optim.lr"] for t in trials if t.state == states.COMPLETE]
    assert sorted(complete) == [0.003, 0.01]  # every grid point COMPLETE exactly once


@pytest.mark.parametrize(
    "storage, message",
    [
        (
            "postgresql+psycopg://h3de:secret@127.0.0.1:1/none",
            r"postgresql\+psycopg://h3de:\*\*\*@127.0.0.1:1/none cannot",
        ),
        ("sqlite:////nonexistent/folder/sweep.db", "cannot be reached: .*unable to open database file"),
        ("nosuchdb://x", "cannot be reached"),
    ],
)
def test_an_unreachable_storage_is_one_line_before_any_work(blob_dataset, tmp_path, capsys, storage, message):
    path = write_sweep(blob_dataset, tmp_path)
    assert main(["sweep", str(path), "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "secret" not in err
    with pytest.raises(H3deError, match=message):
        study.sweep(path, storage)
    assert not (tmp_path / "runs").exists()


def test_bad_sweeps_are_refused_before_any_work(blob_dataset, tmp_path):
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with pytest.raises(ConfigError, match="parameter optim.learning_rate"):
        study.sweep(write_sweep(blob_dataset, tmp_path, parameters={"optim.learning_rate": {"values": [0.1]}}), storage)
    with pytest.raises(ConfigError, match="method 'hillclimb'"):
        study.sweep(write_sweep(blob_dataset, tmp_path, method="hillclimb"), storage)
    with pytest.raises(ConfigError, match="one device"):
        study.sweep(write_sweep(blob_dataset, tmp_path, parameters={"trainer.devices": {"values": [1, 2]}}), storage)
    with pytest.raises(H3deError, match="--trials must be a positive"):
        study.sweep(write_sweep(blob_dataset, tmp_path), storage, trials=0)
    with pytest.raises(H3deError, match="--heartbeat must be a positive number of seconds, got 0"):
        study.sweep(write_sweep(blob_dataset, tmp_path), storage, heartbeat=0)
    # a study of another sweep file is not joined
    study.open_study(load_sweep(write_sweep(blob_dataset, tmp_path)), study.open_storage(storage), "shared")
    other = write_sweep(blob_dataset, tmp_path, parameters={"optim.lr": {"values": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="study 'shared' was made from a different sweep file"):
        study.sweep(other, storage, study="shared")
    assert not (tmp_path / "runs").exists()


# ---- two worker processes (one per "GPU") sharing one study on a real PostgreSQL server -------------------------


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres_url(tmp_path_factory):
    """A PostgreSQL server in a temporary folder (as a non-root user), on a free local port; its URL."""
    pytest.importorskip("psycopg", reason="psycopg (pip install 'h3de[postgres]') is needed to reach PostgreSQL")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    user = {}
    base = Path(tmp_path_factory.mktemp("pg"))
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's user, else nobody
        import pwd

        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            user = {"user": entry.pw_uid, "group": entry.pw_gid}
            break
        base = Path(f"/tmp/h3de-pg-{os.getpid()}")  # reachable by that user (pytest's tmp folders are 0700)
        base.mkdir(mode=0o700)
        os.chown(base, user["user"], user["group"])
    data = base / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(cwd=base, check=True, capture_output=True, **user)
    subprocess.run([bindir / "initdb", "-D", data, "-U", "h3de", "--auth=trust", "-E", "UTF8"], **run)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    subprocess.run([bindir / "pg_ctl", "-D", data, "-o", options, "-l", base / "log", "-w", "start"], **run)
    try:
        yield f"postgresql+psycopg://h3de@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], **{**run, "check": False})
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(blob_dataset, tmp_path, postgres_url, capsys):
    grid = {"optim.lr": {"values": [0.003, 0.01]}, "optim.weight_decay": {"values": [0.0, 0.0001]}}
    path = write_sweep(blob_dataset, tmp_path, parameters=grid, epochs=1)
    # --gpus 0,1: two `h3de sweep` worker processes, each pinned to its id through CUDA_VISIBLE_DEVICES
    assert main(["sweep", str(path), "--storage", postgres_url, "--study", "pg", "--gpus", "0,1"]) == 0
    assert "study pg: 4 trial(s) run; stopped: all 2 workers finished" in capsys.readouterr().out
    trials = optuna.load_study(study_name="pg", storage=postgres_url).get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and len(trials) == 4
    points = {(t.params["optim.lr"], t.params["optim.weight_decay"]) for t in trials}
    assert points == {(a, b) for a in (0.003, 0.01) for b in (0.0, 0.0001)}  # each grid point once
    assert {t.user_attrs["cuda_visible_devices"] for t in trials} == {"0", "1"}  # both workers took trials
    assert len({t.user_attrs["pid"] for t in trials}) == 2 and os.getpid() not in {t.user_attrs["pid"] for t in trials}
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    assert json.loads(json.dumps(trials[0].user_attrs["overrides"]))[-2:] == [
        f"optim.lr={trials[0].params['optim.lr']}",
        f"optim.weight_decay={trials[0].params['optim.weight_decay']}",
    ]
    assert sys.executable  # the workers ran `python -m h3de.cli sweep` with this interpreter


def test_a_live_trial_failed_by_another_worker_is_reported_in_one_line(blob_dataset, tmp_path, monkeypatch, capsys):
    """A worker whose heartbeat was late (a suspended process, a database out of reach) finds its trial failed and
    queued again by another worker when it finishes: one line, and the worker goes on."""

    def objective_for(spec, study_name):
        def objective(trial):
            for p in spec.parameters:
                study._suggest(trial, p)
            trial.set_user_attr("pid", os.getpid())
            # what another worker's fail_stale_trials does to a trial whose heartbeat is late
            trial.study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            return 0.0

        return objective

    monkeypatch.setattr(study, "_objective", objective_for)
    spec = load_sweep(write_sweep(blob_dataset, tmp_path))
    result = study.run_worker(spec, f"sqlite:///{tmp_path / 'db.sqlite'}", "s", trials=1)
    assert result.trials_run == 1
    err = capsys.readouterr().err
    assert "trial 0 finished here, but another worker had already failed it as dead" in err
    assert "Traceback" not in err
