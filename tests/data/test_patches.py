"""World-space patches: the sampler, the coarse-to-fine local patches and the sliding-window training patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from h3de.config import load_config
from h3de.data.manifest import load_manifest
from h3de.data.patches import LocalPatchesd, RandLandmarkPatchd, patch_affines, sample_patches
from h3de.data.pipelines import build_transforms
from h3de.geometry import voxel_to_world, world_to_voxel
from h3de.targets import decode_heatmaps

AFFINE = torch.tensor([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, -1.0, 0, 5], [0, 0, 0, 1]], dtype=torch.float64)


def test_a_patch_on_the_volume_grid_is_an_exact_crop():
    volume = torch.randn(2, 20, 22, 24)
    start = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    affine = AFFINE.clone()
    affine[:3, 3] = AFFINE[:3, :3] @ start + AFFINE[:3, 3]
    patch = sample_patches(volume, AFFINE, affine[None], (8, 9, 10))
    torch.testing.assert_close(patch[0], volume[:, 3:11, 4:13, 5:15])


def test_patch_affines_centre_each_patch_on_its_point_and_sample_linear_fields_exactly():
    centres = torch.tensor([[-10.0, 10.0, -5.0], [-20.5, 5.25, -8.0]], dtype=torch.float64)  # inside the volume
    angle = np.deg2rad(30.0)
    rotation = torch.tensor(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]], dtype=torch.float64
    )
    affines = patch_affines(centres, [0.5, 0.5, 1.0], (5, 7, 9), rotation.expand(2, 3, 3))
    middle = torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64)
    for k in range(2):
        torch.testing.assert_close(voxel_to_world(middle, affines[k])[0], centres[k])
    # a volume whose value is its world x coordinate: trilinear sampling reproduces x at every patch voxel
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (20, 22, 24)], indexing="ij"))
    world_x = (AFFINE[0, :3, None, None, None] * index).sum(0) + AFFINE[0, 3]
    patch = sample_patches(world_x[None].float(), AFFINE, affines, (5, 7, 9))
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (5, 7, 9)], indexing="ij"), -1)
    expected = voxel_to_world(grid.reshape(-1, 3), affines[0])[:, 0].reshape(5, 7, 9)
    torch.testing.assert_close(patch[0, 0].double(), expected, atol=1e-4, rtol=0)


def _blob_volume(points_voxel, shape=(40, 40, 40), sigma=1.5):
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
    image = sum(torch.exp(-((grid - p) ** 2).sum(-1) / (2 * sigma**2)) for p in points_voxel)
    return MetaTensor(image[None].float(), affine=AFFINE.clone())


@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_local_patches_put_each_landmark_target_on_its_feature(scale):
    voxels = torch.tensor([[12.3, 15.6, 20.2], [27.1, 24.4, 18.9]], dtype=torch.float64)
    world = voxel_to_world(voxels, AFFINE)
    world = torch.cat([world, torch.full((1, 3), torch.nan, dtype=torch.float64)])  # a third, absent landmark
    transform = LocalPatchesd(
        "source", "points", [0.8, 0.8, 0.8], (16, 16, 16), 1.0, offset_mm=3.0, rotate_deg=20, scale=scale
    )
    transform.set_random_state(3)
    out = transform({"source": _blob_volume(voxels), "points": world})
    steps = torch.linalg.vector_norm(out["local_affine"][:, :3, :3], dim=1)  # (K, 3) mm per patch voxel
    assert ((steps - 0.8).abs().max() > 0.05) == (scale > 0) and (steps - 0.8).abs().max() <= 0.8 * scale + 1e-9
    assert out["local_image"].shape == (3, 1, 16, 16, 16) and out["local_heatmap"].shape == (3, 3, 16, 16, 16)
    assert out["local_mask"][:, 2].sum() == 0 and out["local_mask"][0, 0] and out["local_mask"][1, 1]
    # in each landmark's own patch, the image's brightest point and the target's peak coincide in world mm
    for k in range(2):
        target = decode_heatmaps(out["local_heatmap"][k : k + 1, k : k + 1])[0]
        found = decode_heatmaps(out["local_image"][k : k + 1].clamp_min(1e-6), log_input=False)[0]
        target_world = voxel_to_world(target.double(), out["local_affine"][k])
        found_world = voxel_to_world(found.double(), out["local_affine"][k])
        assert torch.linalg.vector_norm(target_world - world[k]) < 1e-3
        assert torch.linalg.vector_norm(found_world - world[k]) < 0.5  # a quarter of the 2 mm source voxel
        offset = world_to_voxel(world[k : k + 1], out["local_affine"][k]) - 7.5
        assert offset.abs().max() > 0.1  # patches are not all centred exactly on the landmark
    # patch k is drawn for landmark k: centred on it (less the drawn offset) when present; the absent one's patch is
    # centred on a present stand-in and, for the conditioned design, is a negative of the absent landmark
    drawn = out["local_landmark"]
    assert drawn.dtype == torch.long and drawn.tolist() == [0, 1, 2]
    centres = voxel_to_world(torch.full((1, 3), 7.5, dtype=torch.float64), out["local_affine"])[:, 0]
    origins = centres - transform._offsets
    torch.testing.assert_close(origins[:2], world[:2])
    assert torch.cdist(origins[2:], world[:2]).min() < 1e-6 and not out["local_mask"][2, drawn[2]]


def test_sliding_window_patches_hold_a_landmark_as_often_as_asked():
    world = voxel_to_world(torch.tensor([[5.0, 30.0, 33.0]], dtype=torch.float64), AFFINE)
    volume = _blob_volume([torch.tensor([5.0, 30.0, 33.0])])
    for prob, low, high in ((1.0, 50, 50), (0.0, 0, 20)):
        transform = RandLandmarkPatchd("image", "points", [1.0, 1.0, 1.0], (12, 12, 12), landmark_prob=prob)
        transform.set_random_state(0)
        inside = 0
        for _ in range(50):
            out = transform({"image": volume, "points": world})
            voxel = world_to_voxel(world, out["image"].affine.double())[0]
            inside += bool(((voxel >= 0) & (voxel <= 11)).all())
            assert out["image"].shape == (1, 12, 12, 12)
        assert low <= inside <= high, (prob, inside)


def test_training_chains_of_coarse_to_fine_and_sliding_window(blob_dataset):
    manifest = load_manifest(blob_dataset)
    case = manifest.cases[0]
    names, positions = manifest.landmark_names, manifest.read_case_landmarks(case)
    record = {"image": str(case.image), "landmarks_world": torch.as_tensor(positions)[None], "case_id": case.id}
    c2f = ["detection.mode=coarse_to_fine", "data.patch_size=[16,16,16]", "local.patch_size=[12,12,12]"]
    c2f = load_config(None, c2f)
    chain = build_transforms(c2f.data, manifest.mirror_permutation(), True, True, c2f.detection, c2f.local)
    sample = chain(dict(record))
    count = len(names)
    assert sample["local_image"].shape == (count, 1, 12, 12, 12)
    assert sample["local_heatmap"].shape == (count, count, 12, 12, 12) and "source" not in sample
    assert sample["local_landmark"].tolist() == list(range(count))
    assert sample["image"].shape == (1, 16, 16, 16)
    sw = load_config(None, ["detection.mode=sliding_window", "loss=weighted_mse", "data.spacing_mm=[1.5,1.5,1.5]"])
    sw.data.patch_size = [16, 16, 16]
    chain = build_transforms(sw.data, manifest.mirror_permutation(), True, True, sw.detection, sw.local)
    sample = chain(dict(record))
    assert sample["image"].shape == (1, 16, 16, 16) and sample["heatmap"].shape == (count, 16, 16, 16)


def test_a_fixed_patch_count_centres_patches_on_present_landmarks_only():
    voxels = torch.tensor([[12.3, 15.6, 20.2], [27.1, 24.4, 18.9]], dtype=torch.float64)
    world = torch.cat([voxel_to_world(voxels, AFFINE), torch.full((1, 3), torch.nan, dtype=torch.float64)])
    transform = LocalPatchesd("source", "points", [0.8, 0.8, 0.8], (16, 16, 16), 1.0, 0.0, 0.0, count=5)
    transform.set_random_state(1)
    out = transform({"source": _blob_volume(voxels), "points": world})
    assert out["local_image"].shape == (5, 1, 16, 16, 16) and out["local_heatmap"].shape == (5, 3, 16, 16, 16)
    centres = voxel_to_world(torch.full((1, 3), 7.5, dtype=torch.float64), out["local_affine"])[:, 0]
    nearest = torch.cdist(centres, world[:2]).min(dim=1).values
    assert nearest.max() < 1e-6  # every patch on a present landmark (no offset drawn)
    owners = torch.cdist(centres, world[:2]).argmin(dim=1)
    assert set(owners.tolist()) == {0, 1}  # both present landmarks get patches
    assert not out["local_mask"][:, 2].any()
    assert out["local_landmark"].tolist() == owners.tolist()  # each patch drawn for the landmark it is centred on
