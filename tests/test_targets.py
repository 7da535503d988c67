import pytest
import torch

from h3de.targets import decode_heatmaps, gaussian_heatmaps, points_in_volume


def test_gaussian_peak_is_at_the_continuous_point():
    torch.manual_seed(0)
    points = torch.rand(3, 5, 3) * 6 + 12  # (B, L, 3), >= 6 sigma from every border
    heatmaps = gaussian_heatmaps(points, (32, 36, 30), sigma=2.0)
    assert heatmaps.shape == (3, 5, 32, 36, 30)
    # the centroid of a Gaussian sampled on a grid wider than +-6 sigma is its centre
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (32, 36, 30)], indexing="ij")
    mass = heatmaps.double().sum(dim=(-3, -2, -1))
    centroid = torch.stack([(heatmaps.double() * g).sum(dim=(-3, -2, -1)) / mass for g in grids], -1)
    assert (centroid - points.double()).abs().max() < 1e-4
    # value at the point's voxel matches the analytic Gaussian
    nearest = points.round().long()
    value = heatmaps[0, 0, nearest[0, 0, 0], nearest[0, 0, 1], nearest[0, 0, 2]]
    expected = torch.exp(-((nearest[0, 0] - points[0, 0]) ** 2).sum() / 8.0)
    assert torch.isclose(value, expected, atol=1e-6)


def test_decode_recovers_sub_voxel_positions():
    torch.manual_seed(1)
    points = torch.rand(4, 6, 3) * 18 + 3
    for sigma in (1.0, 1.5, 3.0):
        decoded = decode_heatmaps(gaussian_heatmaps(points, (24, 24, 24), sigma))
        assert (decoded - points).abs().max() < 1e-3
    # scale does not matter, and log-domain input decodes the same
    heat = gaussian_heatmaps(points, (24, 24, 24), 2.0)
    assert (decode_heatmaps(5.0 * heat) - points).abs().max() < 1e-3
    assert (decode_heatmaps(heat.clamp_min(1e-30).log(), log_input=True) - points).abs().max() < 1e-3


def test_decode_at_border_and_for_non_positive_values():
    heat = torch.zeros(1, 2, 8, 8, 8)
    heat[0, 0, 0, 7, 3] = 1.0  # peak on the border: no neighbour on one side
    heat[0, 1] = -1.0
    heat[0, 1, 4, 4, 4], heat[0, 1, 3, 4, 4] = 0.5, 0.0  # non-positive neighbours: raw parabola
    decoded = decode_heatmaps(heat)
    assert torch.allclose(decoded[0, 0], torch.tensor([0.0, 7.0, 3.0]))
    assert torch.isfinite(decoded).all()
    assert decoded[0, 1, 0] < 4.0  # pulled toward the larger neighbour


def test_missing_points_give_empty_heatmaps():
    points = torch.tensor([[4.0, 4.0, 4.0], [float("nan")] * 3])
    heat = gaussian_heatmaps(points, (10, 10, 10), 1.5)
    assert heat[0].max() == pytest.approx(1.0) and heat[1].abs().max() == 0


def test_points_in_volume():
    points = torch.tensor([[0.0, 0.0, 0.0], [-0.6, 1, 1], [9.49, 9.49, 9.49], [9.5, 0, 0], [float("nan"), 1, 1]])
    assert points_in_volume(points, (10, 10, 10)).tolist() == [True, False, True, False, False]
