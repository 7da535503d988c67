"""Elastic deformation that moves the landmarks with the anatomy.

MONAI's ``ApplyTransformToPointsd`` follows affine maps only, so after a non-linear warp the landmarks
must follow the displacement field itself. The field ``d`` is a cubic B-spline in voxel coordinates
with control points every ``spacing_mm`` millimetres on a grid centred on the image, each control
displacement drawn uniformly in +-``magnitude_mm`` per image axis, so it means the same on any grid.

The image is resampled as ``output(y) = input(y + d(y))``; a landmark at ``x`` in the input therefore
moves to the ``y`` that solves ``y + d(y) = x``, found by the fixed-point iteration ``y <- x - d(y)``.
That iteration contracts when the field's gradient has norm below 1; every sampled field is bounded
(:meth:`BSplineField.gradient_bound`) and scaled down where the bound exceeds ``max_gradient``, which
also keeps the warp free of folds.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

from h3de.geometry import voxel_to_world, world_to_voxel

__all__ = ["BSplineField", "RandElasticPoints", "RandElasticPointsd", "voxel_sizes", "warp_image"]


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel (support (-2, 2), non-negative, shifted copies sum to 1)."""
    a = t.abs()
    inner = 2.0 / 3.0 - a**2 + a**3 / 2.0
    outer = (2.0 - a).clamp_min(0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


class BSplineField:
    """A displacement field in voxel units, a cubic B-spline over a regular grid of control points.

    Outside the knot range that covers the image the field is continued as a constant along each
    axis (coordinates are clamped), so its gradient bound holds everywhere.

    Args:
        control: (3, n0, n1, n2) control displacements in voxels of each image axis.
        origin: (3,) voxel position of control point (0, 0, 0).
        step: (3,) voxels between neighbouring control points along each axis.
    """

    def __init__(self, control: torch.Tensor, origin: Sequence[float], step: Sequence[float]) -> None:
        self.control = control.to(torch.float64)
        self.origin = torch.as_tensor(origin, dtype=torch.float64)
        self.step = torch.as_tensor(step, dtype=torch.float64)

    @classmethod
    def centred(
        cls, control_mm: torch.Tensor, shape: Sequence[int], voxel_mm: Sequence[float], spacing_mm: float
    ) -> BSplineField:
        """A field whose control grid is centred on a ``shape`` image and covers it.

        Args:
            control_mm: (3, n0, n1, n2) control displacements in mm along the image axes, with
                ``n_a = control_points(shape, voxel_mm, spacing_mm)[a]``.
            shape: (D, H, W) image size in voxels.
            voxel_mm: (3,) voxel size in mm along each image axis.
            spacing_mm: distance between control points in mm.
        """
        voxel = torch.as_tensor(voxel_mm, dtype=torch.float64)
        step = spacing_mm / voxel
        counts = torch.tensor(control_mm.shape[1:], dtype=torch.float64)
        origin = (torch.tensor(shape, dtype=torch.float64) - 1) / 2 - (counts - 1) / 2 * step
        return cls(control_mm.to(torch.float64) / voxel[:, None, None, None], origin, step)

    @staticmethod
    def control_points(shape: Sequence[int], voxel_mm: Sequence[float], spacing_mm: float) -> tuple[int, int, int]:
        """Control points per axis so that every voxel has its four supporting knots along each axis."""
        return tuple(math.ceil((n - 1) * v / spacing_mm) + 3 for n, v in zip(shape, voxel_mm, strict=True))

    def _weights(self, axis: int, coords: torch.Tensor) -> torch.Tensor:
        """(N, n_axis) B-spline weights of voxel coordinates ``coords`` (N,) along ``axis``."""
        n = self.control.shape[1 + axis]
        t = ((coords - self.origin[axis]) / self.step[axis]).clamp(1.0, n - 2.0)
        return cubic_bspline(t[:, None] - torch.arange(n, dtype=torch.float64))

    def sampling_grid(self, shape: Sequence[int]) -> torch.Tensor:
        """``y + d(y)`` at every voxel centre of a ``shape`` grid, as ``grid_sample`` coordinates.

        Returns:
            (D, H, W, 3) float32, the last axis (W, H, D) positions normalised to [-1, 1] (align_corners).
        """
        scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=torch.float64)
        control = (self.control * scale[:, None, None, None]).flip(0).permute(1, 2, 3, 0).float()  # (n0, n1, n2, 3)
        w0, w1, w2 = (self._weights(a, torch.arange(s, dtype=torch.float64)).float() for a, s in enumerate(shape))
        field = torch.einsum("ijkc,zk->ijzc", control, w2)
        field = torch.einsum("ijzc,yj->iyzc", field, w1)  # (n0, H, W, 3)
        grid = (w0 @ field.reshape(len(field), -1)).reshape(*shape, 3)  # (D, H, W, 3) displacement
        for c, axis in enumerate(reversed(range(3))):  # identity: normalised positions along W, H, D
            view = [1, 1, 1]
            view[axis] = shape[axis]
            grid[..., c] += torch.linspace(-1.0, 1.0, shape[axis]).view(view)
        return grid

    def at(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) displacement in voxels at continuous voxel positions ``points`` (N, 3)."""
        w0, w1, w2 = (self._weights(a, points[:, a].to(torch.float64)) for a in range(3))
        return torch.einsum("cijk,ni,nj,nk->nc", self.control, w0, w1, w2)

    def gradient_bound(self, voxel_mm: Sequence[float]) -> float:
        """Upper bound of the spectral norm of the field's Jacobian anywhere, in mm per mm along the image axes.

        Within one knot cell, column j of the Jacobian (the derivative along axis j) is a convex
        combination of the 3 x 4 x 4 control differences along j that support the cell, divided by the
        knot step; its length is at most the longest of them. The Frobenius norm of the three longest
        lengths bounds the spectral norm in the cell; the bound is the largest over the cells.
        """
        voxel = torch.as_tensor(voxel_mm, dtype=torch.float64)
        control = self.control * voxel[:, None, None, None]  # (3, n0, n1, n2) mm
        step = self.step * voxel  # mm
        squares = 0.0
        for j in range(3):
            length = control.diff(dim=1 + j).norm(dim=0) / step[j]  # column j's length on the control edges
            for axis in range(3):  # max over a cell's support: 3 edges along j, 4 knots along the others
                size = 3 if axis == j else 4
                n = length.shape[axis] - size + 1
                length = torch.stack([length.narrow(axis, k, n) for k in range(size)]).amax(0)
            squares = squares + length.square()  # (n0 - 3, n1 - 3, n2 - 3) cells
        return float(squares.sqrt().max())

    def invert_points(self, points: torch.Tensor, tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
        """Solve ``y + d(y) = x`` for each voxel position ``x`` by the iteration ``y <- x - d(y)``.

        Args:
            points: (N, 3) voxel positions ``x`` (finite).
            tol: stop when no position moves more than this (voxels) in one step.
            max_iter: most iterations; with gradient bound L < 1 the error after k steps is at most
                L^k / (1 - L) times the first step.

        Returns:
            (N, 3) float64 positions ``y``.
        """
        x = points.to(torch.float64)
        y = x.clone()
        for _ in range(max_iter):
            y_next = x - self.at(y)
            converged = (y_next - y).abs().max() <= tol if len(y) else True
            y = y_next
            if converged:
                break
        return y


def voxel_sizes(affine: torch.Tensor) -> tuple[float, float, float]:
    """Voxel size in mm along each image axis (column norms of a (4, 4) voxel-to-world affine)."""
    return tuple(float(v) for v in affine[:3, :3].to(torch.float64).norm(dim=0))


def warp_image(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample ``image`` at ``grid`` (from :meth:`BSplineField.sampling_grid`): trilinear, border padding.

    Args:
        image: (C, D, H, W) plain tensor.
        grid: (D, H, W, 3) normalised sampling positions.

    Returns:
        (C, D, H, W) tensor of ``image``'s dtype.
    """
    warped = F.grid_sample(image[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=True)
    return warped[0].to(image.dtype)


class RandElasticPoints(RandomizableTransform):
    """Random smooth elastic warp of a (C, D, H, W) MetaTensor that moves world-mm points with it.

    The affine is unchanged: the anatomy moves on a fixed grid, and each point moves by the inverse
    of the field. NaN rows (absent landmarks) stay NaN.

    Args:
        prob: probability of warping.
        magnitude_mm: control displacements are uniform in +-``magnitude_mm`` along each image axis.
        spacing_mm: distance between control points (mm); larger is smoother.
        max_gradient: a field whose gradient bound exceeds this is scaled down to it; must be below 1
            so the warp is invertible and the landmark iteration converges.
    """

    def __init__(self, prob: float, magnitude_mm: float, spacing_mm: float, max_gradient: float = 0.9) -> None:
        RandomizableTransform.__init__(self, prob)
        if magnitude_mm < 0:
            raise ValueError(f"magnitude_mm must be non-negative, got {magnitude_mm}")
        if spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
        if not 0 < max_gradient < 1:
            raise ValueError(f"max_gradient must lie in (0, 1), got {max_gradient}")
        self.magnitude_mm, self.spacing_mm, self.max_gradient = magnitude_mm, spacing_mm, max_gradient
        self.field: BSplineField | None = None

    def randomize(self, shape: Sequence[int], voxel_mm: Sequence[float]) -> None:
        """Decide whether to warp and, if so, draw the field of a ``shape`` image with ``voxel_mm`` voxels."""
        super().randomize(None)
        if not self._do_transform:
            return
        counts = BSplineField.control_points(shape, voxel_mm, self.spacing_mm)
        control = torch.from_numpy(self.R.uniform(-self.magnitude_mm, self.magnitude_mm, size=(3, *counts)))
        field = BSplineField.centred(control, shape, voxel_mm, self.spacing_mm)
        bound = field.gradient_bound(voxel_mm)
        if bound > self.max_gradient:
            field = BSplineField.centred(control * (self.max_gradient / bound), shape, voxel_mm, self.spacing_mm)
        self.field = field

    def move_points(self, points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
        """Move world points with the current field: world -> voxel, invert the field, voxel -> world.

        Args:
            points: (..., L, 3) world mm, NaN rows = absent.
            affine: (4, 4) voxel-to-world matrix of the warped image.

        Returns:
            Points of the same shape and dtype; NaN rows stay NaN.
        """
        flat = torch.as_tensor(points).reshape(-1, 3)
        present = torch.isfinite(flat).all(dim=-1)
        moved = flat.to(torch.float64).clone()
        voxel = world_to_voxel(moved[present], affine.to(torch.float64))
        moved[present] = voxel_to_world(self.field.invert_points(voxel), affine.to(torch.float64))
        return moved.to(flat.dtype).reshape(points.shape)

    def __call__(
        self, img: MetaTensor, points: Sequence[torch.Tensor] = (), randomize: bool = True
    ) -> tuple[MetaTensor, list[torch.Tensor]]:
        """Warp ``img`` and move each (..., L, 3) world-mm tensor of ``points`` with it."""
        if not isinstance(img, MetaTensor):
            raise TypeError("the image must be a MetaTensor carrying its affine")
        affine = img.affine.to(torch.float64)
        if randomize:
            self.randomize(img.shape[1:], voxel_sizes(affine))
        if not self._do_transform:
            return img, list(points)
        warped = warp_image(img.as_tensor(), self.field.sampling_grid(img.shape[1:]))
        out, *_ = convert_to_dst_type(warped, img)
        return out, [self.move_points(p, affine) for p in points]


class RandElasticPointsd(RandomizableTransform, MapTransform):
    """Dictionary :class:`RandElasticPoints`: one field warps every image key and moves every point key.

    The images must share a grid; the field is drawn for the first and points go through its affine.
    Place it before ``ApplyTransformToPointsd``, which maps the moved world points onto the voxel grid.

    Args:
        keys: image keys ((C, D, H, W) MetaTensors on one grid).
        point_keys: keys of (..., L, 3) world-mm points, NaN rows = absent.
        prob: probability of warping.
        magnitude_mm: control displacements are uniform in +-``magnitude_mm`` along each image axis.
        spacing_mm: distance between control points (mm).
        max_gradient: gradient bound the field is scaled down to (below 1).
    """

    def __init__(
        self,
        keys: KeysCollection,
        point_keys: Sequence[str],
        prob: float,
        magnitude_mm: float,
        spacing_mm: float,
        max_gradient: float = 0.9,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.point_keys = tuple(point_keys)
        self.elastic = RandElasticPoints(1.0, magnitude_mm, spacing_mm, max_gradient)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        self.elastic.set_random_state(seed, state)
        super().set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        keys = list(self.key_iterator(d))
        first = d[keys[0]]
        self.elastic.randomize(first.shape[1:], voxel_sizes(first.affine))
        d[keys[0]], moved = self.elastic(first, [d[key] for key in self.point_keys], randomize=False)
        d.update(zip(self.point_keys, moved, strict=True))
        for key in keys[1:]:
            d[key], _ = self.elastic(d[key], randomize=False)
        return d
