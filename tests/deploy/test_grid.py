"""The numpy geometry of deployment equals the torch/MONAI steps of the inference chain it stands in for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, SpatialPad

from h3de.data.patches import ResampleRASd, sample_patches
from h3de.data.patches import patch_affines as torch_patch_affines
from h3de.data.transforms import PercentileScaled, WindowScaled, ZScored
from h3de.deploy.grid import pad_to, patch_affines, ras_grid, sample, to_ras, voxel_to_world
from h3de.deploy.runtime import normalise
from h3de.geometry import voxel_to_world as torch_voxel_to_world


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    q, r = np.linalg.qr(np.eye(3) + np.deg2rad(degrees) * rng.normal(size=(3, 3)))
    return q @ np.diag(np.sign(np.diag(r)))


def _affines(count: int) -> list[np.ndarray]:
    """Affines of every kind a scan has: RAS, LPS, permuted axes, flips, anisotropic, oblique (small and large)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        axes = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
        if i % 3:
            axes = _rotation(rng, 8.0 if i % 3 == 1 else 35.0) @ axes
        affine = np.eye(4)
        affine[:3, :3] = axes * rng.uniform(0.4, 3.0, 3)
        affine[:3, 3] = rng.uniform(-100, 100, 3)
        out.append(affine)
    return out


@pytest.mark.parametrize("index", range(12))
def test_the_ras_grid_is_monais_orientation_then_spacing(index):
    affine = _affines(12)[index]
    rng = np.random.default_rng(index)
    shape = tuple(int(n) for n in rng.integers(5, 40, 3))
    spacing = rng.uniform(0.7, 4.0, 3)
    expected_affine, expected_shape = ResampleRASd("image", spacing).grid(
        MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))
    )
    found_affine, found_shape = ras_grid(affine, shape, spacing)
    assert found_shape == expected_shape
    np.testing.assert_allclose(found_affine, expected_affine.numpy(), atol=1e-9)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("oblique", [True, False])  # scipy's 3D interpolation, or one 1D pass per axis
def test_sampling_equals_grid_sample_inside_outside_and_at_the_border(padding, oblique):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(13, 17, 11)).astype(np.float32)
    affine = _affines(3)[2 if oblique else 0]  # the second: permuted, flipped and anisotropic axes
    centre = voxel_to_world(np.array([6.0, 8.0, 5.0]), affine)
    # patches centred inside, across the edge and far outside the volume, rotated and at another spacing
    centres = centre + np.array([[0.0, 0, 0], [20.0, -10, 5], [400.0, 0, 0]])
    rotations = torch.as_tensor(np.stack([_rotation(rng, 30.0) if oblique else np.eye(3) for _ in centres]))
    grids = torch_patch_affines(torch.as_tensor(centres), [1.3, 0.8, 2.1], (9, 10, 7), rotations)
    expected = sample_patches(torch.from_numpy(volume)[None], torch.as_tensor(affine), grids, (9, 10, 7), padding)
    for k, grid in enumerate(grids.numpy()):
        found = sample(volume, affine, grid, (9, 10, 7), padding)
        np.testing.assert_allclose(found, expected[k, 0].numpy(), atol=2e-5)
    assert np.abs(expected[0, 0].numpy()).max() > 0.5  # the volume was sampled, not just its padding


def test_patch_affines_padding_orientation_and_world_points_equal_the_torch_steps():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 3)) * 30
    np.testing.assert_allclose(
        patch_affines(centres, [1.0, 1.5, 0.5], (12, 9, 16)),
        torch_patch_affines(torch.as_tensor(centres), [1.0, 1.5, 0.5], (12, 9, 16)).numpy(),
        atol=1e-12,
    )
    volume = rng.normal(size=(7, 20, 5)).astype(np.float32)
    affine = _affines(2)[1]
    padded, padded_affine = pad_to(volume, affine, (16, 16, 16))
    expected = SpatialPad((16, 16, 16))(MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine)))
    np.testing.assert_array_equal(padded, expected[0].numpy())
    np.testing.assert_allclose(padded_affine, expected.affine.numpy(), atol=1e-9)
    oriented, oriented_affine = to_ras(volume, affine)
    labels = (("L", "R"), ("P", "A"), ("I", "S"))
    expected = Orientation("RAS", labels=labels)(
        MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine))
    )
    np.testing.assert_array_equal(oriented, expected[0].numpy())
    np.testing.assert_allclose(oriented_affine, expected.affine.numpy(), atol=1e-9)
    voxels = rng.uniform(0, 10, (5, 3))
    np.testing.assert_allclose(
        voxel_to_world(voxels, affine),
        torch_voxel_to_world(torch.as_tensor(voxels), torch.as_tensor(affine)).numpy(),
        atol=1e-9,
    )


@pytest.mark.parametrize(
    ("data", "transform"),
    [
        ({"normalize": "zscore"}, ZScored("image")),
        ({"normalize": "percentile", "percentiles": [0.5, 99.5]}, PercentileScaled("image", 0.5, 99.5)),
        ({"normalize": "window", "window": [-100, 300]}, WindowScaled("image", [-100, 300])),
    ],
)
def test_normalisation_equals_the_training_transforms(data, transform):
    volume = np.random.default_rng(3).normal(50, 200, size=(30, 20, 25)).astype(np.float32)
    expected = transform({"image": torch.from_numpy(volume.copy())})["image"].numpy()
    np.testing.assert_allclose(normalise(volume, data), expected, atol=2e-6)
