"""Custom MONAI dictionary transforms for landmark samples.

A sample dict carries ``image`` (MetaTensor, its affine tracking every spatial transform) and
``landmarks_world`` ((L, 3) RAS mm, NaN rows = absent). Points are moved onto the final voxel grid
once, after all spatial transforms, through MONAI's ``ApplyTransformToPointsd``; these transforms
add what MONAI lacks: the label swap of a left/right flip, heatmap targets, and packing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, MapTransform, RandomizableTransform

from h3de.targets import gaussian_heatmaps, points_in_volume

__all__ = [
    "ZScored",
    "WindowScaled",
    "PercentileScaled",
    "percentiles",
    "KeepItemd",
    "RandMirrord",
    "LandmarkMaskd",
    "LandmarkHeatmapd",
    "PackLandmarkSampled",
    "PackInferenced",
]


class ZScored(MapTransform):
    """Zero mean and unit standard deviation over the whole volume, in place.

    The same result as MONAI's ``NormalizeIntensityd`` with its defaults (population standard deviation; a
    constant image only shifted), written here for speed: that one indexes every voxel through a boolean mask
    and allocates copies, twice the time of these three passes on a whole scan (``benchmarks/predict_cost.md``).
    It modifies the tensor it is given: use it on a freshly read volume.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            mean, std = image.mean(), image.std(unbiased=False)
            image.sub_(mean)
            if std > 0:
                image.div_(std)
        return d


def _scale_clip_(image: torch.Tensor, lo: float, span: float) -> None:
    """``(image - lo) / span`` clipped to [0, 1], in place: MONAI's ``ScaleIntensityRange(lo, lo + span, 0, 1,
    clip=True)`` step for step (subtract, divide, clamp), so the results are the same bits; ``span`` 0 (a constant
    image) only shifts, as MONAI does."""
    image.sub_(lo)
    if span != 0:
        image.div_(span).clamp_(0.0, 1.0)


class WindowScaled(MapTransform):
    """CT window: intensities in ``window`` = (lo, hi) (e.g. HU) map linearly onto [0, 1], the rest is clipped.

    The same result as MONAI's ``ScaleIntensityRanged(a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)``, in place:
    it modifies the tensor it is given, like :class:`ZScored`.
    """

    def __init__(self, keys: KeysCollection, window: Sequence[float]) -> None:
        super().__init__(keys)
        lo, hi = (float(v) for v in window)
        if not lo < hi:
            raise ValueError(f"window must be [lo, hi] with lo < hi, got {list(window)}")
        self.lo, self.hi = lo, hi

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            _scale_clip_(d[key], self.lo, self.hi - self.lo)
        return d


def percentiles(image: torch.Tensor, q: Sequence[float]) -> np.ndarray:
    """Percentiles ``q`` (each in [0, 100]) of all of ``image``'s values, exactly as ``np.percentile`` (linear).

    All of them from one copy and one partition of the values; MONAI's ``percentile`` costs a copy and a partition
    per percentile.

    Returns:
        (len(q),) array of numpy's result type for the image's dtype.
    """
    values = image.detach().cpu().numpy().reshape(-1)  # a view when contiguous: np.percentile copies it once
    return np.percentile(values, list(q))


class PercentileScaled(MapTransform):
    """MRI normalisation: the image's ``lower`` and ``upper`` percentiles map to 0 and 1, the rest is clipped.

    The same result as MONAI's ``ScaleIntensityRangePercentilesd(lower, upper, b_min=0, b_max=1, clip=True)`` on
    volumes of over a million voxels (on smaller ones MONAI switches to ``torch.quantile``, equal to rounding), in a
    quarter of its time on a whole 1 mm head (0.1 s against 0.4 s, one thread): both percentiles from one partition
    (:func:`percentiles`), and the scaling in place (it modifies the tensor it is given, like :class:`ZScored`).
    """

    def __init__(self, keys: KeysCollection, lower: float, upper: float) -> None:
        super().__init__(keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower} and {upper}")
        self.q = (float(lower), float(upper))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lo, hi = torch.as_tensor(percentiles(d[key], self.q), dtype=d[key].dtype)  # in the image's type, as MONAI
            _scale_clip_(d[key], lo.item(), (hi - lo).item())
        return d


class KeepItemd(MapTransform):
    """Keeps the current value of ``key`` under ``name`` too, without a copy (MONAI's ``CopyItemsd``
    deep-copies a whole scan): for chains whose later steps replace ``key`` rather than modify it.
    """

    def __init__(self, key: str, name: str) -> None:
        super().__init__([key])
        self.key, self.name = key, name

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d[self.name] = d[self.key]
        return d


class RandMirrord(RandomizableTransform, MapTransform):
    """Left/right flip that mirrors the anatomy and swaps the labels of mirrored landmark pairs.

    The image is flipped along ``spatial_axis`` (the left-right axis after ``Orientationd("RAS")``)
    and its affine updated, so each landmark keeps its world position on the anatomy; the mirrored
    image shows a subject whose left is the original right, so the rows of each mirrored pair are
    swapped in ``landmark_keys``.

    Args:
        keys: image keys to flip.
        landmark_keys: keys of (..., L, 3) per-landmark points whose rows follow the label swap.
        permutation: length-L index permutation swapping the mirrored pairs.
        prob: probability of flipping.
        spatial_axis: the left-right axis of the image (0 for RAS-oriented images).
    """

    def __init__(
        self,
        keys: KeysCollection,
        landmark_keys: Sequence[str],
        permutation: Sequence[int],
        prob: float = 0.5,
        spatial_axis: int = 0,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if sorted(permutation) != list(range(len(permutation))):
            raise ValueError(f"permutation {list(permutation)} is not a permutation of 0..{len(permutation) - 1}")
        self.landmark_keys = tuple(landmark_keys)
        self.permutation = torch.as_tensor(list(permutation), dtype=torch.long)
        self.flipper = Flip(spatial_axis=spatial_axis)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.flipper(d[key])
        for key in self.landmark_keys:
            d[key] = d[key].index_select(-2, self.permutation)
        return d


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class LandmarkMaskd(MapTransform):
    """Loss mask of voxel-space landmarks: present (finite) and inside the image grid.

    Reads ``points_key`` ((L, 3) or (1, L, 3) voxel coordinates of ``image_key``'s grid) and writes
    ``mask_key`` ((L,) bool).
    """

    def __init__(self, points_key: str, image_key: str, mask_key: str = "loss_mask") -> None:
        super().__init__([points_key])
        self.points_key, self.image_key, self.mask_key = points_key, image_key, mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        points = _plain(d[self.points_key]).reshape(-1, 3)
        d[self.mask_key] = points_in_volume(points, tuple(d[self.image_key].shape[1:]))
        return d


class LandmarkHeatmapd(MapTransform):
    """Gaussian heatmap targets of the landmarks in the loss mask (all-zero heatmaps for the others).

    Reads ``points_key`` ((L, 3) or (1, L, 3) voxel coordinates of ``image_key``'s grid) and
    ``mask_key`` (from :class:`LandmarkMaskd`), writes ``heatmap_key`` ((L, D, H, W) float32).

    Args:
        points_key: key of the voxel coordinates.
        image_key: key of the image whose spatial size the heatmaps take.
        sigma: Gaussian standard deviation in voxels.
        heatmap_key: output key of the heatmaps.
        mask_key: key of the loss mask.
    """

    def __init__(
        self,
        points_key: str,
        image_key: str,
        sigma: float,
        heatmap_key: str = "heatmap",
        mask_key: str = "loss_mask",
    ) -> None:
        super().__init__([points_key])
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.points_key, self.image_key, self.sigma = points_key, image_key, sigma
        self.heatmap_key, self.mask_key = heatmap_key, mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        points = _plain(d[self.points_key]).reshape(-1, 3)
        kept = torch.where(d[self.mask_key][:, None], points, torch.nan)
        d[self.heatmap_key] = gaussian_heatmaps(kept, tuple(d[self.image_key].shape[1:]), self.sigma)
        return d


_LOCAL_KEYS = ("local_image", "local_heatmap", "local_mask", "local_affine", "local_landmark")  # LocalPatchesd


class PackLandmarkSampled(MapTransform):
    """Final step: plain tensors for the network and the metrics, one fixed set of keys.

    Output keys: ``image`` (C, D, H, W) float32 plain tensor; ``affine`` (4, 4) float64 voxel-to-world
    of that image; ``landmarks_voxel`` (L, 3) float32; ``landmarks_world`` (L, 3) float64 RAS mm;
    ``present`` (L,) bool; ``loss_mask`` (L,) bool; ``case_id``; ``heatmap`` (L, D, H, W) float32
    when the chain made heatmaps; and the coarse-to-fine local patches (``local_image``, ``local_heatmap``,
    ``local_mask``, ``local_affine``, ``local_landmark``) when the chain drew them.
    """

    def __init__(self, image_key: str = "image", points_key: str = "landmarks_voxel") -> None:
        super().__init__([image_key, points_key])
        self.image_key, self.points_key = image_key, points_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        image = data[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"'{self.image_key}' must be a MetaTensor carrying its affine")
        world = _plain(data["landmarks_world"]).reshape(-1, 3).to(torch.float64)
        sample = {
            "image": image.as_tensor().float(),
            "affine": image.affine.to(torch.float64).clone(),
            "landmarks_voxel": _plain(data[self.points_key]).reshape(-1, 3).float(),
            "landmarks_world": world,
            "present": torch.isfinite(world).all(dim=-1),
            "loss_mask": data["loss_mask"],
            "case_id": data["case_id"],
        }
        for key in ("heatmap", *_LOCAL_KEYS):
            if key in data:
                sample[key] = data[key]
        return sample


class PackInferenced(MapTransform):
    """Final step of the inference chain: the whole prepared scan, still carrying its affine.

    Output keys: ``image`` (MetaTensor (1, D, H, W) float32, the network's input grid, affine to world);
    ``source`` (MetaTensor, the normalised RAS volume for the local stage) when ``source_key`` is given;
    ``case_id``; and, ``with_landmarks``, ``landmarks_world`` (L, 3) float64 RAS mm with ``present`` (L,) bool.
    """

    def __init__(self, image_key: str = "image", source_key: str | None = None, with_landmarks: bool = True) -> None:
        super().__init__([image_key])
        self.image_key, self.source_key, self.with_landmarks = image_key, source_key, with_landmarks

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        image = data[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"'{self.image_key}' must be a MetaTensor carrying its affine")
        sample = {"image": image.float(), "case_id": data.get("case_id", "")}
        if self.source_key is not None:
            sample["source"] = data[self.source_key].float()
        if self.with_landmarks:
            world = _plain(data["landmarks_world"]).reshape(-1, 3).to(torch.float64)
            sample["landmarks_world"] = world
            sample["present"] = torch.isfinite(world).all(dim=-1)
        return sample
