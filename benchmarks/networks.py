"""Whole networks at the reference configuration: parameters, FLOPs, time and peak memory, side by side.

At a 1x1x128x128x64 input with 14 landmarks (the H3DE-Net paper's patch), this measures:

- H3DE-Net (anchor-free and anchor-based) at the published sizes ("reference" preset, 4x4x2 regions,
  top-k [1, 4, 16, 16]) with h3de's V-BRA;
- the same networks with every V-BRA computed by the reference gather-then-explicit-softmax
  formulation (``reference_vbra`` of benchmarks/vbra_attention.py, same weights), measured in the same
  process: the side-by-side reference run;
- the lean option of the anchor-free network: ``full_res_levels`` 1 and 0 run one or none of the two
  full-resolution decoder levels and upsample the heatmaps trilinearly instead;
- the comparison networks (U-Net and SwinUNETR at their config defaults).

The original H3DE-Net code itself is measured side by side in benchmarks/networks_vs_original.py.
Rewrites benchmarks/networks.md.

    .venv/bin/python benchmarks/networks.py
"""

from __future__ import annotations

import platform
import types

import torch
from report import write_report
from vbra_attention import reference_vbra

from h3de.config import load_config
from h3de.networks import network_params
from h3de.networks.attention import VolumetricBRA
from h3de.profile import ProfileResult, format_table, profile_network

INPUT, LANDMARKS, REPEATS = (128, 128, 64), 14, 3


def params_of(name: str) -> dict:
    loss = "anchor" if name == "h3de_net_anchor" else "spatial_ce"
    cfg = load_config(None, [f"model.name={name}", f"loss.name={loss}", f"data.patch_size={list(INPUT)}"])
    return dict(network_params(cfg.model))


def with_reference_attention(network: torch.nn.Module) -> torch.nn.Module:
    """Route every V-BRA module of ``network`` through the reference formulation (same weights)."""
    for module in network.modules():
        if isinstance(module, VolumetricBRA):
            module.forward = types.MethodType(reference_vbra, module)
    return network


def main() -> None:
    ours: list[ProfileResult] = []
    reference: list[ProfileResult] = []
    for name in ("h3de_net", "h3de_net_anchor"):
        ours.append(profile_network(name, params_of(name), INPUT, LANDMARKS, repeats=REPEATS))
        ref = profile_network(name, params_of(name), INPUT, LANDMARKS, repeats=REPEATS, wrap=with_reference_attention)
        ref.model = f"{name} (reference attention)"
        reference.append(ref)
    lean = []
    for levels in (1, 0):
        result = profile_network(
            "h3de_net", {**params_of("h3de_net"), "full_res_levels": levels}, INPUT, LANDMARKS, repeats=REPEATS
        )
        result.model = f"h3de_net (full_res_levels={levels})"
        lean.append(result)
    baselines = [profile_network(n, params_of(n), INPUT, LANDMARKS, repeats=REPEATS) for n in ("unet", "swin_unetr")]

    comparison = [
        "| network | time vs reference attention | memory vs reference attention |",
        "|---|---:|---:|",
    ]
    for o, r in zip(ours, reference, strict=True):
        comparison.append(
            f"| {o.model} | {o.forward_backward_s / r.forward_backward_s:.2f}x "
            f"| {o.peak_memory_gb / r.peak_memory_gb:.2f}x |"
        )
    lines = [
        "# Whole networks at the reference configuration",
        "",
        f"Input 1x1x{'x'.join(map(str, INPUT))}, {LANDMARKS} landmarks, fp32, {torch.get_num_threads()} torch "
        f"threads on {platform.machine()} CPU, torch {torch.__version__}. FLOPs by `torch.utils.flop_counter` "
        "(two per multiply-add, forward). Times: median of "
        f"{REPEATS} runs after a warm-up. Peak memory: tensor memory live at once during one forward+backward "
        "(`torch.profiler` memory events), above the model and input.",
        "",
        format_table([*ours, *reference, *lean, *baselines]),
        "",
        "`torch.utils.flop_counter` has no formula for the fused CPU attention kernel "
        "(`_scaled_dot_product_flash_attention_for_cpu`), so the h3de rows omit the attention's own FLOPs "
        "(about 5 GFLOPs: the difference to the reference-attention rows, whose explicit matmuls are counted).",
        "",
        "The `full_res_levels` rows are the lean option of the anchor-free network: the faithful decoder "
        "(`full_res_levels=2`, the h3de_net row) ends with two levels at strides 2 and 1, each fed by a skip "
        "computed from the input; with 1 or 0 of them, the heatmaps are upsampled trilinearly from stride 2 "
        "or 4. Their accuracy beside the faithful decoder: `phantom_h3de` (1 level) against "
        "`phantom_h3de_full_res` (2) in [phantom_accuracy.md](phantom_accuracy.md).",
        "",
        "## Goals: forward+backward time <= 1.0x and peak memory <= 0.8x of the reference",
        "",
        *comparison,
        "",
        "Against the original H3DE-Net code itself, measured side by side (separate processes, same input, "
        "threads and day): [networks_vs_original.md](networks_vs_original.md).",
        "",
        "Reproduce: `.venv/bin/python benchmarks/networks.py`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
