"""Exact resume: a run killed by SIGKILL and resumed ends as an uninterrupted run; bad resume input is refused."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

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


def _args(blob_dataset, output_dir):
    return ["train", f"data.root={blob_dataset.parent}", f"output_dir={output_dir}", *RUN]


def test_a_killed_run_resumed_ends_as_an_uninterrupted_one(blob_dataset, tmp_path, capsys):
    whole = train(load_config(None, _args(blob_dataset, tmp_path / "whole")[1:]))

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "H3DE_RUN_DIR")}
    command = [sys.executable, "-c", _KILLED, *_args(blob_dataset, tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "resumed").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert any(row.get("epoch") == "1" for row in _rows(run_dir))  # the interrupted epoch had logged

    assert main([*_args(blob_dataset, tmp_path / "runs"), "resume=last"]) == 0
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
    assert sessions[0]["packages"]["torch"] == torch.__version__.split("+")[0] or sessions[0]["packages"]["torch"]
