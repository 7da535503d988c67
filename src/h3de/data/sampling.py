"""The training epoch's samples: which case, and the random state its augmentation is drawn with.

:class:`EpochSampler` yields ``(index, seed)`` pairs, both functions of ``(seed, epoch)`` and the sample's position
in the epoch; :class:`SeededSamples` seeds the random transforms of the dataset with the pair's seed just before
drawing that sample. A sample's augmentation therefore depends neither on the loader worker that draws it nor on
how many there are, nor on what was drawn before it, so a run with workers draws what one without draws, and a
resumed run what an uninterrupted one would. :class:`EpochLoader` makes sure the sampler is read for the right
epoch when the loader has workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, Randomizable
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochLoader", "EpochSampler", "SeededSamples"]


class EpochSampler(Sampler[tuple[int, int]]):
    """``num_samples`` (dataset index, transform seed) pairs per epoch: shuffled passes over the ``size`` items, the
    last pass cut short, each sample with a 32-bit seed of its own.

    Shuffled repeats rather than draws with replacement: every case is seen ``num_samples // size`` or one more
    times per epoch, so with few cases none is left out of an epoch by chance (with replacement, one of 2 cases
    would be missing from a 4-sample epoch 1 time in 8); repeats of a case differ through their seeds.

    The pairs depend only on ``(seed, epoch)``, so every DDP rank builds the same list: Lightning wraps this
    sampler in its ``DistributedSamplerWrapper`` (``use_distributed_sampler``, the default), which hands each rank
    every ``world_size``-th pair of that list (``num_samples / world_size`` each, padded up with repeats of the
    first pairs) and forwards ``set_epoch`` here, as Lightning also does without DDP. A sample's seed is that of its
    position in the epoch's list, whichever rank and loader worker draws it.

    Args:
        size: number of items in the dataset.
        num_samples: pairs drawn per epoch.
        seed: base of the per-epoch order and seeds.
    """

    def __init__(self, size: int, num_samples: int, seed: int = 0) -> None:
        self.size, self.num_samples, self.seed, self.epoch = size, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1 + self.num_samples)
        generator = torch.Generator().manual_seed(int(words[0]))
        passes = math.ceil(self.num_samples / self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])
        return zip(order[: self.num_samples].tolist(), words[1:].tolist(), strict=True)


class SeededSamples(Dataset):
    """The samples of ``dataset`` drawn as ``samples[(index, seed)]``: its random transforms draw from one generator
    seeded with ``seed``, then ``dataset[index]``.

    ``CacheDataset`` runs the chain from its first random transform on the cached result, in a fixed order, so one
    generator shared by every random transform (MONAI's ``set_random_state(state=...)``, which dictionary transforms
    pass on to the array transforms they wrap) and seeded per sample fixes every draw of the sample. Reseeding an
    existing generator costs microseconds, where a new ``RandomState`` per transform (``set_random_state(seed)``)
    costs a tenth of a millisecond each. Each loader worker holds its own copy of the transforms; the seed alone
    decides.
    """

    def __init__(self, dataset: CacheDataset) -> None:
        self.dataset, self.generator = dataset, np.random.RandomState()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        self.generator.seed(seed)
        _draw_from(self.dataset.transform, self.generator)  # also when another SeededSamples shares the dataset
        return self.dataset[index]


def _draw_from(transform: Any, generator: np.random.RandomState) -> None:
    """Make every random transform in ``transform`` (nested ``Compose`` included) draw from ``generator``."""
    if isinstance(transform, Compose):
        Randomizable.set_random_state(transform, state=generator)  # its own draws (OneOf, RandomOrder), not children's
        for child in transform.transforms:
            _draw_from(child, generator)
    elif isinstance(transform, Randomizable):
        transform.set_random_state(state=generator)


class EpochLoader(DataLoader):
    """A ``DataLoader`` whose iterations read the sampler at their first batch, not when their iterator is made.

    Lightning (2.6) makes the training iterator before it sets the sampler's epoch, and, when resuming, keeps it for
    the resumed epoch (Lightning-AI/pytorch-lightning#21938). Without workers the sampler is read lazily anyway; with
    workers, the iterator hands the workers their first indices as it is made, so a resumed run would draw epoch 0's
    samples in its first epoch. Here the workers' iteration starts at the first ``next``, after ``set_epoch``.
    """

    def __iter__(self) -> Iterator[Any]:
        return _Deferred(lambda: DataLoader.__iter__(self))


class _Deferred:
    """An iterator made by ``start`` at the first ``next``."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start, self._iterator = start, None

    def __iter__(self) -> _Deferred:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)
