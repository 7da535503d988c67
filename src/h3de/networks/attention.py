"""Volumetric bi-level routing attention (V-BRA), the attention of H3DE-Net ("H3DE-Net: Efficient and
Accurate 3D Landmark Detection in Medical Imaging"), extending BiFormer's bi-level routing attention
(https://arxiv.org/abs/2303.08810) from 2D to 3D.

The token grid is split into regions; every query region keeps the ``topk`` regions whose mean key is
most similar to its mean query (STEP 1, route; not differentiated), the tokens of those regions are
gathered (STEP 2) and the region's tokens attend over them only (STEP 3). Unlike the reference
implementation, the routed keys and values are gathered once per token (no (B, R, R, T, C) gradient in
the backward pass), attention runs through ``F.scaled_dot_product_attention`` (a fused kernel that
keeps no (B R, heads, T, topk T) attention matrix), and two exact shortcuts apply: dense attention when
every region is routed to, and for top-1 routing that sends several query regions to the same key
region, one long query sequence per key region instead of a copy of its keys per query region.

Tensors are channels-last inside the block: (B, D, H, W, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from h3de.networks.tracing import is_tracing

__all__ = ["ATTENTION_SCALES", "route_regions", "bi_level_routing_attention", "DepthwiseConv3d", "VolumetricBRA"]

ATTENTION_SCALES = ("head", "width")  # softmax scale head_dim^-0.5 or dim^-0.5 (VolumetricBRA)


def _check_triple(name: str, value: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(value) != 3 or any(int(v) != v or v < 1 for v in value):
        raise ValueError(f"{name}={tuple(value)} must be three integers >= 1")
    return (int(value[0]), int(value[1]), int(value[2]))


def _fmt(triple: tuple[int, ...]) -> str:
    return "x".join(str(t) for t in triple)


def route_regions(
    q: torch.Tensor,
    k: torch.Tensor,
    num_regions: tuple[int, int, int],
    topk: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """STEP 1 of V-BRA: the ``topk`` key regions of every query region, by the affinity of the regions'
    mean query and mean key. Not differentiated (the result is an integer index).

    Args:
        q: queries (B, D, H, W, C); each side divisible by ``num_regions``.
        k: keys (B, D, H, W, C).
        num_regions: regions per axis (Rd, Rh, Rw).
        topk: regions kept per query region, 1 <= topk <= R = Rd Rh Rw.
        valid: optional (B, D, H, W) bool, False for padded tokens: they are left out of the region
            means, and regions without a valid token are routed to last.

    Returns:
        (B, R, topk) int64 region indices (row-major over (Rd, Rh, Rw)), most similar first.
    """
    B, D, H, W, C = q.shape
    Rd, Rh, Rw = num_regions
    R = Rd * Rh * Rw
    grid = (B, Rd, D // Rd, Rh, H // Rh, Rw, W // Rw)
    with torch.no_grad():
        if valid is None:
            q_region = q.reshape(*grid, C).mean((2, 4, 6))  # (B, Rd, Rh, Rw, C)
            k_region = k.reshape(*grid, C).mean((2, 4, 6))  # (B, Rd, Rh, Rw, C)
        else:
            weight = valid.reshape(*grid, 1).to(q.dtype)  # (B, Rd, d, Rh, h, Rw, w, 1)
            count = weight.sum((2, 4, 6))  # (B, Rd, Rh, Rw, 1)
            q_region = (q.reshape(*grid, C) * weight).sum((2, 4, 6)) / count.clamp(min=1)
            k_region = (k.reshape(*grid, C) * weight).sum((2, 4, 6)) / count.clamp(min=1)
        affinity = q_region.reshape(B, R, C) @ k_region.reshape(B, R, C).transpose(1, 2)  # (B, R, R)
        if valid is not None:
            affinity.masked_fill_(count.reshape(B, 1, R) == 0, float("-inf"))
        return affinity.topk(topk, dim=-1).indices  # (B, R, topk)


def _region_token_index(
    size: tuple[int, int, int], num_regions: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    """(R, T) flat grid index of the T tokens of every region, regions and tokens row-major."""
    (D, H, W), (Rd, Rh, Rw) = size, num_regions
    index = torch.arange(D * H * W, device=device).view(Rd, D // Rd, Rh, H // Rh, Rw, W // Rw)
    return index.permute(0, 2, 4, 1, 3, 5).reshape(Rd * Rh * Rw, -1)  # (R, T)


def bi_level_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_regions: tuple[int, int, int],
    topk: int,
    num_heads: int,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Bi-level routing attention on a 3D token grid: every token attends, per head, over the tokens of
    the ``topk`` regions routed to its region (``route_regions``), with softmax scale ``scale`` (default
    head_dim^-0.5).

    With ``topk`` = R every token sees every token: this is dense attention and is computed as such. With
    ``topk`` = 1 and on average two or more query regions per routed key region, the query regions that
    share a key region attend over it as one query sequence (the same result, faster).

    Args:
        q: queries (B, D, H, W, C); each side divisible by ``num_regions``.
        k: keys (B, D, H, W, C).
        v: values (B, D, H, W, C).
        num_regions: regions per axis (Rd, Rh, Rw).
        topk: key regions per query region, 1 <= topk <= Rd Rh Rw.
        num_heads: attention heads; C must be divisible by it.
        valid: optional (B, D, H, W) bool mask of real tokens; False (padded) tokens are never keys and
            stay out of the routing, so the output at real tokens does not depend on their content.
        scale: the factor of q k^T before the softmax; None: head_dim^-0.5.

    Returns:
        (B, D, H, W, C), before local context enhancement and output projection.
    """
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (B, D, H, W, C) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, D, H, W, C = q.shape
    if not is_tracing():  # (int() would fix a traced region count, which grows with the input for region_size)
        num_regions = _check_triple("num_regions", num_regions)
    if D % num_regions[0] or H % num_regions[1] or W % num_regions[2]:
        raise ValueError(f"token grid {_fmt((D, H, W))} is not divisible by num_regions={_fmt(num_regions)}")
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the width C={C}")
    Rd, Rh, Rw = num_regions
    R, N, head_dim = Rd * Rh * Rw, D * H * W, C // num_heads
    T = N // R
    if not 1 <= topk <= R:
        raise ValueError(f"topk={topk} must be in [1, {R}] (the {_fmt(num_regions)} regions)")
    if valid is not None:
        if valid.shape != (B, D, H, W) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a (B, D, H, W) = {(B, D, H, W)} bool mask, got {tuple(valid.shape)}")
        if not is_tracing() and bool(valid.all()):
            valid = None  # nothing to mask: take the unmasked (faster) kernels

    if topk == R and not is_tracing():  # exported: R may grow with the input (region_size), so route
        # Every region routes to every region, so every query sees every key: dense attention.
        q_t, k_t, v_t = (t.reshape(B, N, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, e)
        mask = None if valid is None else valid.reshape(B, 1, 1, N)
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, scale=scale)  # (B, heads, N, e)
        return out.transpose(1, 2).reshape(B, D, H, W, C)

    # STEP 1: route between regions (no gradient)
    routes = route_regions(q, k, num_regions, topk, valid)  # (B, R, topk)
    key_regions = (routes + R * torch.arange(B, device=q.device).view(B, 1, 1)).view(B * R, topk)  # (B R, topk)

    # STEP 2 and 3 (in the helpers): gather the tokens of the routed regions, attend over them
    tokens = _region_token_index((D, H, W), num_regions, q.device)  # (R, T)
    tokens = (tokens + N * torch.arange(B, device=q.device).view(B, 1, 1)).view(B * R, T)  # (B R, T)
    flat = [t.reshape(B * N, C) for t in (q, k, v)]  # 3 x (B N, C)
    valid_flat = None if valid is None else valid.reshape(B * N)  # (B N)
    # on average >= 2 query regions per key region (data-dependent: never in an exported graph)
    if topk == 1 and not is_tracing() and 2 * torch.unique(key_regions).numel() <= B * R:
        out = _attend_shared_keys(*flat, tokens, key_regions[:, 0], num_heads, valid_flat, scale)  # (B R, T, C)
    else:
        out = _attend_gathered(*flat, tokens, key_regions, num_heads, valid_flat, scale)  # (B R, T, C)
    d, h, w = D // Rd, H // Rh, W // Rw
    return (
        out.view(B, Rd, Rh, Rw, d, h, w, C)
        .permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, Rd, d, Rh, h, Rw, w, C)
        .reshape(B, D, H, W, C)
    )


def _attend_gathered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: torch.Tensor,
    key_regions: torch.Tensor,
    num_heads: int,
    valid: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Every query region attends over the tokens of its routed regions, gathered per query region
    straight from the grid (one copy of k and v per routed region), as one batch of B R sequences.

    Args:
        q, k, v: flattened token grids (B N, C).
        tokens: (B R, T) index into B N of the tokens of every region.
        key_regions: (B R, topk) routed regions, indices into B R.
        num_heads: attention heads.
        valid: optional (B N) bool, False for tokens that are never keys.
        scale: softmax scale (None: head_dim^-0.5).

    Returns:
        (B R, T, C), regions in order.
    """
    (BR, T), C, topk = tokens.shape, q.shape[1], key_regions.shape[1]
    e = C // num_heads
    # STEP 2: gather the queries of every region and the keys / values of its routed regions
    q_sel = q.index_select(0, tokens.view(-1)).view(BR, T, num_heads, e).transpose(1, 2)  # (B R, heads, T, e)
    key_index = tokens[key_regions].view(-1)  # (B R topk T)
    k_sel, v_sel = (
        t.index_select(0, key_index).view(BR, topk * T, num_heads, e).transpose(1, 2) for t in (k, v)
    )  # (B R, heads, topk T, e)
    mask = None if valid is None else valid[key_index].view(BR, 1, 1, topk * T)
    # STEP 3: attend (fused kernel: no (B R, heads, T, topk T) matrix is kept)
    out = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, attn_mask=mask, scale=scale)  # (B R, heads, T, e)
    return out.transpose(1, 2).reshape(BR, T, C)


def _attend_shared_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: torch.Tensor,
    key_region: torch.Tensor,
    num_heads: int,
    valid: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Top-1 routing: the query regions routed to one key region attend over it as one long query
    sequence, so k and v are not copied per query region and the fused kernel runs on longer (faster)
    sequences. Same arguments as ``_attend_gathered``, with ``key_region`` (B R,); returns (B R, T, C)."""
    (BR, T), C = tokens.shape, q.shape[1]
    e = C // num_heads
    # STEP 2: gather the queries grouped by key region, and the keys / values of every key region once
    order = torch.argsort(key_region, stable=True)  # (B R) query regions grouped by key region
    keys, counts = torch.unique_consecutive(key_region[order], return_counts=True)  # (G,), (G,)
    q_sorted = q.index_select(0, tokens[order].view(-1))  # (B R T, C)
    key_index = tokens[keys].view(-1)  # (G T)
    k_used, v_used = (t.index_select(0, key_index).view(-1, T, num_heads, e).unbind(0) for t in (k, v))
    masks = [None] * len(keys) if valid is None else valid[key_index].view(-1, 1, 1, 1, T).unbind(0)
    # STEP 3: attend, one query sequence per key region
    outs = []
    for q_group, k_group, v_group, mask in zip(
        q_sorted.split((counts * T).tolist()), k_used, v_used, masks, strict=True
    ):
        out = F.scaled_dot_product_attention(
            q_group.view(1, -1, num_heads, e).transpose(1, 2),  # (1, heads, n T, e)
            k_group.unsqueeze(0).transpose(1, 2),  # (1, heads, T, e)
            v_group.unsqueeze(0).transpose(1, 2),  # (1, heads, T, e)
            attn_mask=mask,  # (1, 1, 1, T)
            scale=scale,
        )  # (1, heads, n T, e)
        outs.append(out.transpose(1, 2).reshape(-1, C))  # (n T, C)
    return torch.cat(outs).view(BR, T, C).index_select(0, torch.argsort(order))  # (B R, T, C)


class _DepthwiseConv3dFunction(torch.autograd.Function):
    """Depthwise 'same' Conv3d (stride 1, odd kernel) whose backward runs as two forward convolutions.

    Under CPU autocast (``bf16-mixed``) the backward runs in the forward's autocast state, so its convolutions
    cast the saved float32 weight to the bfloat16 of the input and gradient, as the forward's did.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        (B, C), p = x.shape[:2], weight.shape[-1] // 2
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # convolution with the flipped kernel
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=p, groups=C)
        if ctx.needs_input_grad[1]:  # correlation of the zero-padded input with the gradient as kernel
            x_all, grad_all = x.reshape(1, B * C, *x.shape[2:]), grad.reshape(B * C, 1, *grad.shape[2:])
            grad_weight = F.conv3d(x_all, grad_all, padding=p, groups=B * C)  # (1, B C, k, k, k)
            grad_weight = grad_weight.reshape(B, C, 1, *weight.shape[2:]).sum(0)  # (C, 1, k, k, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias


class DepthwiseConv3d(nn.Conv3d):
    """Depthwise Conv3d, stride 1, zero padding keeping the size; the same parameters and result as
    ``nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)``. On CPU its
    backward pass runs as two forward convolutions (input gradient: the flipped kernel; weight gradient:
    the output gradient as the kernel), several times faster than PyTorch's CPU backward; on other
    devices it is ``nn.Conv3d``.

    Args:
        channels: input and output channels.
        kernel_size: odd kernel side.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        if x.device.type != "cpu" or is_tracing():  # the two-convolution backward: measured (and faster) on CPU
            return super().forward(x)
        return _DepthwiseConv3dFunction.apply(x, self.weight, self.bias)


class VolumetricBRA(nn.Module):
    """V-BRA block attention: qkv projection, bi-level routing attention, local context enhancement (a
    depthwise Conv3d of V added to the attention output) and output projection. Any input size works:
    the token grid is padded at the end of every axis to whole regions, the padded tokens are masked out
    (they are never keys and stay out of the routing) and the output is cropped back.

    Args:
        dim: token width C.
        topk: key regions per query region.
        head_dim: channels per head; ``dim`` must be divisible by it (num_heads = dim / head_dim).
        region_grid: fixed region COUNT per axis (Rd, Rh, Rw); regions grow with the input, so the cost
            is quadratic in the volume. Default (4, 4, 2), H3DE-Net's grid at every stage.
        region_size: fixed region SIZE in tokens per axis; the region count grows with the input, so the
            cost is linear in the volume. Exactly one of ``region_grid`` / ``region_size`` is given
            (pass ``region_grid=None`` with ``region_size``).
        lce_kernel: odd kernel size of the local context enhancement; 0 disables it.
        qkv_bias: bias of the qkv projection.
        attention_scale: softmax scale of the token attention: "head" multiplies q k^T by head_dim^-0.5
            (the usual multi-head scale, BiFormer's refactored attention), "width" by dim^-0.5 (the original
            H3DE-Net and BiFormer legacy code, whose scale is qk_dim^-0.5 for the whole width: a softmax
            num_heads^0.5 times flatter). The routing (a top-k) does not depend on it.

    Raises:
        ValueError: bad widths, topk, region options or kernel; in fixed-size mode, forward raises when
            the input has fewer regions than ``topk``.
    """

    def __init__(
        self,
        dim: int,
        topk: int,
        head_dim: int = 8,
        region_grid: tuple[int, int, int] | None = (4, 4, 2),
        region_size: tuple[int, int, int] | None = None,
        lce_kernel: int = 5,
        qkv_bias: bool = True,
        attention_scale: str = "head",
    ) -> None:
        super().__init__()
        if attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"attention_scale '{attention_scale}' is not one of {', '.join(ATTENTION_SCALES)}")
        if head_dim < 1 or dim < 1 or dim % head_dim:
            raise ValueError(f"dim={dim} must be a positive multiple of head_dim={head_dim}")
        if topk < 1:
            raise ValueError(f"topk={topk} must be >= 1")
        if (region_grid is None) == (region_size is None):
            raise ValueError(
                f"give exactly one of region_grid={region_grid} and region_size={region_size} "
                "(pass region_grid=None with region_size)"
            )
        if region_grid is not None:
            region_grid = _check_triple("region_grid", region_grid)
            if topk > math.prod(region_grid):
                raise ValueError(
                    f"topk={topk} exceeds the {_fmt(region_grid)}={math.prod(region_grid)} regions of region_grid"
                )
        if region_size is not None:
            region_size = _check_triple("region_size", region_size)
        if lce_kernel < 0 or (lce_kernel and lce_kernel % 2 == 0):
            raise ValueError(f"lce_kernel={lce_kernel} must be 0 (off) or an odd size")
        self.dim, self.topk, self.num_heads = dim, topk, dim // head_dim
        self.scale = (head_dim if attention_scale == "head" else dim) ** -0.5
        self.region_grid, self.region_size = region_grid, region_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lce = DepthwiseConv3d(dim, lce_kernel) if lce_kernel else None
        self.proj = nn.Linear(dim, dim)

    def region_layout(self, size: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(regions per axis, padded token grid) for a (D, H, W) token grid.

        Divisions of non-negative numbers only: an exported graph's integer division truncates (ONNX ``Div``).
        """
        if self.region_grid is not None:
            regions = self.region_grid
            padded = tuple(r * ((s + r - 1) // r) for s, r in zip(size, regions, strict=True))
        else:
            regions = tuple((s + r - 1) // r for s, r in zip(size, self.region_size, strict=True))
            padded = tuple(n * r for n, r in zip(regions, self.region_size, strict=True))
            if self.topk > math.prod(regions):
                raise ValueError(
                    f"topk={self.topk} exceeds the {_fmt(regions)}={math.prod(regions)} regions of a "
                    f"{_fmt(size)} input with region_size={_fmt(self.region_size)}"
                )
        return regions, padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) -> (B, D, H, W, C)."""
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"input shape {tuple(x.shape)} must be (B, D, H, W, {self.dim})")
        B, D, H, W, C = x.shape
        regions, padded = self.region_layout((D, H, W))
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, D, H, W, C)
        lce = None
        if self.lce is not None:  # on the unpadded grid; v.permute is a channels-last (B, C, D, H, W) view
            lce = self.lce(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        valid = None
        if is_tracing() or padded != (D, H, W):  # exported: pad (maybe by nothing) whatever the size
            pd, ph, pw = (p - s for p, s in zip(padded, (D, H, W), strict=True))
            q, k, v = (F.pad(t, (0, 0, 0, pw, 0, ph, 0, pd)) for t in (q, k, v))  # 3 x (B, D', H', W', C)
            valid = torch.zeros(padded, dtype=torch.bool, device=x.device)
            valid[:D, :H, :W] = True
            valid = valid.expand(B, *padded)  # (B, D', H', W')
        out = bi_level_routing_attention(q, k, v, regions, self.topk, self.num_heads, valid, self.scale)
        if valid is not None:
            out = out[:, :D, :H, :W]  # (B, D, H, W, C)
        if lce is not None:
            out = out + lce
        return self.proj(out)
