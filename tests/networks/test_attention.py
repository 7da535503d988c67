import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from h3de.networks import attention
from h3de.networks.attention import DepthwiseConv3d, VolumetricBRA, bi_level_routing_attention, route_regions


def region_of_tokens(size, num_regions) -> torch.Tensor:
    """(N,) region id of every token of a row-major (D, H, W) grid, regions row-major."""
    axes = [torch.arange(s) // (s // r) for s, r in zip(size, num_regions, strict=True)]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return ((d * num_regions[1] + h) * num_regions[2] + w).reshape(-1)


def naive_routing_attention(q, k, v, num_regions, topk, num_heads, valid=None):
    """Token-level reference: an (N, N) mask of the keys each query may see, then masked softmax."""
    B, D, H, W, C = q.shape
    N, R = D * H * W, math.prod(num_regions)
    region = region_of_tokens((D, H, W), num_regions)  # (N,)
    member = F.one_hot(region, R).to(q.dtype)  # (N, R)
    out = []
    for b in range(B):
        qb, kb, vb = (t[b].reshape(N, C) for t in (q, k, v))
        real = torch.ones(N, dtype=torch.bool) if valid is None else valid[b].reshape(N)
        weight = member * real[:, None]  # (N, R)
        count = weight.sum(0)
        q_mean = (weight.T @ qb) / count.clamp(min=1)[:, None]
        k_mean = (weight.T @ kb) / count.clamp(min=1)[:, None]
        affinity = (q_mean @ k_mean.T).detach().masked_fill(count == 0, float("-inf"))
        chosen = torch.zeros(R, R, dtype=torch.bool)
        chosen.scatter_(1, affinity.topk(topk, dim=-1).indices, True)
        allowed = chosen[region][:, region] & real[None, :]  # (N, N) query token -> key token
        e = C // num_heads
        heads = []
        for i in range(num_heads):
            s = qb[:, i * e : (i + 1) * e] @ kb[:, i * e : (i + 1) * e].T * e**-0.5
            heads.append(s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vb[:, i * e : (i + 1) * e])
        out.append(torch.cat(heads, -1).reshape(D, H, W, C))
    return torch.stack(out)


def module_reference(module, x, num_regions, padded):
    """The module computed with the naive attention on the zero-padded grid (padded tokens masked)."""
    B, D, H, W, C = x.shape
    qkv = module.qkv(x)
    pad = [p - s for p, s in zip(padded, (D, H, W), strict=True)]
    padded_qkv = F.pad(qkv, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    valid = torch.zeros(B, *padded, dtype=torch.bool)
    valid[:, :D, :H, :W] = True
    q, k, v = padded_qkv.chunk(3, -1)
    out = naive_routing_attention(q, k, v, num_regions, module.topk, module.num_heads, valid)[:, :D, :H, :W]
    if module.lce is not None:
        out = out + module.lce(qkv[..., 2 * C :].permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    return module.proj(out)


def test_all_regions_without_lce_is_dense_multi_head_attention():
    torch.manual_seed(0)
    module = VolumetricBRA(16, topk=8, head_dim=4, region_grid=(2, 2, 2), lce_kernel=0)
    x = torch.randn(2, 6, 4, 8, 16)
    q, k, v = module.qkv(x).reshape(2, -1, 3, 4, 4).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, 4)
    weights = (q @ k.transpose(-1, -2) / 2).softmax(-1)
    dense = module.proj((weights @ v).transpose(1, 2).reshape(2, 6, 4, 8, 16))
    torch.testing.assert_close(module(x), dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["grid", "size"])
@pytest.mark.parametrize("topk", [1, 3])
def test_routed_attention_equals_masked_token_reference(mode, topk):
    torch.manual_seed(1)
    regions = {"grid": {"region_grid": (2, 3, 2)}, "size": {"region_grid": None, "region_size": (2, 2, 3)}}
    module = VolumetricBRA(8, topk=topk, head_dim=4, **regions[mode]).double()
    x = torch.randn(2, 4, 6, 6, 8, dtype=torch.float64, requires_grad=True)
    out, expected = module(x), module_reference(module, x, (2, 3, 2), (4, 6, 6))
    torch.testing.assert_close(out, expected)
    # input gradients agree with the reference, whose routing is a constant mask
    grad = torch.randn_like(out)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, grad)[0] for y in (out, expected)))


@pytest.mark.parametrize(
    ("regions", "topk", "size", "num_regions", "padded"),
    [
        ({"region_grid": (2, 2, 3)}, 2, (5, 3, 7), (2, 2, 3), (6, 4, 9)),
        ({"region_grid": (4, 2, 2)}, 2, (5, 4, 3), (4, 2, 2), (8, 4, 4)),  # last d-regions are all padding
        ({"region_grid": None, "region_size": (3, 2, 4)}, 2, (7, 5, 6), (3, 3, 2), (9, 6, 8)),
        ({"region_grid": (2, 1, 2)}, 4, (3, 5, 3), (2, 1, 2), (4, 5, 4)),  # all regions: dense, masked
    ],
)
def test_any_input_size_pads_all_axes_and_masks_the_padding(regions, topk, size, num_regions, padded):
    torch.manual_seed(2)
    module = VolumetricBRA(8, topk=topk, head_dim=4, **regions).double()
    assert module.region_layout(size) == (num_regions, padded)
    x = torch.randn(2, *size, 8, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, module_reference(module, x, num_regions, padded))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("routing", ["shared", "distinct"])
def test_top1_shared_key_and_gathered_paths_equal_the_reference(routing, padded, monkeypatch):
    torch.manual_seed(6)
    q, k, v = torch.randn(3, 2, 4, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    region = region_of_tokens((4, 4, 2), (2, 2, 1)).view(4, 4, 2)
    if routing == "shared":  # every region's queries match region 3's keys best
        q_in, k_in = q + 5, k + 5 * (region == 3)[..., None]
    else:  # the queries of region r match the keys of region r best
        one_hot = 5 * F.one_hot(region, 8).to(q.dtype)
        q_in, k_in = q + one_hot, k + one_hot
    valid = torch.rand(2, 4, 4, 2) > 0.3 if padded else torch.ones(2, 4, 4, 2, dtype=torch.bool)
    calls = []
    shared_keys = attention._attend_shared_keys
    monkeypatch.setattr(attention, "_attend_shared_keys", lambda *a: calls.append(a) or shared_keys(*a))
    out = bi_level_routing_attention(q_in, k_in, v, (2, 2, 1), 1, 2, valid if padded else None)
    assert bool(calls) == (routing == "shared")  # both regions of a batch routed to one: shared-key path
    expected = naive_routing_attention(q_in, k_in, v, (2, 2, 1), 1, 2, valid)
    torch.testing.assert_close(out[valid], expected[valid])
    grad = torch.randn_like(out) * valid[..., None]
    grads, expected_grads = (torch.autograd.grad(y, (q, k, v), grad) for y in (out, expected))
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_padded_content_does_not_change_real_tokens():
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 2, 4, 6, 4, 8, dtype=torch.float64)
    valid = torch.ones(2, 4, 6, 4, dtype=torch.bool)
    valid[:, 3], valid[0, :, 5], valid[1, :, :, 2:] = False, False, False
    out = bi_level_routing_attention(q, k, v, (2, 3, 2), 2, 2, valid)
    noisy = [torch.where(valid[..., None], t, 100 * torch.randn_like(t)) for t in (q, k, v)]
    out_noisy = bi_level_routing_attention(*noisy, (2, 3, 2), 2, 2, valid)
    torch.testing.assert_close(out[valid], out_noisy[valid])
    naive = naive_routing_attention(q, k, v, (2, 3, 2), 2, 2, valid)
    torch.testing.assert_close(out[valid], naive[valid])  # fully padded query regions route on ties


def test_parameters_get_finite_gradients_and_routing_is_not_differentiated():
    torch.manual_seed(4)
    module = VolumetricBRA(16, topk=2, head_dim=8, region_grid=(2, 2, 2))
    x = torch.randn(2, 5, 4, 6, 16, requires_grad=True)
    out = module(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    q, k, v = torch.randn(3, 1, 4, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    routes = route_regions(q, k, (2, 2, 1), 2)
    assert routes.dtype == torch.int64 and routes.shape == (1, 4, 2)
    # the numerical gradient (routing piecewise constant) equals the analytical one: no gradient flows
    # through the region means that drive the routing
    assert torch.autograd.gradcheck(
        lambda *t: bi_level_routing_attention(*t, (2, 2, 1), 2, 2), (q, k, v), fast_mode=True
    )


@pytest.mark.parametrize(("batch", "size", "kernel"), [(2, (5, 6, 7), 5), (1, (3, 4, 2), 3), (3, (4, 2, 3), 1)])
def test_depthwise_conv_equals_torch_conv3d_with_its_fast_backward(batch, size, kernel):
    torch.manual_seed(5)
    conv = DepthwiseConv3d(3, kernel).double()
    torch_conv = nn.Conv3d(3, 3, kernel, padding=kernel // 2, groups=3).double()
    torch_conv.load_state_dict(conv.state_dict())
    x = torch.randn(batch, 3, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(batch, 3, *size, dtype=torch.float64)
    out, torch_out = conv(x), torch_conv(x)
    torch.testing.assert_close(out, torch_out)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)
    torch_grads = torch.autograd.grad(torch_out, [x, torch_conv.weight, torch_conv.bias], grad)
    for a, b in zip(grads, torch_grads, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="kernel_size=4 must be odd"):
        DepthwiseConv3d(3, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 12, "topk": 1, "head_dim": 8}, "dim=12 must be a positive multiple of head_dim=8"),
        ({"dim": 16, "topk": 0}, "topk=0 must be >= 1"),
        ({"dim": 16, "topk": 16, "region_grid": (4, 2, 1)}, r"topk=16 exceeds the 4x2x1=8 regions"),
        ({"dim": 16, "topk": 1, "region_grid": (4, 0, 2)}, r"region_grid=\(4, 0, 2\) must be three integers"),
        ({"dim": 16, "topk": 1, "region_grid": None, "region_size": (2, 2)}, r"region_size=\(2, 2\)"),
        ({"dim": 16, "topk": 1, "region_size": (2, 2, 2)}, "exactly one of region_grid=.*region_size="),
        ({"dim": 16, "topk": 1, "region_grid": None}, "exactly one of region_grid=None and region_size=None"),
        ({"dim": 16, "topk": 1, "lce_kernel": 4}, "lce_kernel=4 must be 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VolumetricBRA(**kwargs)


def test_fixed_size_mode_refuses_inputs_with_fewer_regions_than_topk():
    module = VolumetricBRA(8, topk=4, head_dim=4, region_grid=None, region_size=(4, 4, 4))
    assert module(torch.randn(1, 8, 8, 4, 8)).shape == (1, 8, 8, 4, 8)  # 2x2x1 = 4 regions
    with pytest.raises(ValueError, match="topk=4 exceeds the 2x1x1=2 regions of a 8x4x3 input"):
        module(torch.randn(1, 8, 4, 3, 8))
    with pytest.raises(ValueError, match=r"input shape \(1, 8, 8, 4, 6\) must be \(B, D, H, W, 8\)"):
        module(torch.randn(1, 8, 8, 4, 6))


def test_function_refuses_bad_grids():
    q = torch.randn(1, 4, 4, 4, 8)
    with pytest.raises(ValueError, match="token grid 4x4x4 is not divisible by num_regions=3x2x2"):
        bi_level_routing_attention(q, q, q, (3, 2, 2), 1, 2)
    with pytest.raises(ValueError, match=r"topk=9 must be in \[1, 8\]"):
        bi_level_routing_attention(q, q, q, (2, 2, 2), 9, 2)
    with pytest.raises(ValueError, match="num_heads=3 must be >= 1 and divide the width C=8"):
        bi_level_routing_attention(q, q, q, (2, 2, 2), 1, 3)


@pytest.mark.parametrize("topk", [1, 2, 8])  # shared keys, gathered, dense
def test_width_scale_is_the_head_scale_with_q_rescaled(topk):
    torch.manual_seed(0)
    heads, C = 4, 16
    q, k, v = (torch.randn(1, 4, 4, 4, C) for _ in range(3))
    width = bi_level_routing_attention(q, k, v, (2, 2, 2), topk, heads, scale=C**-0.5)
    head = bi_level_routing_attention(q * heads**-0.5, k, v, (2, 2, 2), topk, heads)  # default head_dim^-0.5
    torch.testing.assert_close(width, head, rtol=1e-5, atol=1e-6)
    assert (width - bi_level_routing_attention(q, k, v, (2, 2, 2), topk, heads)).abs().max() > 1e-3


def test_module_attention_scales_differ_by_the_q_rescaling():
    torch.manual_seed(0)
    width = VolumetricBRA(32, topk=2, head_dim=8, region_grid=(2, 2, 2), attention_scale="width")
    head = VolumetricBRA(32, topk=2, head_dim=8, region_grid=(2, 2, 2), attention_scale="head")
    head.load_state_dict(width.state_dict())
    assert width.scale == pytest.approx(32**-0.5) and head.scale == pytest.approx(8**-0.5)
    with torch.no_grad():  # q's rows of the projection times heads^-0.5 = 0.5
        head.qkv.weight[:32] *= 0.5
        head.qkv.bias[:32] *= 0.5
    x = torch.randn(2, 4, 6, 4, 32)
    torch.testing.assert_close(width(x), head(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention_scale 'qk'"):
        VolumetricBRA(32, topk=2, attention_scale="qk")


@pytest.mark.parametrize(("topk", "size"), [(1, (4, 4, 2)), (2, (5, 4, 3)), (8, (4, 4, 2))])  # shared, gathered, dense
def test_bf16_autocast_forward_and_backward_are_finite_and_near_float32(topk, size):
    """bf16-mixed on CPU: the depthwise convolution's own backward runs in the forward's autocast state (it once
    mixed the bfloat16 gradient with the float32 weight and crashed)."""
    torch.manual_seed(6)
    module = VolumetricBRA(16, topk=topk, head_dim=8, region_grid=(2, 2, 2), lce_kernel=3)
    x = torch.randn(2, *size, 16)
    target = torch.randn(2, *size, 16)

    def gradients(autocast: bool):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        loss = (out.float() - target).square().mean()
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in module.named_parameters()}

    loss32, grads32 = gradients(False)
    loss16, grads16 = gradients(True)
    assert torch.isfinite(loss16) and abs(loss16 - loss32) < 0.02 * loss32
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        cosine = F.cosine_similarity(grad.flatten(), grads32[name].flatten(), dim=0)
        assert cosine > 0.98, (name, cosine)
