"""LandmarkModule: the LightningModule around a landmark network — loss, metrics, optimisation, logging.

Training steps see packed crops (and, coarse-to-fine, the local stage's patches); validation and test steps
see whole prepared scans and score :func:`h3de.inference.detect`, the path that ``evaluate`` and ``predict``
take too. It knows nothing of files. It is built from the resolved experiment config (a plain dict, saved in
every checkpoint) and the landmark names, so a checkpoint alone rebuilds it.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torchmetrics import MinMetric

from h3de.config import config_from_dict
from h3de.geometry import voxel_to_world
from h3de.inference import Detection, detect
from h3de.metrics import LandmarkErrors, PresenceScores
from h3de.networks import LandmarkConditioned, build_network, network_params, network_spec
from h3de.readout import build_readout

__all__ = ["LandmarkModule"]


class LandmarkModule(L.LightningModule):
    """Landmark detector: a registry network plus the readout of its output kind (heatmap or anchor).

    Args:
        config: resolved experiment config as a plain dict (``h3de.config.to_container``).
        landmark_names: the manifest's landmark names, in output order.
    """

    def __init__(self, config: dict[str, Any], landmark_names: list[str]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        self.landmark_names = list(landmark_names)
        model = self.cfg.model
        spec = network_spec(model.name)
        params = network_params(model)
        self.network = build_network(model.name, 1, len(landmark_names), params)
        self.readout = build_readout(
            spec.output, self.cfg.loss, len(landmark_names), params, self.cfg.data.heatmap_sigma
        )
        self.local_network, self.local_readout = None, None
        if self.cfg.detection.mode == "coarse_to_fine":
            local, count = self.cfg.local, len(landmark_names)
            local_params = network_params(local.model)
            if local.design == "conditioned":
                network = build_network(local.model.name, 1 + count, 1, local_params)
                self.local_network = LandmarkConditioned(network, count)
                # one map out: one absent logit, made per landmark by the conditioned network's landmark_bias
                maps = 1
            else:
                self.local_network = build_network(local.model.name, 1, count, local_params)
                maps = count
            self.local_readout = build_readout("heatmap", local.loss, maps, local_params, local.heatmap_sigma)
        radii = tuple(self.cfg.sdr_radii_mm)
        self.train_errors = LandmarkErrors(radii)
        self.val_errors = LandmarkErrors(radii)
        self.test_errors = LandmarkErrors(radii)
        self.val_mre_best = MinMetric()
        self._resumed_val_mre_best: torch.Tensor | None = None  # from a resumed run's checkpoint
        self.val_presence = PresenceScores(0.5)
        self.val_errors_mm: torch.Tensor | None = None  # (N, L) mm of the last validation, NaN = absent

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) image -> the network's raw output (heatmaps, logits or anchor maps)."""
        return self.network(image)

    def decode(self, output: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Network output -> ((B, L, 3) voxel coordinates, (B, L, 3) float64 world mm, (B, L) presence)."""
        voxel, presence = self.readout.decode(output)
        return voxel, voxel_to_world(voxel.double(), affine.double()), presence

    def model_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and (B, L, 3) predicted world mm for a packed training batch (the global stage's)."""
        output = self(batch["image"])
        loss = self.readout.loss(output, batch)
        _, world, _ = self.decode(output, batch["affine"])
        return loss, world

    def local_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Loss of the coarse-to-fine local stage on the batch's (B, K) patches: each supervises the landmarks inside
        it (``shared``), or only the landmark it was drawn for, which the network is asked for (``conditioned``)."""
        images = batch["local_image"].flatten(0, 1)  # (B*K, 1, *patch)
        heatmap, mask = batch["local_heatmap"].flatten(0, 1), batch["local_mask"].flatten(0, 1)  # (B*K, L, ...)
        if self.cfg.local.design == "conditioned":
            landmark = batch["local_landmark"].flatten()  # (B*K,)
            rows = torch.arange(len(landmark), device=landmark.device)
            output = self.local_network(images, landmark)  # (B*K, 1, *patch)
            heatmap, mask = heatmap[rows, landmark][:, None], mask[rows, landmark][:, None]
        else:
            output = self.local_network(images)  # (B*K, L, *patch)
        return self.local_readout.loss(output, {"heatmap": heatmap, "loss_mask": mask})

    def on_train_start(self) -> None:
        self.val_errors.reset()
        self.val_mre_best.reset()
        if self._resumed_val_mre_best is not None and torch.isfinite(self._resumed_val_mre_best):
            self.val_mre_best.update(self._resumed_val_mre_best.to(self.device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_mre_best"] = self.val_mre_best.min_value.detach().cpu()  # torchmetrics states are not saved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_val_mre_best = checkpoint.get("val_mre_best")  # resuming: the best so far continues

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, world = self.model_step(batch)
        self.train_errors.update(world, batch["landmarks_world"], batch["present"])
        n = len(world)
        if self.local_network is not None:
            local_loss = self.local_step(batch)
            self.log("train/global_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
            self.log("train/local_loss", local_loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
            loss = loss + self.cfg.local.loss_weight * local_loss
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_errors("train", self.train_errors, per_landmark=False)

    def detect_batch(self, batch: list[dict[str, Any]]) -> list[Detection]:
        """:func:`h3de.inference.detect` on each prepared scan of an inference batch (a list of samples)."""
        return [detect(self, sample) for sample in batch]

    def _score(self, batch: list[dict[str, Any]], metric: LandmarkErrors) -> list[Detection]:
        found = self.detect_batch(batch)
        world = torch.stack([d.world for d in found])
        truth = torch.stack([s["landmarks_world"] for s in batch])
        present = torch.stack([s["present"] for s in batch])
        metric.update(world.to(self.device), truth.to(self.device), present.to(self.device))
        return found

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[Detection]:
        found = self._score(batch, self.val_errors)
        scores = torch.stack([d.presence for d in found]).to(self.device)
        self.val_presence.update(scores, torch.stack([s["present"] for s in batch]).to(self.device))
        return found  # for callbacks (h3de.callbacks draws one case)

    def on_validation_epoch_end(self) -> None:
        presence = self.val_presence.compute()
        self.val_presence.reset()
        for key in ("presence_accuracy", "absent_f1"):  # None where undefined (e.g. nothing absent)
            if presence[key] is not None:
                self.log(f"val/{key}", float(presence[key]), sync_dist=True)
        mre = self._log_errors("val", self.val_errors, per_landmark=True)
        if torch.isfinite(mre):
            self.val_mre_best(mre)
            self.log("val/mre_mm_best", self.val_mre_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._score(batch, self.test_errors)

    def on_test_epoch_end(self) -> None:
        self._log_errors("test", self.test_errors, per_landmark=True)

    def _log_errors(self, stage: str, metric: LandmarkErrors, per_landmark: bool) -> torch.Tensor:
        values = metric.compute()
        metric.reset()
        per = values.pop("per_landmark")
        errors = values.pop("errors")
        if stage == "val":
            self.val_errors_mm = errors.detach().cpu()  # for callbacks (h3de.callbacks: SDR curve, landmark table)
        values.pop("count")
        # values come from states already gathered over all processes: identical on every rank
        for key, value in values.items():
            self.log(f"{stage}/{key}", value.float(), prog_bar=key == "mre_mm", sync_dist=True)
        if per_landmark:
            for name, value in zip(self.landmark_names, per, strict=True):
                self.log(f"{stage}/mre_mm/{name}", value.float(), sync_dist=True)
        return values["mre_mm"]

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimiser and an LR schedule stepped after every optimiser step.

        The schedule spans the trainer's step budget (``estimated_stepping_batches``: max_epochs x steps per epoch,
        or max_steps if less; it counts samples_per_epoch, limit_train_batches and gradient accumulation), so a
        cosine reaches its minimum (0) after the last step. ``warmup_epochs`` and the per-epoch ``gamma`` are
        converted with the steps per epoch.
        """
        cfg = self.cfg.optim
        params = self.parameters()
        if cfg.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.name == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches), 1)
        warmup = min(cfg.warmup_epochs * per_epoch, total - 1)
        if cfg.scheduler == "cosine":
            main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
        elif cfg.scheduler == "exponential":
            main = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma ** (1.0 / per_epoch))
        else:
            main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        scheduler = main
        if warmup > 0:
            ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
