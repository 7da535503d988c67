"""W&B dashboards: an offline run is read back from its .wandb file and media, and checked against metrics.csv."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BLOB_NAMES
from h3de.callbacks import PANEL_LANDMARKS, heatmaps, landmark_rows, sdr_curve
from h3de.config import load_config
from h3de.module import LandmarkModule
from h3de.plots import qc_figure
from h3de.train import train
from tiny_configs import FAST_RUN
from wandb_records import read_offline_run

FAST = [*FAST_RUN, "trainer.log_every_n_steps=1"]


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No W&B credentials, no WANDB_MODE: the default (auto) resolves to offline."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_SILENT", "WANDB_ERROR_REPORTING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def _metrics_csv(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val/mre_mm")]


def _table(run_dir, row, key):
    """The rows of a table logged under ``key`` (a history row's ``<key>/path`` in the offline run's files)."""
    files = next((run_dir / "wandb").glob("offline-run-*")) / "files"
    content = json.loads((files / row[f"{key}/path"]).read_text())
    return content["columns"], content["data"]


def test_offline_run_records_config_summary_curves_tables_slices_and_checkpoint(blob_dataset, tmp_path, offline_env):
    overrides = [f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'runs'}", *FAST, "name=blobs"]
    overrides += ["trainer.max_epochs=3", "logger.name=wandb", "logger.tags=[smoke,unet]"]
    overrides += ["logger.image_every_n_epochs=2", "logger.log_checkpoint=true"]
    cfg = load_config(None, overrides)
    result = train(cfg)
    run = read_offline_run(result.run_dir)

    # named, grouped (default: the experiment name) and tagged from the experiment
    assert run.run.display_name == f"blobs-{result.run_dir.name}" and run.run.run_group == "blobs"
    assert list(run.run.tags) == ["smoke", "unet"] and run.run.job_type == "train"
    # the resolved config as flat section.key entries (the names of key=value overrides and sweep parameters)
    assert run.config["optim.lr"] == cfg.optim.lr and run.config["data.batch_size"] == 2
    assert run.config["model.unet.channels"] == [8, 16, 32] and run.config["logger.log_checkpoint"] is True
    assert run.config["landmark_names"] == BLOB_NAMES
    assert run.exit_code == 0  # finished when training ended

    # val/mre_mm per epoch as in metrics.csv; its minimum in the summary, as val/mre_mm_best
    csv_rows = _metrics_csv(result.run_dir)
    logged = [r for r in run.history if "val/mre_mm" in r]
    assert len(logged) == len(csv_rows) == 3
    mre = [r["val/mre_mm"] for r in logged]
    assert mre == pytest.approx([float(r["val/mre_mm"]) for r in csv_rows], rel=1e-6)
    assert run.metrics["val/mre_mm"].summary.min
    assert run.summary["val/mre_mm"]["min"] == pytest.approx(min(mre), rel=1e-6)
    assert run.summary["val/mre_mm_best"] == pytest.approx(min(mre), rel=1e-6)
    assert result.best_val_mre_mm == pytest.approx(min(mre), rel=1e-5)

    panels = [r for r in run.history if "val/landmarks/path" in r]
    assert len(panels) == 3  # every validation
    for metrics, panel in zip(logged, panels, strict=True):
        # per-landmark table: each row's MRE is the logged val/mre_mm/<name>; counts weight them to val/mre_mm
        columns, rows = _table(result.run_dir, panel, "val/landmarks")
        table = [dict(zip(columns, row, strict=True)) for row in rows]
        assert [t["landmark"] for t in table] == BLOB_NAMES
        for t in table:
            assert t["mre_mm"] == pytest.approx(metrics[f"val/mre_mm/{t['landmark']}"], rel=1e-5)
        total = sum(t["count"] for t in table)
        assert sum(t["count"] * t["mre_mm"] for t in table) / total == pytest.approx(metrics["val/mre_mm"], rel=1e-5)
        # SDR curve: from 0 % at 0 mm, non-decreasing, bracketing the logged SDR at 4 mm
        columns, rows = _table(result.run_dir, panel, "val/sdr_curve_table")
        assert columns == ["radius_mm", "sdr_percent"]
        radius, sdr = np.array(rows).T
        assert radius[0] == 0 and sdr[0] == 0 and np.all(np.diff(sdr) >= 0) and sdr[-1] >= 90
        below, above = sdr[radius <= 4.0][-1], sdr[radius >= 4.0][0]
        assert below <= metrics["val/sdr_4mm"] + 1e-6 and metrics["val/sdr_4mm"] <= above + 1e-6
    assert "_wandb/visualize/val/sdr_curve" in run.config  # the line plot's panel

    # slices at epochs 0 and 2 (every 2 epochs), one row of three views per landmark (4 <= PANEL_LANDMARKS)
    slices = [r for r in run.history if "val/slices/path" in r]
    assert [r["val/slices/caption"].rsplit(" ", 1)[-1] for r in slices] == ["0", "2"]
    files = next((result.run_dir / "wandb").glob("offline-run-*")) / "files"
    for row in slices:
        with Image.open(files / row["val/slices/path"]) as image:
            assert image.size == (row["val/slices/width"], row["val/slices/height"])
            assert image.height > image.width  # 4 rows of 3 views
    assert len(BLOB_NAMES) <= PANEL_LANDMARKS

    # the best checkpoint as a model artifact
    (artifact,) = [a for a in run.artifacts if a.type == "model"]
    assert artifact.name == f"model-{run.run.run_id}" and "best" in artifact.aliases
    assert [e.path for e in artifact.manifest.contents] == ["best.ckpt"]
    assert json.loads(artifact.metadata)["val/mre_mm"] == pytest.approx(min(mre), rel=1e-5)


@pytest.mark.parametrize("logger", [["logger=csv"], ["logger=wandb", "logger.mode=disabled"]])
def test_csv_logger_and_disabled_wandb_train_without_panels(blob_dataset, tmp_path, offline_env, logger):
    overrides = [f"data.root={blob_dataset.parent}", f"output_dir={tmp_path / 'runs'}", *FAST, "trainer.max_epochs=1"]
    result = train(load_config(None, [*overrides, *logger, "logger.image_every_n_epochs=1"]))
    assert not list((result.run_dir / "wandb").glob("*run-*"))
    assert len(_metrics_csv(result.run_dir)) == 1


def test_sdr_curve_and_landmark_rows_by_hand():
    errors = np.array([[1.0, np.nan, 3.0], [2.0, np.nan, 9.0]])
    curve = dict(sdr_curve(errors, [2.0], points=5))  # radii 0 .. max(2 x 2, the error >= 90 % of them: 9) mm
    assert list(curve) == pytest.approx([0.0, 2.25, 4.5, 6.75, 9.0])
    assert list(curve.values()) == [0.0, 50.0, 75.0, 75.0, 100.0]
    assert dict(sdr_curve(errors / 10, [2.0], points=3)) == {0.0: 0.0, 2.0: 100.0, 4.0: 100.0}
    assert sdr_curve(np.full((2, 2), np.nan), [2.0]) == []
    columns, rows = landmark_rows(["a", "b", "c"], errors, [2.0])
    assert columns == ["landmark", "count", "mre_mm", "mre_sd_mm", "median_mm", "max_mm", "sdr_2mm"]
    assert rows[0] == ["a", 2, 1.5, 0.5, 1.5, 2.0, 100.0]
    assert rows[1] == ["b", 0, None, None, None, None, None]
    assert rows[2][2] == 6.0 and rows[2][-1] == 0.0


def test_heatmap_overlay_is_drawn_where_the_map_is_and_only_there():
    volume = np.random.default_rng(0).normal(size=(20, 24, 16)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    point = np.array([[20.0, 24.0, 24.0]])  # voxel (10, 12, 8)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in volume.shape], indexing="ij"), -1)
    blob = np.exp(-((grid - [10, 12, 8]) ** 2).sum(-1) / 8.0)[None]

    def pixels(heatmap):
        fig = qc_figure(volume, affine, ["p"], point, np.ones(1), point, heatmap=heatmap)
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
        return image

    plain, zero, warm = pixels(None), pixels(np.zeros_like(blob)), pixels(blob)
    grey = (zero[..., 0] == zero[..., 1]) & (zero[..., 1] == zero[..., 2])  # the slices, not the markers
    changed = (np.abs(warm - zero).sum(-1) > 30) & grey
    assert changed.sum() > 100  # the blob is drawn ...
    red, green, blue = warm[changed].T
    assert np.all(red >= green) and np.all(green >= blue)  # ... in yellow-red over the grey slices
    # a zero map changes nothing but the legend in the title
    body = slice(40, None)
    assert np.abs(plain[body] - zero[body]).max() == 0


def test_heatmaps_of_a_heatmap_network_peak_at_one():
    cfg = load_config(None, [*FAST])
    module = LandmarkModule(dict(_plain(cfg)), BLOB_NAMES).eval()
    from monai.data import MetaTensor

    image = MetaTensor(torch.randn(1, 16, 16, 16), affine=torch.eye(4))
    maps = heatmaps(module, {"image": image})
    assert maps.shape == (4, 16, 16, 16)
    assert np.allclose(maps.reshape(4, -1).max(1), 1.0) and maps.min() >= 0
    assert np.allclose(heatmaps(module, {"image": image}, [2, 0]), maps[[2, 0]], atol=1e-6)
    module.cfg.detection.mode = "sliding_window"
    assert heatmaps(module, {"image": image}) is None
    assert math.isfinite(float(maps.sum()))


def _plain(cfg):
    from h3de.config import to_container

    return to_container(cfg)
