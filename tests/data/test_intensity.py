"""Intensity handling: CT window and MRI percentile normalisation, bias-field and contrast augmentation."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandAdjustContrastd, RandBiasFieldd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

from conftest import BLOB_NAMES, blob_affine, write_blob_case
from h3de.config import load_config
from h3de.data.pipelines import build_inference_transforms, build_transforms
from h3de.data.transforms import PercentileScaled, WindowScaled, percentiles

MIRROR = [1, 0, 2, 3]  # a_L <-> a_R


def sample(tmp_path, kind):
    shape = (30, 34, 22)
    voxels = np.array([[-7.0, 1, 0], [7.0, 1, 0], [0, -2, 6.0], [0, 8.0, -1]]) + np.array(shape) / 2
    image, _, world = write_blob_case(tmp_path, kind, blob_affine(kind), shape, voxels)
    return {"image": str(image), "landmarks_world": torch.as_tensor(world)[None], "case_id": kind}


def data_cfg(*overrides):
    return load_config(None, ["data.spacing_mm=[3,3,3]", "data.patch_size=[40,40,40]", *overrides]).data


def mri_like(shape, seed=0) -> torch.Tensor:
    """A (1, *shape) float32 volume with a dark background, tissue, bright outliers and repeated values."""
    rng = np.random.default_rng(seed)
    image = rng.gamma(2.0, 60.0, shape).astype(np.float32)
    image[: shape[0] // 4] = 0.0
    image.flat[rng.integers(0, image.size, 50)] = 5000.0
    return torch.from_numpy(image)[None]


@pytest.mark.parametrize("q", [(0.5, 99.5), (0.0, 100.0), (2.0, 98.0)])
def test_percentile_scaling_is_monais_exactly(q):
    """Over a million voxels MONAI computes np.percentile: the same bits, from one partition and in place."""
    image = mri_like((104, 100, 97))
    assert image.numel() > 1_000_000
    expected = ScaleIntensityRangePercentilesd("image", *q, b_min=0.0, b_max=1.0, clip=True)({"image": image.clone()})
    out = PercentileScaled("image", *q)({"image": image.clone()})["image"]
    assert out.dtype == torch.float32 and torch.equal(out, expected["image"].as_tensor())
    assert np.array_equal(percentiles(image, q), np.percentile(image.numpy(), q))


def test_percentile_scaling_small_volumes_metatensors_and_constants():
    image = MetaTensor(mri_like((20, 18, 16), seed=1), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    expected = ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True)({"image": image.clone()})
    out = PercentileScaled("image", 0.5, 99.5)({"image": image})["image"]  # MONAI: torch.quantile below 1M voxels
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    assert torch.allclose(out.as_tensor(), expected["image"].as_tensor(), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    constant = PercentileScaled("image", 1.0, 99.0)({"image": torch.full((1, 3, 3, 3), 4.0)})["image"]
    assert torch.equal(constant, torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="percentiles"):
        PercentileScaled("image", 99.0, 1.0)


def test_window_scaling_is_monais_exactly():
    image = torch.randn(1, 30, 20, 10) * 800 + 100  # HU-like
    expected = ScaleIntensityRanged("image", -1000.0, 2000.0, 0.0, 1.0, clip=True)({"image": image.clone()})
    out = WindowScaled("image", [-1000, 2000])({"image": image})["image"]
    assert torch.equal(out, expected["image"].as_tensor()) and out.min() == 0.0 and out.max() == 1.0
    with pytest.raises(ValueError, match="lo < hi"):
        WindowScaled("image", [10, 10])


@pytest.mark.parametrize(
    "overrides",
    [["data.normalize=window", "data.window=[-1,3]"], ["data.normalize=percentile", "data.percentiles=[1,99]"]],
)
def test_normalisations_reach_both_chains(tmp_path, overrides):
    cfg = data_cfg(*overrides)
    raw = sample(tmp_path, "lps")
    out = build_transforms(cfg, MIRROR, train=False)(dict(raw))
    prepared = build_inference_transforms(cfg)(dict(raw))
    for image in (out["image"], prepared["image"]):
        assert image.min() >= 0.0 and image.max() <= 1.0 + 1e-6 and image.max() > 0.5  # resampled: rounding


def test_bias_and_contrast_join_the_chain_only_when_on(tmp_path):
    def kinds(*overrides, mode="whole"):
        cfg = load_config(None, ["data.spacing_mm=[3,3,3]", "data.patch_size=[40,40,40]", *overrides])
        chain = build_transforms(cfg.data, MIRROR, True, detection=cfg.detection, local=cfg.local)
        return [type(t) for t in chain.transforms]

    off = kinds()
    assert RandBiasFieldd not in off and RandAdjustContrastd not in off
    on = kinds("data.augment.bias_field_prob=0.5", "data.augment.contrast_prob=0.5")
    assert on.count(RandBiasFieldd) == 1 and on.count(RandAdjustContrastd) == 1
    assert [t for t in on if t not in (RandBiasFieldd, RandAdjustContrastd)] == off
    c2f = kinds("data.augment.bias_field_prob=0.5", "data.augment.contrast_prob=0.5", "detection.mode=coarse_to_fine")
    assert c2f.count(RandBiasFieldd) == 1 and c2f.count(RandAdjustContrastd) == 2  # local patches: contrast only


def test_bias_and_contrast_augment_reproducibly(tmp_path):
    cfg = load_config(
        None,
        [
            "data.spacing_mm=[3,3,3]",
            "data.patch_size=[40,40,40]",
            "data.normalize=percentile",
            "data.augment.bias_field_prob=1.0",
            "data.augment.bias_field_coeff=0.3",
            "data.augment.contrast_prob=1.0",
            "data.augment.intensity_prob=0.0",
            "data.augment.affine_prob=0.0",
            "data.augment.flip_prob=0.0",
            "detection.mode=coarse_to_fine",
            "local.patch_size=[16,16,16]",
        ],
    )
    raw = sample(tmp_path, "ras")
    plain = build_transforms(cfg.data, MIRROR, False, detection=cfg.detection, local=cfg.local)(dict(raw))
    outs = []
    for _ in range(2):
        chain = build_transforms(cfg.data, MIRROR, True, detection=cfg.detection, local=cfg.local)
        chain.set_random_state(3)
        outs.append(chain(dict(raw)))
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert torch.equal(outs[0]["local_image"], outs[1]["local_image"])
    assert not torch.allclose(outs[0]["image"], plain["image"])  # the intensities changed, the geometry did not
    assert torch.equal(outs[0]["landmarks_voxel"], plain["landmarks_voxel"])
    assert outs[0]["local_image"].shape == (len(BLOB_NAMES), 1, 16, 16, 16)
