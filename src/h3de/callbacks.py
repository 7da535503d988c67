"""W&B dashboard panels, fed by what :class:`h3de.module.LandmarkModule`'s validation already computes.

After every validation (not the sanity check), on the process of global rank zero, :class:`WandbPanels` logs:

- ``val/sdr_curve``: the successful detection rate (%) against the radius (mm), a line plot of a table;
- ``val/landmarks``: a table with one row per landmark: count, MRE, SD, median, max and the SDRs;
- ``val/slices`` (every ``image_every_n_epochs`` epochs, from epoch 0): the sagittal, coronal and axial slices
  through the predictions of the first val case, with the predicted (red +) and true (green x) landmarks and each
  landmark's heatmap (heatmap networks, whole-volume and coarse-to-fine detection); the landmarks with the largest
  errors first, at most ``PANEL_LANDMARKS`` of them.

It also makes the run summary's ``val/mre_mm`` the minimum over the epochs (``define_metric``; the module logs
``val/mre_mm_best`` too) and, with ``log_checkpoint``, logs the best checkpoint as a ``model`` artifact at the end
of a successful fit. Without a W&B logger it does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from h3de.inference import Detection
from h3de.metrics import describe_errors
from h3de.readout import HeatmapReadout

__all__ = ["WandbPanels", "PANEL_LANDMARKS", "sdr_curve", "landmark_rows", "heatmaps"]

PANEL_LANDMARKS = 6  # rows of the slice panel


def sdr_curve(errors: np.ndarray, radii_mm: Sequence[float], points: int = 51) -> list[tuple[float, float]]:
    """(radius mm, % of present landmarks within it) at ``points`` radii from 0 to twice the largest SDR radius, or
    further, to the smallest error that 90 % of the errors do not exceed (so the curve reaches at least 90 %);
    ``errors`` any shape, NaN = absent (left out). Empty if nothing is present."""
    valid = np.sort(errors[np.isfinite(errors)].ravel())
    if valid.size == 0:
        return []
    top = max(2.0 * max(radii_mm), float(np.quantile(valid, 0.9, method="higher")))
    radii = np.linspace(0.0, top, points)
    within = np.searchsorted(valid, radii, side="right") / valid.size
    return [(float(r), 100.0 * float(w)) for r, w in zip(radii, within, strict=True)]


def landmark_rows(
    names: Sequence[str], errors: np.ndarray, radii_mm: Sequence[float]
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-landmark table of an (N, L) error matrix (mm, NaN = absent): name, then
    :func:`h3de.metrics.describe_errors` of its column (None where the landmark was never present)."""
    rows = []
    for j, name in enumerate(names):
        summary = describe_errors(torch.from_numpy(errors[:, j]), radii_mm)
        rows.append([name, *(None if isinstance(v, float) and np.isnan(v) else v for v in summary.values())])
    summary = describe_errors(torch.full((1,), float("nan")), radii_mm)
    return ["landmark", *summary], rows


def heatmaps(module: Any, sample: dict[str, Any], landmarks: Sequence[int] | None = None) -> np.ndarray | None:
    """(K, X, Y, Z) maps in [0, 1] (each divided by its peak) of the global network over one prepared val scan, for
    the ``landmarks`` indices (default all), or None where there is no whole-volume heatmap (anchor networks,
    sliding-window detection)."""
    if not isinstance(module.readout, HeatmapReadout) or module.cfg.detection.mode == "sliding_window":
        return None
    image = sample["image"].as_tensor()[None].to(module.device, torch.float32)  # (1, 1, X, Y, Z)
    criterion = module.readout.criterion
    with torch.no_grad():
        maps = criterion.decodable(module.network(image))[0]  # (L, X, Y, Z)
    maps = (maps if landmarks is None else maps[list(landmarks)]).float()
    if maps.shape[1:] != image.shape[2:]:
        return None
    peak = maps.flatten(1).amax(1)[:, None, None, None]
    maps = torch.exp(maps - peak) if criterion.log_domain else maps.clamp_min(0.0) / peak.clamp_min(1e-12)
    return maps.cpu().numpy()


def _figure_rgb(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class WandbPanels(Callback):
    """The W&B panels of a training run (module docstring).

    Args:
        radii_mm: the SDR radii (mm) of the experiment.
        image_every_n_epochs: log the slice panel at epochs 0, N, 2N, ... (0 = never).
        log_checkpoint: log the best checkpoint as a model artifact at the end of a successful fit.
    """

    def __init__(self, radii_mm: Sequence[float], image_every_n_epochs: int, log_checkpoint: bool) -> None:
        self.radii_mm = tuple(float(r) for r in radii_mm)
        self.image_every_n_epochs = image_every_n_epochs
        self.log_checkpoint = log_checkpoint
        self._case: dict[str, Any] | None = None

    @staticmethod
    def _logger(trainer: L.Trainer) -> WandbLogger | None:
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and not logger.experiment.disabled:
                return logger
        return None

    def _images_due(self, trainer: L.Trainer) -> bool:
        every = self.image_every_n_epochs
        return every > 0 and trainer.current_epoch % every == 0 and not trainer.sanity_checking

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is not None:
            logger.experiment.define_metric("val/mre_mm", summary="min", step_metric="trainer/global_step")

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: list[Detection] | None,
        batch: list[dict[str, Any]],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or not outputs or not self._images_due(trainer):
            return
        if self._logger(trainer) is None:
            return
        sample, found = batch[0], outputs[0]
        image = sample["image"]
        truth, predicted = sample["landmarks_world"].double().cpu().numpy(), found.world.double().cpu().numpy()
        error = np.linalg.norm(predicted - truth, axis=-1)  # NaN where absent
        order = np.argsort(np.where(np.isfinite(error), -error, np.inf), kind="stable")[:PANEL_LANDMARKS]
        self._case = {  # the landmarks with the largest errors first, truth-absent last
            "case_id": sample.get("case_id", ""),
            "volume": image.as_tensor()[0].float().cpu().numpy(),
            "affine": image.affine.double().cpu().numpy(),
            "names": [
                f"{pl_module.landmark_names[i]} {error[i]:.1f} mm"
                if np.isfinite(error[i])
                else pl_module.landmark_names[i]
                for i in order
            ],
            "truth": truth[order],
            "predicted": predicted[order],
            "presence": found.presence.float().cpu().numpy()[order],
            "heatmaps": heatmaps(pl_module, sample, order.tolist()),
        }

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        case, self._case = self._case, None
        logger = self._logger(trainer)
        errors = getattr(pl_module, "val_errors_mm", None)
        if logger is None or trainer.sanity_checking or errors is None:
            return
        import wandb

        errors = errors.double().numpy()
        payload: dict[str, Any] = {}
        curve = sdr_curve(errors, self.radii_mm)
        if curve:
            table = wandb.Table(columns=["radius_mm", "sdr_percent"], data=[list(p) for p in curve])
            title = f"SDR: % of val landmarks within r mm (epoch {trainer.current_epoch})"
            payload["val/sdr_curve"] = wandb.plot.line(table, "radius_mm", "sdr_percent", title=title)
        columns, rows = landmark_rows(pl_module.landmark_names, errors, self.radii_mm)
        payload["val/landmarks"] = wandb.Table(columns=columns, data=rows)
        if case is not None:
            payload["val/slices"] = wandb.Image(
                self._panel(case, trainer.current_epoch),
                caption=f"{case['case_id']}, epoch {trainer.current_epoch}",
            )
        logger.log_metrics(payload, step=trainer.global_step)

    @staticmethod
    def _panel(case: dict[str, Any], epoch: int) -> np.ndarray:
        """RGB image of the slices through the landmarks of ``case``."""
        import matplotlib.pyplot as plt

        from h3de.plots import qc_figure

        fig = qc_figure(
            case["volume"],
            case["affine"],
            case["names"],
            case["predicted"],
            case["presence"],
            case["truth"],
            title=f"{case['case_id']}, epoch {epoch}",
            heatmap=case["heatmaps"],
        )
        try:
            return _figure_rgb(fig)
        finally:
            plt.close(fig)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._logger(trainer) if self.log_checkpoint and not trainer.interrupted else None
        monitors = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
        if logger is None or not monitors or not monitors[0].best_model_path:
            return
        import wandb

        best, run = monitors[0], logger.experiment
        score = best.best_model_score
        metadata = {best.monitor: float(score) if score is not None else None, "trained_steps": trainer.global_step}
        artifact = wandb.Artifact(name=f"model-{run.id}", type="model", metadata=metadata)
        artifact.add_file(str(best.best_model_path), name=Path(best.best_model_path).name)
        run.log_artifact(artifact, aliases=["best"])
