"""Heatmap target generation: h3de's separable Gaussian vs MONAI ``GenerateHeatmap``, side by side.

Measures, at 96^3 x 14 landmarks (sigma 2 voxels, random continuous positions), the median time per
sample of each, and the peak error: the distance between the true continuous landmark and the
sub-voxel peak of its heatmap (both decoded with h3de's decoder). Rewrites benchmarks/heatmap_targets.md.

    .venv/bin/python benchmarks/heatmap_targets.py
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from monai.transforms import GenerateHeatmap
from report import write_report

from h3de.targets import decode_heatmaps, gaussian_heatmaps

SHAPE, LANDMARKS, SIGMA, REPEATS = (96, 96, 96), 14, 2.0, 7


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_error(heatmaps: torch.Tensor, points: torch.Tensor) -> float:
    """Largest distance (voxels) between the decoded heatmap peaks and the true points."""
    return (decode_heatmaps(heatmaps[None])[0] - points).norm(dim=-1).max().item()


def main() -> None:
    torch.manual_seed(0)
    points = torch.rand(LANDMARKS, 3) * (torch.tensor(SHAPE) - 16) + 8
    monai = GenerateHeatmap(sigma=SIGMA, spatial_shape=SHAPE)
    ours_s = median_seconds(lambda: gaussian_heatmaps(points, SHAPE, SIGMA), REPEATS)
    monai_s = median_seconds(lambda: monai(points), REPEATS)
    ours_err = peak_error(gaussian_heatmaps(points, SHAPE, SIGMA), points)
    monai_err = peak_error(monai(points), points)
    rows = [
        ("MONAI GenerateHeatmap", monai_s, monai_err),
        ("h3de gaussian_heatmaps", ours_s, ours_err),
    ]
    lines = [
        "# Heatmap target generation",
        "",
        f"{LANDMARKS} landmarks, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} grid, sigma {SIGMA} voxels, float32, "
        f"median of {REPEATS} runs after a warm-up; {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "",
        "| method | time per sample (ms) | max peak error (voxels) |",
        "|---|---:|---:|",
        *[f"| {name} | {1000 * s:.1f} | {err:.1e} |" for name, s, err in rows],
        "",
        f"Speed-up: **{monai_s / ours_s:.0f}x** (goal >= 50x); h3de peak error {ours_err:.2e} voxels "
        "(goal < 0.05). MONAI rounds each landmark to the nearest voxel before filtering.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/heatmap_targets.py`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
