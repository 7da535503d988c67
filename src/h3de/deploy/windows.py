"""Gaussian-blended sliding windows over a volume in numpy: MONAI's ``sliding_window_inference(mode="gaussian",
sigma_scale=0.125, padding_mode="constant")`` as ``h3de.inference`` calls it, step for step (window positions,
importance map, blending, padding of a volume smaller than a window), for a deployment without torch;
``tests/deploy`` holds the two equal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["window_starts", "importance_map", "sliding_window"]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start voxels of the windows along one axis of ``size`` voxels (MONAI's scan interval and dense slices)."""
    if window >= size:
        return [0]
    step = max(int(window * (1 - overlap)), 1)
    count = next(i for i in range(math.ceil(size / step)) if i * step + window >= size) + 1
    return [min(i * step, size - window) for i in range(count)]


def importance_map(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """(*window) float32 Gaussian weights, sigma ``sigma_scale`` x the window per axis, floored at 1e-3."""
    weights = np.ones((), np.float32)
    for n in window:
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
        weights = np.multiply.outer(weights, np.exp(x**2 / np.float32(-2 * (n * sigma_scale) ** 2)))
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def sliding_window(
    volume: np.ndarray,
    window: Sequence[int],
    batch: int,
    overlap: float,
    predictor: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """The predictor's output over the whole volume, its windows blended with Gaussian weights.

    Args:
        volume: (1, 1, D, H, W) float32.
        window: (3,) voxels per window.
        batch: windows per predictor call.
        overlap: share of a window that its neighbour overlaps, in [0, 1).
        predictor: (N, 1, *window) -> (N, C, *window).

    Returns:
        (1, C, D, H, W) float32.
    """
    shape = volume.shape[2:]
    missing = [max(w - n, 0) for w, n in zip(window, shape, strict=True)]
    widths = [(m // 2, m - m // 2) for m in missing]
    padded = np.pad(volume, [(0, 0), (0, 0), *widths]) if any(any(w) for w in widths) else volume
    full = padded.shape[2:]
    axes = [window_starts(n, w, overlap) for n, w in zip(full, window, strict=True)]
    boxes = [tuple(slice(s, s + w) for s, w in zip(start, window, strict=True)) for start in itertools.product(*axes)]
    weights = importance_map(window)
    count = np.zeros(full, np.float32)
    for box in boxes:
        count[box] += weights
    output = None
    for first in range(0, len(boxes), batch):
        group = boxes[first : first + batch]
        predicted = predictor(np.concatenate([padded[(slice(None), slice(None), *box)] for box in group]))
        if output is None:
            output = np.zeros((1, predicted.shape[1], *full), np.float32)
        for box, maps in zip(group, predicted, strict=True):
            output[(0, slice(None), *box)] += maps * weights
    output /= count
    crop = tuple(slice(before, before + n) for (before, _), n in zip(widths, shape, strict=True))
    return output[(slice(None), slice(None), *crop)]
