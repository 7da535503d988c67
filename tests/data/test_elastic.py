import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import blob_affine, write_blob_case
from h3de.config import load_config
from h3de.data.elastic import BSplineField, RandElasticPoints, RandElasticPointsd, voxel_sizes
from h3de.data.pipelines import build_transforms
from h3de.errors import ConfigError
from h3de.geometry import voxel_to_world, world_to_voxel
from h3de.targets import decode_heatmaps

SHAPE = (40, 44, 36)
VOXELS = torch.tensor([[10.0, 12, 9], [29.5, 11, 25], [20.3, 31.7, 18.2], [11, 33, 27], [28, 30.5, 10.4]])


def blobs(shape, voxels, sigma=1.5):
    """(1, *shape) image with a Gaussian blob (amplitude 1, ``sigma`` voxels) at each voxel position."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
    image = sum(torch.exp(-((grid - v.double()) ** 2).sum(-1) / (2 * sigma**2)) for v in voxels)
    return image[None].float()


def centroid(image, point, radius=4):
    """Intensity-weighted centroid (voxels) of the blob in a cube of ``radius`` around a voxel point."""
    centre = point.round().long()
    lo = (centre - radius).clamp_min(0)
    hi = torch.minimum(centre + radius + 1, torch.tensor(image.shape[1:]))
    patch = image[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].double()
    axes = [torch.arange(a, b, dtype=torch.float64) for a, b in zip(lo, hi, strict=True)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([(patch * g).sum() / patch.sum() for g in grids])


def blob_sample(affine, absent=()):
    affine = torch.as_tensor(affine, dtype=torch.float64)
    world = voxel_to_world(VOXELS.double(), affine)
    world[list(absent)] = torch.nan
    image = MetaTensor(blobs(SHAPE, VOXELS), affine=affine)
    return {"image": image, "landmarks_world": world[None]}


def strong(prob=1.0, magnitude_mm=14.0, spacing_mm=30.0):
    """A field scaled down to the gradient cap: about 1.5 voxels of displacement at ~1.2 mm voxels."""
    return RandElasticPointsd("image", ["landmarks_world"], prob, magnitude_mm, spacing_mm)


@pytest.mark.parametrize("seed, voxel_mm", [(0, (1.0, 1.0, 1.0)), (1, (2.0, 2.5, 3.0)), (2, (0.7, 3.0, 1.5))])
def test_gradient_bound_holds(seed, voxel_mm):
    rng = np.random.default_rng(seed)
    shape, spacing = (24, 20, 28), 12.0
    counts = BSplineField.control_points(shape, voxel_mm, spacing)
    field = BSplineField.centred(torch.from_numpy(rng.uniform(-3, 3, (3, *counts))), shape, voxel_mm, spacing)
    voxel = torch.tensor(voxel_mm, dtype=torch.float64)
    points = torch.from_numpy(rng.uniform(-5, 30, (4000, 3)))  # also outside the image (clamped field)
    eps = 1e-4
    columns = [
        (field.at(points + eps * e / voxel) - field.at(points - eps * e / voxel)) * voxel / (2 * eps)
        for e in torch.eye(3, dtype=torch.float64)
    ]
    jacobian = torch.stack(columns, -1)  # (N, 3, 3) mm per mm
    largest = torch.linalg.matrix_norm(jacobian, ord=2).max().item()
    bound = field.gradient_bound(voxel_mm)
    assert largest <= bound
    assert largest > 0.15 * bound  # the bound is conservative, not vacuous


def test_sampling_grid_is_the_field_at_voxel_centres():
    shape, voxel_mm = (9, 12, 14), (2.0, 2.5, 3.0)
    transform = RandElasticPoints(1.0, 6.0, 15.0)
    transform.set_random_state(3)
    transform.randomize(shape, voxel_mm)
    grid = transform.field.sampling_grid(shape).double()  # (D, H, W, 3) normalised (x, y, z)
    positions = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
    expected = positions + transform.field.at(positions.reshape(-1, 3)).reshape(*shape, 3)
    unnormalised = (grid.flip(-1) + 1) / 2 * (torch.tensor(shape, dtype=torch.float64) - 1)
    assert (unnormalised - expected).abs().max() < 1e-4
    # the warp samples the input at y + d(y): a coordinate image comes out as y + d(y) where that lies inside
    coordinates = MetaTensor(positions.permute(3, 0, 1, 2).float(), affine=torch.diag(torch.tensor([*voxel_mm, 1.0])))
    warped, _ = transform(coordinates, randomize=False)
    inside = ((expected >= 0) & (expected <= torch.tensor(shape) - 1)).all(-1)
    assert inside.float().mean() > 0.5
    assert (warped.as_tensor().permute(1, 2, 3, 0).double() - expected)[inside].abs().max() < 1e-3


@pytest.mark.parametrize("kind, seed", [("ras", 0), ("oblique", 1), ("permuted", 2), ("lps", 3)])
def test_blobs_stay_on_moved_landmarks(kind, seed):
    sample = blob_sample(blob_affine(kind, spacing=(1.0, 1.25, 1.5)))
    transform = strong()
    transform.set_random_state(seed)
    out = transform(sample)
    assert torch.equal(out["image"].affine, sample["image"].affine)  # the grid stays, the anatomy moves
    field = transform.elastic.field
    assert 0.5 < field.gradient_bound(voxel_sizes(out["image"].affine)) <= 0.9 + 1e-9  # strong, within the cap
    moved = world_to_voxel(out["landmarks_world"][0], out["image"].affine)
    residual = (moved + field.at(moved) - VOXELS.double()).norm(dim=-1)
    assert residual.max() < 1e-6  # voxels: the fixed-point iteration solved y + d(y) = x
    shift = (moved - VOXELS).norm(dim=-1)
    assert shift.mean() > 1.0, f"landmarks barely moved: {shift}"
    for i, point in enumerate(moved):
        found = centroid(out["image"], point)
        assert (found - point).norm() < 0.5, f"blob {i}: centroid {found} vs moved landmark {point}"
        if shift[i] > 1.0:  # the blob left the old position
            assert (centroid(out["image"], VOXELS[i].double()) - VOXELS[i]).norm() > 0.5


def test_absent_rows_stay_nan_and_shapes_and_dtypes_are_kept():
    sample = blob_sample(blob_affine("oblique"), absent=(1, 3))
    out = strong().set_random_state(0)(sample)
    world = out["landmarks_world"]
    assert world.shape == (1, 5, 3) and world.dtype == torch.float64
    assert torch.isnan(world[0, [1, 3]]).all() and torch.isfinite(world[0, [0, 2, 4]]).all()
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, *SHAPE)
    assert out["image"].dtype == torch.float32
    flat, _ = RandElasticPoints(1.0, 8.0, 40.0).set_random_state(0)(sample["image"], [sample["landmarks_world"][0]])
    assert flat.shape == sample["image"].shape


def test_same_seed_same_output_other_seed_differs():
    sample = blob_sample(blob_affine("lps"))
    a, b, c = (strong().set_random_state(seed)(sample) for seed in (5, 5, 6))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["landmarks_world"], b["landmarks_world"])
    assert not torch.allclose(a["landmarks_world"], c["landmarks_world"])


def test_prob_zero_and_magnitude_zero_are_the_identity():
    sample = blob_sample(blob_affine("oblique"), absent=(2,))
    out = strong(prob=0.0).set_random_state(0)(sample)
    assert out["image"] is sample["image"] and out["landmarks_world"] is sample["landmarks_world"]
    out = strong(magnitude_mm=0.0).set_random_state(0)(sample)
    assert torch.allclose(out["image"], sample["image"], atol=1e-5)
    assert torch.allclose(out["landmarks_world"], sample["landmarks_world"], atol=1e-9, equal_nan=True)


def test_bad_arguments_and_config_values_are_named():
    with pytest.raises(ValueError, match="spacing_mm"):
        RandElasticPoints(1.0, 4.0, 0.0)
    with pytest.raises(ValueError, match="max_gradient"):
        RandElasticPoints(1.0, 4.0, 30.0, max_gradient=1.0)
    for override, key in [
        ("data.augment.elastic_prob=1.5", "data.augment.elastic_prob"),
        ("data.augment.elastic_magnitude_mm=-1", "data.augment.elastic_magnitude_mm"),
        ("data.augment.elastic_spacing_mm=0", "data.augment.elastic_spacing_mm"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_training_chain_packs_landmarks_on_the_deformed_blobs(tmp_path):
    shape = (30, 34, 26)
    voxels = np.array([[8.0, 9, 8], [21, 10, 17], [15, 24, 12], [9, 25, 18]])
    image, _, world = write_blob_case(tmp_path, "case", blob_affine("oblique", spacing=(2.5, 2.0, 3.0)), shape, voxels)
    raw = {"image": str(image), "landmarks_world": torch.as_tensor(world)[None], "case_id": "case"}
    off = ["data.augment.affine_prob=0", "data.augment.flip_prob=0", "data.augment.intensity_prob=0"]
    base = ["data.spacing_mm=[2,2,2]", "data.patch_size=[40,40,40]", "data.heatmap_sigma=1.5", *off]
    elastic = [
        "data.augment.elastic_prob=1",
        "data.augment.elastic_magnitude_mm=14",
        "data.augment.elastic_spacing_mm=30",
    ]
    transform = build_transforms(load_config(None, base + elastic).data, [1, 0, 2, 3], train=True)
    transform.set_random_state(0)
    out = transform(raw)
    plain = build_transforms(load_config(None, base).data, [1, 0, 2, 3], train=False)(raw)
    assert torch.equal(out["affine"], plain["affine"])
    points = out["landmarks_voxel"].double()
    assert (points - plain["landmarks_voxel"]).norm(dim=-1).mean() > 1.0  # the warp moved them
    assert out["loss_mask"].all()
    for i, point in enumerate(points):
        found = centroid(out["image"] - out["image"].min(), point, radius=3)
        assert (found - point).norm() < 0.5, f"landmark {i}: packed {point} vs blob {found}"
    assert (decode_heatmaps(out["heatmap"][None])[0].double() - points).abs().max() < 0.05
    back = voxel_to_world(points, out["affine"])
    assert (back - out["landmarks_world"]).abs().max() < 1e-3  # the packed world landmarks are the moved ones


def test_every_image_key_gets_the_same_warp():
    sample = blob_sample(blob_affine("oblique"))
    sample["copy"] = sample["image"].clone()
    both = RandElasticPointsd(["image", "copy"], ["landmarks_world"], 1.0, 14.0, 30.0).set_random_state(4)(sample)
    alone = strong().set_random_state(4)(sample)
    assert torch.equal(both["image"], both["copy"]) and torch.equal(both["image"], alone["image"])
    assert not torch.allclose(both["image"], sample["image"], atol=1e-3)
    assert torch.equal(both["landmarks_world"], alone["landmarks_world"])
