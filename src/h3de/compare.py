"""``h3de compare``: a table and the validation MRE curves of finished runs, read from their run directories.

For each run directory (``config.yaml``, ``logs/metrics.csv``, ``checkpoints/``): the best ``val/mre_mm`` and
its epoch, the SDRs of that epoch, the network's parameter count and forward GFLOPs (one forward pass on
CPU at ``data.patch_size``, counted by ``torch.utils.flop_counter``, once per distinct network), the epochs
run, the training time (from the time ``config.yaml`` was written to that of ``checkpoints/last.ckpt``),
and the config values in which the runs differ. Written (atomically): ``compare.md``, ``compare.csv`` and
``val_mre.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from h3de.errors import H3deError
from h3de.io_utils import atomic_path, atomic_write, csv_text, removed_if_left_empty

__all__ = ["RunSummary", "CompareResult", "read_run", "compare"]


@dataclass
class RunSummary:
    run_dir: Path
    label: str  # name/timestamp
    config: dict
    val_mre_mm: list[tuple[int, float]]  # (epoch, val MRE) per validation
    best_val_mre_mm: float | None
    best_epoch: int | None
    sdr: dict[str, float]  # val/sdr_<r>mm of the best epoch, in %
    epochs: int
    train_seconds: float | None
    parameters: int | None = None
    gflops: float | None = None
    differs: dict[str, str] = field(default_factory=dict)


@dataclass
class CompareResult:
    runs: list[RunSummary]
    table: str  # markdown
    out_dir: Path | None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_run(run_dir: str | os.PathLike) -> RunSummary:
    """Read one run directory written by ``h3de train``.

    Raises:
        H3deError: not a folder, or no ``config.yaml`` (not a run directory), or an unreadable one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise H3deError(f"{run_dir}: not a folder (give run directories written by h3de train)")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise H3deError(f"{run_dir}: not a run directory of h3de train (it has no config.yaml)")
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path))
    except Exception as e:  # yaml errors of many classes
        raise H3deError(f"{config_path}: not readable YAML ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise H3deError(f"{config_path}: not an h3de config (the top level is not a mapping)")
    rows: list[dict] = []
    metrics = run_dir / "logs" / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            rows = list(csv.DictReader(f))
    curve, by_epoch = [], {}
    for row in rows:
        value, epoch = _number(row.get("val/mre_mm")), _number(row.get("epoch"))
        if value is not None and epoch is not None:
            curve.append((int(epoch), value))
            by_epoch[int(epoch)] = row
    best_epoch, best = min(curve, key=lambda c: c[1]) if curve else (None, None)
    sdr = {}
    if best_epoch is not None:
        for key, text in by_epoch[best_epoch].items():
            value = _number(text)
            if key.startswith("val/sdr_") and value is not None:
                sdr[key.removeprefix("val/")] = value
    epochs = [int(e) for e in (_number(r.get("epoch")) for r in rows) if e is not None]
    last = run_dir / "checkpoints" / "last.ckpt"
    seconds = last.stat().st_mtime - config_path.stat().st_mtime if last.is_file() else None
    label = f"{run_dir.parent.name}/{run_dir.name}"
    return RunSummary(run_dir, label, config, curve, best, best_epoch, sdr, max(epochs) + 1 if epochs else 0, seconds)


def _network_cost(config: dict, run_dir: Path) -> tuple[int, float]:
    """Parameters and forward GFLOPs of the run's network, one (1, 1, *patch) input on CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from h3de.config import config_from_dict
    from h3de.data.manifest import load_manifest
    from h3de.networks import build_network, network_params

    cfg = config_from_dict(config)
    try:
        landmarks = len(load_manifest(Path(cfg.data.root) / cfg.data.manifest).landmark_names)
    except H3deError:  # the data has moved: the checkpoint knows the landmarks
        landmarks = len(_checkpoint_landmarks(run_dir))
    network = build_network(cfg.model.name, 1, landmarks, network_params(cfg.model)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(torch.zeros(1, 1, *cfg.data.patch_size))
    return sum(p.numel() for p in network.parameters()), counter.get_total_flops() / 1e9


def _checkpoint_landmarks(run_dir: Path) -> list[str]:
    import torch

    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]["landmark_names"]
    raise H3deError(f"{run_dir}: neither its dataset nor a checkpoint is there to count its landmarks")


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def _differences(runs: Sequence[RunSummary]) -> None:
    """Fill each run's ``differs``: the config keys whose values are not the same in every run."""
    flats = [_flatten(r.config) for r in runs]
    ignored = {"output_dir", "name"}
    keys = sorted({k for f in flats for k in f} - ignored)
    varying = [k for k in keys if len({f.get(k) for f in flats}) > 1]
    for run, flat in zip(runs, flats, strict=True):
        run.differs = {k: flat.get(k, "-") for k in varying}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    radii = sorted({k for r in runs for k in r.sdr}, key=lambda k: float(k[4:-2]))
    header = ["run", "best val MRE (mm)", "best epoch", *[f"{k[4:]} SDR (%)" for k in radii], "epochs",
              "params (M)", "fwd GFLOPs", "train time (s)", *runs[0].differs]  # fmt: skip
    rows = []
    for r in runs:
        sdr = [_fmt(100 * r.sdr[k], 1) if k in r.sdr else "n/a" for k in radii]
        params = None if r.parameters is None else r.parameters / 1e6
        best_epoch = "n/a" if r.best_epoch is None else str(r.best_epoch)
        rows.append([r.label, _fmt(r.best_val_mre_mm), best_epoch, *sdr, str(r.epochs), _fmt(params),
                     _fmt(r.gflops, 1), _fmt(r.train_seconds, 0), *r.differs.values()])  # fmt: skip
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _plot(path: Path, runs: Sequence[RunSummary]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.val_mre_mm:
            epochs, values = zip(*run.val_mre_mm, strict=True)
            ax.plot(epochs, values, marker="o", markersize=3, label=run.label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch (as in metrics.csv, from 0)")
    ax.set_ylabel("val MRE (mm)")
    ax.set_title("validation MRE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def compare(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, flops: bool = True):
    """Compare run directories; with ``out``, write compare.md, compare.csv and val_mre.png there.

    Raises:
        H3deError: no run directory, one given twice, or a folder that is not a run directory.
    """
    if not run_dirs:
        raise H3deError("give one or more run directories to compare")
    resolved = [Path(d).resolve() for d in run_dirs]
    twice = {str(d) for d in run_dirs if resolved.count(Path(d).resolve()) > 1}
    if twice:
        raise H3deError(f"run directory given twice: {', '.join(sorted(twice))}")
    runs = [read_run(d) for d in run_dirs]  # every folder checked before any cost is computed
    costs: dict[str, tuple[int, float]] = {}
    for run in runs:
        if flops:
            key = json.dumps([run.config.get("model"), run.config.get("data", {}).get("patch_size")], sort_keys=True)
            costs[key] = costs.get(key) or _network_cost(run.config, run.run_dir)
            run.parameters, run.gflops = costs[key]
    _differences(runs)
    header, rows = _rows(runs)
    table = _markdown(header, rows)
    out_dir = None
    if out is not None:
        out_dir = Path(out)
        with removed_if_left_empty(out_dir):
            try:
                atomic_write(out_dir / "compare.md", table + "\n")
                atomic_write(out_dir / "compare.csv", csv_text(header, rows))
                _plot(out_dir / "val_mre.png", runs)
            except OSError as e:
                raise H3deError(f"{out_dir}: cannot write the comparison there ({e.strerror or e})") from None
    return CompareResult(runs, table, out_dir)
