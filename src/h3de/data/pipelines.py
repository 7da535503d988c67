"""Transform chains from config: deterministic preprocessing (cached), then augmentation, then targets.

Training:  load -> RAS -> normalise -> resample -> centre pad/crop    (cached by CacheDataset)
           [coarse-to-fine: + local patches from the normalised RAS volume]
           [sliding window: a random patch instead of resample + crop]
           -> [mirror with label swap -> random affine -> elastic warp -> intensity (bias field, contrast, scale,
              shift, noise)]  (augmented splits only)
           -> world landmarks onto the final voxel grid -> heatmaps -> pack
Inference: load -> RAS -> normalise -> resample -> pad to >= patch (whole scan, no ground truth) -> pack
Normalise: z-score, MRI percentiles or a CT window to [0, 1] (``data.normalize``), in place.
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
    DeleteItemsd,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import MetaKeys, SpaceKeys

from h3de.config import AugmentConfig, DataConfig, DetectionConfig, LocalStageConfig
from h3de.data.elastic import RandElasticPointsd
from h3de.data.images import read_volume
from h3de.data.patches import LocalPatchesd, RandLandmarkPatchd, ResampleRASd
from h3de.data.transforms import (
    KeepItemd,
    LandmarkHeatmapd,
    LandmarkMaskd,
    PackInferenced,
    PackLandmarkSampled,
    PercentileScaled,
    RandMirrord,
    WindowScaled,
    ZScored,
)

__all__ = ["build_transforms", "build_inference_transforms", "load_and_normalise", "LoadVolumed"]


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


def build_transforms(
    cfg: DataConfig,
    mirror_permutation: Sequence[int],
    train: bool,
    heatmaps: bool = True,
    detection: DetectionConfig | None = None,
    local: LocalStageConfig | None = None,
) -> Compose:
    """The per-sample training chain of a split (augmented when ``train``), for the detection mode.

    - ``whole`` and ``coarse_to_fine``: resample to ``cfg.spacing_mm``, centre pad/crop to ``cfg.patch_size``;
      coarse-to-fine adds the local stage's patches (:class:`~h3de.data.patches.LocalPatchesd`) drawn from the
      normalised RAS volume at its own resolution.
    - ``sliding_window``: a random ``cfg.patch_size`` patch at ``cfg.spacing_mm``
      (:class:`~h3de.data.patches.RandLandmarkPatchd`), sampled straight from the normalised RAS volume.

    Args:
        cfg: the ``data`` section of the experiment config.
        mirror_permutation: landmark index permutation of a left/right flip (from the manifest).
        train: add the random augmentation of ``cfg.augment``.
        heatmaps: add Gaussian heatmap targets (networks with heatmap output); anchor networks encode
            their targets from the voxel landmarks themselves.
        detection: the ``detection`` section (default: whole-volume mode).
        local: the ``local`` section (coarse-to-fine only).

    Returns:
        A ``Compose`` mapping ``{"image": path, "landmarks_world": (1, L, 3), "case_id"}`` to the
        packed sample of :class:`~h3de.data.transforms.PackLandmarkSampled`.
    """
    mode = detection.mode if detection is not None else "whole"
    spacing = tuple(float(s) for s in cfg.spacing_mm)
    steps = load_and_normalise(cfg)
    if mode == "sliding_window":
        steps.append(
            RandLandmarkPatchd("image", "landmarks_world", spacing, cfg.patch_size, detection.landmark_patch_prob)
        )
    else:
        if mode == "coarse_to_fine":
            steps.append(CopyItemsd("image", names="source"))
        steps += [
            _resample(spacing),
            ResizeWithPadOrCropd("image", spatial_size=tuple(cfg.patch_size), mode="constant"),
        ]
        if mode == "coarse_to_fine":
            steps += [
                LocalPatchesd(
                    "source",
                    "landmarks_world",
                    local.spacing_mm,
                    local.patch_size,
                    local.heatmap_sigma,
                    local.offset_mm if train else 0.0,
                    local.rotate_deg if train and cfg.augment.enabled else 0.0,
                    local.patches_per_sample,
                    local.scale if train and cfg.augment.enabled else 0.0,
                ),
                DeleteItemsd("source"),
            ]
    if train and cfg.augment.enabled:
        steps += _augmentations(cfg, spacing, mirror_permutation)
        if mode == "coarse_to_fine":
            steps += _intensity_augmentations(cfg.augment, "local_image", bias_field=False)
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


def build_inference_transforms(
    cfg: DataConfig, detection: DetectionConfig | None = None, with_landmarks: bool = True
) -> Compose:
    """The deterministic chain that prepares a whole scan for :func:`h3de.inference.detect`.

    No crop and no ground truth: the whole volume is normalised and resampled onto the RAS grid of
    ``cfg.spacing_mm`` that training uses (:class:`~h3de.data.patches.ResampleRASd`), and, except for sliding
    windows, padded to at least ``cfg.patch_size``; coarse-to-fine keeps the normalised volume at its own
    resolution and orientation as ``source`` for the local patches (sampled in world space). World coordinates
    are those of the file: every step carries its affine.

    Args:
        cfg: the ``data`` section of the experiment config.
        detection: the ``detection`` section (default: whole-volume mode).
        with_landmarks: the input dicts carry ``landmarks_world`` ((1, L, 3) world mm) to pass through.

    Returns:
        A ``Compose`` mapping ``{"image": path, "case_id", ["landmarks_world"]}`` to the sample of
        :class:`~h3de.data.transforms.PackInferenced`.
    """
    mode = detection.mode if detection is not None else "whole"
    load, _, normalise = load_and_normalise(cfg)
    steps = [load, normalise]  # the intensity statistics do not depend on the orientation
    if mode == "coarse_to_fine":
        steps.append(KeepItemd("image", "source"))  # resampling makes a new tensor: no copy needed
    steps.append(ResampleRASd("image", cfg.spacing_mm))  # the grid of the training chain's reorientation + Spacingd
    if mode != "sliding_window":
        steps.append(SpatialPadd("image", spatial_size=tuple(cfg.patch_size), mode="constant"))
    steps.append(PackInferenced("image", "source" if mode == "coarse_to_fine" else None, with_landmarks))
    return Compose(steps)


def _resample(spacing: tuple[float, ...]) -> Spacingd:
    # float32 interpolation: MONAI's float64 default costs a third more on a whole CT for nothing measurable
    return Spacingd("image", pixdim=spacing, mode="bilinear", padding_mode="border", dtype=torch.float32)


def load_and_normalise(cfg: DataConfig) -> list:
    """The first steps of every chain: read (one 3D volume), orient to RAS, normalise the intensities."""
    return [
        LoadVolumed("image"),
        Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        _normalizer(cfg),
    ]


def _normalizer(cfg: DataConfig):
    """``cfg.normalize``: z-score, percentiles to [0, 1] (MRI) or a fixed window to [0, 1] (CT); all in place."""
    if cfg.normalize == "zscore":
        return ZScored("image")
    if cfg.normalize == "percentile":
        return PercentileScaled("image", *cfg.percentiles)
    if cfg.normalize == "window":
        return WindowScaled("image", cfg.window)
    raise ValueError(f"unknown normalisation '{cfg.normalize}'")


def _augmentations(cfg: DataConfig, spacing: tuple[float, ...], mirror_permutation: Sequence[int]) -> list:
    aug = cfg.augment
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
    return spatial + _intensity_augmentations(aug, "image")


def _intensity_augmentations(aug: AugmentConfig, key: str, bias_field: bool = True) -> list:
    """Random intensity changes of ``key``: bias field (``bias_field``: a (C, D, H, W) image, not a stack of patches)
    and contrast when their probability is above 0 (an extra random transform would reseed the ones after it),
    then scale, shift and noise."""
    steps = []
    if bias_field and aug.bias_field_prob > 0:
        coeff = (-aug.bias_field_coeff, aug.bias_field_coeff)
        steps.append(RandBiasFieldd(key, degree=aug.bias_field_degree, coeff_range=coeff, prob=aug.bias_field_prob))
    if aug.contrast_prob > 0:
        steps.append(RandAdjustContrastd(key, gamma=tuple(aug.contrast_gamma), prob=aug.contrast_prob))
    return steps + [
        RandScaleIntensityd(key, factors=aug.intensity_scale, prob=aug.intensity_prob),
        RandShiftIntensityd(key, offsets=aug.intensity_shift, prob=aug.intensity_prob),
        RandGaussianNoised(key, std=aug.noise_std, prob=aug.intensity_prob),
    ]
