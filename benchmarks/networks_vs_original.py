"""H3DE-Net side by side with the original H3DE-Net code: time and peak memory, forward-only and forward+backward.

The original code (https://github.com/ECNUACRush/H3DE-Net, no licence: read and run, never copied here) is
imported from the path given on the command line. Its anchor-free network ``models.BiFormer_Unet.BiFormer_Unet``
(the network of its ``main_baseline.py``, 14 landmarks, default sizes) is measured beside h3de's anchor-free
``h3de_net`` (``reference`` preset, ``full_res_levels=2``). The packages the original imports but this
environment lacks (timm, fairscale, ml_collections, torchinfo) are replaced at run time by small stand-ins in
the measuring process (``_shim_original_imports``); the original's files are not changed.

Every measurement runs in a fresh process: build the network, one warm-up step, reset the kernel's peak-RSS
counter (``/proc/self/clear_refs``), one timed step; the process reports the step's wall time, its peak RSS
(``VmHWM``) and the RSS before the step (model, input, interpreter: "base"). Modes: forward under
``torch.inference_mode()`` (eval mode), and forward + backward of ``out.square().mean()`` (train mode, gradients
set to None before the step, so they are allocated inside it). The candidates alternate within each round.

Also, with no test depending on it: the original's bi-level routing attention with its weights copied into
h3de's ``VolumetricBRA`` (stage-1 and stage-2 sizes), max abs difference of the outputs for both
``attention_scale`` options.

    PYTHONPATH=src .venv/bin/python benchmarks/networks_vs_original.py /path/to/H3DE-Net [--repeats 5]

Rewrites benchmarks/networks_vs_original.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

INPUT, LANDMARKS = (128, 128, 64), 14
NETWORKS = ("original", "h3de")
MODES = ("forward", "forward+backward")
GIB = 2**30


def _shim_original_imports() -> None:
    """Stand-ins for the packages the original imports but does not need at these settings."""

    def stub(name: str, **attrs) -> None:
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module

    stub("timm")
    stub("timm.models")
    stub(
        "timm.models.layers",
        DropPath=lambda p: torch.nn.Identity(),  # the original uses drop_path 0, i.e. nn.Identity
        trunc_normal_=torch.nn.init.trunc_normal_,
        to_3tuple=lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v, v),
    )
    stub("fairscale")
    stub("fairscale.nn")
    stub("fairscale.nn.checkpoint", checkpoint_wrapper=lambda module: module)  # unused: no checkpointed stages
    stub("ml_collections")
    stub("torchinfo", summary=lambda *args, **kwargs: None)


def _import_original(path: str):
    _shim_original_imports()
    sys.path.insert(0, path)
    from models.BiFormer.bra_legacy import BiLevelRoutingAttention
    from models.BiFormer_Unet import BiFormer_Unet

    return BiFormer_Unet, BiLevelRoutingAttention


def build(network: str, original: str) -> torch.nn.Module:
    if network == "original":
        return _import_original(original)[0](n_class=LANDMARKS)
    from h3de.config import load_config
    from h3de.networks import build_network, network_params

    overrides = ["model.name=h3de_net", f"data.patch_size={list(INPUT)}", "model.h3de_net.full_res_levels=2"]
    cfg = load_config(None, overrides)
    return build_network("h3de_net", 1, LANDMARKS, dict(network_params(cfg.model)))


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(network: str, mode: str, original: str, threads: int) -> dict:
    """One step of ``network`` in ``mode`` in this (fresh) process: seconds, peak and base RSS in bytes."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(network, original)
    x = torch.randn(1, 1, *INPUT)

    def step() -> None:
        if mode == "forward":
            with torch.inference_mode():
                model(x)
        else:
            for p in model.parameters():
                p.grad = None
            model(x).square().mean().backward()

    model.eval() if mode == "forward" else model.train()
    step()  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_status("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": _proc_status("VmHWM"), "base": base}


def vbra_check(original: str) -> list[str]:
    """Max abs difference between the original's routing attention and h3de's V-BRA with its weights."""
    from h3de.networks.attention import VolumetricBRA

    original_bra = _import_original(original)[1]
    lines = []
    for dim, grid, topk in ((64, (32, 32, 16), 1), (128, (16, 16, 8), 4)):
        torch.manual_seed(0)
        theirs = original_bra(dim, num_heads=dim // 8, n_win=(4, 4, 2), qk_dim=dim, topk=topk, side_dwconv=5)
        x = torch.randn(1, *grid, dim)
        diffs = []
        for scale in ("head", "width"):
            ours = VolumetricBRA(dim, topk, head_dim=8, region_grid=(4, 4, 2), lce_kernel=5, attention_scale=scale)
            ours.qkv.load_state_dict(theirs.qkv.qkv.state_dict())
            ours.lce.load_state_dict(theirs.lepe.state_dict())
            ours.proj.load_state_dict(theirs.wo.state_dict())
            with torch.inference_mode():
                diffs.append((ours(x) - theirs(x)).abs().max().item())
        lines.append(f"| {dim} | {'x'.join(map(str, grid))} | {topk} | {diffs[0]:.1e} | {diffs[1]:.1e} |")
    return lines


# glibc's malloc otherwise raises its mmap threshold after the warm-up frees large blocks and keeps them in
# its heap, so that the RSS would neither drop after a step nor rise in the next one: large tensors are mmapped
# (and returned to the system when freed) with a fixed threshold
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def run_worker(args: list[str]) -> dict:
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _fmt(values: list[float], scale: float, digits: int) -> str:
    med = statistics.median(values) / scale
    return f"{med:.{digits}f} ({min(values) / scale:.{digits}f}-{max(values) / scale:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", help="path of a checkout of github.com/ECNUACRush/H3DE-Net")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("NETWORK", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--vbra-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.original, args.threads)))
        return
    if args.vbra_check:
        print(json.dumps(vbra_check(args.original)))
        return

    results = {(n, m): [] for n in NETWORKS for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            for network in NETWORKS:
                worker = ["--worker", network, mode, "--threads", str(args.threads), args.original]
                results[network, mode].append(run_worker(worker))
    check = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--vbra-check", args.original], check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )

    command = (
        "PYTHONPATH=src .venv/bin/python benchmarks/networks_vs_original.py <H3DE-Net checkout> "
        f"--repeats {args.repeats} --threads {args.threads}"
    )
    lines = [
        "# H3DE-Net against the original code, side by side",
        "",
        f"Command: `{command}`",
        "",
        f"Input 1x1x{'x'.join(map(str, INPUT))}, {LANDMARKS} landmarks, fp32, {args.threads} torch threads, "
        f"{platform.machine()} CPU, torch {torch.__version__}. original: `models.BiFormer_Unet.BiFormer_Unet` of "
        "github.com/ECNUACRush/H3DE-Net (its anchor-free network, default sizes); h3de: `h3de_net`, `reference` "
        "preset, `full_res_levels=2`. One fresh process per measurement (warm-up step, then one measured step); "
        f"{args.repeats} rounds, the candidates alternating within each. Median (min-max). Peak RSS: the "
        "process's `VmHWM` during the measured step; base: its RSS just before (interpreter, torch, model, "
        "input; in forward+backward the gradients are freed before the step); peak above base: what the step "
        "itself adds. Workers run with glibc's `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` at 1 MiB, so "
        "freed tensors leave the RSS (the same for both networks).",
        "",
        "| network | mode | time (s) | peak RSS (GiB) | base RSS (GiB) | peak above base (GiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for network in NETWORKS:
            r = results[network, mode]
            lines.append(
                f"| {network} | {mode} | {_fmt([v['seconds'] for v in r], 1, 3)} | "
                f"{_fmt([v['peak'] for v in r], GIB, 3)} | {_fmt([v['base'] for v in r], GIB, 3)} | "
                f"{_fmt([v['peak'] - v['base'] for v in r], GIB, 3)} |"
            )
    lines += [
        "",
        "Ratios h3de / original (medians; goal: peak memory <= 0.8x in both modes):",
        "",
        "| mode | time | peak RSS | peak above base |",
        "|---|---:|---:|---:|",
    ]
    for mode in MODES:
        ours, theirs = results["h3de", mode], results["original", mode]

        def ratio(key, ours=ours, theirs=theirs) -> str:
            return f"{statistics.median(map(key, ours)) / statistics.median(map(key, theirs)):.2f}x"

        lines.append(
            f"| {mode} | {ratio(lambda v: v['seconds'])} | {ratio(lambda v: v['peak'])} | "
            f"{ratio(lambda v: v['peak'] - v['base'])} |"
        )
    lines += [
        "",
        "## V-BRA with the original's weights",
        "",
        "The original's `BiLevelRoutingAttention` (4x4x2 regions, `qk_dim` = width, identity kv downsampling, "
        "5x5x5 local context) with its qkv, local-context and output weights copied into h3de's `VolumetricBRA`; "
        "max abs difference of the outputs on a standard-normal input, for both `attention_scale` options "
        "(the original's softmax scale is width^-0.5):",
        "",
        "| width | tokens | topk | head | width |",
        "|---:|---|---:|---:|---:|",
        *check,
        "",
    ]
    from report import write_report

    write_report(__file__, lines)


if __name__ == "__main__":
    main()
