import dataclasses
import itertools

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader

from h3de.config import load_config
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.landmark_io import read_landmarks, write_landmarks
from h3de.data.manifest import load_manifest, write_manifest
from h3de.data.sampling import EpochLoader
from h3de.errors import DataWarning


def _draw_training_images(manifest_path, num_workers, epoch=0):
    overrides = ["data.spacing_mm=[6,6,6]", "data.patch_size=[16,16,16]", "data.batch_size=1"]
    overrides += [f"data.num_workers={num_workers}", "data.samples_per_epoch=16"]
    overrides += ["data.augment.affine_prob=1", "data.augment.intensity_prob=1"]  # every draw continuous
    datamodule = LandmarkDataModule(load_config(None, overrides).data, manifest_path, heatmaps=False)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert len(loader) == 16  # samples_per_epoch / batch_size, from a split of one case
    batches = iter(loader)  # made before set_epoch, as Lightning does when resuming (the workers wait for next())
    loader.sampler.set_epoch(epoch)
    return [batch["image"][0] for batch in batches], datamodule._dataset("train", False)[0]["image"]


def test_workers_draw_the_augmentations_of_a_run_without_workers(blob_dataset):
    """One training case drawn 16 times: every draw is its own augmentation, the same with 2 loader workers as
    without (each sample's transforms are seeded from its place in the epoch), and another in the next epoch."""
    manifest = load_manifest(blob_dataset)
    one_train = tuple(c for c in manifest.cases if c.split != "train" or c.id == "case_0")
    write_manifest(blob_dataset.parent / "one.json", dataclasses.replace(manifest, cases=one_train))
    images, cached = _draw_training_images(blob_dataset.parent / "one.json", num_workers=2)
    assert len(images) == 16
    duplicates = [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(images), 2) if torch.equal(a, b)]
    assert duplicates == []
    assert not any(torch.equal(image, cached) for image in images)  # all augmented

    without, _ = _draw_training_images(blob_dataset.parent / "one.json", num_workers=0)
    assert all(torch.equal(a, b) for a, b in zip(images, without, strict=True))
    next_epoch, _ = _draw_training_images(blob_dataset.parent / "one.json", num_workers=2, epoch=1)
    assert not any(torch.equal(a, b) for a, b in zip(images, next_epoch, strict=True))


def test_lightning_gives_each_rank_its_share_of_the_samples(blob_dataset):
    """What Lightning does to the training loader under DDP (use_distributed_sampler): a DistributedSamplerWrapper
    around the EpochSampler and a re-made EpochLoader per rank. The ranks' samples, interleaved, are the
    single-process run's, augmentation included."""
    cfg = load_config(None, ["data.spacing_mm=[6,6,6]", "data.patch_size=[16,16,16]", "data.batch_size=1"]).data
    datamodule = LandmarkDataModule(cfg, blob_dataset, heatmaps=False)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    single = [batch["image"] for batch in loader]
    shares = []
    for rank in (0, 1):
        sampler = _get_distributed_sampler(
            loader, _is_dataloader_shuffled(loader), overfit_batches=0, num_replicas=2, rank=rank
        )
        ranked = _update_dataloader(loader, sampler, RunningStage.TRAINING)
        assert isinstance(ranked, EpochLoader) and isinstance(ranked.sampler, DistributedSamplerWrapper)
        shares.append([batch["image"] for batch in ranked])
    assert len(single) == 4 and [len(s) for s in shares] == [2, 2]
    interleaved = [shares[rank][i] for i in range(2) for rank in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(single, interleaved, strict=True))


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
