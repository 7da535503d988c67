"""LightningDataModule over a manifest: validated cases, cached preprocessing, per-device batches."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from monai.data import CacheDataset
from torch.utils.data import DataLoader

from h3de.config import DataConfig, DetectionConfig, LocalStageConfig
from h3de.data.bounds import describe_outside, far_outside
from h3de.data.images import read_header
from h3de.data.manifest import Case, Manifest, load_manifest
from h3de.data.pipelines import build_inference_transforms, build_transforms
from h3de.data.sampling import EpochLoader, EpochSampler, SeededSamples
from h3de.errors import DataError, DataWarning, root_cause

__all__ = ["LandmarkDataModule", "check_case", "list_of_samples"]


def list_of_samples(samples: list[dict]) -> list[dict]:
    """Collate of inference batches: whole scans differ in size, so a batch is the list of its samples."""
    return list(samples)


def check_case(manifest: Manifest, case: Case) -> torch.Tensor:
    """Validate one case without reading the voxel data; return its (1, L, 3) world landmarks.

    A landmark more than :data:`~h3de.data.bounds.OUTSIDE_TOLERANCE_MM` outside its image (an LPS/RAS or
    voxel/mm mix-up, a landmark file of another scan) would poison the loss and the metrics: it is returned
    as absent (NaN), so that it counts neither in the position loss nor in the errors (and is trained as "not
    in this image", like one outside a training patch), with one :class:`~h3de.errors.DataWarning` per case
    that names the case and the landmarks.

    Raises:
        DataError: an image header that :func:`h3de.data.images.read_header` refuses (unreadable, not
            one 3D volume, bad spacing or affine), or a landmark file whose names disagree with the manifest.
    """
    header = read_header(case.image)
    positions = manifest.read_case_landmarks(case)
    message = describe_outside(case.id, manifest.landmark_names, header, positions)
    if message is not None:
        positions[far_outside(header, positions)] = np.nan
        warnings.warn(f"{message}; treated as absent (kept out of the loss and the metrics)", DataWarning, stacklevel=2)
    return torch.as_tensor(positions, dtype=torch.float64)[None]


class _CacheDataset(CacheDataset):
    """``CacheDataset`` whose cache filling stops cleanly at the first failing case.

    MONAI fills the cache in a ``multiprocessing.pool.ThreadPool``, whose exit does not wait for the items
    in flight: after one case fails, the others keep running in daemon threads. When the interpreter then
    exits (the CLI returning 2), those threads are torn down inside torch code and the process aborts
    ("terminate called without an active exception", exit 134). Here pending items are cancelled and
    running ones finish before the error propagates. A case loaded outside the cache (``cache_rate`` < 1)
    raises the H3deError behind MONAI's wrapping, as a cached one does.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else indices
        with ThreadPoolExecutor(self.num_workers or os.cpu_count()) as pool:  # as many threads as MONAI
            futures = [pool.submit(self._load_cache_item, i) for i in indices]
            try:
                return [future.result() for future in futures]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:
            cause = root_cause(e)
            if cause is e:
                raise
            raise cause from None


class LandmarkDataModule(L.LightningDataModule):
    """Train/val/test loaders of heatmap samples for the cases of a manifest.

    The manifest and every case (image header, landmark names) are validated at construction, so bad
    input stops before any output is written. ``cfg.batch_size`` is the global batch: each of the
    trainer's devices loads ``batch_size / world_size`` samples.

    Training batches are packed crops (:func:`~h3de.data.pipelines.build_transforms`); validation, test and
    :meth:`eval_dataloader` batches are lists of whole prepared scans
    (:func:`~h3de.data.pipelines.build_inference_transforms`) for :func:`h3de.inference.detect`.

    Args:
        cfg: the ``data`` section of the experiment config.
        manifest_path: overrides ``cfg.root / cfg.manifest``.
        heatmaps: add Gaussian heatmap targets to the samples (networks with heatmap output).
        detection: the ``detection`` section (default: whole-volume mode).
        local: the ``local`` section (coarse-to-fine only).
        seed: base of the training sample order when ``cfg.samples_per_epoch`` is set.
    """

    def __init__(
        self,
        cfg: DataConfig,
        manifest_path: str | Path | None = None,
        heatmaps: bool = True,
        detection: DetectionConfig | None = None,
        local: LocalStageConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg, self.heatmaps, self.detection, self.local, self.seed = cfg, heatmaps, detection, local, seed
        self.manifest = load_manifest(manifest_path or Path(cfg.root) / cfg.manifest)
        self.records = {split: self._records(split) for split in ("train", "val", "test")}
        self.datasets: dict[tuple[str, bool], CacheDataset] = {}  # (split, augmented) -> dataset
        self.batch_size_per_device = cfg.batch_size

    @property
    def landmark_names(self) -> list[str]:
        return list(self.manifest.landmark_names)

    def landmarks(self, split: str) -> torch.Tensor:
        """(N, L, 3) world mm landmarks of a split's cases (NaN = absent)."""
        return torch.cat([r["landmarks_world"] for r in self.records[split]]) if self.records[split] else torch.empty(0)

    def mean_position_baseline_mm(self, split: str = "val") -> float:
        """MRE (mm) of predicting every landmark at its mean training position: the landmarks' spread."""
        mean = torch.nanmean(self.landmarks("train"), dim=0)  # (L, 3)
        target = self.landmarks(split)
        errors = torch.linalg.vector_norm(target - mean, dim=-1)
        return torch.nanmean(errors).item()

    def _records(self, split: str) -> list[dict]:
        return [
            {"image": str(case.image), "landmarks_world": check_case(self.manifest, case), "case_id": case.id}
            for case in self.manifest.split(split)
        ]

    def check_world_size(self, world: int, splits: tuple[str, ...] = ("val",)) -> None:
        """Refuse ``world`` processes that cannot share the work: a global batch they do not divide, or an evaluated
        split with fewer cases than processes (each process scores its own cases, at least one)."""
        if self.cfg.batch_size % world:
            raise DataError(f"data.batch_size={self.cfg.batch_size} is not divisible by the device count ({world})")
        for split in splits:
            cases = len(self.records[split])
            if 0 < cases < world:
                raise DataError(
                    f"{self.manifest.path}: the '{split}' split has {cases} cases, fewer than the {world} processes "
                    "that share its evaluation: use fewer devices or more cases"
                )

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            world = self.trainer.world_size
            self.check_world_size(world, {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ()))
            self.batch_size_per_device = self.cfg.batch_size // world
        wanted = {
            "fit": (("train", True), ("val", False)),
            "validate": (("val", False),),
            "test": (("test", False),),
        }
        for split, augmented in wanted.get(stage, (("train", True), ("val", False), ("test", False))):
            self._dataset(split, augmented)

    def _dataset(self, split: str, augmented: bool) -> CacheDataset:
        if (split, augmented) in self.datasets:
            return self.datasets[split, augmented]
        if not self.records[split]:
            raise DataError(f"{self.manifest.path}: the '{split}' split has no cases")
        if augmented:
            permutation = self.manifest.mirror_permutation()
            transform = build_transforms(self.cfg, permutation, True, self.heatmaps, self.detection, self.local)
        else:
            transform = build_inference_transforms(self.cfg, self.detection)
        try:
            dataset = _CacheDataset(
                self.records[split],
                transform,
                cache_rate=self.cfg.cache_rate,
                num_workers=None,
                progress=False,
            )
        except Exception as e:
            cause = root_cause(e)
            if cause is e:
                raise
            raise cause from None
        self.datasets[split, augmented] = dataset
        return dataset

    def _loader(self, split: str, shuffle: bool, augmented: bool) -> DataLoader:
        """Batches of ``batch_size_per_device``; shuffled loaders are the training ones.

        A training loader draws ``cfg.samples_per_epoch`` samples an epoch (default: one pass over the split) through
        :class:`~h3de.data.sampling.EpochSampler`, each with its augmentation seeded by the sampler
        (:class:`~h3de.data.sampling.SeededSamples`): order and augmentation depend on the seed, the epoch and the
        sample's place in the epoch only, not on the loader workers (resumed runs continue them). In a multi-process
        run, an evaluation loader gives each process every ``world_size``-th case, unpadded.
        """
        dataset = self._dataset(split, augmented)
        workers = self.cfg.num_workers
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = None
        if shuffle:
            sampler = EpochSampler(len(dataset), self.cfg.samples_per_epoch or len(dataset), self.seed)
            dataset = SeededSamples(dataset)
        world = self.trainer.world_size if self.trainer is not None else 1
        if not shuffle and world > 1:
            # every case scored exactly once: process r takes cases r, r + world, ... (Lightning's DistributedSampler
            # would pad the shares to one length with repeated cases, counted twice in the metrics)
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        samples = len(sampler) if sampler is not None else len(dataset)
        return (EpochLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size_per_device,
            sampler=sampler,
            drop_last=shuffle and samples >= self.batch_size_per_device,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available() and augmented,
            collate_fn=None if augmented else list_of_samples,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, augmented=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, augmented=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, augmented=False)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Loader of any split's whole prepared scans, as lists of samples (used by evaluation)."""
        return self._loader(split, shuffle=False, augmented=False)
