"""Exact resume: a run killed by SIGKILL and resumed ends as an uninterrupted run; bad resume input is refused."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import wandb

from h3de.checkpoints import read_checkpoint, save_checkpoint
from h3de.cli import main
from h3de.config import load_config
from h3de.evaluate import load_checkpoint
from h3de.resume import prepare_resume
from h3de.train import train

RUN = [
    "data.patch_size=[16,16,16]",
    "data.spacing_mm=[6,6,6]",
    "data.batch_size=2",
    "data.samples_per_epoch=4",  # 2 steps an epoch (4 training cases, augmented)
    "model.unet.channels=[8,16,32]",
    "model.unet.strides=[2,2]",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.deterministic=true",
    "optim.warmup_epochs=1",  # a warm-up then a cosine: the scheduler's state matters
    "logger=csv",
    "name=resumed",
]

# Runs `h3de train` with a callback that SIGKILLs the process at epoch 1's second step: after last.ckpt of epoch 0,
# with rows of the interrupted epoch already in metrics.csv.
_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    from h3de.cli import main

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = L.Trainer
    L.Trainer = lambda **kw: trainer(**{**kw, "callbacks": [*kw["callbacks"], Kill()]})
    sys.exit(main(sys.argv[1:]))
    """
)


def _rows(run_dir):
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _args(blob_dataset, output_dir, *overrides):
    return ["train", f"data.root={blob_dataset.parent}", f"output_dir={output_dir}", *RUN, *overrides]


def test_a_killed_run_resumed_ends_as_an_uninterrupted_one(blob_dataset, tmp_path, capsys):
    """The uninterrupted run loads in the main process, the killed and resumed one with 2 loader workers
    (restarted on resume): the same samples, augmentation and steps either way."""
    whole = train(load_config(None, _args(blob_dataset, tmp_path / "whole", "data.num_workers=0")[1:]))

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "H3DE_RUN_DIR")}
    command = [sys.executable, "-c", _KILLED, *_args(blob_dataset, tmp_path / "runs", "data.num_workers=2")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "resumed").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert any(row.get("epoch") == "1" for row in _rows(run_dir))  # the interrupted epoch had logged

    assert main([*_args(blob_dataset, tmp_path / "runs", "data.num_workers=2"), "resume=last"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "(after epoch 0, step 2)" in out
    assert [p.name for p in (tmp_path / "runs" / "resumed").iterdir()] == [run_dir.name]  # the same run

    # the same rows, steps and values (the interrupted epoch's rows replaced by the resumed ones)
    assert _rows(run_dir) == _rows(whole.run_dir)
    resumed = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    reference = read_checkpoint(whole.run_dir / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"]) == (1, 4)
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    moments = [s["exp_avg_sq"] for s in resumed["optimizer_states"][0]["state"].values()]
    expected = [s["exp_avg_sq"] for s in reference["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, expected, strict=True))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    sessions = json.loads((run_dir / "run_info.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from"]["global_step"] == 2


@pytest.fixture(autouse=True)
def _restore_determinism():
    """trainer.deterministic sets torch's global flags (Lightning does); leave them as they were for other tests."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _one_epoch_run(blob_dataset, output_dir, *overrides):
    args = _args(blob_dataset, output_dir)[1:]
    return train(load_config(None, [*args, "trainer.max_epochs=1", "trainer.deterministic=false", *overrides]))


def _sessions(run_dir):
    return len(json.loads((run_dir / "run_info.json").read_text())["sessions"])


def test_resume_refuses_bad_input_before_any_work(blob_dataset, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = _one_epoch_run(blob_dataset, runs).run_dir
    base = [*_args(blob_dataset, runs), "trainer.max_epochs=1", "trainer.deterministic=false"]
    before = sorted(p.name for p in run_dir.rglob("*"))

    cases = {
        f"resume={tmp_path / 'nowhere'}": "no such run directory or checkpoint",
        "name=other resume=last": "no run of experiment 'other'",
        "resume=last model.unet.channels=[8,16,64]": "belongs to a different model or dataset: model.unet.channels",
        f"resume=last data.root={tmp_path / 'runs'}": "belongs to a different model or dataset: data.root",
        "resume=last optim.lr=0.5": "only trainer.max_epochs, trainer.max_steps, trainer.max_time",
        "resume=last trainer.max_epochs=4": "cannot change with optim.scheduler=cosine",
        f"resume={run_dir / 'config.yaml'}": "not a checkpoint of a run directory",
        "resume=last resume=last": "resume= given 2 times",
    }
    for extra, message in cases.items():
        assert main([*base, *extra.split()]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    # without the experiment's settings, the run's config.yaml is the config: only budget keys may be given
    assert main(["train", f"resume={run_dir}", "data.batch_size=4"]) == 2
    assert "data.batch_size=4 here, 2 in the run" in capsys.readouterr().err

    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert main([*base, "resume=last"]) == 2
    err = capsys.readouterr().err
    assert f"{last}: not a loadable h3de checkpoint: the file is truncated" in err
    assert main(["evaluate", str(last)]) == 2
    assert "the file is truncated" in capsys.readouterr().err

    assert sorted(p.name for p in run_dir.rglob("*")) == before and _sessions(run_dir) == 1
    assert [p.name for p in (runs / "resumed").iterdir()] == [run_dir.name]


def test_checkpoints_are_written_atomically_and_read_without_unpickling(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, path)
    old = path.read_bytes()
    with pytest.raises(
        (AttributeError, TypeError, pickle.PicklingError)
    ):  # fails while serialising, after part of the file was written
        save_checkpoint({"weights": torch.zeros(1000), "bad": lambda: None}, path)
    assert path.read_bytes() == old and os.listdir(path.parent) == ["last.ckpt"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert read_checkpoint(path)["epoch"] == 1

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload()}, unsafe)  # a pickled class: code run on load
    with pytest.raises(Exception, match="objects other than tensors and plain values, which h3de never unpickles"):
        read_checkpoint(unsafe)
    with pytest.raises(Exception, match="never unpickles"):
        load_checkpoint(unsafe)


class _Payload:
    pass


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_keeps_the_wandb_run_and_extends_the_budget(blob_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    runs = tmp_path / "runs"
    first = _one_epoch_run(blob_dataset, runs, "logger=wandb", "optim.scheduler=constant")
    run_id = (first.run_dir / "wandb_run_id").read_text().strip()
    wandb.finish()  # as the end of the first `h3de train` process would
    # no experiment settings given: the run's config.yaml, with a larger epoch budget (the schedule is constant)
    assert main(["train", f"resume={first.run_dir}", "trainer.max_epochs=2"]) == 0
    assert "(after epoch 0, step 2)" in capsys.readouterr().out
    offline = sorted((first.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)
    assert read_checkpoint(first.run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert load_config(first.run_dir / "config.yaml").trainer.max_epochs == 2
    epochs = [row["epoch"] for row in _rows(first.run_dir) if "train/loss_step" in row]
    assert epochs == ["0", "0", "1", "1"]


def test_prepare_resume_takes_the_budget_from_the_command(blob_dataset, tmp_path):
    run_dir = _one_epoch_run(blob_dataset, tmp_path / "runs", "optim.scheduler=exponential").run_dir
    cfg, point = prepare_resume(str(run_dir / "checkpoints" / "best.ckpt"), None, ["trainer.max_steps=3"])
    assert (point.run_dir, point.epoch, point.global_step) == (run_dir, 0, 2)
    assert cfg.trainer.max_steps == 3 and cfg.optim.scheduler == "exponential"
    with pytest.raises(Exception, match="landmarks .* differ from those of"):
        point.check_landmarks(["a_L", "a_R", "top"])
