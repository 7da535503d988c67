"""The numpy sliding window equals MONAI's Gaussian-blended ``sliding_window_inference`` as h3de.inference calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from h3de.deploy.windows import sliding_window, window_starts


def _ramp(shape) -> np.ndarray:
    """(D, H, W) position inside the window: makes each window's output differ, so the blending weights show."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    return (grids[0] + 2 * grids[1] - grids[2]).astype(np.float32)


def _numpy_predictor(windows: np.ndarray) -> np.ndarray:
    ramp = _ramp(windows.shape[2:])
    return np.concatenate([np.tanh(windows) * 3, windows + ramp, -windows * ramp], axis=1)


def _torch_predictor(windows: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_numpy_predictor(windows.numpy()))


@pytest.mark.parametrize(
    ("shape", "window", "overlap", "batch"),
    [
        ((37, 29, 22), (16, 16, 16), 0.5, 2),
        ((37, 29, 22), (16, 12, 8), 0.25, 3),
        ((20, 9, 30), (16, 16, 16), 0.0, 1),  # one axis smaller than the window: padded, then cropped
        ((16, 16, 16), (16, 16, 16), 0.5, 4),  # exactly one window
    ],
)
def test_sliding_window_equals_monai(shape, window, overlap, batch):
    volume = np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32)
    expected = sliding_window_inference(
        torch.from_numpy(volume),
        roi_size=window,
        sw_batch_size=batch,
        predictor=_torch_predictor,
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        device=torch.device("cpu"),
    )
    found = sliding_window(volume, window, batch, overlap, _numpy_predictor)
    assert found.shape == tuple(expected.shape) == (1, 3, *shape)
    np.testing.assert_allclose(found, expected.numpy(), atol=1e-5)


def test_windows_cover_the_axis_and_end_at_its_edge():
    assert window_starts(37, 16, 0.5) == [0, 8, 16, 21]
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(17, 16, 0.99) == [0, 1]
