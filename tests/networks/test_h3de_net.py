import pytest
import torch
import torch.nn.functional as F
from torch import nn

from h3de.anchors import ANCHOR_PRIOR, split_anchor_output
from h3de.config import load_config
from h3de.errors import ConfigError
from h3de.networks import build_network, check_network_input
from h3de.networks.attention import VolumetricBRA
from h3de.networks.blocks import DecoderBlock, FeatureFusion, PixelShuffle3d, SuperResolutionUp
from h3de.networks.h3de_net import stage_token_grids

TINY = {"preset": "tiny", "region_grid": None, "region_size": [2, 2, 2], "topk": [2, 2, 1, 1]}


def net(name="h3de_net", landmarks=3, **params):
    return build_network(name, 1, landmarks, {**TINY, **params})


@pytest.mark.parametrize("size", [(64, 32, 32), (40, 36, 28)])
def test_heatmap_head_keeps_the_input_size(size):
    out = net()(torch.randn(2, 1, *size))
    assert out.shape == (2, 3, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize("size, cells", [((64, 32, 32), (16, 8, 8)), ((40, 36, 28), (10, 9, 7))])
def test_anchor_head_outputs_stride_4_cells(size, cells):
    out = net("h3de_net_anchor", anchor_sizes=[0.5, 1.0])(torch.randn(1, 1, *size))
    assert out.shape == (1, 2 * 3 * 4, *cells) and torch.isfinite(out).all()


def test_anchor_head_starts_near_the_anchor_prior():
    out = net("h3de_net_anchor", anchor_sizes=[0.5, 1.0])(torch.randn(1, 1, 64, 32, 32))
    logits, _ = split_anchor_output(out, 3, 2)
    assert torch.sigmoid(logits).median().item() == pytest.approx(ANCHOR_PRIOR, rel=0.5)


@pytest.mark.parametrize("name", ["h3de_net", "h3de_net_anchor"])
def test_every_parameter_receives_a_gradient(name):
    network = net(name, fusion="sum")
    network(torch.randn(1, 1, 64, 32, 32)).square().mean().backward()
    missing = [n for n, p in network.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_ablation_switches_change_the_architecture():
    def count(network, cls):
        return sum(isinstance(m, cls) for m in network.modules())

    assert count(net(), VolumetricBRA) == 5  # tiny depths (1, 1, 2, 1)
    assert count(net(attention=False), VolumetricBRA) == 0
    assert count(net(), PixelShuffle3d) > 0 and count(net(upsample="trilinear"), PixelShuffle3d) == 0
    assert count(net(), FeatureFusion) == 1 and count(net(fusion="none"), FeatureFusion) == 0
    full, lean = net(), net(full_res_levels=0)
    assert sum(p.numel() for p in lean.parameters()) < sum(p.numel() for p in full.parameters())
    assert lean(torch.randn(1, 1, 64, 32, 32)).shape == (1, 3, 64, 32, 32)


def test_explicit_sizes_override_the_preset():
    network = net(widths=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    assert network.stages[3][0].mlp[0].in_features == 64 and len(network.stages[2]) == 1


def test_pixel_shuffle_3d_matches_a_direct_definition():
    x = torch.randn(2, 3 * 8, 2, 3, 4)
    y = PixelShuffle3d(2)(x)
    assert y.shape == (2, 3, 4, 6, 8)
    for c, d, h, w in [(0, 0, 0, 0), (2, 3, 5, 7), (1, 1, 4, 2)]:
        sub = (d % 2) * 4 + (h % 2) * 2 + (w % 2)  # channel c*8 + sub holds offset (d%2, h%2, w%2)
        assert y[1, c, d, h, w] == x[1, c * 8 + sub, d // 2, h // 2, w // 2]
    assert SuperResolutionUp(4, 5)(torch.randn(1, 4, 3, 3, 3)).shape == (1, 5, 6, 6, 6)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"topk": [1, 4, 16, 40], "region_grid": [4, 4, 2], "region_size": None}, "topk"),
        ({"widths": [12, 32, 64, 128]}, "widths[0]=12 is not divisible by head_dim=8"),
        ({"region_grid": [4, 4, 2], "region_size": [2, 2, 2]}, "region"),
        ({"upsample": "nearest"}, "upsample 'nearest'"),
        ({"fusion": "max"}, "fusion 'max'"),
        ({"preset": "huge"}, "preset 'huge'"),
        ({"depths": [1, 1, 1]}, "depths"),
    ],
)
def test_impossible_configs_are_refused_at_construction(params, fragment):
    with pytest.raises(ConfigError, match="model.h3de_net") as info:
        net(**params)
    assert fragment in str(info.value)


def test_region_grid_and_topk_checked_against_the_patch_size():
    assert stage_token_grids((128, 128, 64))[0] == (32, 32, 16)
    reference = {"preset": "reference", "region_grid": [4, 4, 2], "region_size": None}
    check_network_input("h3de_net", reference, (128, 128, 64))  # the published configuration works
    with pytest.raises(ConfigError, match=r"stage 4 \(stride 32\) has 2x2x2 tokens, fewer than the region_grid"):
        check_network_input("h3de_net", reference, (64, 64, 64))
    with pytest.raises(ConfigError, match=r"fewer than topk\[3\]=2"):
        check_network_input("h3de_net", {**TINY, "topk": [2, 2, 2, 2]}, (64, 64, 64))  # stage 4: 1 region
    with pytest.raises(ConfigError, match="data.patch_size"):
        load_config(None, ["model=h3de_net", "data.patch_size=[64,64,64]"])


def test_attention_scale_defaults_to_the_preset_and_an_explicit_value_wins():
    def scale(network):
        return network.stages[0][0].attn.scale

    assert scale(net()) == pytest.approx(8**-0.5)  # tiny: head_dim^-0.5
    assert scale(net(attention_scale="width")) == pytest.approx(16**-0.5)  # tiny stage 1 is 16 wide
    reference = build_network("h3de_net", 1, 3, {"preset": "reference"})
    assert scale(reference) == pytest.approx(64**-0.5)  # reference: the original code's width^-0.5
    assert scale(build_network("h3de_net", 1, 3, {"preset": "reference", "attention_scale": "head"})) == 8**-0.5
    with pytest.raises(ConfigError, match="attention_scale 'qk' is not one of head, width"):
        load_config(None, ["model=h3de_net", "model.h3de_net.attention_scale=qk"])


def test_decoder_block_equals_its_convolutions_over_the_concatenation():
    torch.manual_seed(0)
    block = DecoderBlock(8, 4, 6, norm="group")
    x, skip = torch.randn(2, 8, 3, 4, 5), torch.randn(2, 4, 6, 8, 10)
    explicit = nn.Sequential.forward(block.convs[0], torch.cat([block.up(x), skip], dim=1))
    torch.testing.assert_close(block(x, skip), block.convs[1](explicit), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the in-place norm and activation
        torch.testing.assert_close(block(x, skip), block.convs[1](explicit).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["concat", "sum"])
def test_feature_fusion_equals_project_resize_merge(mode):
    torch.manual_seed(0)
    fusion = FeatureFusion([4, 6, 8], 5, mode)
    if mode == "sum":
        nn.init.normal_(fusion.weights)
    features = [torch.randn(2, 4, 8, 8, 6), torch.randn(2, 6, 4, 4, 3), torch.randn(2, 8, 2, 2, 2)]
    resized = [
        F.interpolate(project(f), size=(8, 8, 6), mode="trilinear")
        for project, f in zip(fusion.inputs, features, strict=True)
    ]
    if mode == "concat":
        merged = torch.cat(resized, dim=1)
    else:
        merged = sum(w * r for w, r in zip(torch.softmax(fusion.weights, 0), resized, strict=True))
    torch.testing.assert_close(fusion(features), fusion.out(merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("full_res_levels", [2, 1])
def test_inference_and_recomputation_keep_outputs_and_gradients(full_res_levels):
    torch.manual_seed(0)
    plain = net(full_res_levels=full_res_levels, recompute_full_res=False)
    recomputed = net(full_res_levels=full_res_levels)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    outs = []
    for network in (plain, recomputed):
        out = network(x)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    with torch.inference_mode():  # in-place norms and activations, tensors freed early
        torch.testing.assert_close(plain(x), outs[0], rtol=1e-5, atol=1e-5)


def test_a_batch_without_gradients_gives_each_volumes_own_output():
    # the decoder's in-place GroupNorm once viewed a non-contiguous convolution output and failed: with 2 threads,
    # the CPU convolution returns a batch of 2 at this size in another memory layout
    model = build_network("h3de_net", 1, 3, {"preset": "tiny"}).eval()
    x = torch.randn(2, 1, 96, 64, 80)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[:1]), model(x[1:])])
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(together, alone, atol=1e-5)
