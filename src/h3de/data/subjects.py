"""Synthetic subjects: a template volume strongly deformed, its landmarks moved exactly with the anatomy.

A subject mimics another head scanned in the same grid: a pose (rotation, isotropic scale and translation about the
image centre), a smooth nonlinear elastic deformation (the training augmentation's cubic B-spline field,
:class:`~h3de.data.elastic.RandElasticPoints`), then MRI intensity changes (MONAI's polynomial bias field, a gamma
contrast change and Rician noise).

The subject's voxel ``y`` shows the template at voxel ``x = M (y + d(y))``, with ``d`` the elastic field (voxels)
and ``M = A^-1 W A`` the pose in voxels (``A`` the grid's voxel-to-world affine, ``W`` the world similarity), all
resampled in one trilinear pass. A template landmark at world ``p`` therefore moves to the ``y`` that solves
``y + d(y) = A^-1 W^-1 p``: the pose inverted exactly, the field inverted by the fixed-point iteration of
:meth:`~h3de.data.elastic.BSplineField.invert_points` (to < 1e-6 voxel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import AdjustContrast, RandBiasField, RandRicianNoise
from monai.transforms.utils import create_rotate
from monai.utils import convert_to_numpy

from h3de.data.elastic import RandElasticPoints, voxel_sizes, warp_image

__all__ = ["SubjectRanges", "Subject", "sample_subject", "make_subject"]


@dataclass(frozen=True)
class SubjectRanges:
    """How strongly subjects differ from the template; every quantity uniform in its range.

    Attributes:
        rotate_deg: +- rotation about each world axis.
        scale: +- relative isotropic size.
        translate_mm: +- translation along each world axis.
        elastic_magnitude_mm: +- B-spline control displacements per axis (scaled down where the field could fold).
        elastic_spacing_mm: between the field's control points.
        bias_coeff: +- coefficients of MONAI's degree-3 polynomial bias field (the image times exp of it).
        log_gamma: +- natural log of the contrast exponent.
        noise: (low, high) Rician noise standard deviation, a fraction of the template's 99th percentile.
    """

    rotate_deg: float = 12.0
    scale: float = 0.1
    translate_mm: float = 10.0
    elastic_magnitude_mm: float = 10.0
    elastic_spacing_mm: float = 50.0
    bias_coeff: float = 0.15
    log_gamma: float = 0.3
    noise: tuple[float, float] = (0.01, 0.04)


@dataclass(frozen=True)
class Subject:
    """Everything random about one subject; making it from a template is deterministic."""

    rotate_rad: tuple[float, float, float]
    scale: float
    translate_mm: tuple[float, float, float]
    gamma: float
    noise: float  # Rician noise sd as a fraction of the template's 99th percentile
    seeds: tuple[int, int, int]  # of the elastic field, the bias field and the noise (MONAI random states)


def sample_subject(rng: np.random.Generator, ranges: SubjectRanges) -> Subject:
    """Draw one subject's pose, intensity change and random-state seeds from ``rng``."""
    rotate = np.deg2rad(rng.uniform(-ranges.rotate_deg, ranges.rotate_deg, 3))
    scale = 1.0 + rng.uniform(-ranges.scale, ranges.scale)
    translate = rng.uniform(-ranges.translate_mm, ranges.translate_mm, 3)
    gamma = math.exp(rng.uniform(-ranges.log_gamma, ranges.log_gamma))
    noise = rng.uniform(*ranges.noise)
    seeds = tuple(int(s) for s in rng.integers(0, 2**31 - 1, 3))
    return Subject(tuple(rotate.tolist()), float(scale), tuple(translate.tolist()), gamma, float(noise), seeds)


def _pose(subject: Subject, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(4, 4) world similarity ``W``: subject world -> template world, about the image centre."""
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    linear = subject.scale * create_rotate(3, subject.rotate_rad)[:3, :3]
    pose = np.eye(4)
    pose[:3, :3] = linear
    pose[:3, 3] = centre - linear @ centre + np.asarray(subject.translate_mm)
    return pose


def _compose(grid: torch.Tensor, matrix: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Normalised ``grid_sample`` positions of ``matrix @ z`` for each voxel position ``z`` in ``grid``.

    Args:
        grid: (D, H, W, 3) normalised positions (last axis in (W, H, D) order, align_corners).
        matrix: (4, 4) voxel -> voxel map in (D, H, W) axis order.
        shape: (D, H, W).

    Returns:
        (D, H, W, 3) float32, same convention.
    """
    half = (np.asarray(shape[::-1], dtype=np.float64) - 1) / 2  # (W, H, D): normalised g -> voxel (g + 1) * half
    linear = matrix[:3, :3][::-1, ::-1]  # rows and columns in (W, H, D) order
    offset = matrix[:3, 3][::-1]
    scaled = linear * half[None, :] / half[:, None]  # g' = (linear ((g + 1) half) + offset) / half - 1
    shift = (linear @ half + offset) / half - 1
    out = grid.reshape(-1, 3) @ torch.as_tensor(scaled.T.copy(), dtype=torch.float32)
    out += torch.as_tensor(shift, dtype=torch.float32)
    return out.reshape(grid.shape)


def make_subject(
    volume: np.ndarray, affine: np.ndarray, landmarks: np.ndarray, subject: Subject, ranges: SubjectRanges
) -> tuple[np.ndarray, np.ndarray]:
    """Deform a template into ``subject`` on the template's own grid.

    Args:
        volume: (X, Y, Z) template intensities.
        affine: (4, 4) its voxel -> world RAS mm matrix (also the subject's).
        landmarks: (L, 3) template landmarks, world mm (NaN rows = absent, kept NaN).
        subject: from :func:`sample_subject`.
        ranges: the elastic field's magnitude and spacing and the bias field's range are read here.

    Returns:
        The (X, Y, Z) float32 subject image and its (L, 3) float64 landmarks in world mm.
    """
    shape = tuple(int(s) for s in volume.shape)
    voxel_mm = voxel_sizes(torch.as_tensor(affine))
    elastic = RandElasticPoints(1.0, ranges.elastic_magnitude_mm, ranges.elastic_spacing_mm)
    elastic.set_random_state(subject.seeds[0])
    elastic.randomize(shape, voxel_mm)
    pose = _pose(subject, affine, shape)
    to_template = np.linalg.inv(affine) @ pose @ affine  # M: subject voxel (after the field) -> template voxel
    grid = _compose(elastic.field.sampling_grid(shape), to_template, shape)
    image = warp_image(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None], grid)

    unposed = landmarks @ np.linalg.inv(pose)[:3, :3].T + np.linalg.inv(pose)[:3, 3]  # W^-1 p, world
    moved = elastic.move_points(torch.as_tensor(unposed), torch.as_tensor(affine)).numpy()

    reference = float(np.percentile(volume, 99))
    bias = RandBiasField(degree=3, coeff_range=(-ranges.bias_coeff, ranges.bias_coeff), prob=1.0)
    image = bias.set_random_state(subject.seeds[1])(image)
    image = AdjustContrast(subject.gamma)(image)
    noise = RandRicianNoise(prob=1.0, std=subject.noise * reference, sample_std=False)
    image = noise.set_random_state(subject.seeds[2])(image)
    return convert_to_numpy(image[0], dtype=np.float32), moved.astype(np.float64)
