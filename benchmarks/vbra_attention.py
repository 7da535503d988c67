"""Volumetric bi-level routing attention (h3de ``VolumetricBRA``) against the reference formulation.

The reference is the BiFormer / H3DE-Net formulation written out below with the SAME module weights:
routed k and v gathered per region by ``torch.gather`` from (B, R, R, T, C) expanded views into
(B, R, topk, T, C), then explicit ``softmax((q * scale) @ k^T) @ v``, keeping the full
(B R, heads, T, topk T) attention matrix. Both compute the qkv projection on the token grid, the same
local context enhancement and the same output projection, so they differ only in routing, gathering and
attention. Measured: forward + backward of the whole module (input and parameter gradients), batch 1,
fp32, every measurement in fresh processes (the method is described in the written markdown). Rewrites
benchmarks/vbra_attention.md and benchmarks/vbra_scaling.svg; takes about seven minutes.

    .venv/bin/python benchmarks/vbra_attention.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from h3de.networks.attention import VolumetricBRA, route_regions

HERE = Path(__file__).parent
MiB = 2**20
STAGES = [  # name, token grid, width, topk, region option: H3DE-Net's first two stages for a 128x128x64 input
    ("stage 1", (32, 32, 16), 64, 1, {"region_grid": (4, 4, 2)}),
    ("stage 2", (16, 16, 8), 128, 4, {"region_grid": (4, 4, 2)}),
]
ROUNDS, LOOPS = 3, 7  # timing of the stages: processes per implementation, timed loops per process
SCALES = [1.0, 1.5, 2.0]  # per-axis scale of the stage-1 token grid: voxel count x1, x3.375, x8
MODES = {
    "fixed count 4x4x2": {"region_grid": (4, 4, 2)},
    "fixed size 8x8x8": {"region_grid": None, "region_size": (8, 8, 8)},
}


def reference_vbra(module: VolumetricBRA, x: torch.Tensor) -> torch.Tensor:
    """The reference formulation with ``module``'s weights; the input must be whole regions."""
    B, D, H, W, C = x.shape
    (Rd, Rh, Rw), _ = module.region_layout((D, H, W))
    d, h, w = D // Rd, H // Rh, W // Rw
    R, T, topk = Rd * Rh * Rw, d * h * w, module.topk
    heads, e = module.num_heads, C // module.num_heads
    scale = module.scale
    q, k, v = module.qkv(x).chunk(3, dim=-1)  # 3 x (B, D, H, W, C), as in the module
    lepe = module.lce(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # (B, D, H, W, C), as in the module
    # BiFormer's 'n (j h) (i w) c -> n (j i) (h w) c', in 3D
    q_pix, k_pix, v_pix = (
        t.reshape(B, Rd, d, Rh, h, Rw, w, C).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, R, T, C) for t in (q, k, v)
    )  # 3 x (B, R, T, C)
    # routing (not differentiated), as BiFormer's TopkRouting with diff_routing=False
    q_win, k_win = q_pix.mean(2).detach(), k_pix.mean(2).detach()  # (B, R, C)
    r_idx = torch.topk((q_win * scale) @ k_win.transpose(-2, -1), k=topk, dim=-1).indices  # (B, R, topk)
    # BiFormer's KVGather: gather from the (B, R, R, T, C) expanded view, for k and for v
    index = r_idx.view(B, R, topk, 1, 1).expand(-1, -1, -1, T, C)
    k_sel, v_sel = (
        torch.gather(t.view(B, 1, R, T, C).expand(-1, R, -1, -1, -1), dim=2, index=index) for t in (k_pix, v_pix)
    )  # 2 x (B, R, topk, T, C)
    k_sel = k_sel.reshape(B * R, topk * T, heads, e).permute(0, 2, 3, 1)  # (B R, heads, e, kT)
    v_sel = v_sel.reshape(B * R, topk * T, heads, e).permute(0, 2, 1, 3)  # (B R, heads, kT, e)
    q_sel = q_pix.reshape(B * R, T, heads, e).permute(0, 2, 1, 3)  # (B R, heads, T, e)
    attn = (q_sel * scale) @ k_sel  # (B R, heads, T, kT)
    attn = torch.softmax(attn, dim=-1)
    out = attn @ v_sel  # (B R, heads, T, e)
    out = out.permute(0, 2, 1, 3).reshape(B, Rd, Rh, Rw, d, h, w, C)
    out = out.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, C)
    return module.proj(out + lepe)


def reference_bytes(case: dict) -> int:
    """Rough peak of the reference: three (B R, heads, T, kT) matrices and the expanded gather gradients."""
    module = VolumetricBRA(case["dim"], case["topk"], **case["regions"])
    (Rd, Rh, Rw), _ = module.region_layout(case["grid"])
    R, N = Rd * Rh * Rw, math.prod(case["grid"])
    T, topk = N // R, case["topk"]
    return 4 * (3 * R * module.num_heads * T * topk * T + R * R * T * 2 * case["dim"])


def vbra(module: VolumetricBRA, x: torch.Tensor) -> torch.Tensor:
    return module(x)


IMPLEMENTATIONS = {"vbra": vbra, "reference": reference_vbra}


def setup(case: dict) -> tuple[VolumetricBRA, torch.Tensor, torch.Tensor]:
    """The module (seeded weights), an input requiring a gradient and an output gradient."""
    torch.manual_seed(0)
    module = VolumetricBRA(case["dim"], case["topk"], **case["regions"])
    x = torch.randn(1, *case["grid"], case["dim"], requires_grad=True)
    return module, x, torch.randn_like(x)


def step(fn, module: VolumetricBRA, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One forward + backward; returns the output."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = fn(module, x)
    out.backward(grad)
    return out.detach()


def cpu_ticks() -> tuple[int, int, int]:
    """(all ticks, busy ticks of all processes, ticks of this process) since boot, in clock ticks."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(ticks), sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])  # utime + stime


def others_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of all cores that other processes kept busy between two ``cpu_ticks`` readings."""
    total, busy, own = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, busy - own) / max(1, total)


def wait_for_idle_cpu(timeout: float = 60.0) -> None:
    """Waits (up to ``timeout`` s) until other jobs leave the cores idle for three seconds in a row."""
    start, quiet = time.monotonic(), 0
    while quiet < 3 and time.monotonic() - start < timeout:
        before = cpu_ticks()
        time.sleep(1.0)
        quiet = quiet + 1 if others_share(before, cpu_ticks()) < 0.05 else 0


def time_worker(spec: dict) -> dict:
    """Times of one implementation, every case once per loop as a network runs its stages, and the share
    of the cores that other processes used meanwhile."""
    fn = IMPLEMENTATIONS[spec["impl"]]
    cases = [setup(case) for case in spec["cases"]]
    for _ in range(spec["warmup"]):
        for module, x, grad in cases:
            step(fn, module, x, grad)
    wait_for_idle_cpu()
    ms = [[] for _ in cases]
    before = cpu_ticks()
    for _ in range(spec["loops"]):
        for times, (module, x, grad) in zip(ms, cases, strict=True):
            start = time.perf_counter()
            step(fn, module, x, grad)
            times.append(1000 * (time.perf_counter() - start))
    return {"ms": ms, "others": others_share(before, cpu_ticks())}


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def allocator_peak(fn, module, x, grad) -> int:
    """Peak bytes of tensor memory live at once during one run, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, module, x, grad)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def memory_worker(spec: dict) -> dict:
    """Peak memory of one implementation on one case."""
    fn = IMPLEMENTATIONS[spec["impl"]]
    module, x, grad = setup(spec["case"])
    step(fn, module, x, grad)  # warm-up: one-time allocations (thread pools, kernel caches)
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
    rss_before = proc_kib("VmRSS")
    step(fn, module, x, grad)
    rss = 1024 * (proc_kib("VmHWM") - rss_before)
    return {"rss": rss, "alloc": allocator_peak(fn, module, x, grad)}


def check_worker(spec: dict) -> dict:
    """Largest differences of V-BRA's output, input gradient and parameter gradients from the reference."""
    module, x, grad = setup(spec["case"])
    results = {}
    for name, fn in IMPLEMENTATIONS.items():
        out = step(fn, module, x, grad)
        results[name] = [out, x.grad.clone(), *(p.grad.clone() for p in module.parameters())]
    diffs = [(a - b).abs().max().item() for a, b in zip(results["vbra"], results["reference"], strict=True)]
    q, k, _ = module.qkv(x).chunk(3, dim=-1)
    routes = route_regions(q, k, module.region_layout(x.shape[1:4])[0], module.topk)
    return {
        "out_diff": diffs[0],
        "grad_diff": diffs[1],
        "param_grad_diff": max(diffs[2:]),
        "key_regions": torch.unique(routes).numel(),  # distinct routed key regions
    }


WORKERS = {"time": time_worker, "memory": memory_worker, "check": check_worker}


def run_time_worker(**spec) -> dict:
    """A time worker, run again (twice at most) while other jobs used over 10% of the cores meanwhile;
    the least disturbed result."""
    results = [run_worker("time", **spec)]
    while results[-1]["others"] > 0.1 and len(results) < 3:
        results.append(run_worker("time", **spec))
    return min(results, key=lambda r: r["others"])


def run_worker(kind: str, **spec) -> dict:
    """Runs a worker in a fresh process; memory workers with glibc serving every allocation >= 64 KiB by
    mmap, so that freed tensors leave the resident set."""
    env = dict(os.environ)
    if kind == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} worker {spec} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shown = {k: [statistics.median(t) for t in v] if k == "ms" else v for k, v in result.items()}
    print(kind, spec.get("impl", ""), [c["grid"] for c in spec.get("cases", [spec.get("case")])], shown, flush=True)
    return result


def case_of(grid, dim: int, topk: int, regions: dict) -> dict:
    return {"grid": list(grid), "dim": dim, "topk": topk, "regions": regions}


def measure_stages() -> list[dict]:
    """Both stages, timed together in ROUNDS alternating processes per implementation."""
    cases = [case_of(*stage[1:]) for stage in STAGES]
    rounds = []  # per round: {impl: per case: list of ms}
    for _ in range(ROUNDS):
        rounds.append(
            {impl: run_time_worker(impl=impl, cases=cases, warmup=2, loops=LOOPS) for impl in IMPLEMENTATIONS}
        )
    others = max(result["others"] for r in rounds for result in r.values())
    rows = []
    for i, case in enumerate(cases):
        row = {"name": STAGES[i][0], "case": case, "others": others, **run_worker("check", case=case)}
        row["round_ratios"] = [
            statistics.median(r["vbra"]["ms"][i]) / statistics.median(r["reference"]["ms"][i]) for r in rounds
        ]
        for impl in IMPLEMENTATIONS:
            ms = [t for r in rounds for t in r[impl]["ms"][i]]
            row[impl] = {"ms": statistics.median(ms), **run_worker("memory", impl=impl, case=case)}
        rows.append(row)
    return rows


def measure_scaling() -> list[dict]:
    """Both region modes at the stage-1 grid scaled by SCALES per axis (width 64, top-1)."""
    rows, measured = [], {}
    for mode, regions in MODES.items():
        for s in SCALES:
            case = case_of((int(n * s) for n in STAGES[0][1]), 64, 1, regions)
            row = {"mode": mode, "scale": s, "case": case, "voxels": s**3}
            row["regions"], _ = VolumetricBRA(64, 1, **regions).region_layout(case["grid"])
            key = (tuple(case["grid"]), row["regions"])  # at scale 1 both modes have the same regions
            if key not in measured:
                measured[key] = measure_case(case)
            rows.append({**row, **measured[key]})
    return rows


def measure_case(case: dict) -> dict:
    """Times, peak memories and differences of both implementations on one case; the reference is left
    out where it would need more than 60% of the available memory."""
    result = {"reference": None}
    need, available = reference_bytes(case), mem_available()
    impls = ["vbra", "reference"] if need < 0.6 * available else ["vbra"]
    if len(impls) == 1:
        result["skip"] = f"skipped: needs ~{need / 2**30:.0f} GiB, {available / 2**30:.0f} GiB available"
    else:
        result.update(run_worker("check", case=case))
    for impl in impls:
        times = run_time_worker(impl=impl, cases=[case], warmup=1, loops=3)
        result[impl] = {"ms": statistics.median(times["ms"][0]), **run_worker("memory", impl=impl, case=case)}
        result["others"] = max(result.get("others", 0.0), times["others"])
    return result


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return 1024 * int(line.split()[1])
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def svg_plot(rows: list[dict], path: Path) -> None:
    """Two log-log panels (time, peak tensor memory) against the voxel-count factor."""
    series = [  # label, implementation, region mode, colour, dash pattern, line width (wider under narrower)
        ("V-BRA, fixed count", "vbra", "fixed count 4x4x2", "#c0392b", "none", 5),
        ("V-BRA, fixed size", "vbra", "fixed size 8x8x8", "#2471a3", "none", 2),
        ("reference, fixed count", "reference", "fixed count 4x4x2", "#c0392b", "6 4", 2),
        ("reference, fixed size", "reference", "fixed size 8x8x8", "#2471a3", "6 4", 2),
    ]
    panels = [("ms", 1, "forward + backward time (ms)"), ("alloc", MiB, "peak tensor memory (MiB)")]
    top, pw, ph = 40, 330, 280
    svg = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="900" height="420" font-family="sans-serif" font-size="12">',
        '<rect width="900" height="420" fill="white"/>',
    ]
    xs = sorted({row["voxels"] for row in rows})
    x_lo, x_hi = math.log(xs[0] / 1.2), math.log(xs[-1] * 1.2)
    for p, (key, unit, title) in enumerate(panels):
        x0 = 80 + p * (pw + 110)
        values = [row[impl][key] / unit for row in rows for impl in ("vbra", "reference") if row[impl]]
        y_lo, y_hi = math.log(min(values) / 1.5), math.log(max(values) * 1.5)

        def px(v: float, x0: int = x0) -> float:
            return x0 + pw * (math.log(v) - x_lo) / (x_hi - x_lo)

        def py(v: float, y_lo: float = y_lo, y_hi: float = y_hi) -> float:
            return top + ph - ph * (math.log(v) - y_lo) / (y_hi - y_lo)

        svg.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
        svg.append(f'<text x="{x0 + pw / 2}" y="{top - 12}" text-anchor="middle">{title}</text>')
        label = "voxel count (x the stage-1 grid 32x32x16)"
        svg.append(f'<text x="{x0 + pw / 2}" y="{top + ph + 36}" text-anchor="middle">{label}</text>')
        for v in xs:
            bottom = top + ph
            svg.append(f'<line x1="{px(v):.1f}" y1="{bottom}" x2="{px(v):.1f}" y2="{bottom + 5}" stroke="black"/>')
            svg.append(f'<text x="{px(v):.1f}" y="{top + ph + 18}" text-anchor="middle">{v:g}x</text>')
        ticks = [m * 10**e for e in range(-1, 7) for m in (1, 2, 5) if y_lo <= math.log(m * 10**e) <= y_hi]
        for v in ticks:
            svg.append(f'<line x1="{x0 - 5}" y1="{py(v):.1f}" x2="{x0 + pw}" y2="{py(v):.1f}" stroke="#ddd"/>')
            svg.append(f'<text x="{x0 - 8}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        for _, impl, mode, colour, dash, width in series:
            points = [(px(r["voxels"]), py(r[impl][key] / unit)) for r in rows if r["mode"] == mode and r[impl]]
            line = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
            style = f'fill="none" stroke="{colour}" stroke-width="{width}" stroke-dasharray="{dash}"'
            svg.append(f'<polyline points="{line}" {style}/>')
            svg.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in points)
    for i, (name, _, _, colour, dash, width) in enumerate(series):
        x, y = 80 + 200 * i, top + ph + 64  # legend: one row under the panels
        style = f'stroke="{colour}" stroke-width="{width}" stroke-dasharray="{dash}"'
        svg.append(f'<line x1="{x}" y1="{y}" x2="{x + 28}" y2="{y}" {style}/>')
        svg.append(f'<text x="{x + 34}" y="{y + 4}">{name}</text>')
    svg.append("</svg>")
    path.write_text("\n".join(svg) + "\n")


def _x(triple) -> str:
    return "x".join(map(str, triple))


def _mib(n: float) -> str:
    return f"{n / MiB:.0f}" if n >= 10 * MiB else f"{n / MiB:.1f}"


def stage_table(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Markdown rows comparing V-BRA with the reference at the two stages; per stage, whether the goals
    (time and both peak memories <= 0.5x the reference's) are met."""
    lines, met = [], []
    for row in rows:
        ref, mine, case = row["reference"], row["vbra"], row["case"]
        t, a, r = mine["ms"] / ref["ms"], mine["alloc"] / ref["alloc"], mine["rss"] / ref["rss"]
        met.append(f"{row['name']} {'yes' if max(t, a, r) <= 0.5 else 'no'}")
        lines.append(
            f"| {row['name']} | {_x(case['grid'])} | {case['dim']} | {case['topk']} | {ref['ms']:.1f} "
            f"| {mine['ms']:.1f} | **{t:.3f}** | {_mib(ref['alloc'])} | {_mib(mine['alloc'])} | **{a:.3f}** "
            f"| {_mib(ref['rss'])} | {_mib(mine['rss'])} | {r:.3f} | {row['out_diff']:.1e} "
            f"| {row['grad_diff']:.1e} | {row['param_grad_diff']:.1e} |"
        )
    return lines, met


def routing(rows: list[dict]) -> str:
    """'stage 1: 32 regions routed to 5 distinct key regions; ...'."""
    return "; ".join(
        f"{row['name']}: the {math.prod(row['case']['regions']['region_grid'])} regions route to "
        f"{row['key_regions']} distinct key regions (top-{row['case']['topk']})"
        for row in rows
    )


def round_ratios(rows: list[dict]) -> str:
    """'stage 1: 0.41, 0.43, 0.42; stage 2: ...': the time ratio of every round."""
    return "; ".join(f"{row['name']}: {', '.join(f'{r:.2f}' for r in row['round_ratios'])}" for row in rows)


def scaling_table(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        ref, mine = row["reference"], row["vbra"]
        if ref:
            diff = max(row["out_diff"], row["grad_diff"])
            ref_cells = (
                f"{ref['ms']:.0f} | {_mib(ref['alloc'])} | {mine['ms'] / ref['ms']:.2f} "
                f"| {mine['alloc'] / ref['alloc']:.3f} | {diff:.1e}"
            )
        else:
            ref_cells = f"{row['skip']} | | | |"
        lines.append(
            f"| {row['mode']} | {row['scale']:g} | {_x(row['case']['grid'])} | {row['voxels']:.3g} "
            f"| {_x(row['regions'])} | {mine['ms']:.0f} | {_mib(mine['alloc'])} | {_mib(mine['rss'])} "
            f"| {ref_cells} |"
        )
    return lines


def growth(rows: list[dict], mode: str, key: str) -> str:
    """V-BRA's cost at every scale relative to scale 1, e.g. '1.0x, 3.4x, 8.1x'."""
    series = [row["vbra"][key] for row in rows if row["mode"] == mode]
    return ", ".join(f"{v / series[0]:.1f}x" for v in series)


def main() -> None:
    load_before = Path("/proc/loadavg").read_text().split()[0]
    stage_rows = measure_stages()
    rows = measure_scaling()
    load_after = Path("/proc/loadavg").read_text().split()[0]
    svg_plot(rows, HERE / "vbra_scaling.svg")
    stage_lines, met = stage_table(stage_rows)
    size, count = "fixed size 8x8x8", "fixed count 4x4x2"
    cpu = platform.processor() or platform.machine()
    others = max(row["others"] for row in stage_rows + rows)
    lines = [
        "# Volumetric bi-level routing attention (V-BRA)",
        "",
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} {cpu} cores shared with other jobs, "
        f"torch {torch.__version__}, batch 1, fp32, head dim 8. Every number is forward + backward of the "
        "whole module (qkv projection, routing, attention, local context enhancement, output projection; "
        "input and parameter gradients). 1-minute load average "
        f"{load_before} at the start and {load_after} at the end (this benchmark itself adds up to 2).",
        "",
        "**Reference**: the BiFormer / H3DE-Net formulation, written in the benchmark with the same weights: "
        "routed k and v gathered per region by `torch.gather` from (B, R, R, T, C) expanded views into "
        "(B, R, topk, T, C) (whose backward materialises the expanded gradient), then explicit "
        "`softmax((q * scale) @ k^T) @ v` over the full (B R, heads, T, topk T) matrix. "
        "**V-BRA** (`h3de.networks.attention`): routed k and v gathered once per token by `index_select` "
        "from the token grid, attention by `F.scaled_dot_product_attention` (PyTorch's fused CPU flash "
        "kernel, which keeps no attention matrix), plain dense attention when topk equals the region "
        "count; with top-1 routing, when the query regions routed to one key region are on average two or "
        "more, each such group attends over its key region as one long query sequence (no k/v copy per "
        "query region, and the kernel runs faster on long sequences). Both share the qkv projection, the "
        "local context enhancement (`DepthwiseConv3d`, 5x5x5, on a channels-last view of V) and the output "
        "projection, so only routing, gathering and attention differ.",
        "",
        f"**Time**: median over {ROUNDS} rounds of one fresh process per implementation (alternating, so "
        "load from other jobs on the shared cores hits both alike), each running both stages one after "
        f"the other as the network does, {LOOPS} timed loops after 2 warm-up loops. Scaling cases: one "
        "process per case and implementation, median of 3 runs after one warm-up. Before timing, every "
        "process waits (up to 60 s) until other jobs leave the cores idle for 3 s; a process during whose "
        "timed runs other jobs used more than 10% of the cores is run again (twice at most) and the least "
        f"disturbed one kept: at most {100 * others:.0f}% of the cores went to other jobs in the kept "
        "ones.",
        "",
        "**Peak memory**, one fresh process per case and implementation: *tensor* = the peak of tensor "
        "memory live at once during one forward + backward, from `torch.profiler` with "
        "`profile_memory=True` (every allocation and free of the CPU allocator summed in time order; "
        "inputs and weights allocated before the run are not counted). *RSS* = the growth of the "
        "process's resident set over one run (`VmHWM` after resetting the high-water mark through "
        "`/proc/self/clear_refs`, minus `VmRSS` before), with glibc serving every allocation >= 64 KiB "
        "by mmap (`MALLOC_MMAP_THRESHOLD_=65536`) so freed tensors leave the resident set: a cross-check "
        "that also sees memory outside the torch allocator.",
        "",
        "## Ratio to the reference (goal: time and peak memory <= 0.5x)",
        "",
        "| stage | tokens | width | topk | ref ms | V-BRA ms | time ratio | ref tensor MiB "
        "| V-BRA tensor MiB | memory ratio | ref RSS MiB | V-BRA RSS MiB | RSS ratio "
        "| max abs diff: output | input grad | param grads |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *stage_lines,
        "",
        f"Goals met: **{', '.join(met)}**. 4x4x2 regions at both stages (regions of "
        "8x8x8 and 4x4x4 tokens). The diff columns compare V-BRA with the reference on the same input "
        "(fp32): output, input gradient and the largest parameter-gradient difference. Routing of the "
        f"benchmark input (random weights): {routing(stage_rows)}; V-BRA therefore takes its shared-key "
        "path at stage 1 (with all routes distinct it would take the gathered path, whose attention took "
        "about 13% longer at this shape while writing this benchmark). Time ratio of each "
        f"round (V-BRA median / reference median): {round_ratios(stage_rows)}. The ratio moves between "
        "whole runs on this shared virtual machine, by up to about 0.1 while writing this benchmark: "
        "V-BRA's time, dominated by the compute-bound fused attention kernel, moves more than the "
        "reference's, dominated by memory traffic.",
        "",
        "## Cost against input size",
        "",
        "The stage-1 token grid 32x32x16 (width 64, top-1) scaled by 1, 1.5 and 2 in EVERY axis, so the "
        "voxel (token) count grows 1x, 3.375x and 8x. Fixed count keeps 4x4x2 regions (of 8^3, 12^3 and "
        "16^3 tokens); fixed size keeps regions of 8x8x8 tokens (4x4x2, 6x6x3 and 8x8x4 of them). Ratios "
        "are V-BRA / reference. The reference is skipped where its estimated peak (three attention "
        "matrices and the expanded gather gradients, which grow with the square of the region count) "
        "exceeds 60% of the available memory.",
        "",
        "| mode | scale per axis | tokens | voxels | regions | V-BRA ms | V-BRA tensor MiB | V-BRA RSS MiB "
        "| ref ms | ref tensor MiB | time ratio | memory ratio | max abs diff |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *scaling_table(rows),
        "",
        f"Measured V-BRA growth at voxel counts 1x, 3.375x, 8x: fixed size: time {growth(rows, size, 'ms')}, "
        f"tensor memory {growth(rows, size, 'alloc')}; fixed count: time {growth(rows, count, 'ms')}, "
        f"tensor memory {growth(rows, count, 'alloc')}. Fixed size is linear in the volume: its memory "
        "and its attention work grow like the voxel count; its time per voxel rises somewhat at 8x, where "
        "every activation (33 MiB and more) outgrows the caches and glibc's 32 MiB mmap threshold, so each "
        "allocation page-faults and copies and zero-fills run from DRAM (a profile at 8x, taken while "
        "writing this benchmark: the attention kernel took 7-8x its 1x time, zero-fills and copies ~30x). "
        "Fixed count costs time quadratic in the volume (every region, and so every query's key set, grows "
        "with it) while V-BRA's memory stays linear (the fused kernel keeps no attention matrix). The "
        "reference's memory grows quadratically in both modes: attention matrices in fixed-count mode, the "
        "(B, R, R, T, C) gather gradients in fixed-size mode.",
        "",
        "![V-BRA scaling](vbra_scaling.svg)",
        "",
        "Reproduce: `.venv/bin/python benchmarks/vbra_attention.py`",
        "",
    ]
    text = "\n".join(lines)
    (HERE / "vbra_attention.md").write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, spec = args.worker
        print(json.dumps(WORKERS[kind](json.loads(spec))))
    else:
        main()
