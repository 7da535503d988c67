import dataclasses
import itertools
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from h3de.config import load_config
from h3de.data.datamodule import EpochSampler, LandmarkDataModule
from h3de.data.landmark_io import read_landmarks, write_landmarks
from h3de.data.manifest import load_manifest, write_manifest
from h3de.errors import DataWarning


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


def test_a_landmark_far_outside_its_image_is_named_once_and_kept_out_of_loss_and_metrics(blob_dataset):
    case = load_manifest(blob_dataset).cases[0]  # a training case
    names, positions = read_landmarks(case.landmarks)
    moved = positions.copy()
    moved[2, 0] += 500.0  # 'top', 500 mm to the right of its image
    write_landmarks(case.landmarks, names, moved)
    cfg = load_config(None, ["data.spacing_mm=[6,6,6]", "data.patch_size=[16,16,16]"]).data
    with pytest.warns(DataWarning) as caught:
        datamodule = LandmarkDataModule(cfg, blob_dataset, heatmaps=False)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]  # once, for this case
    assert message.startswith("case 'case_0': landmarks outside its image") and "'top' (" in message
    assert "treated as absent" in message and "'a_L'" not in message

    world = datamodule.records["train"][0]["landmarks_world"][0]
    assert torch.isnan(world[2]).all()
    np.testing.assert_allclose(world[[0, 1, 3]].numpy(), positions[[0, 1, 3]])
    sample = datamodule._dataset("train", True)[0]
    assert not sample["present"][2] and not sample["loss_mask"][2]  # out of the loss
    assert sample["present"][[0, 1, 3]].all()
    assert torch.isnan(datamodule.landmarks("train")[0, 2]).all()  # and of the metrics' ground truth
