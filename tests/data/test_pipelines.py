import numpy as np
import pytest
import torch

from conftest import BLOB_NAMES, blob_affine, write_blob_case
from h3de.config import load_config
from h3de.data.pipelines import build_transforms
from h3de.geometry import voxel_to_world
from h3de.targets import decode_heatmaps

MIRROR = [1, 0, 2, 3]  # a_L <-> a_R


def sample(tmp_path, kind, seed=0, absent=()):
    rng = np.random.default_rng(seed)
    shape = (30, 34, 22)
    centre = np.array(shape) / 2
    voxels = np.array([[-7.0, 1, 0], [7.0, 1, 0], [0, -2, 6.0], [0, 8.0, -1]]) + centre + rng.uniform(-1, 1, (4, 3))
    image, _, world = write_blob_case(tmp_path, f"{kind}_{seed}", blob_affine(kind), shape, voxels, absent)
    return {"image": str(image), "landmarks_world": torch.as_tensor(world)[None], "case_id": kind}


def data_cfg(*overrides):
    base = ["data.spacing_mm=[3,3,3]", "data.patch_size=[40,40,40]", "data.heatmap_sigma=1.5"]
    return load_config(None, base + list(overrides)).data


def blob_centroid(image: torch.Tensor, point: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Intensity-weighted centroid of the image blob around a voxel point (background removed)."""
    image = image[0].double()
    centre = point.round().long()
    lo = (centre - radius).clamp_min(0)
    hi = torch.minimum(centre + radius + 1, torch.tensor(image.shape))
    patch = image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    weights = (patch - image.median()).clamp_min(0)
    grids = torch.meshgrid(
        *[torch.arange(a, b, dtype=torch.float64) for a, b in zip(lo, hi, strict=True)], indexing="ij"
    )
    return torch.stack([(weights * g).sum() / weights.sum() for g in grids])


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "permuted"])
def test_eval_pipeline_world_round_trip(tmp_path, kind):
    out = build_transforms(data_cfg(), MIRROR, train=False)(sample(tmp_path, kind, absent=(3,)))
    assert out["image"].shape == (1, 40, 40, 40) and out["heatmap"].shape == (4, 40, 40, 40)
    assert out["present"].tolist() == [True, True, True, False] and out["loss_mask"].tolist() == [True] * 3 + [False]
    world = out["landmarks_world"][:3]
    back = voxel_to_world(out["landmarks_voxel"][:3].double(), out["affine"])
    assert (back - world).abs().max() < 1e-4  # mm
    decoded = voxel_to_world(decode_heatmaps(out["heatmap"][None])[0, :3].double(), out["affine"])
    assert (decoded - world).norm(dim=-1).max() < 1e-2  # mm: heatmap target decodes onto the landmark
    assert out["heatmap"][3].abs().max() == 0


@pytest.mark.parametrize("kind, seed", [("ras", 0), ("lps", 1), ("oblique", 2), ("permuted", 3), ("ras", 4)])
def test_heatmap_peaks_follow_affine_and_flip(tmp_path, kind, seed):
    cfg = data_cfg(
        "data.augment.affine_prob=1.0",
        "data.augment.flip_prob=1.0",
        "data.augment.intensity_prob=0.0",
        "data.augment.rotate_deg=[25,25,25]",
        "data.augment.scale=0.15",
        "data.augment.translate_mm=10",
    )
    transform = build_transforms(cfg, MIRROR, train=True)
    transform.set_random_state(seed)
    raw = sample(tmp_path, kind, seed)
    out = transform(raw)
    plain = build_transforms(data_cfg(), MIRROR, train=False)(raw)
    assert not torch.allclose(out["affine"], plain["affine"])  # the augmentation really moved the grid

    peaks = decode_heatmaps(out["heatmap"][None])[0].double()
    for i, name in enumerate(BLOB_NAMES):
        centroid = blob_centroid(out["image"], peaks[i])
        assert (centroid - peaks[i]).norm() < 0.5, f"{name}: heatmap peak {peaks[i]} vs blob {centroid}"
    # blob i has amplitude i + 1: after the flip the a_L label sits on the brighter, originally right blob
    value = [out["image"][0][tuple(p.round().long())].item() for p in peaks]
    assert value[0] > value[1]
    plain_peaks = decode_heatmaps(plain["heatmap"][None])[0].round().long()
    right_blob = plain["image"][0][tuple(plain_peaks[1])].item()
    assert value[0] == pytest.approx(right_blob, rel=0.35)
    # labels and world positions were swapped together
    assert torch.allclose(out["landmarks_world"][0], raw["landmarks_world"][0, 1])
    assert torch.allclose(out["landmarks_world"][1], raw["landmarks_world"][0, 0])


def test_without_flip_labels_stay(tmp_path):
    cfg = data_cfg("data.augment.affine_prob=1.0", "data.augment.flip_prob=0.0", "data.augment.intensity_prob=0.0")
    transform = build_transforms(cfg, MIRROR, train=True)
    transform.set_random_state(0)
    out = transform(sample(tmp_path, "oblique"))
    peaks = decode_heatmaps(out["heatmap"][None])[0]
    value = [out["image"][0][tuple(p.round().long())] for p in peaks]
    assert value[0] < value[1]


def test_augmentation_is_reproducible_with_random_state(tmp_path):
    cfg = data_cfg("data.augment.affine_prob=1.0", "data.augment.flip_prob=0.5")
    raw = sample(tmp_path, "ras")
    outs = []
    for _ in range(2):
        transform = build_transforms(cfg, MIRROR, train=True)
        transform.set_random_state(7)
        outs.append(transform(raw))
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["affine"], outs[1]["affine"])


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "permuted"])
@pytest.mark.parametrize("spacing", [3.0, 0.8])
def test_inference_resampling_equals_monai_reorientation_then_spacing(tmp_path, kind, spacing):
    """ResampleRASd gives the training chain's grid (affine and shape) and values, coarser or finer."""
    from monai.transforms import Compose, Orientationd, Spacingd

    from h3de.data.patches import ResampleRASd
    from h3de.data.pipelines import LoadVolumed

    loaded = LoadVolumed("image")(sample(tmp_path, kind))
    labels = (("L", "R"), ("P", "A"), ("I", "S"))
    monai = Compose(
        [
            Orientationd("image", axcodes="RAS", labels=labels),
            Spacingd("image", pixdim=(spacing,) * 3, mode="bilinear", padding_mode="border", dtype=torch.float32),
        ]
    )(dict(loaded))["image"]
    ours = ResampleRASd("image", (spacing,) * 3)(dict(loaded))["image"]
    assert ours.shape == monai.shape
    assert torch.equal(ours.affine.double(), monai.affine.double())
    scale = monai.abs().max()
    assert (ours.as_tensor() - monai.as_tensor()).abs().max() <= 1e-5 * scale


def test_zscore_matches_monai_and_keep_item_shares_the_tensor():
    from monai.transforms import NormalizeIntensityd

    from h3de.data.transforms import KeepItemd, ZScored

    image = torch.rand(1, 9, 8, 7) * 300 - 40
    expected = NormalizeIntensityd("image")({"image": image.clone()})["image"]
    out = ZScored("image")({"image": image})["image"]
    assert torch.allclose(out, expected, atol=1e-5) and abs(out.mean()) < 1e-5
    assert torch.equal(ZScored("image")({"image": torch.full((1, 2, 2, 2), 7.0)})["image"], torch.zeros(1, 2, 2, 2))
    kept = KeepItemd("image", "source")({"image": out})
    assert kept["source"] is kept["image"]
