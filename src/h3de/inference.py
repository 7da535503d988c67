"""The one inference path: a prepared scan in, world-mm landmarks and presence probabilities out.

Validation, ``h3de evaluate`` and ``h3de predict`` all call :func:`detect` on the samples of
:func:`h3de.data.pipelines.build_inference_transforms`. Ground truth never enters it: every window, stage and
patch is placed from the image and the model's own estimates.

Modes (``detection.mode`` of the model's config):

- ``whole``: the network over the whole resampled volume, once.
- ``sliding_window``: MONAI's sliding-window inferer (Gaussian-weighted overlap) over the whole volume,
  decoding landmarks in chunks so that the full-resolution maps of a chunk fit ``detection.max_heatmap_gib``.
- ``coarse_to_fine``: ``whole`` as the global stage, then the local stage on one fine patch per landmark,
  centred on its coarse estimate; the patch's own landmark is decoded (its channel of the ``shared`` design's
  maps, or the ``conditioned`` design's one map, asked for that landmark). The presence probability is
  the mean of the two stages' (the global one sees the whole scan, the local one the anatomy at fine
  resolution): on the 1 mm phantom's val split it separates the absent teeth at 0.5 where the global
  stage's alone calls none absent (``benchmarks/fine_accuracy.md``).

Positions are decoded on the grid the network saw and mapped to world mm through that grid's affine, which
MONAI kept through every preprocessing step: the result is in the world space of the original file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import sliding_window_inference

from h3de.data.patches import patch_affines, sample_patches
from h3de.geometry import voxel_to_world
from h3de.timing import Stopwatch

__all__ = ["Detection", "detect"]

_LOCAL_BATCH = 8  # local patches per network call


@dataclass
class Detection:
    """One scan's landmarks.

    Attributes:
        world: (L, 3) float64 RAS world mm (the original image's world space).
        presence: (L,) float32 probability that each landmark is in the image.
        coarse_world: (L, 3) float64 the global stage's estimate (equal to ``world`` unless coarse-to-fine).
    """

    world: torch.Tensor
    presence: torch.Tensor
    coarse_world: torch.Tensor


def detect(module: Any, sample: dict[str, Any], timings: dict[str, float] | None = None) -> Detection:
    """Detect every landmark in one prepared scan.

    Args:
        module: a :class:`h3de.module.LandmarkModule` (its network, readout, local stage, config and device). An
            export runs the same steps in numpy (:class:`h3de.deploy.runtime.ExportRunner`).
        sample: one sample of :func:`h3de.data.pipelines.build_inference_transforms`: ``image`` (MetaTensor
            (1, D, H, W) with its affine) and, for coarse-to-fine, ``source``.
        timings: if given, seconds are added to its "network", "decoding" and "patches" entries.

    Returns:
        The :class:`Detection`, on the CPU.
    """
    cfg = module.cfg.detection
    clock = Stopwatch(timings)
    device = module.device
    image = sample["image"]
    x = image.as_tensor()[None].to(device, torch.float32)  # (1, 1, D, H, W)
    affine = image.affine.to(torch.float64)
    with torch.no_grad():
        if cfg.mode == "sliding_window":
            voxel, presence = _sliding_window(module, x, clock)
        else:
            with clock("network"):
                output = module.network(x)
            with clock("decoding"):
                voxel, presence = module.readout.decode(output)
        world = voxel_to_world(voxel[0].double().cpu(), affine)  # (L, 3)
        presence = presence[0].float().cpu()
        coarse = world
        if cfg.mode == "coarse_to_fine":
            world, local_presence = _refine(module, sample["source"], world, device, clock)
            presence = (presence + local_presence) / 2
    return Detection(world, presence, coarse)


def _sliding_window(module: Any, x: torch.Tensor, clock: Stopwatch) -> tuple[torch.Tensor, torch.Tensor]:
    """((1, L, 3) voxel positions, (1, L) presence) from Gaussian-blended windows over the whole volume."""
    cfg, data = module.cfg.detection, module.cfg.data
    count = len(module.landmark_names)
    voxels = math.prod(x.shape[2:])
    # MONAI accumulates the blended output and a weight map per voxel, both float32
    chunk = max(1, min(count, int(cfg.max_heatmap_gib * 2**30 // (4 * voxels)) - 1))
    positions, scores = [], []
    for start in range(0, count, chunk):
        channels = slice(start, min(start + chunk, count))
        with clock("network"):
            output = sliding_window_inference(
                x,
                roi_size=tuple(data.patch_size),
                sw_batch_size=cfg.sw_batch_size,
                predictor=lambda window, c=channels: module.network(window)[:, c],
                overlap=cfg.overlap,
                mode="gaussian",
                padding_mode="constant",
                device=torch.device("cpu"),
            )
        with clock("decoding"):
            voxel, presence = module.readout.decode(output, torch.arange(channels.start, channels.stop))
        positions.append(voxel)
        scores.append(presence)
        del output
    return torch.cat(positions, dim=1), torch.cat(scores, dim=1)


def _refine(
    module: Any, source: Any, coarse: torch.Tensor, device: torch.device, clock: Stopwatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """((L, 3) world mm refined by the local stage on fine patches centred on the ``coarse`` estimates, (L,) the
    local stage's presence: is the landmark in its patch)."""
    local = module.cfg.local
    size = tuple(int(s) for s in local.patch_size)
    with clock("patches"):
        affines = patch_affines(coarse, local.spacing_mm, size)  # (L, 4, 4)
        patches = sample_patches(source.as_tensor().to(device), source.affine, affines, size)  # (L, 1, *size)
    own = []
    with clock("network"):
        for start in range(0, len(patches), _LOCAL_BATCH):
            batch = patches[start : start + _LOCAL_BATCH]
            rows = torch.arange(len(batch), device=device)
            if local.design == "conditioned":  # each patch asked for its own landmark
                own.append(module.local_network(batch, rows + start)[:, 0])
            else:  # each patch's own landmark channel
                own.append(module.local_network(batch)[rows, rows + start])
    with clock("decoding"):
        voxel, presence = module.local_readout.decode(torch.cat(own)[None])  # (1, L, 3) each in its own patch
    return voxel_to_world(voxel[0].double().cpu()[:, None], affines)[:, 0], presence[0].float().cpu()
