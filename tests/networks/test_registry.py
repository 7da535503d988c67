import pytest
import torch
from torch import nn

from h3de.errors import ConfigError
from h3de.networks import available_networks, build_network
from h3de.networks.baselines import PadToMultiple

UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance", "dropout": 0.0}


def test_unet_is_registered_and_maps_any_size_to_landmark_heatmaps():
    assert "unet" in available_networks()
    net = build_network("unet", 1, 5, UNET)
    for size in [(16, 16, 16), (13, 18, 11)]:
        out = net(torch.randn(2, 1, *size))
        assert out.shape == (2, 5, *size) and torch.isfinite(out).all()


def test_every_parameter_receives_a_gradient():
    net = build_network("unet", 1, 3, UNET)
    net(torch.randn(1, 1, 12, 12, 12)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_pad_to_multiple_is_identity_on_multiples_and_crops_back():
    conv = nn.Conv3d(1, 1, 3, padding=1)
    wrapped = PadToMultiple(conv, 4)
    x = torch.randn(1, 1, 8, 12, 16)
    assert torch.equal(wrapped(x), conv(x))
    y = torch.randn(1, 1, 9, 10, 7)
    out = wrapped(y)
    assert out.shape == y.shape
    # away from the padded border the result equals the unpadded convolution
    assert torch.allclose(out[..., 1:-1, 1:-1, 1:-1], conv(y)[..., 1:-1, 1:-1, 1:-1], atol=1e-6)


def test_unknown_network_and_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="model.name='resnet'.*known: .*unet"):
        build_network("resnet", 1, 2, {})
    with pytest.raises(ConfigError, match="model.unet: .*strides"):
        build_network("unet", 1, 2, {**UNET, "strides": [2]})


def test_swin_unetr_is_registered_and_accepts_any_size():
    net = build_network("swin_unetr", 1, 2, {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
    out = net(torch.randn(1, 1, 40, 36, 33))  # padded to 64^3: the deepest level keeps 2^3 voxels
    assert out.shape == (1, 2, 40, 36, 33) and torch.isfinite(out).all()
