import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from h3de.cli import main
from h3de.config import load_config
from h3de.evaluate import evaluate, load_checkpoint
from h3de.train import train
from tiny_configs import SMALL_RUN

SMALL = [*SMALL_RUN, "trainer.log_every_n_steps=1"]


def small_cfg(blob_dataset, tmp_path, *overrides):
    return load_config(
        None, [f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'runs'}", *SMALL, *overrides]
    )


def test_fast_dev_run(blob_dataset, tmp_path):
    result = train(small_cfg(blob_dataset, tmp_path, "trainer.fast_dev_run=true", "logger.name=none"))
    assert (result.run_dir / "config.yaml").is_file()
    assert torch.isfinite(torch.tensor(result.metrics["train/loss_step"]))


def test_train_writes_config_metrics_checkpoints_and_evaluates(blob_dataset, tmp_path, capsys):
    cfg = small_cfg(blob_dataset, tmp_path, "trainer.max_epochs=2", "logger.name=csv", "name=blobs")
    result = train(cfg)
    assert result.run_dir.parent.name == "blobs"
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.data.batch_size == 2 and saved.trainer.max_epochs == 2
    with open(result.run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = set(rows[0])
    for key in (
        "train/loss_step",
        "val/mre_mm",
        "val/mre_sd_mm",
        "val/sdr_2mm",
        "val/sdr_2.5mm",
        "val/mre_mm/a_L",
    ):
        assert key in keys
    assert sum(1 for r in rows if r["val/mre_mm"]) == 2  # one per epoch, nothing from the sanity check
    assert result.best_checkpoint.name == "best.ckpt" and (result.run_dir / "checkpoints" / "last.ckpt").is_file()

    module = load_checkpoint(result.best_checkpoint)  # weights_only load, rebuilt from the saved config
    assert module.landmark_names == ["a_L", "a_R", "top", "front"]

    out = evaluate(result.best_checkpoint, "test", tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 1 and summary["split"] == "test"
    assert summary["mre_mm"] == pytest.approx(float(torch.nanmean(out.errors)))
    with open(tmp_path / "eval" / "errors.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all((r["error_mm"] != "") == (r["called_present"] == "1") for r in rows)
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {
        "errors.csv",
        "per_landmark.csv",
        "per_case.csv",
        "summary.json",
        "cpe.png",
        "predictions",
    }
    assert (tmp_path / "eval" / "predictions" / "case_5.mrk.json").is_file()

    # a threshold between the scores calls the lower-scored landmarks absent: written as missing, not scored
    scores = sorted(float(r["presence_score"]) for r in rows)
    threshold = (scores[1] + scores[2]) / 2
    assert scores[1] < threshold < scores[2]
    args = ["evaluate", str(result.best_checkpoint), "--split", "test", "--out", str(tmp_path / "eval_absent")]
    assert main([*args, "--presence-threshold", str(threshold)]) == 0
    assert "2 present ones" in capsys.readouterr().out
    with open(tmp_path / "eval_absent" / "errors.csv") as f:
        absent_rows = list(csv.DictReader(f))
    called = {r["landmark"]: (r["called_present"], float(r["presence_score"])) for r in absent_rows}
    assert all((flag == "1") == (score >= threshold) for flag, score in called.values())
    markup = json.loads((tmp_path / "eval_absent" / "predictions" / "case_5.mrk.json").read_text())
    status = {p["label"]: p["positionStatus"] for p in markup["markups"][0]["controlPoints"]}
    assert status == {n: "defined" if f == "1" else "missing" for n, (f, _) in called.items()}
    again = json.loads((tmp_path / "eval_absent" / "summary.json").read_text())
    kept = [float(r["error_mm"]) for r in absent_rows if r["called_present"] == "1"]
    assert again["count"] == len(kept) == 2 and again["present_called_absent"] == 2
    assert again["mre_mm"] == pytest.approx(sum(kept) / 2, abs=1e-4)  # errors.csv holds 4 decimals
    assert main([*args, "--presence-threshold", "1.5"]) == 2


def test_wandb_offline_run_is_written_locally(blob_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = train(small_cfg(blob_dataset, tmp_path, "trainer.max_epochs=1", "logger.name=wandb"))
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (result.run_dir / "logs" / "metrics.csv").is_file()


def test_cli_bad_input_fails_cleanly_without_output(blob_dataset, tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ["train", f"data.root={blob_dataset.parent}", f"output_dir={runs}"]
    assert main(base + ["data.batchsize=3"]) == 2
    assert "data.batchsize" in capsys.readouterr().err
    assert main(base + ["model.name=nonet"]) == 2
    assert "model.name='nonet'" in capsys.readouterr().err
    assert main(["train", f"data.root={tmp_path / 'nowhere'}", f"output_dir={runs}"]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(base + ["model.unet.strides=[2]"]) == 2
    assert "model.unet" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(tmp_path / "junk.ckpt")]) == 2
    assert "not a loadable h3de checkpoint" in capsys.readouterr().err
    assert not runs.exists()


def test_cli_print_config_shows_the_merged_config(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  batch_size: 6\n")
    assert main(["train", str(path), "optim.lr=0.25", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 6" in out and "lr: 0.25" in out and "name: exp" in out
    assert not (tmp_path / "runs").exists()


def test_cli_train_runs_experiment_file(blob_dataset, tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("trainer:\n  max_epochs: 1\nlogger:\n  name: none\n")
    args = ["train", str(path), f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'runs'}", *SMALL]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best val MRE:" in out and (tmp_path / "runs" / "exp").is_dir()


def test_two_process_ddp_with_bf16_mixed_precision(odd_val_dataset, tmp_path):
    """The multi-GPU path on CPU: 2 processes (gloo), global batch and samples_per_epoch split, one run directory,
    bf16."""
    runs = tmp_path / "runs"
    data = f"data.root={odd_val_dataset.parent}"
    command = [sys.executable, "-m", "h3de.cli", "train", data, f"output_dir={runs}"]
    command += [*SMALL, "data.batch_size=4", "trainer.max_epochs=1", "logger=csv", "name=ddp"]
    command += ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    command += ["trainer.precision=bf16-mixed", "data.samples_per_epoch=8"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "H3DE_RUN_DIR")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr
    assert done.stdout.count("best val MRE") == 1  # only rank 0 reports
    run_dirs = list((runs / "ddp").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "checkpoints" / "best.ckpt").is_file()
    with open(run_dirs[0] / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss_step"]]
    assert len(rows) == 2  # 8 samples an epoch / (2 per device x 2 devices) = 2 steps (3 training cases)


def test_cli_phantom_writes_a_dataset_and_refuses_bad_sizes(tmp_path, capsys):
    assert main(["data", "phantom", "--out", str(tmp_path / "ph"), "--cases", "3", "--voxel-mm", "8"]) == 0
    assert "wrote 3 cases" in capsys.readouterr().out
    assert (tmp_path / "ph" / "dataset.json").is_file()
    assert main(["data", "phantom", "--out", str(tmp_path / "bad"), "--cases", "2"]) == 2
    assert "num_cases" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "dataset.json").exists()


TINY = ["data.spacing_mm=[6,6,6]", "data.patch_size=[16,16,16]", "trainer.num_sanity_val_steps=0", "logger=csv"]


def _read_metrics(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _checkpoint_progress(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["epoch"], state["global_step"]


def test_samples_per_epoch_max_steps_and_the_step_schedule(blob_dataset, tmp_path):
    """6 samples / batch 2 = 3 steps an epoch (4 training cases); max_steps=7 ends in epoch 2; the cosine (after a
    one-epoch warm-up) spans those 7 steps and ends at its minimum."""
    overrides = ["data.samples_per_epoch=6", "trainer.max_epochs=5", "trainer.max_steps=7"]
    overrides += ["optim.lr=0.01", "optim.warmup_epochs=1"]
    result = train(small_cfg(blob_dataset, tmp_path, *TINY, *overrides))
    steps = [r for r in _read_metrics(result.run_dir) if r["train/loss_step"]]
    assert [int(r["epoch"]) for r in steps] == [0, 0, 0, 1, 1, 1, 2]
    assert _checkpoint_progress(result.run_dir / "checkpoints" / "last.ckpt") == (2, 7)

    lrs = [float(r["lr-AdamW"]) for r in _read_metrics(result.run_dir) if r.get("lr-AdamW")]
    warmup = [0.01 * (0.1 + 0.9 * k / 3) for k in range(3)]  # linear from 0.1 x lr over 3 steps
    cosine = [0.005 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]  # 7 - 3 = 4 steps to the minimum
    assert lrs == pytest.approx(warmup + cosine[:4], rel=1e-5)  # the lr used by each of the 7 steps
    assert cosine[4] == pytest.approx(0.0, abs=1e-12)  # ...and the lr after the last step


def test_last_checkpoint_is_the_last_epoch_and_best_the_best(blob_dataset, tmp_path):
    """With a learning rate too small to change any weight, val MRE never improves after epoch 0."""
    overrides = ["trainer.max_epochs=3", "data.samples_per_epoch=2", "optim.lr=1e-15", "optim.scheduler=constant"]
    result = train(small_cfg(blob_dataset, tmp_path, *TINY, *overrides))
    mre = [float(r["val/mre_mm"]) for r in _read_metrics(result.run_dir) if r["val/mre_mm"]]
    assert len(mre) == 3 and mre[1:] == [mre[0]] * 2
    checkpoints = result.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert _checkpoint_progress(checkpoints / "best.ckpt") == (0, 1)  # one step an epoch
    assert _checkpoint_progress(checkpoints / "last.ckpt") == (2, 3)
    assert (checkpoints / "best.ckpt").read_bytes() != (checkpoints / "last.ckpt").read_bytes()


def test_max_time_stops_the_run(blob_dataset, tmp_path):
    overrides = ["trainer.max_epochs=1000", "data.samples_per_epoch=2", "trainer.max_time=00:00:00:01"]
    result = train(small_cfg(blob_dataset, tmp_path, *TINY, *overrides))
    epoch, step = _checkpoint_progress(result.run_dir / "checkpoints" / "last.ckpt")
    assert 1 <= step < 1000 and epoch == step - 1  # one step an epoch; stopped by the clock long before the epochs


def test_batch_size_not_divisible_by_the_devices_is_refused_once_without_a_run_directory(
    blob_dataset, tmp_path, capsys
):
    runs = tmp_path / "runs"
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={runs}", *SMALL, "logger=csv"]
    args += ["data.batch_size=3", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("data.batch_size=3 is not divisible by the device count (2)") == 1
    assert [p for p in runs.rglob("*")] == []  # the run directory was removed, nothing was launched


def test_progress_bar_goes_to_stderr_and_stdout_holds_the_results(blob_dataset, tmp_path, capsys):
    args = ["train", f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'runs'}", *SMALL, *TINY]
    assert main([*args, "trainer.enable_progress_bar=true", "trainer.max_epochs=1", "logger=none"]) == 0
    captured = capsys.readouterr()
    assert "Epoch 0: 100%" in captured.err
    assert captured.out.startswith("run directory: ") and "Epoch" not in captured.out and "\r" not in captured.out


def test_run_info_records_versions_and_the_git_commit(blob_dataset, tmp_path):
    result = train(small_cfg(blob_dataset, tmp_path, *TINY, "trainer.fast_dev_run=true"))
    (info,) = json.loads((result.run_dir / "run_info.json").read_text())["sessions"]
    import lightning
    import monai
    import numpy

    assert info["packages"]["torch"] == torch.__version__ and info["packages"]["monai"] == monai.__version__
    assert (info["packages"]["lightning"], info["packages"]["numpy"]) == (lightning.__version__, numpy.__version__)
    assert info["python"] == "{}.{}.{}".format(*sys.version_info[:3]) and info["packages"]["h3de"]
    source = os.path.dirname(os.path.dirname(__file__))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True)
    if head.returncode == 0:  # tests run from a git checkout
        assert info["git"]["commit"] == head.stdout.strip() and isinstance(info["git"]["dirty"], bool)
