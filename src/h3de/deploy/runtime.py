"""``h3de predict EXPORT_DIR``: the inference path of :mod:`h3de.inference` on an export, in numpy.

A scan is read (:func:`h3de.data.images.read_volume`, as training reads it), normalised, resampled onto the RAS grid
of the model's spacing and padded to its patch (:mod:`h3de.deploy.grid`, the steps of
``h3de.data.pipelines.build_inference_transforms``). Then the modes of :func:`h3de.inference.detect`: the global
network over the whole volume or in Gaussian-blended windows (:mod:`h3de.deploy.windows`, landmarks decoded in
chunks within ``detection.max_heatmap_gib``), and for coarse-to-fine one fine patch per landmark around its coarse
estimate, sampled from the normalised scan, whose own landmark the local network decodes; presence is the mean of
both stages'. Decoding is the readout's own, exported as a graph. Positions go to world mm (RAS) through each
grid's affine. Nothing here imports torch: with an ONNX export, numpy, nibabel, scipy and onnxruntime suffice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h3de.data.images import read_volume
from h3de.deploy.bundle import Bundle
from h3de.deploy.grid import pad_to, patch_affines, ras_grid, sample, to_ras, voxel_to_world
from h3de.deploy.windows import sliding_window
from h3de.timing import Stopwatch

__all__ = ["Scan", "ExportRunner", "normalise"]

_LOCAL_BATCH = 8  # local patches per network call, as h3de.inference


@dataclass
class Scan:
    """A scan prepared for the networks.

    Attributes:
        image: (D, H, W) float32 on the network's grid (RAS at the model's spacing, padded to its patch).
        affine: (4, 4) that grid's voxel-to-world matrix.
        source: (X, Y, Z) float32 the normalised scan on its own grid (the local stage's patches, the QC figure).
        source_affine: (4, 4) its voxel-to-world matrix (the file's).
    """

    image: np.ndarray
    affine: np.ndarray
    source: np.ndarray
    source_affine: np.ndarray


def normalise(volume: np.ndarray, data: dict) -> np.ndarray:
    """``data.normalize`` of the config, in place (``h3de.data.transforms``' ZScored, PercentileScaled or
    WindowScaled)."""
    if data["normalize"] == "zscore":
        mean, std = volume.mean(), volume.std()  # float32 with pairwise sums, as torch (a float64 copy costs 2x)
        volume -= mean
        if std > 0:
            volume /= std
        return volume
    if data["normalize"] == "percentile":
        lo, hi = np.percentile(volume.reshape(-1), [float(q) for q in data["percentiles"]]).astype(volume.dtype)
    else:  # window
        lo, hi = (np.float32(v) for v in data["window"])
    volume -= lo
    if hi - lo != 0:
        volume /= hi - lo
        np.clip(volume, 0.0, 1.0, out=volume)
    return volume


class ExportRunner:
    """Runs an export folder on scans for :func:`h3de.predict.predict` (read, prepare, detect, QC volume)."""

    def __init__(self, folder: str | Path) -> None:
        self.bundle = Bundle(folder)
        self.source = Path(folder)
        self.landmark_names = self.bundle.landmark_names
        self.config = self.bundle.config

    def read(self, path: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y, Z) float32 volume and its (4, 4) affine to world RAS mm; DataError naming a bad file."""
        volume, header = read_volume(path)
        return volume, np.asarray(header.affine, np.float64)

    def prepare(self, loaded: tuple[np.ndarray, np.ndarray]) -> Scan:
        """Normalised (in place), resampled onto the RAS grid of the spacing and, but for sliding windows, padded."""
        volume, affine = loaded
        data = self.config["data"]
        volume = normalise(volume, data)
        grid, shape = ras_grid(affine, volume.shape, data["spacing_mm"])
        image = sample(volume, affine, grid, shape, padding="border")
        if self.bundle.mode != "sliding_window":
            image, grid = pad_to(image, grid, data["patch_size"])
        return Scan(image, grid, volume, affine)

    def qc_volume(self, scan: Scan, loaded: object) -> tuple[np.ndarray, np.ndarray]:
        """The normalised scan at full resolution, oriented to RAS, and its affine (for the QC figure)."""
        return to_ras(scan.source, scan.source_affine)

    def detect(self, scan: Scan, timings: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """((L, 3) world RAS mm, (L,) presence probability) of every landmark in ``scan``."""
        clock = Stopwatch(timings)
        count = len(self.landmark_names)
        x = scan.image[None, None].astype(np.float32, copy=False)
        if self.bundle.mode == "sliding_window":
            voxel, presence = self._sliding_window(x, clock)
        else:
            with clock("network"):
                (maps,) = self.bundle.graphs["global"](x)
            with clock("decoding"):
                voxel, presence = self.bundle.decode("global", maps, np.arange(count, dtype=np.int64))
        world = voxel_to_world(voxel, scan.affine)
        if self.bundle.mode == "coarse_to_fine":
            world, local_presence = self._refine(scan, world, clock)
            presence = (presence + local_presence) / 2
        return world, presence.astype(np.float32)

    def _sliding_window(self, x: np.ndarray, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        """((L, 3) voxel positions, (L,) presence), landmarks in chunks whose maps fit ``max_heatmap_gib``."""
        detection, data = self.config["detection"], self.config["data"]
        count = len(self.landmark_names)
        chunk = max(1, min(count, int(detection["max_heatmap_gib"] * 2**30 // (4 * math.prod(x.shape[2:]))) - 1))
        network = self.bundle.graphs["global"]
        positions, scores = [], []
        for start in range(0, count, chunk):
            channels = np.arange(start, min(start + chunk, count), dtype=np.int64)
            with clock("network"):
                maps = sliding_window(
                    x,
                    data["patch_size"],
                    detection["sw_batch_size"],
                    detection["overlap"],
                    lambda windows, c=channels: network(windows)[0][:, c],
                )
            with clock("decoding"):
                voxel, presence = self.bundle.decode("global", maps, channels)
            positions.append(voxel)
            scores.append(presence)
        return np.concatenate(positions), np.concatenate(scores)

    def _refine(self, scan: Scan, coarse: np.ndarray, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        """((L, 3) world mm from the local stage's patches around the ``coarse`` estimates, (L,) its presence)."""
        local = self.config["local"]
        size = tuple(int(s) for s in local["patch_size"])
        count = len(coarse)
        with clock("patches"):
            affines = patch_affines(coarse, local["spacing_mm"], size)
            patches = np.stack([sample(scan.source, scan.source_affine, a, size)[None] for a in affines])
        own = []
        with clock("network"):
            for start in range(0, count, _LOCAL_BATCH):
                batch = patches[start : start + _LOCAL_BATCH]
                rows = np.arange(start, start + len(batch), dtype=np.int64)
                if local["design"] == "conditioned":  # each patch asked for its own landmark
                    (maps,) = self.bundle.graphs["local"](batch, rows)
                    own.append(maps[:, 0])
                else:  # each patch's own landmark channel
                    (maps,) = self.bundle.graphs["local"](batch)
                    own.append(maps[np.arange(len(batch)), rows])
        # the shared design's maps are the landmarks' own; the conditioned design's one map has one absent logit
        channels = np.zeros(count, np.int64) if local["design"] == "conditioned" else np.arange(count, dtype=np.int64)
        with clock("decoding"):
            voxel, presence = self.bundle.decode("local", np.concatenate(own)[None], channels)
        return voxel_to_world(voxel, affines), presence  # each in its own patch
