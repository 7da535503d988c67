"""Figures: quality-control slices of predicted landmarks; the cumulative error distribution of an evaluation.

matplotlib with the Agg backend (no screen needed); every figure is written atomically.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from h3de.io_utils import atomic_path  # noqa: E402

__all__ = ["qc_slices", "qc_figure", "cumulative_errors"]

_VIEWS = (("sagittal", 0, (1, 2)), ("coronal", 1, (0, 2)), ("axial", 2, (0, 1)))  # name, fixed axis, shown axes


def qc_slices(
    path: str | os.PathLike,
    volume: np.ndarray,
    affine: np.ndarray,
    names: list[str],
    predicted: np.ndarray,
    presence: np.ndarray,
    truth: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Write a PNG with, per landmark, the sagittal, coronal and axial slices through its prediction.

    Args:
        path: the PNG to write.
        volume, affine, names, predicted, presence, truth, title: as :func:`qc_figure`.
    """
    fig = qc_figure(volume, affine, names, predicted, presence, truth, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=72)
    plt.close(fig)


def qc_figure(
    volume: np.ndarray,
    affine: np.ndarray,
    names: list[str],
    predicted: np.ndarray,
    presence: np.ndarray,
    truth: np.ndarray | None = None,
    title: str = "",
    heatmap: np.ndarray | None = None,
) -> Figure:
    """A figure with, per landmark, the sagittal, coronal and axial slices through its prediction.

    Args:
        volume: (X, Y, Z) RAS-oriented volume (axes L->R, P->A, I->S).
        affine: (4, 4) its voxel-to-world matrix.
        names: L landmark names.
        predicted: (L, 3) world mm (red +).
        presence: (L,) presence probabilities (in each row's title).
        truth: (L, 3) world mm of the ground truth (green x; NaN rows = absent), or None.
        title: the figure's title (e.g. the case id).
        heatmap: (L, X, Y, Z) maps in [0, 1] on the volume's grid, or None; each row overlays its landmark's map
            (yellow-red, more opaque where higher).

    Returns:
        The matplotlib figure (close it with ``plt.close``).
    """
    inverse = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    to_voxel = lambda points: points @ inverse[:3, :3].T + inverse[:3, 3]  # noqa: E731
    pred_vox = to_voxel(np.asarray(predicted, dtype=np.float64))
    truth_vox = to_voxel(np.asarray(truth, dtype=np.float64)) if truth is not None else None
    low, high = np.percentile(volume, [1, 99]) if volume.size else (0.0, 1.0)
    rows = len(names)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 2.8 * rows), squeeze=False)
    for row, name in enumerate(names):
        centre = np.clip(np.round(pred_vox[row]), 0, np.array(volume.shape) - 1).astype(int)
        for col, (view, fixed, (a, b)) in enumerate(_VIEWS):
            ax = axes[row, col]
            plane = np.take(volume, centre[fixed], axis=fixed)  # (shape[a], shape[b])
            aspect = spacing[b] / spacing[a]
            ax.imshow(plane.T, cmap="gray", origin="lower", vmin=low, vmax=high, aspect=aspect)
            if heatmap is not None:
                heat = np.clip(np.take(heatmap[row], centre[fixed], axis=fixed), 0.0, 1.0).T
                ax.imshow(heat, cmap="autumn_r", origin="lower", vmin=0, vmax=1, alpha=0.7 * heat, aspect=aspect)
            ax.plot(pred_vox[row, a], pred_vox[row, b], "r+", markersize=12, markeredgewidth=2)
            if truth_vox is not None and np.isfinite(truth_vox[row]).all():
                ax.plot(truth_vox[row, a], truth_vox[row, b], "gx", markersize=10, markeredgewidth=2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} ({presence[row]:.2f}): {view}" if col == 0 else view, fontsize=8)
    legend = "red +: predicted" + (", green x: ground truth, projected onto the slice" if truth is not None else "")
    legend += ", yellow-red: the landmark's heatmap" if heatmap is not None else ""
    fig.suptitle(f"{title}\n{legend}; presence in brackets; R to the right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / rows))
    return fig


def cumulative_errors(path: str | os.PathLike, errors: np.ndarray, radii_mm: list[float], title: str = "") -> None:
    """Write a PNG of the cumulative error distribution: the fraction of landmarks within r mm against r.

    Args:
        path: the PNG to write.
        errors: radial errors in mm of the scored landmarks, any shape (NaN entries are left out).
        radii_mm: the SDR radii, marked by dashed lines; the fraction within each in a box.
        title: the figure's title.
    """
    values = np.sort(np.asarray(errors, dtype=np.float64).ravel())
    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=(6, 4))
    right = 1.05 * max([*values[-1:], *radii_mm, 1.0])
    if values.size:
        fraction = np.arange(1, values.size + 1) / values.size
        ax.step(np.concatenate([[0.0], values, [right]]), np.concatenate([[0.0], fraction, [1.0]]), where="post")
    else:
        ax.text(0.5, 0.5, "no landmark scored", ha="center", va="center", transform=ax.transAxes)
    lines = []
    for r in radii_mm:
        within = (values <= r).mean() if values.size else 0.0
        ax.axvline(r, color="grey", linestyle="--", linewidth=0.8)
        lines.append(f"{r:g} mm: {100 * within:.1f}%")
    box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.8}
    ax.text(0.97, 0.05, "SDR (dashed)\n" + "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom", bbox=box)
    ax.set_xlim(0.0, right)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("radial error r (mm)")
    ax.set_ylabel("fraction of landmarks within r")
    ax.set_title(title or f"cumulative error distribution ({values.size} landmarks)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
