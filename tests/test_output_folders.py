"""Output folders that an error left empty are removed, and the error is one line (Task: no empty folders)."""

import subprocess

import lightning as L
import pytest

from h3de.cli import main
from h3de.config import load_config
from h3de.errors import ConfigError
from h3de.io_utils import removed_if_left_empty
from h3de.train import train
from inference_helpers import save_checkpoint

TINY = [
    "data.patch_size=[16,16,16]",
    "data.spacing_mm=[6,6,6]",
    "data.batch_size=2",
    "model.unet.channels=[8,16,32]",
    "model.unet.strides=[2,2]",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "logger=csv",
]


def _one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    assert err.startswith("h3de: error: ") and fragment in err and err.count("\n") == 1, err


def test_removed_if_left_empty_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), removed_if_left_empty(tmp_path / "a" / "b" / "out") as out:
        (out / "sub" / "deeper").mkdir(parents=True)
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # out, its subfolders and a/b made for it

    with pytest.raises(RuntimeError), removed_if_left_empty(tmp_path / "a" / "out") as out:
        (out / "empty").mkdir(parents=True)
        (out / "written.txt").write_text("x")
        raise RuntimeError
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "a",
        "a/out",
        "a/out/written.txt",
        "kept",
    ]
    with pytest.raises(RuntimeError), removed_if_left_empty(tmp_path / "kept"):  # it existed: it stays
        raise RuntimeError
    with removed_if_left_empty(tmp_path / "new" / "ok") as out:  # no error: nothing removed
        out.mkdir(parents=True)
    assert (tmp_path / "new" / "ok").is_dir()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.accelerator=foo", "Lightning refuses the trainer settings: You selected an invalid accelerator"),
        ("trainer.strategy=nonsense", "Lightning refuses the trainer settings: You selected an invalid strategy"),
    ],
)
def test_train_refused_by_lightning_leaves_no_folder(blob_dataset, tmp_path, capsys, override, fragment):
    out = tmp_path / "new" / "runs"
    assert main(["train", f"data.root={blob_dataset.parent}", f"output_dir={out}", *TINY, override]) == 2
    _one_line_error(capsys, fragment)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be positive, got 0"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch must be positive, got 0"),
        ("data.num_workers=-1", "data.num_workers must be 0 (no loader processes) or more, got -1"),
    ],
)
def test_settings_that_failed_inside_lightning_are_refused_by_the_config(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


class _FailAtFirstStep(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        raise RuntimeError("out of memory, say")


def test_an_error_at_the_first_step_removes_the_run_directory(blob_dataset, tmp_path):
    cfg = load_config(None, [f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'new' / 'runs'}", *TINY])
    with pytest.raises(RuntimeError, match="out of memory, say"):
        train(cfg, callbacks=[_FailAtFirstStep()])
    assert not (tmp_path / "new").exists()


def test_predict_with_every_case_failing_leaves_no_folder(blob_dataset, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "model.ckpt", [f"data.root={blob_dataset.parent}", *TINY], ["a", "b"])
    images = tmp_path / "broken"
    images.mkdir()
    (images / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "new" / "deeper" / "predictions"
    assert main(["predict", str(checkpoint), str(images), "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "cannot read image")
    assert not (tmp_path / "new").exists()


def test_a_failing_export_leaves_no_folder(blob_dataset, tmp_path, capsys, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "model.ckpt", [f"data.root={blob_dataset.parent}", *TINY], ["a", "b"])

    def disagrees(stage, path):
        raise H3deError(f"{stage.name} stage: the torchscript export differs from PyTorch by 1 at input 16x16x16")

    from h3de import export
    from h3de.errors import H3deError

    monkeypatch.setitem(export._EXPORTERS, "torchscript", disagrees)
    out = tmp_path / "new" / "deeper" / "export"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 2
    _one_line_error(capsys, "differs from PyTorch")
    assert not (tmp_path / "new").exists()


def test_phantom_and_afids_leave_no_folder_after_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    assert main(["data", "phantom", "--out", str(tmp_path / "a_file" / "phantom"), "--cases", "3"]) == 2
    _one_line_error(capsys, "cannot make the output folder there")

    from h3de.data import phantom

    def broken(*args, **kwargs):
        raise phantom.DataError("rendering failed")

    monkeypatch.setattr(phantom, "_write_case", broken)
    assert main(["data", "phantom", "--out", str(tmp_path / "new" / "phantom"), "--cases", "3"]) == 2
    _one_line_error(capsys, "rendering failed")
    assert not (tmp_path / "new").exists()

    # no network: pip fails after downloads/ was made
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr("h3de.data.afids.subprocess.run", lambda *args, **kwargs: failed)
    assert main(["data", "afids", "--out", str(tmp_path / "new" / "afids")]) == 2
    _one_line_error(capsys, "pip could not download")
    assert not (tmp_path / "new").exists()
