"""Runs a checkpoint on scans for :func:`h3de.predict.predict`: the experiment's inference chain
(:func:`h3de.data.pipelines.build_inference_transforms`) and :func:`h3de.inference.detect`, the path that validation
and ``evaluate`` take, on the GPU when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from h3de.data.pipelines import build_inference_transforms, load_and_normalise
from h3de.evaluate import load_checkpoint, resolve_checkpoint
from h3de.inference import detect

__all__ = ["CheckpointRunner"]


class CheckpointRunner:
    """A checkpoint, a run directory or ``runs/<experiment>/latest`` (:func:`h3de.evaluate.resolve_checkpoint`),
    loaded for prediction (read, prepare, detect, QC volume)."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.source = resolve_checkpoint(checkpoint)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = load_checkpoint(self.source, map_location=device).to(device)
        self.landmark_names = list(self.module.landmark_names)
        cfg = self.module.cfg
        chain = build_inference_transforms(cfg.data, cfg.detection, with_landmarks=False)
        self._read, self._prepare = chain.transforms[0], Compose(chain.transforms[1:])

    def read(self, path: Path, case: str) -> dict[str, Any]:
        return self._read({"image": str(path), "case_id": case})

    def prepare(self, loaded: dict[str, Any]) -> dict[str, Any]:
        return self._prepare(loaded)

    def detect(self, sample: dict[str, Any], timings: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """((L, 3) world RAS mm, (L,) presence probability)."""
        found = detect(self.module, sample, timings)
        return found.world.numpy(), found.presence.numpy()

    def qc_volume(self, sample: dict[str, Any], loaded: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The normalised scan at full resolution, oriented to RAS (coarse-to-fine keeps it; otherwise the volume
        read, normalised again), and its affine."""
        _, orient, normalise = load_and_normalise(self.module.cfg.data)
        if "source" in sample:
            volume = orient({"image": sample["source"]})["image"]
        else:
            volume = Compose([orient, normalise])(dict(loaded))["image"]
        return volume.as_tensor()[0].numpy(), volume.affine.double().numpy()
