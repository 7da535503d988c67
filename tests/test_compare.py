"""``h3de compare``: the table and curves read back from real run directories; clear errors for other folders."""

import csv
import os
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import write_blob_dataset
from h3de.cli import main
from h3de.compare import compare
from h3de.config import load_config
from h3de.errors import H3deError
from h3de.networks import build_network, network_params
from h3de.train import train
from tiny_configs import SMALL_RUN

TINY = [*SMALL_RUN, "trainer.num_sanity_val_steps=0", "logger=csv"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished runs on the blob dataset that differ in learning rate and epochs."""
    root = tmp_path_factory.mktemp("compare")
    manifest = write_blob_dataset(root)
    runs = []
    for lr, epochs in ((0.003, 2), (0.01, 3)):
        cfg = load_config(None, [f"data.root={manifest.parent}", f"output_dir={root / 'runs'}", *TINY,
                                 f"optim.lr={lr}", f"trainer.max_epochs={epochs}", f"name=lr{lr}"])  # fmt: skip
        runs.append(train(cfg).run_dir)
    return runs


def val_mre(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [(int(r["epoch"]), float(r["val/mre_mm"]), r) for r in csv.DictReader(f) if r["val/mre_mm"]]


def test_compare_reads_the_runs_back(two_runs, tmp_path, capsys):
    assert main(["compare", *map(str, two_runs), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    result = compare(two_runs, tmp_path / "cmp2")
    assert result.table in printed
    for run, summary in zip(two_runs, result.runs, strict=True):
        curve = val_mre(run)
        epoch, best, row = min(curve, key=lambda c: c[1])
        assert summary.best_val_mre_mm == pytest.approx(best) and summary.best_epoch == epoch
        assert summary.sdr["sdr_2mm"] == pytest.approx(float(row["val/sdr_2mm"]))
        assert summary.val_mre_mm == [(e, pytest.approx(v)) for e, v, _ in curve]
        cfg = load_config(run / "config.yaml")
        network = build_network("unet", 1, 4, network_params(cfg.model))
        assert summary.parameters == sum(p.numel() for p in network.parameters())
        assert summary.gflops > 0 and summary.train_seconds > 0
    assert [r.epochs for r in result.runs] == [2, 3]
    assert result.runs[0].differs == {"optim.lr": "0.003", "trainer.max_epochs": "2"}  # only what differs
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [f"{d.parent.name}/{d.name}" for d in two_runs]
    assert float(rows[1]["best val MRE (mm)"]) == pytest.approx(result.runs[1].best_val_mre_mm, abs=0.005)
    assert {"2mm SDR (%)", "fwd GFLOPs", "params (M)", "train time (s)", "optim.lr"} <= set(rows[0])
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == result.table
    image = imread(tmp_path / "cmp" / "val_mre.png")
    assert image.shape[0] > 100 and np.ptp(image[..., :3]) > 0  # a drawn figure, not a blank one
    assert sorted(os.listdir(tmp_path / "cmp")) == ["compare.csv", "compare.md", "val_mre.png"]  # no temp files


def test_no_flops_and_a_run_without_checkpoints_or_metrics(two_runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(two_runs[0] / "config.yaml", bare / "config.yaml")
    result = compare([two_runs[0], bare], tmp_path / "out", flops=False)
    assert result.runs[1].best_val_mre_mm is None and result.runs[1].train_seconds is None
    assert result.runs[0].parameters is None and "| n/a |" in result.table


def test_folders_that_are_not_run_directories_are_refused(two_runs, tmp_path, capsys):
    with pytest.raises(H3deError, match="not a run directory of h3de train .it has no config.yaml"):
        compare([two_runs[0], tmp_path], tmp_path / "out")
    with pytest.raises(H3deError, match="not a folder"):
        compare([tmp_path / "missing"])
    with pytest.raises(H3deError, match="given twice"):
        compare([two_runs[0], two_runs[0]])
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line(two_runs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["compare", *map(str, two_runs), "--no-flops", "--out", str(tmp_path / "a_file" / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "a_file/cmp: cannot write the comparison there" in err and err.count("\n") == 1, err
