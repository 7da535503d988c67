import dataclasses
import itertools
from collections import Counter

import lightning as L
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from h3de.config import load_config
from h3de.data.datamodule import EpochSampler, LandmarkDataModule
from h3de.data.manifest import load_manifest, write_manifest


def test_epoch_sampler_balances_cases_and_splits_over_ranks_like_lightning():
    sampler = EpochSampler(size=4, num_samples=10, seed=3)
    first = list(sampler)
    assert len(sampler) == 10 and sorted(Counter(first).values()) == [2, 2, 3, 3]  # 2 full passes + 2 of a third
    assert first == list(sampler)  # the order depends on (seed, epoch) only: the same on every DDP rank
    sampler.set_epoch(1)
    assert list(sampler) != first

    # what Lightning's use_distributed_sampler does with it on 2 ranks: disjoint halves of the same list, and
    # set_epoch forwarded to this sampler
    ranks = [
        DistributedSamplerWrapper(EpochSampler(4, 10, seed=3), num_replicas=2, rank=r, shuffle=False) for r in (0, 1)
    ]
    for wrapper in ranks:
        wrapper.set_epoch(1)
    shares = [list(w) for w in ranks]
    assert [len(s) for s in shares] == [5, 5]
    assert shares[0] == list(sampler)[0::2] and shares[1] == list(sampler)[1::2]


def _draw_training_images(manifest_path, num_workers=2):
    overrides = ["data.spacing_mm=[6,6,6]", "data.patch_size=[16,16,16]", "data.batch_size=1"]
    overrides += [f"data.num_workers={num_workers}", "data.samples_per_epoch=16"]
    overrides += ["data.augment.affine_prob=1", "data.augment.intensity_prob=1"]  # every draw continuous
    datamodule = LandmarkDataModule(load_config(None, overrides).data, manifest_path, heatmaps=False)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert len(loader) == 16  # samples_per_epoch / batch_size, from a split of one case
    return [batch["image"][0] for batch in loader], datamodule._dataset("train", False)[0]["image"]


def test_workers_draw_different_augmentations_reproducibly(blob_dataset, monkeypatch):
    """Two loader workers, one training case drawn 16 times: every draw is its own augmentation, and
    ``seed_everything(workers=True)`` replays them."""
    manifest = load_manifest(blob_dataset)
    one_train = tuple(c for c in manifest.cases if c.split != "train" or c.id == "case_0")
    write_manifest(blob_dataset.parent / "one.json", dataclasses.replace(manifest, cases=one_train))
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # restored after the test
        monkeypatch.setenv(name, "0")
    L.seed_everything(7, workers=True, verbose=False)
    images, cached = _draw_training_images(blob_dataset.parent / "one.json")
    assert len(images) == 16
    duplicates = [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(images), 2) if torch.equal(a, b)]
    assert duplicates == []
    assert not any(torch.equal(image, cached) for image in images)  # all augmented

    L.seed_everything(7, workers=True, verbose=False)
    again, _ = _draw_training_images(blob_dataset.parent / "one.json")
    assert all(torch.equal(a, b) for a, b in zip(images, again, strict=True))
