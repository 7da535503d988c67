"""``profile_network``: parameters, FLOPs, time and peak memory of any registry network.

FLOPs are counted by ``torch.utils.flop_counter`` (two FLOPs per multiply-add) for one forward pass.
Times are medians over repeats after a warm-up. Peak memory is the most tensor memory live at once
during one forward+backward pass, above what was allocated before it (model and input): on CUDA the
caching allocator's peak, on CPU the running sum of the allocator's allocation and free events
recorded by ``torch.profiler`` (``profile_memory=True``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from h3de.errors import H3deError
from h3de.networks import build_network

__all__ = ["ProfileResult", "profile_network", "peak_memory_bytes", "format_table"]


@dataclass
class ProfileResult:
    model: str
    input_size: tuple[int, ...]  # (B, C, D, H, W)
    parameters: int
    forward_gflops: float
    forward_s: float
    forward_backward_s: float
    peak_memory_gb: float  # forward + backward, above model and input
    device: str


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most tensor memory (bytes) live at once while ``fn`` runs, above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:  # allocations are positive, frees negative
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_network(
    name: str,
    params: Mapping[str, Any],
    input_size: Sequence[int],
    num_landmarks: int = 14,
    batch_size: int = 1,
    device: str = "cpu",
    repeats: int = 3,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> ProfileResult:
    """Profile the registry network ``name`` built from ``params`` on a random (B, 1, D, H, W) input.

    ``wrap`` may replace parts of the built network (e.g. a reference implementation to compare with).
    """
    if len(input_size) != 3 or any(s < 1 for s in input_size):
        raise H3deError(f"input size {list(input_size)} must be three positive integers D,H,W")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise H3deError("device 'cuda' requested but no CUDA device is available")
    torch.manual_seed(0)
    network = build_network(name, 1, num_landmarks, params)
    network = (wrap(network) if wrap is not None else network).to(dev)
    x = torch.randn(batch_size, 1, *input_size, device=dev)

    def forward():
        with torch.no_grad():
            network(x)

    def forward_backward():
        network(x).float().square().mean().backward()
        network.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(x)
    forward_backward()  # warm-up (allocations, kernel selection)
    peak = peak_memory_bytes(forward_backward, dev)
    return ProfileResult(
        model=name,
        input_size=tuple(x.shape),
        parameters=sum(p.numel() for p in network.parameters()),
        forward_gflops=counter.get_total_flops() / 1e9,
        forward_s=_median_seconds(forward, dev, repeats),
        forward_backward_s=_median_seconds(forward_backward, dev, repeats),
        peak_memory_gb=peak / 2**30,
        device=str(dev),
    )


def format_table(results: Sequence[ProfileResult]) -> str:
    """Markdown table of profile results."""
    lines = [
        "| model | input | params (M) | fwd GFLOPs | fwd (s) | fwd+bwd (s) | fwd+bwd peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        memory = f"{r.peak_memory_gb:.2f}"
        size = "x".join(map(str, r.input_size))
        lines.append(
            f"| {r.model} | {size} | {r.parameters / 1e6:.2f} | {r.forward_gflops:.1f} "
            f"| {r.forward_s:.3f} | {r.forward_backward_s:.3f} | {memory} |"
        )
    return "\n".join(lines)
