import numpy as np
import pytest
import torch

from conftest import blob_affine
from h3de.geometry import voxel_to_world, world_to_voxel


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "permuted"])
def test_world_voxel_round_trip(kind):
    affine = torch.as_tensor(blob_affine(kind, spacing=(0.7, 1.3, 5.0)))
    voxels = torch.rand(50, 3, dtype=torch.float64) * 100
    world = voxel_to_world(voxels, affine)
    assert torch.allclose(world_to_voxel(world, affine), voxels, atol=1e-9)
    again = voxel_to_world(world_to_voxel(world, affine), affine)
    assert (again - world).abs().max() < 1e-4  # mm


def test_matches_homogeneous_matrix_product_and_keeps_nan():
    affine = torch.as_tensor(blob_affine("oblique"))
    voxels = torch.tensor([[1.0, 2.0, 3.0], [float("nan")] * 3], dtype=torch.float64)
    world = voxel_to_world(voxels, affine)
    expected = (affine @ torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64))[:3]
    assert torch.allclose(world[0], expected)
    assert torch.isnan(world[1]).all()


def test_batched_affines_broadcast():
    affines = torch.stack([torch.as_tensor(blob_affine(k)) for k in ("ras", "lps")])  # (2, 4, 4)
    voxels = torch.rand(2, 5, 3, dtype=torch.float64)
    world = voxel_to_world(voxels, affines)
    for b in range(2):
        assert torch.allclose(world[b], voxel_to_world(voxels[b], affines[b]))
    assert np.allclose(world_to_voxel(world, affines).numpy(), voxels.numpy())
