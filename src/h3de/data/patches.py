"""Patches sampled from a volume in world space, and the training transforms that draw them.

A patch is a small grid with its own voxel-to-world affine: axes along RAS (optionally rotated), a given
spacing in mm, centred on a world point. Its voxels are read from the source volume by trilinear
interpolation at their world positions, so one sampler serves every geometry: a coarse-to-fine local
patch around a landmark estimate (training and inference alike), or a random training patch of the
sliding-window mode. Written here rather than with MONAI's crops because those work on the source's own
grid; this samples any spacing and rotation in one ``grid_sample`` call, without resampling the whole
volume first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform, Orientation, Randomizable, Spacing

from h3de.geometry import world_to_voxel
from h3de.targets import gaussian_heatmaps, points_in_volume

__all__ = ["patch_affines", "sample_patches", "ResampleRASd", "LocalPatchesd", "RandLandmarkPatchd"]


def patch_affines(
    centres: torch.Tensor, spacing: Sequence[float], size: Sequence[int], rotations: torch.Tensor | None = None
) -> torch.Tensor:
    """Voxel-to-world affines of patches centred on ``centres``.

    Args:
        centres: (K, 3) world mm, the patches' centres.
        spacing: (3,) mm per patch voxel.
        size: (3,) voxels per patch side.
        rotations: (K, 3, 3) rotations of the patch axes, or any linear maps (a rotation times a scale) (default:
            RAS-aligned).

    Returns:
        (K, 4, 4) float64 affines; voxel ``(size - 1) / 2`` of patch k lies at ``centres[k]``.
    """
    centres = centres.to(torch.float64).reshape(-1, 3)
    k = len(centres)
    axes = torch.diag(torch.as_tensor(spacing, dtype=torch.float64)).expand(k, 3, 3)
    if rotations is not None:
        axes = rotations.to(torch.float64) @ axes
    half = (torch.as_tensor(size, dtype=torch.float64) - 1) / 2
    affine = torch.eye(4, dtype=torch.float64).repeat(k, 1, 1)
    affine[:, :3, :3] = axes
    affine[:, :3, 3] = centres - (axes @ half)
    return affine


def sample_patches(
    volume: torch.Tensor,
    affine: torch.Tensor,
    patch_affine: torch.Tensor,
    size: Sequence[int],
    padding: str = "zeros",
) -> torch.Tensor:
    """Trilinear samples of ``volume`` on the patch grids.

    Args:
        volume: (C, D, H, W) source volume, in any memory layout (it is never copied whole).
        affine: (4, 4) its voxel-to-world matrix.
        patch_affine: (K, 4, 4) voxel-to-world matrices of the patches (:func:`patch_affines`).
        size: (3,) voxels per patch side.
        padding: the value outside the volume: "zeros", or "border" (that of the nearest edge voxel).

    Returns:
        (K, C, *size) float32 patches on ``volume``'s device.
    """
    volume = torch.as_tensor(volume)
    device = volume.device
    # patch voxel -> source voxel, composed in float64: one (K, 4, 4) matrix per patch
    to_source = torch.linalg.inv(torch.as_tensor(affine, dtype=torch.float64).cpu()) @ patch_affine.cpu()
    # fold grid_sample's coordinates into the matrix: align_corners=True maps voxel 0 -> -1 and n - 1 -> 1, and
    # the last grid axis lists (x, y, z) = (W, H, D), the reverse of the voxel axes
    shape = torch.as_tensor(volume.shape[1:], dtype=torch.float64)
    scale = torch.diag(torch.cat([2 / (shape - 1).clamp_min(1), torch.ones(1, dtype=torch.float64)]))
    scale[:3, 3] = -1
    to_grid = (scale @ to_source)[:, [2, 1, 0]].to(device=device, dtype=torch.float32)  # (K, 3, 4)
    # the grid is built by broadcasting one row per patch axis: one (K, *size, 3) allocation, nothing of size P x 3
    k = len(patch_affine)
    grid = to_grid[:, None, None, None, :, 3].expand(k, *size, 3).clone()
    for axis, n in enumerate(size):
        steps = torch.arange(n, dtype=torch.float32, device=device)
        view = [k, 1, 1, 1, 3]
        view[1 + axis] = n
        grid += (steps[None, :, None] * to_grid[:, None, :, axis]).reshape(view)
    grid = grid.reshape(1, -1, *size[1:], 3)
    out = F.grid_sample(volume[None].float(), grid, mode="bilinear", padding_mode=padding, align_corners=True)
    # (1, C, K * size[0], size[1], size[2]) -> (K, C, *size)
    return out.reshape(volume.shape[0], len(patch_affine), *size).transpose(0, 1).contiguous()


class ResampleRASd(MapTransform):
    """The whole volume on the grid that MONAI's ``Orientationd("RAS")`` then ``Spacingd(spacing)`` make (the
    training chain's: same affine, same shape, bilinear, border padding), sampled in one world-space pass from
    the volume in its own orientation.

    Written for the inference chain's speed: MONAI's pair copies the whole full-resolution scan twice (the flip of
    the reorientation, then a contiguous copy before ``grid_sample``), which cost more than the network on a 1 mm
    head. The grid itself is MONAI's: both transforms are applied lazily to a stand-in of the image's shape and
    affine, and their pending affine and shape read back.

    Args:
        key: the image key (MetaTensor (C, X, Y, Z) with its affine); replaced by the resampled float32 volume.
        spacing: (3,) mm of the output grid.
    """

    def __init__(self, key: str, spacing: Sequence[float]) -> None:
        super().__init__([key])
        self.key = key
        labels = (("L", "R"), ("P", "A"), ("I", "S"))
        self.orient = Orientation(axcodes="RAS", labels=labels, lazy=True)
        self.resample = Spacing(pixdim=tuple(spacing), mode="bilinear", padding_mode="border", lazy=True)

    def grid(self, image: MetaTensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(4, 4) float64 affine and (3,) shape of the output grid for ``image``."""
        stand_in = MetaTensor(torch.zeros(()).expand(1, *image.shape[1:]), affine=image.affine)  # no voxels
        pending = self.resample(self.orient(stand_in))
        shape = tuple(int(s) for s in pending.peek_pending_shape())
        return torch.as_tensor(pending.peek_pending_affine(), dtype=torch.float64), shape

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.key]
        affine, shape = self.grid(image)
        out = sample_patches(image.as_tensor(), image.affine, affine[None], shape, padding="border")[0]
        d[self.key] = MetaTensor(out, affine=affine, meta={"filename_or_obj": image.meta.get("filename_or_obj")})
        return d


def _random_rotations(rng: np.random.RandomState, count: int, max_deg: float) -> torch.Tensor:
    """(count, 3, 3) rotations by uniform angles in +-max_deg about each axis."""
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, (count, 3)))
    out = []
    for a, b, c in angles:
        rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
        rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
        out.append(rz @ ry @ rx)
    return torch.as_tensor(np.stack(out), dtype=torch.float64)


def _points(data: Mapping[Hashable, torch.Tensor], key: str) -> torch.Tensor:
    points = data[key]
    points = points.as_tensor() if isinstance(points, MetaTensor) else torch.as_tensor(points)
    return points.reshape(-1, 3).to(torch.float64)


class LocalPatchesd(Randomizable, MapTransform):
    """Training patches of the coarse-to-fine local stage, K per sample, with their heatmap targets.

    Each patch is centred on one landmark's true world position plus a uniform offset of up to ``offset_mm``
    per axis, rotated by up to ``rotate_deg`` about each axis, and, with ``scale`` > 0, its voxels stretched by a
    factor in [1 - scale, 1 + scale] along each of its axes (the anatomy's size and proportions vary; the targets
    follow exactly, through the patch affine). With ``count`` None there is one patch per
    landmark (K = L; an absent landmark's patch goes to a randomly chosen present one); otherwise K = ``count``
    patches go to present landmarks drawn without repetition while they last, which bounds the memory of
    many-landmark datasets (targets grow as K x L). The ``shared`` design supervises every landmark that falls
    inside a patch; the ``conditioned`` one only the landmark the patch was drawn for (``local_landmark``): the
    one it is centred on, except that an absent landmark's patch (one per landmark) is drawn for that absent
    landmark, centred on its present stand-in, so that the conditioned design also learns "absent".

    Reads ``source_key`` (MetaTensor (C, D, H, W) with its affine) and ``points_key`` ((L, 3) world mm, NaN =
    absent). Writes ``local_image`` (K, C, *size) float32, ``local_heatmap`` (K, L, *size) float32,
    ``local_mask`` (K, L) bool (landmark j inside patch k), ``local_affine`` (K, 4, 4) float64,
    ``local_landmark`` (K,) long (the landmark patch k was drawn for).
    """

    def __init__(
        self,
        source_key: str,
        points_key: str,
        spacing: Sequence[float],
        size: Sequence[int],
        sigma: float,
        offset_mm: float,
        rotate_deg: float,
        count: int | None = None,
        scale: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, [source_key])
        self.source_key, self.points_key = source_key, points_key
        self.spacing, self.size = tuple(float(s) for s in spacing), tuple(int(s) for s in size)
        self.sigma, self.offset_mm, self.rotate_deg, self.count = sigma, offset_mm, rotate_deg, count
        if not 0.0 <= scale < 1.0:
            raise ValueError(f"scale must lie in [0, 1), got {scale}")
        self.scale = scale

    def randomize(self, landmarks: int) -> None:
        """Draw, for K patches of ``landmarks`` landmarks: offsets (mm), rotations and stretches, and an order of
        preference among the landmarks (which ones get a patch, and which stand in for absent ones)."""
        count = self.count or landmarks
        self._offsets = torch.as_tensor(self.R.uniform(-self.offset_mm, self.offset_mm, (count, 3)))
        self._rotations = _random_rotations(self.R, count, self.rotate_deg) if self.rotate_deg > 0 else None
        if self.scale > 0:  # drawn only when on, so that the other draws stay those of earlier versions
            stretch = torch.diag_embed(torch.as_tensor(self.R.uniform(1 - self.scale, 1 + self.scale, (count, 3))))
            self._rotations = stretch if self._rotations is None else self._rotations @ stretch
        self._order = torch.as_tensor(self.R.permutation(landmarks))

    def _targets(self, present: torch.Tensor) -> torch.Tensor:
        """(K,) the landmark each patch is centred on; present landmarks only."""
        preferred = self._order[present[self._order]]  # present landmarks in the drawn order
        if self.count is None:  # one per landmark; absent ones replaced by present ones in the drawn order
            own = torch.arange(len(present))
            absent = torch.nonzero(~present).flatten()
            own[absent] = preferred[torch.arange(len(absent)) % len(preferred)]
            return own
        return preferred[torch.arange(self.count) % len(preferred)]

    def _drawn_for(self, present: torch.Tensor) -> torch.Tensor:
        """(K,) the landmark each patch is drawn for: its own one per landmark, else the one it is centred on."""
        if self.count is None:
            return torch.arange(len(present))
        if present.any():
            return self._targets(present)
        return self._order[torch.arange(self.count) % len(present)]  # nothing present: every patch a negative

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        source = d[self.source_key]
        world = _points(d, self.points_key)  # (L, 3)
        self.randomize(len(world))
        present = torch.isfinite(world).all(-1)
        count = self.count or len(world)
        if present.any():
            centres = world[self._targets(present)]
        else:  # nothing to look for: patches at the volume's centre teach "absent" everywhere
            middle = (torch.as_tensor(source.shape[1:], dtype=torch.float64) - 1) / 2
            centre = source.affine[:3, :3].double() @ middle + source.affine[:3, 3].double()
            centres = centre.expand(count, 3)
        affines = patch_affines(centres + self._offsets, self.spacing, self.size, self._rotations)
        d["local_image"] = sample_patches(source.as_tensor(), source.affine, affines, self.size)
        voxels = world_to_voxel(world.expand(count, *world.shape), affines)  # (K, L, 3) in each patch
        mask = points_in_volume(voxels, self.size)
        d["local_heatmap"] = gaussian_heatmaps(torch.where(mask[..., None], voxels, torch.nan), self.size, self.sigma)
        d["local_mask"] = mask
        d["local_affine"] = affines
        d["local_landmark"] = self._drawn_for(present)
        return d


class RandLandmarkPatchd(Randomizable, MapTransform):
    """A random training patch of the sliding-window mode, replacing the image by the patch.

    With probability ``landmark_prob`` the patch contains a randomly chosen present landmark at a uniformly
    random place inside it; otherwise its centre is uniform over the volume. The patch is RAS-aligned at
    ``spacing`` mm, sampled from the (RAS-oriented) image at any resolution, and carries its own affine, so the
    landmarks follow through :class:`monai.transforms.ApplyTransformToPointsd` like after any crop.

    Reads ``image_key`` (MetaTensor (C, D, H, W)) and ``points_key`` ((L, 3) world mm).
    """

    def __init__(
        self, image_key: str, points_key: str, spacing: Sequence[float], size: Sequence[int], landmark_prob: float
    ) -> None:
        MapTransform.__init__(self, [image_key])
        self.image_key, self.points_key = image_key, points_key
        self.spacing, self.size = tuple(float(s) for s in spacing), tuple(int(s) for s in size)
        self.landmark_prob = landmark_prob

    def randomize(self, data=None) -> None:
        """Draw whether to hold a landmark, which one (a fraction of the present ones) and where, in [0, 1)^3."""
        self._around_landmark = self.R.rand() < self.landmark_prob
        self._which = self.R.rand()
        self._where = torch.as_tensor(self.R.uniform(0, 1, 3))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        image = d[self.image_key]
        affine = image.affine.to(torch.float64)
        world = _points(d, self.points_key)
        present = torch.nonzero(torch.isfinite(world).all(-1)).flatten()
        extent = torch.as_tensor(self.size, dtype=torch.float64) * torch.as_tensor(self.spacing) / 2  # half side mm
        if len(present) and self._around_landmark:
            chosen = world[present[int(self._which * len(present))]]
            centre = chosen + (2 * self._where - 1) * (extent - torch.as_tensor(self.spacing))
        else:
            corner = self._where * (torch.as_tensor(image.shape[1:]) - 1)
            centre = affine[:3, :3] @ corner + affine[:3, 3]
        patch_affine = patch_affines(centre[None], self.spacing, self.size)
        patch = sample_patches(image.as_tensor(), affine, patch_affine, self.size)[0]
        d[self.image_key] = MetaTensor(
            patch, affine=patch_affine[0], meta={"filename_or_obj": image.meta.get("filename_or_obj")}
        )
        return d
