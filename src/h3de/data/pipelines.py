"""Transform chains from config: deterministic preprocessing (cached), then augmentation, then targets.

load -> RAS -> resample -> normalise -> centre pad/crop     (cached by CacheDataset)
-> [mirror with label swap -> random affine -> intensity]   (training only)
-> world landmarks onto the final voxel grid -> heatmaps -> pack
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (
    ApplyTransformToPointsd,
    Compose,
    CopyItemsd,
    MapTransform,
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
from monai.utils import MetaKeys, SpaceKeys

from h3de.config import DataConfig
from h3de.data.images import read_volume
from h3de.data.transforms import LandmarkHeatmapd, LandmarkMaskd, PackLandmarkSampled, RandMirrord

__all__ = ["build_transforms", "LoadVolumed"]


class LoadVolumed(MapTransform):
    """Read a NIfTI or NRRD volume, checked by :mod:`h3de.data.images`, as a (1, X, Y, Z) float32 ``MetaTensor``.

    Its affine maps voxel indices to world RAS mm (NRRD spaces converted). Unreadable or truncated files,
    anything but one 3D volume, bad geometry, NaN/infinite or constant voxels raise a ``DataError``
    naming the file.
    """

    def __init__(self, keys: str = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            volume, header = read_volume(out[key])
            affine = torch.as_tensor(header.affine, dtype=torch.float64)
            meta = {
                "filename_or_obj": str(header.path),
                MetaKeys.ORIGINAL_AFFINE: affine.clone(),
                MetaKeys.SPATIAL_SHAPE: header.shape,
                MetaKeys.SPACE: SpaceKeys.RAS,
            }
            out[key] = MetaTensor(torch.from_numpy(volume)[None], affine=affine, meta=meta)
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
    return [
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
        RandScaleIntensityd("image", factors=aug.intensity_scale, prob=intensity),
        RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=intensity),
        RandGaussianNoised("image", std=aug.noise_std, prob=intensity),
    ]
