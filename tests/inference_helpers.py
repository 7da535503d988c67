"""Helpers of the inference tests: checkpoints without training, a probe network, one-blob scans."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from h3de.config import load_config, to_container
from h3de.data.landmark_io import write_landmarks
from h3de.module import LandmarkModule
from h3de.networks import available_networks, register_network


class IntensityProbe(nn.Module):
    """Outputs the image itself as every landmark's heatmap: a 'network' that finds the brightest blob exactly,
    so tests of the inference geometry do not depend on training."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x.expand(-1, self.out_channels, -1, -1, -1)


if "intensity_probe" not in available_networks():
    register_network("intensity_probe")(IntensityProbe)


def save_checkpoint(path: Path, overrides: list[str], names: list[str]) -> Path:
    """A checkpoint of an untrained model of the config ``overrides``, as ``h3de train`` writes them."""
    cfg = load_config(None, overrides)
    module = LandmarkModule(to_container(cfg), names)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def write_one_blob(folder: Path, case_id: str, affine: np.ndarray, shape, voxel, sigma: float = 1.5) -> np.ndarray:
    """Image with one Gaussian blob at continuous ``voxel`` (plus a faint background); returns its world mm."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    image = np.exp(-((grid - np.asarray(voxel)) ** 2).sum(-1) / (2 * sigma**2)).astype(np.float32)
    image += 0.01 * (grid[..., 0] / shape[0]).astype(np.float32)  # not constant anywhere: z-scores stay defined
    world = np.asarray(voxel, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{case_id}.nii.gz")
    write_landmarks(folder / "landmarks" / f"{case_id}.mrk.json", ["tip"], world[None])
    return world
