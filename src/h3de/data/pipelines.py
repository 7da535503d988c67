"""Transform chains from config: deterministic preprocessing (cached), then augmentation, then targets.

load -> RAS -> resample -> normalise -> centre pad/crop     (cached by CacheDataset)
-> [mirror with label swap -> random affine -> elastic warp -> intensity]   (training only)
-> world landmarks onto the final voxel grid -> heatmaps -> pack
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms import (
    ApplyTransformToPointsd,
    Compose,
    CopyItemsd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from h3de.config import DataConfig
from h3de.data.elastic import RandElasticPointsd
from h3de.data.transforms import LandmarkHeatmapd, LandmarkMaskd, PackLandmarkSampled, RandMirrord
from h3de.errors import DataError

__all__ = ["build_transforms", "LoadVolumed"]


class LoadVolumed(LoadImaged):
    """``LoadImaged`` (channel first) whose errors name the file, refusing anything but one 3D volume."""

    def __init__(self, key: str = "image") -> None:
        super().__init__(keys=key, image_only=True, ensure_channel_first=True)
        self.key = key

    def __call__(self, data, reader=None):
        path = data[self.key]
        try:
            out = super().__call__(data, reader)
        except Exception as e:
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        image = out[self.key]
        if image.ndim != 4 or image.shape[0] != 1:
            raise DataError(f"{path}: expected a single-channel 3D volume, got array shape {tuple(image.shape)[1:]}")
        return out


def build_transforms(cfg: DataConfig, mirror_permutation: Sequence[int], train: bool, heatmaps: bool = True) -> Compose:
    """The full per-sample chain for a split.

    Args:
        cfg: the ``data`` section of the experiment config.
        mirror_permutation: landmark index permutation of a left/right flip (from the manifest).
        train: add the random augmentation of ``cfg.augment``.
        heatmaps: add Gaussian heatmap targets (networks with heatmap output); anchor networks encode
            their targets from the voxel landmarks themselves.

    Returns:
        A ``Compose`` mapping ``{"image": path, "landmarks_world": (1, L, 3), "case_id"}`` to the
        packed sample of :class:`~h3de.data.transforms.PackLandmarkSampled`.
    """
    spacing = tuple(float(s) for s in cfg.spacing_mm)
    steps = [
        LoadVolumed("image"),
        Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=spacing, mode="bilinear", padding_mode="border"),
        _normalizer(cfg.normalize),
        ResizeWithPadOrCropd("image", spatial_size=tuple(cfg.patch_size), mode="constant"),
    ]
    if train and cfg.augment.enabled:
        steps += _augmentations(cfg, spacing, mirror_permutation)
    steps += [
        CopyItemsd("landmarks_world", names="landmarks_voxel"),
        ApplyTransformToPointsd(
            "landmarks_voxel",
            refer_keys="image",
            dtype=torch.float64,
            invert_affine=True,
            affine_lps_to_ras=False,
        ),
        LandmarkMaskd("landmarks_voxel", "image"),
    ]
    if heatmaps:
        steps.append(LandmarkHeatmapd("landmarks_voxel", "image", sigma=cfg.heatmap_sigma))
    steps.append(PackLandmarkSampled("image", "landmarks_voxel"))
    return Compose(steps)


def _normalizer(name: str):
    if name == "zscore":
        return NormalizeIntensityd("image")
    if name == "percentile":
        return ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"unknown normalisation '{name}'")


def _augmentations(cfg: DataConfig, spacing: tuple[float, ...], mirror_permutation: Sequence[int]) -> list:
    aug = cfg.augment
    intensity = aug.intensity_prob
    spatial = [
        RandMirrord("image", ["landmarks_world"], mirror_permutation, prob=aug.flip_prob, spatial_axis=0),
        RandAffined(
            "image",
            prob=aug.affine_prob,
            rotate_range=tuple(math.radians(r) for r in aug.rotate_deg),
            scale_range=(aug.scale,) * 3,
            translate_range=tuple(aug.translate_mm / s for s in spacing),
            mode="bilinear",
            padding_mode="border",
        ),
    ]
    if aug.elastic_prob > 0:  # only when on: an extra random transform would reseed the ones after it
        spatial.append(
            RandElasticPointsd(
                "image",
                ["landmarks_world"],
                prob=aug.elastic_prob,
                magnitude_mm=aug.elastic_magnitude_mm,
                spacing_mm=aug.elastic_spacing_mm,
            )
        )
    return spatial + [
        RandScaleIntensityd("image", factors=aug.intensity_scale, prob=intensity),
        RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=intensity),
        RandGaussianNoised("image", std=aug.noise_std, prob=intensity),
    ]
