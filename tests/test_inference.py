"""The one inference path: whole volume, sliding window and coarse-to-fine, on whole scans without ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from h3de.data.pipelines import build_inference_transforms
from h3de.evaluate import load_checkpoint
from h3de.inference import _LOCAL_BATCH, detect
from h3de.networks import LandmarkConditioned, available_networks, register_network
from h3de.targets import gaussian_heatmaps
from inference_helpers import save_checkpoint, write_one_blob

PROBE = ["model.name=intensity_probe", "loss=weighted_mse", "data.heatmap_sigma=1.0"]


def _detect(ckpt, image):
    module = load_checkpoint(ckpt)
    chain = build_inference_transforms(module.cfg.data, module.cfg.detection, with_landmarks=False)
    return detect(module, chain({"image": str(image), "case_id": "x"}))


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("whole", []),
        ("sliding_window", ["data.patch_size=[16,16,16]"]),
        (
            "coarse_to_fine",
            ["local.model.name=intensity_probe", "local.loss.name=weighted_mse", "local.spacing_mm=[1,1,1]"],
        ),
    ],
)
def test_landmarks_outside_the_training_crop_and_at_the_edge_are_found(tmp_path, mode, extra):
    # 96 mm of volume, a 32 mm training crop: both blobs lie outside the crop, one 1.5 voxels from the edge
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-40.0, 10.0, 5.0]
    overrides = [*PROBE, f"detection.mode={mode}", "data.spacing_mm=[2,2,2]", "data.patch_size=[16,16,16]", *extra]
    ckpt = save_checkpoint(tmp_path / "probe.ckpt", overrides, ["tip"])
    for voxel in ([85.3, 20.2, 30.7], [1.5, 48.6, 60.4]):
        world = write_one_blob(tmp_path, "case", affine, (96, 64, 64), voxel, sigma=2.5)
        found = _detect(ckpt, tmp_path / "images" / "case.nii.gz")
        error = np.linalg.norm(found.world[0].numpy() - world)
        assert error < (0.3 if mode == "coarse_to_fine" else 1.0), (mode, voxel, error)


def test_coarse_to_fine_refines_the_coarse_estimate(tmp_path):
    affine = np.diag([0.8, 0.8, 1.2, 1.0])
    overrides = [
        *PROBE,
        "detection.mode=coarse_to_fine",
        "data.spacing_mm=[6,6,6]",
        "local.model.name=intensity_probe",
        "local.loss.name=weighted_mse",
        "local.spacing_mm=[0.5,0.5,0.5]",
    ]
    ckpt = save_checkpoint(tmp_path / "c2f.ckpt", overrides, ["tip"])
    world = write_one_blob(tmp_path, "case", affine, (80, 80, 60), [41.37, 30.81, 22.45], sigma=2.0)
    found = _detect(ckpt, tmp_path / "images" / "case.nii.gz")
    coarse_error = np.linalg.norm(found.coarse_world[0].numpy() - world)
    fine_error = np.linalg.norm(found.world[0].numpy() - world)
    assert fine_error < 0.15 and fine_error < coarse_error / 3, (coarse_error, fine_error)


def test_a_sliding_window_covering_the_volume_equals_whole_volume_inference(tmp_path, blob_dataset):
    names = ["a_L", "a_R", "top", "front"]
    common = ["loss=weighted_mse", "model.unet.channels=[4,8]", "model.unet.strides=[2]", "data.spacing_mm=[3,3,3]"]
    whole = load_checkpoint(save_checkpoint(tmp_path / "w.ckpt", [*common, "data.patch_size=[40,40,40]"], names))
    sliding = load_checkpoint(
        save_checkpoint(
            tmp_path / "s.ckpt", [*common, "data.patch_size=[40,40,40]", "detection.mode=sliding_window"], names
        )
    )
    sliding.load_state_dict(whole.state_dict())
    image = str(blob_dataset.parent / "images" / "case_2.nii.gz")  # the oblique one: 40^3 covers it at 3 mm
    results = []
    for module in (whole, sliding):
        chain = build_inference_transforms(module.cfg.data, module.cfg.detection, with_landmarks=False)
        sample = chain({"image": image, "case_id": "c"})
        assert max(sample["image"].shape[1:]) <= 40
        results.append(detect(module, sample))
    assert torch.allclose(results[0].world, results[1].world, atol=1e-3)
    assert torch.allclose(results[0].presence, results[1].presence, atol=1e-5)


@pytest.mark.parametrize("loss", ["weighted_mse", "spatial_ce"])  # spatial_ce: per-landmark absent logits
def test_sliding_window_decodes_landmarks_in_chunks_within_the_memory_budget(tmp_path, blob_dataset, loss):
    names = ["a_L", "a_R", "top", "front"]
    common = [f"loss={loss}", "model.unet.channels=[4,8]", "model.unet.strides=[2]", "data.spacing_mm=[2,2,2]"]
    common += ["detection.mode=sliding_window", "data.patch_size=[16,16,16]"]
    roomy = load_checkpoint(save_checkpoint(tmp_path / "a.ckpt", common, names))
    # a budget that holds the maps of one landmark at a time (the volume is ~ 44 x 40 x 40 voxels at 2 mm)
    tight = load_checkpoint(save_checkpoint(tmp_path / "b.ckpt", [*common, "detection.max_heatmap_gib=0.0007"], names))
    tight.load_state_dict(roomy.state_dict())
    chain = build_inference_transforms(roomy.cfg.data, roomy.cfg.detection, with_landmarks=False)
    sample = chain({"image": str(blob_dataset.parent / "images" / "case_0.nii.gz"), "case_id": "c"})
    calls = []
    network = tight.network.forward
    tight.network.forward = lambda x: calls.append(1) or network(x)
    a, b = detect(roomy, sample), detect(tight, sample)
    windows = len(calls)
    assert torch.allclose(a.world, b.world, atol=1e-4) and torch.allclose(a.presence, b.presence, atol=1e-5)
    tight.network.forward = network
    calls.clear()
    tight.network.forward = lambda x: calls.append(1) or network(x)
    tight.cfg.detection.max_heatmap_gib = 1.0
    detect(tight, sample)
    assert windows >= 3 * len(calls)  # several chunks, each a full pass of windows


def test_coarse_to_fine_presence_is_the_mean_of_both_stages(tmp_path, blob_dataset):
    from h3de.data.patches import patch_affines, sample_patches

    names = ["a_L", "a_R", "top", "front"]
    overrides = ["model.unet.channels=[4,8]", "model.unet.strides=[2]", "data.spacing_mm=[3,3,3]"]
    overrides += ["data.patch_size=[16,16,16]", "detection.mode=coarse_to_fine", "local.patch_size=[12,12,12]"]
    overrides += ["local.model.unet.channels=[4,8]", "local.model.unet.strides=[2]"]
    module = load_checkpoint(save_checkpoint(tmp_path / "c.ckpt", overrides, names))
    chain = build_inference_transforms(module.cfg.data, module.cfg.detection, with_landmarks=False)
    sample = chain({"image": str(blob_dataset.parent / "images" / "case_0.nii.gz"), "case_id": "c"})
    found = detect(module, sample)
    with torch.no_grad():
        _, global_presence = module.readout.decode(module.network(sample["image"].as_tensor()[None]))
        size = (12, 12, 12)
        affines = patch_affines(found.coarse_world, module.cfg.local.spacing_mm, size)
        patches = sample_patches(sample["source"].as_tensor(), sample["source"].affine, affines, size)
        own = module.local_network(patches)[torch.arange(4), torch.arange(4)]
        _, local_presence = module.local_readout.decode(own[None])
    torch.testing.assert_close(found.presence, (global_presence[0] + local_presence[0]) / 2)
    assert not torch.allclose(global_presence, local_presence)


class AskedLandmarkProbe(nn.Module):
    """Ignores the image: a Gaussian at patch voxel (3 + l, c, c) for the landmark l whose gated channel is set."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        asked = x[:, 1:].abs().sum(dim=(2, 3, 4)).argmax(dim=1).float()  # (B,): the one channel not all zero
        middle = torch.full_like(asked, (x.shape[3] - 1) / 2)
        points = torch.stack([3 + asked, middle, middle], dim=-1)[:, None]  # (B, 1, 3)
        return self.gain * gaussian_heatmaps(points, tuple(x.shape[2:]), 1.0)


if "asked_landmark_probe" not in available_networks():
    register_network("asked_landmark_probe")(AskedLandmarkProbe)


def test_conditioned_local_stage_asks_each_patch_for_its_own_landmark(tmp_path):
    names = [f"l{i}" for i in range(_LOCAL_BATCH + 2)]  # two network calls
    overrides = [*PROBE, "detection.mode=coarse_to_fine", "data.spacing_mm=[4,4,4]", "data.patch_size=[16,16,16]"]
    overrides += ["local.design=conditioned", "local.model.name=asked_landmark_probe", "local.loss.name=weighted_mse"]
    overrides += ["local.patch_size=[16,16,16]"]
    module = load_checkpoint(save_checkpoint(tmp_path / "c.ckpt", overrides, names))
    assert isinstance(module.local_network, LandmarkConditioned)
    write_one_blob(tmp_path, "case", np.eye(4), (40, 40, 40), [20.3, 18.7, 21.1])
    chain = build_inference_transforms(module.cfg.data, module.cfg.detection, with_landmarks=False)
    sample = chain({"image": str(tmp_path / "images" / "case.nii.gz"), "case_id": "x"})
    sizes = []
    probe = module.local_network.network.forward
    module.local_network.network.forward = lambda x: sizes.append(len(x)) or probe(x)
    found = detect(module, sample)
    assert sizes == [_LOCAL_BATCH, 2]
    # landmark l read at patch voxel (3 + l, 7.5, 7.5) of its 1 mm RAS patch centred on its coarse estimate
    shift = torch.zeros(len(names), 3, dtype=torch.float64)
    shift[:, 0] = torch.arange(len(names)) + 3 - 7.5
    torch.testing.assert_close(found.world - found.coarse_world, shift, atol=1e-3, rtol=0)
