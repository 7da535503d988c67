"""``export(checkpoint, fmt, out_dir)``: a trained model's networks as ONNX or TorchScript files, for deployment.

Every network of the model is exported: the one network of ``detection.mode`` whole or sliding_window, and both
stages of coarse_to_fine (``global``: the whole-volume network; ``local``: the fine-patch network, which for the
``conditioned`` design takes the asked landmark's index as a second input). Batch and spatial sizes are dynamic:
the networks pad to their stride (and V-BRA to its regions) inside the graph, so any volume size works.

Each exported file is checked before the folder is written: it is run (onnxruntime for ONNX, ``torch.jit.load`` for
TorchScript) against PyTorch on the same random input at two sizes, the training patch and an odd larger size at
batch 2, and the largest absolute difference of the outputs is recorded (refused above ``1e-3 x max(1, |output|)``).

ONNX uses ``torch.onnx.export(dynamo=False)``, the TorchScript-based exporter (deprecated, still in torch 2.13): the
default dynamo exporter (it needs onnxscript) took minutes instead of seconds for the tiny H3DE-Net and fixed the batch
size of its graph at the example's, so onnxruntime refused a batch of 2. TorchScript uses ``torch.jit.trace``. In
both, sizes computed from the input's shape are recorded as graph operations, so the graphs hold at other sizes.

Each network's decoding (its readout's ``decode``: sub-voxel peak and presence, or the anchors' vote) is exported too,
as a graph of its own (``decode_global``, ``decode_local``), checked the same way on the network's outputs: the export
carries the code that validation decodes with, so ``h3de predict`` runs an ONNX export without torch
(:mod:`h3de.deploy`). A heatmap decoding takes the landmark index of each map channel as a second input (a sliding
window decodes the landmarks in chunks; spatial_ce's absent logits are per landmark).

The folder holds ``global.<onnx|pt>``, ``decode_global`` (and ``local``, ``decode_local``) and ``h3de_export.json``:
everything ``h3de predict`` needs besides the graphs (the resolved config, with the preprocessing: spacing, patch size,
normalisation; the landmark names; mirrored pairs; the presence threshold; the detection mode and its parameters)
and the checks. It is written whole, then swapped in (``io_utils.atomic_dir``).
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from h3de.deploy.bundle import EXPORT_VERSION, METADATA_FILE, SUFFIXES, load_graph
from h3de.errors import H3deError
from h3de.evaluate import load_checkpoint, resolve_checkpoint
from h3de.io_utils import atomic_dir, removed_if_left_empty
from h3de.module import LandmarkModule
from h3de.readout import HeatmapReadout

__all__ = ["FORMATS", "ExportResult", "export"]

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
TOLERANCE = 1e-3  # relative to max(1, the largest |output|)


@dataclass
class _Stage:
    name: str  # "global" | "local" | "decode_global" | "decode_local"
    network: nn.Module
    input_names: list[str]
    output_names: list[str]
    examples: list[tuple[torch.Tensor, ...]]  # the export's example first, then a second size
    dynamic: dict[str, dict[int, str]]  # input or output name -> its axes that vary (ONNX)


class _Decoding(nn.Module):
    """A readout's ``decode`` as a module of its own: maps (B, C, ...) (and, for heatmaps, the landmark index (C,)
    of each channel) in; (B, C, 3) voxel positions and (B, C) presence out."""

    def __init__(self, readout: nn.Module) -> None:
        super().__init__()
        self.readout = readout

    def forward(self, maps: torch.Tensor, landmark: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.readout.decode(maps) if landmark is None else self.readout.decode(maps, landmark)


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]  # stage -> file
    checks: list[dict[str, Any]] = field(default_factory=list)  # stage, input_shape, max_abs_diff


def export(checkpoint: str | Path, fmt: str = "onnx", out_dir: str | Path | None = None) -> ExportResult:
    """Export the networks of ``checkpoint`` as ``fmt`` into ``out_dir``, checked against PyTorch.

    Args:
        checkpoint: a ``.ckpt``, a run directory or ``runs/<experiment>/latest`` (as ``h3de evaluate``).
        fmt: "onnx" or "torchscript".
        out_dir: a new or empty folder, or an earlier export (replaced whole); default
            ``<run dir>/export_<fmt>`` beside the checkpoint folder.

    Raises:
        H3deError: before any output, for an unknown format, a missing export package, a bad checkpoint or an
            output folder that cannot be written; after exporting, when an export disagrees with PyTorch.
    """
    if fmt not in FORMATS:
        raise H3deError(f"unknown export format '{fmt}' (expected one of {', '.join(FORMATS)})")
    if fmt == "onnx":
        _require("onnx", "onnxruntime")
    checkpoint = resolve_checkpoint(checkpoint)
    module = load_checkpoint(checkpoint)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.resolve().parent.parent / f"export_{fmt}"
    with removed_if_left_empty(out_dir):  # the parents _check_out_dir makes, when the export then fails
        _check_out_dir(out_dir)
        return _export(module, checkpoint, fmt, out_dir)


def _export(module: LandmarkModule, checkpoint: Path, fmt: str, out_dir: Path) -> ExportResult:
    result = ExportResult(out_dir, {})
    stages = _stages(module)
    metadata = _metadata(module, checkpoint, fmt)
    with atomic_dir(out_dir) as tmp:
        for stage in stages:
            path = tmp / f"{stage.name}{SUFFIXES[fmt]}"
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and deprecation warnings: the checks below decide
                _EXPORTERS[fmt](stage, path)
            runner = load_graph(path, fmt, stage.input_names)
            checks = [_check(stage, runner, inputs, fmt) for inputs in stage.examples]
            metadata["stages"][stage.name] = {
                "file": path.name,
                "inputs": stage.input_names,
                "outputs": stage.output_names,
                "checks": checks,
            }
            result.files[stage.name] = out_dir / path.name
            result.checks += [{"stage": stage.name, **c} for c in checks]
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return result


def _require(*packages: str) -> None:
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            raise H3deError(f"the ONNX export needs the package '{package}': pip install 'h3de[export]'") from None


def _check_out_dir(out_dir: Path) -> None:
    """Refuse a folder that is a file, holds other files (it would be replaced whole) or cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise H3deError(f"{out_dir}: not a folder (give a new or empty folder for the export)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).is_file():
        raise H3deError(f"{out_dir}: not empty and not an earlier export (give a new or empty folder)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir.parent, prefix=".h3de-write-test-"):
            pass
    except OSError as e:
        raise H3deError(f"{out_dir}: cannot write the export there ({e.strerror or e})") from None


def _stages(module: LandmarkModule) -> list[_Stage]:
    """The graphs to export, each with two example inputs: the networks at (1, 1, *patch) and (2, 1, *larger odd
    size), then their decodings on the networks' outputs for those inputs."""
    generator = torch.Generator().manual_seed(0)

    def images(size: list[int]) -> list[torch.Tensor]:
        other = [s + 3 + 2 * i for i, s in enumerate(size)]  # odd, different per axis: no stride divides it
        return [torch.randn(batch, 1, *shape, generator=generator) for batch, shape in ((1, size), (2, other))]

    cfg = module.cfg
    image = {"image": {0: "batch", 2: "depth", 3: "height", 4: "width"}}
    output = {"output": {0: "batch", 2: "out_depth", 3: "out_height", 4: "out_width"}}
    stages = [
        _Stage(
            "global",
            module.network,
            ["image"],
            ["output"],
            [(x,) for x in images(list(cfg.data.patch_size))],
            {**image, **output},
        )
    ]
    if module.local_network is not None:
        patches = images(list(cfg.local.patch_size))
        if cfg.local.design == "conditioned":
            count = len(module.landmark_names)
            examples = [(x, torch.arange(len(x)) % count) for x in patches]
            dynamic = {**image, "landmark": {0: "batch"}, **output}
            stages.append(_Stage("local", module.local_network, ["image", "landmark"], ["output"], examples, dynamic))
        else:
            stages.append(
                _Stage(
                    "local", module.local_network, ["image"], ["output"], [(x,) for x in patches], {**image, **output}
                )
            )
    readouts = {"global": module.readout, "local": module.local_readout}
    return stages + [_decoding(stage, readouts[stage.name]) for stage in stages]


def _decoding(stage: _Stage, readout: nn.Module) -> _Stage:
    """The decoding of ``stage``'s network, with its outputs on the stage's examples as examples."""
    heatmap = isinstance(readout, HeatmapReadout)
    with torch.no_grad():
        maps = [stage.network(*inputs) for inputs in stage.examples]
    examples = [(m, torch.arange(m.shape[1])) if heatmap else (m,) for m in maps]
    dynamic = {"maps": {0: "batch", 2: "depth", 3: "height", 4: "width"}}
    dynamic |= {"voxel": {0: "batch", 1: "landmarks"}, "presence": {0: "batch", 1: "landmarks"}}
    if heatmap:  # one map per landmark: any number of them (the chunks of a sliding window)
        dynamic["maps"][1] = "landmarks"
        dynamic["landmark"] = {0: "landmarks"}
    names = ["maps", "landmark"] if heatmap else ["maps"]
    return _Stage(f"decode_{stage.name}", _Decoding(readout), names, ["voxel", "presence"], examples, dynamic)


def _export_onnx(stage: _Stage, path: Path) -> None:
    torch.onnx.export(
        stage.network,
        stage.examples[0],
        str(path),
        input_names=stage.input_names,
        output_names=stage.output_names,
        dynamic_axes=stage.dynamic,
        opset_version=ONNX_OPSET,
        dynamo=False,
    )


def _export_torchscript(stage: _Stage, path: Path) -> None:
    traced = torch.jit.trace(stage.network, stage.examples[0], check_trace=False)
    torch.jit.save(traced, str(path))


_EXPORTERS: dict[str, Callable[[_Stage, Path], None]] = {"onnx": _export_onnx, "torchscript": _export_torchscript}


def _check(stage: _Stage, runner: Callable[..., tuple], inputs: tuple[torch.Tensor, ...], fmt: str) -> dict:
    """The export against PyTorch on ``inputs``: {input_shape, max_abs_diff} (over every output); H3deError when
    they disagree."""
    with torch.no_grad():
        expected = stage.network(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    found = runner(*(x.numpy() for x in inputs))
    shape = list(inputs[0].shape)
    diff = 0.0
    for name, want, got in zip(stage.output_names, expected, found, strict=True):
        want, got = want.float(), torch.from_numpy(np.asarray(got)).float()
        if got.shape != want.shape:
            raise H3deError(
                f"{stage.name}: the {fmt} export gives an {name} of shape {list(got.shape)} for an input of "
                f"{shape}, PyTorch {list(want.shape)}"
            )
        difference = float((got - want).abs().max()) if want.numel() else 0.0
        limit = TOLERANCE * max(1.0, float(want.abs().max()) if want.numel() else 1.0)
        if not difference <= limit:  # also NaN
            raise H3deError(
                f"{stage.name}: the {fmt} export's {name} differs from PyTorch by {difference:.3g} at input {shape}"
            )
        diff = max(diff, difference)
    return {"input_shape": shape, "max_abs_diff": diff}


def _metadata(module: LandmarkModule, checkpoint: Path, fmt: str) -> dict[str, Any]:
    cfg, config = module.cfg, module.hparams["config"]
    local = None
    if module.local_network is not None:
        local = {k: config["local"][k] for k in ("design", "spacing_mm", "patch_size", "heatmap_sigma")}
        local["model"] = cfg.local.model.name
    return {
        "h3de_export": EXPORT_VERSION,
        "format": fmt,
        "checkpoint": str(checkpoint.resolve()),
        "landmark_names": list(module.landmark_names),
        "mirrored_pairs": _mirrored_pairs(config, module.landmark_names),
        "coordinate_system": "RAS",
        "units": "mm",
        "presence_threshold": 0.5,  # every readout is trained so that 0.5 separates present from absent
        "preprocessing": {
            k: config["data"][k] for k in ("spacing_mm", "patch_size", "normalize", "percentiles", "window")
        },
        "detection": dict(config["detection"]),
        "local": local,
        "model": cfg.model.name,
        "stages": {},
        "config": config,
        "versions": {p: _version(p) for p in ("h3de", "torch", "onnx", "onnxruntime", "monai")},
    }


def _mirrored_pairs(config: dict, names: list[str]) -> list[list[str]] | None:
    """The dataset manifest's mirrored pairs, where it is still readable and has these landmarks; else None."""
    path = Path(config["data"]["root"]) / config["data"]["manifest"]
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("landmarks") != list(names):
        return None
    return [list(pair) for pair in doc.get("mirrored_pairs", [])]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
