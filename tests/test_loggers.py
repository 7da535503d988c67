"""W&B modes: offline runs send nothing over the network; online runs that cannot be made fail in one line before
the run directory exists (explicit ``online``) or fall back to offline with a warning (``auto``)."""

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from h3de.cli import main
from h3de.config import load_config
from h3de.errors import ConfigError
from h3de.loggers import build_loggers, resolve_logger, server_unreachable
from tiny_configs import FAST_RUN
from wandb_records import read_offline_run

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = [*FAST_RUN, "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logger.name=wandb"]
FAKE_KEY = "a" * 40  # a well-formed W&B API key that no server knows

# Records every name lookup and every IP connection of a Python process (not its child processes) in $NET_LOG.
NET_RECORDER = """
import os, socket
_log = os.environ["NET_LOG"]
def _note(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex
def getaddrinfo(host, *args, **kwargs):
    _note(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _note(f"connect {address!r}")
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _note(f"connect {address!r}")
    return _connect_ex(self, address)
socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
"""


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for key in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_BASE_URL",
        "WANDB_SILENT",
        "WANDB_ERROR_REPORTING",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Answering(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.send_response(404)
        self.end_headers()

    do_GET = do_POST = do_HEAD  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    """A local HTTP server that answers every request with 404: reachable, but no W&B."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _env(tmp_path, **extra):
    """A subprocess environment without W&B credentials or settings, with extra variables."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("LOCAL_RANK", "H3DE_RUN_DIR")
    }
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"), PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _train(blob_dataset, tmp_path, env, *overrides, prefix=()):
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'runs'}", *FAST, *overrides]
    command = [*prefix, sys.executable, "-m", "h3de.cli", *args]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return done, time.monotonic() - start


def test_server_unreachable_names_the_reason_within_the_timeout(answering_server):
    assert server_unreachable(answering_server, 5.0) is None  # any HTTP answer counts
    assert "refused" in server_unreachable(f"http://127.0.0.1:{_closed_port()}", 5.0).lower()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        start = time.monotonic()
        reason = server_unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        assert reason is not None and time.monotonic() - start < 2.0


def test_resolve_logger_modes(tmp_path, monkeypatch, no_credentials):
    cfg = load_config(None, ["name=exp"])
    resolved = resolve_logger(cfg)
    assert (resolved.mode, resolved.group) == ("offline", "exp")  # auto without credentials: offline, no check
    assert resolve_logger(load_config(None, ["logger.group=g", "logger.mode=disabled"])).group == "g"
    with pytest.raises(ConfigError, match=r"logger.mode=online needs W&B credentials .* `wandb sync`"):
        resolve_logger(load_config(None, ["logger.mode=online"]))
    assert resolve_logger(load_config(None, ["logger.mode=online"]), rank_zero=False).mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over the config, with no check
    assert resolve_logger(load_config(None, ["logger.mode=online"])).mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_logger(cfg).mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        resolve_logger(cfg)
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_logger(load_config(None, ["logger=csv"])).mode == "auto"  # only W&B has modes
    with pytest.raises(ValueError, match="resolve_logger"):
        build_loggers(cfg.logger, tmp_path, "run")
    with pytest.raises(ConfigError, match="logger.connect_timeout_s"):
        load_config(None, ["logger.connect_timeout_s=0"])
    with pytest.raises(ConfigError, match="logger.image_every_n_epochs"):
        load_config(None, ["logger.image_every_n_epochs=-1"])


def test_online_without_credentials_is_one_line_before_the_run_directory(
    blob_dataset, tmp_path, no_credentials, capsys
):
    runs = tmp_path / "runs"
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={runs}", *FAST, "logger.mode=online"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("h3de: error: logger.mode=online needs W&B credentials") and err.count("\n") == 1
    assert not runs.exists()


def test_unreachable_server_online_is_an_error_and_auto_falls_back_to_offline(
    blob_dataset, tmp_path, no_credentials, monkeypatch, capsys
):
    url = f"http://127.0.0.1:{_closed_port()}"  # nothing leaves the machine
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setattr("h3de.loggers._base_url", lambda: url)
    runs = tmp_path / "runs"
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={runs}", *FAST, "logger.connect_timeout_s=3"]
    assert main([*args, "logger.mode=online"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"h3de: error: logger.mode=online: the W&B server {url} does not answer (")
    assert err.count("\n") == 1 and not runs.exists()
    with pytest.warns(UserWarning, match=f"the W&B server {url} does not answer .*: logging offline instead"):
        assert main([*args, "name=fallback"]) == 0  # logger.mode=auto
    (run_dir,) = (runs / "fallback").iterdir()
    assert read_offline_run(run_dir).exit_code == 0
    assert "wandb sync" in capsys.readouterr().out


def test_wandb_init_error_is_one_line_and_leaves_no_run_directory(
    blob_dataset, tmp_path, no_credentials, monkeypatch, answering_server, capsys
):
    monkeypatch.setenv("WANDB_API_KEY", "short-key")  # refused by wandb.init before any request
    monkeypatch.setenv("WANDB_BASE_URL", answering_server)
    monkeypatch.setattr("h3de.loggers._base_url", lambda: answering_server)
    runs = tmp_path / "runs"
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={runs}", *FAST, "logger.mode=online"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("h3de: error: W&B: WANDB_API_KEY invalid: API key must have 40+ characters")
    assert err.count("\n") == 1 and not runs.exists()  # the run directory made for it is gone, and output_dir


@pytest.mark.slow
def test_cli_unreachable_server_online_fails_in_one_line_and_auto_falls_back_to_offline(blob_dataset, tmp_path):
    """The new user's case, with W&B's own resolution of WANDB_BASE_URL: a key but no server."""
    url = f"http://127.0.0.1:{_closed_port()}"  # nothing leaves the machine
    env = _env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=url)
    done, seconds = _train(blob_dataset, tmp_path, env, "logger.mode=online", "logger.connect_timeout_s=3")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"h3de: error: logger.mode=online: the W&B server {url} does not answer")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert seconds < 60

    done, _ = _train(blob_dataset, tmp_path, env, "logger.connect_timeout_s=3", "name=fallback")  # mode auto
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"the W&B server {url} does not answer" in done.stderr and "logging offline instead" in done.stderr
    (run_dir,) = (tmp_path / "runs" / "fallback").iterdir()
    assert read_offline_run(run_dir).exit_code == 0
    assert "wandb sync" in done.stdout


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True).returncode == 0


def _recording_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NET_RECORDER)
    env = _env(tmp_path, NET_LOG=str(tmp_path / "net.log"))
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{site}"
    return env


def _check_no_network(tmp_path, traced):
    log = tmp_path / "net.log"
    assert not log.exists() or log.read_text() == "", log.read_text()
    if traced:
        calls = (tmp_path / "strace.txt").read_text().splitlines()
        assert any("AF_UNIX" in c for c in calls)  # the trace saw wandb's local sockets ...
        network = [c for c in calls if "AF_INET" in c or "htons(53)" in c]
        assert network == []  # ... and no IP traffic at all


STRACE = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o"]

OFFLINE_LOGGING = """
import sys
from pathlib import Path
import numpy as np
import wandb
from h3de.config import load_config
from h3de.loggers import build_loggers, resolve_logger
cfg = load_config(None, ["logger.name=wandb", "name=net"])
(logger, _) = build_loggers(resolve_logger(cfg), Path(sys.argv[1]), "net-run")
logger.log_hyperparams({"config": {"optim": {"lr": 0.1}}})
logger.log_metrics({"val/mre_mm": 3.0}, step=1)
logger.log_metrics({"val/slices": wandb.Image(np.zeros((8, 8, 3), np.uint8))}, step=2)
logger.finalize("success")
"""


def test_offline_logger_makes_no_network_traffic(tmp_path):
    """No name lookup or IP connection from the process (W&B's telemetry exporter probed its server here, even
    offline); where strace works, from none of its child processes either (wandb-core, its system monitor, git)."""
    env = _recording_env(tmp_path)
    traced = _strace_works()
    script = tmp_path / "log.py"
    script.write_text(OFFLINE_LOGGING)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prefix = [*STRACE, str(tmp_path / "strace.txt")] if traced else []
    done = subprocess.run([*prefix, sys.executable, str(script), str(run_dir)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    run = read_offline_run(run_dir)
    assert run.exit_code == 0 and run.config["optim.lr"] == 0.1 and run.run.run_group == "net"
    _check_no_network(tmp_path, traced)


@pytest.mark.slow
def test_cli_offline_training_makes_no_network_traffic(blob_dataset, tmp_path):
    """``h3de train`` with W&B's default mode (auto, no credentials: offline), panels on."""
    env = _recording_env(tmp_path)
    traced = _strace_works()
    prefix = [*STRACE, str(tmp_path / "strace.txt")] if traced else []
    done, _ = _train(blob_dataset, tmp_path, env, "logger.image_every_n_epochs=1", prefix=prefix)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs" / "default").iterdir()
    assert read_offline_run(run_dir).exit_code == 0
    _check_no_network(tmp_path, traced)
