import math
from types import SimpleNamespace

import pytest
import torch

from h3de.config import load_config, to_container
from h3de.geometry import voxel_to_world
from h3de.module import LandmarkModule
from h3de.networks import LandmarkConditioned
from h3de.targets import gaussian_heatmaps

NAMES = ["a", "b", "c"]
TINY = ["model.unet.channels=[4,8]", "model.unet.strides=[2]", "trainer.max_epochs=10"]


def module(*overrides):
    return LandmarkModule(to_container(load_config(None, [*TINY, *overrides])), NAMES)


def learning_rates(overrides, epochs=10, batches=1, accumulate=1):
    """The lr of each of ``epochs`` x ``batches / accumulate`` optimiser steps (the schedule steps per step)."""
    m = module(*overrides)
    steps_per_epoch = batches // accumulate
    m.trainer = SimpleNamespace(  # what configure_optimizers reads of the trainer
        estimated_stepping_batches=epochs * steps_per_epoch,
        num_training_batches=batches,
        accumulate_grad_batches=accumulate,
    )
    setup = m.configure_optimizers()
    assert setup["lr_scheduler"]["interval"] == "step"
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return optimizer, rates


@pytest.mark.parametrize(
    "name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimiser_from_config(name, cls):
    optimizer, rates = learning_rates([f"optim={name}", "optim.lr=0.01", "optim.weight_decay=0.001"], epochs=1)
    assert isinstance(optimizer, cls)
    assert rates[0] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.001


def test_schedules_from_config():
    _, cosine = learning_rates(["optim.scheduler=cosine", "optim.lr=1.0"])
    assert cosine[0] == pytest.approx(1.0) and cosine[5] == pytest.approx(0.5) and cosine == sorted(cosine)[::-1]
    _, exponential = learning_rates(["optim.scheduler=exponential", "optim.lr=1.0", "optim.gamma=0.5"])
    assert exponential[:3] == pytest.approx([1.0, 0.5, 0.25])
    _, constant = learning_rates(["optim.scheduler=constant", "optim.lr=0.3"])
    assert constant == pytest.approx([0.3] * 10)
    _, warm = learning_rates(["optim.scheduler=constant", "optim.lr=1.0", "optim.warmup_epochs=2"])
    assert warm[0] == pytest.approx(0.1) and warm[2:] == pytest.approx([1.0] * 8)


def test_schedules_keep_their_epoch_meaning_at_several_steps_an_epoch():
    """8 batches, accumulated by 2 = 4 optimiser steps an epoch, 3 epochs."""
    steps = {"epochs": 3, "batches": 8, "accumulate": 2}
    _, exponential = learning_rates(["optim.scheduler=exponential", "optim.lr=1.0", "optim.gamma=0.5"], **steps)
    assert exponential[::4] == pytest.approx([1.0, 0.5, 0.25]) and exponential[1] == pytest.approx(0.5**0.25)
    _, warm = learning_rates(["optim.scheduler=cosine", "optim.lr=1.0", "optim.warmup_epochs=1"], **steps)
    assert warm[:4] == pytest.approx([0.1, 0.325, 0.55, 0.775])  # linear over the first epoch's 4 steps
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # then down to 0 over the other 8
    assert warm[4:] == pytest.approx(cosine)


@pytest.mark.parametrize("loss", ["spatial_ce", "weighted_mse"])
def test_decode_maps_the_output_peak_to_world_mm(loss):
    m = module(f"loss={loss}")
    voxels = torch.tensor([[[3.3, 4.6, 5.1], [8.0, 2.2, 6.7], [5.5, 5.5, 5.5]]])
    heat = gaussian_heatmaps(voxels, (12, 12, 12), 1.5)
    output = heat.clamp_min(1e-20).log() if m.readout.criterion.log_domain else heat
    affine = torch.tensor([[0.0, 0.0, -2.0, 30.0], [1.5, 0.0, 0.0, -7.0], [0.0, 3.0, 0.0, 4.0], [0, 0, 0, 1.0]])
    decoded_voxels, world, presence = m.decode(output, affine[None].double())
    assert presence.shape == (1, 3) and (presence > 0).all()
    assert torch.allclose(decoded_voxels, voxels, atol=1e-3)
    assert world.dtype == torch.float64
    assert torch.allclose(world, voxel_to_world(voxels.double(), affine.double()), atol=1e-2)


def test_checkpoint_hyperparameters_rebuild_the_same_network():
    m = module("model.unet.channels=[4,8]")
    twin = LandmarkModule(m.hparams["config"], m.hparams["landmark_names"])
    twin.load_state_dict(m.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    assert torch.equal(m.eval()(x), twin.eval()(x))


def test_conditioned_local_stage_learns_each_patch_on_the_landmark_it_is_asked_for():
    m = module(
        "detection.mode=coarse_to_fine",
        "local.design=conditioned",
        "local.patch_size=[8,8,8]",
        "local.model.unet.channels=[4,8]",
        "local.model.unet.strides=[2]",
    )
    assert isinstance(m.local_network, LandmarkConditioned)
    drawn = torch.tensor([[0, 1, 2], [2, 0, 1]])  # (B, K): the landmark each patch is drawn for
    # only the asked landmark's target is read: every other one is NaN, so reading it would make the loss NaN
    heatmap = torch.full((2, 3, 3, 8, 8, 8), float("nan"))
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    for b in range(2):
        for k in range(3):
            heatmap[b, k, drawn[b, k]] = gaussian_heatmaps(torch.rand(1, 3) * 7, (8, 8, 8), 1.5)[0]
            mask[b, k, drawn[b, k]] = (b, k) != (1, 2)  # one asked landmark absent: a negative
    batch = {"local_image": torch.randn(2, 3, 1, 8, 8, 8), "local_heatmap": heatmap, "local_mask": mask}
    loss = m.local_step({**batch, "local_landmark": drawn})
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in m.local_network.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # the gated channels change the answer
        image = batch["local_image"][0, :1]
        assert not torch.allclose(m.local_network(image, torch.tensor([0])), m.local_network(image, torch.tensor([1])))
