"""An ``h3de export`` folder: its description (``h3de_export.json``) and its graphs, run on numpy arrays.

The folder holds, per stage, the network and its decoding (the readout's ``decode``, exported as a graph of its
own): ``global`` and ``decode_global``, and for coarse-to-fine ``local`` and ``decode_local``. ONNX graphs run on
onnxruntime, without torch; TorchScript ones on ``torch.jit.load`` (that format needs torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from h3de.errors import H3deError

__all__ = ["METADATA_FILE", "SUFFIXES", "EXPORT_VERSION", "Bundle", "load_graph", "is_export", "read_metadata"]

METADATA_FILE = "h3de_export.json"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_VERSION = 2  # 2: the decoding exported beside each network

Graph = Callable[..., tuple[np.ndarray, ...]]


class OnnxGraph:
    """An ONNX graph on onnxruntime: numpy arrays in (in the order of its inputs), its outputs out."""

    def __init__(self, path: Path, input_names: list[str]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise H3deError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
        self.input_names = input_names
        self.used = {i.name for i in self.session.get_inputs()}  # the exporter drops an input the graph ignores

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        named = zip(self.input_names, inputs, strict=True)
        feed = {name: np.ascontiguousarray(x) for name, x in named if name in self.used}
        return tuple(self.session.run(None, feed))


class TorchScriptGraph:
    """A TorchScript graph (``torch.jit.load``) on the CPU: numpy arrays in, its outputs as numpy arrays out."""

    def __init__(self, path: Path, input_names: list[str]) -> None:
        import torch

        self.torch = torch
        self.input_names = input_names
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        with self.torch.no_grad():
            out = self.module(*(self.torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        return tuple(o.numpy() for o in (out if isinstance(out, tuple) else (out,)))


def load_graph(path: Path, fmt: str, input_names: list[str]) -> Graph:
    """The runner of one exported graph file."""
    return OnnxGraph(path, input_names) if fmt == "onnx" else TorchScriptGraph(path, input_names)


class Bundle:
    """An export folder, read and checked: its description and a runner per graph.

    Attributes:
        meta: the parsed ``h3de_export.json``.
        config: the model's resolved config (plain dict).
        landmark_names: L names.
        graphs: stage name -> runner (``global``, ``decode_global`` and, for coarse-to-fine, ``local``,
            ``decode_local``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        version = self.meta.get("h3de_export")
        if version != EXPORT_VERSION:
            raise H3deError(
                f"{self.folder / METADATA_FILE}: an export of version {version}, this h3de reads version "
                f"{EXPORT_VERSION}: export the checkpoint again with h3de export"
            )
        try:
            self.config = self.meta["config"]
            self.landmark_names = [str(n) for n in self.meta["landmark_names"]]
            self.mode = self.config["detection"]["mode"]
            stages = self.meta["stages"]
            needed = ["global", "decode_global"] + (["local", "decode_local"] if self.mode == "coarse_to_fine" else [])
            self.graphs = {name: self._graph(stages[name]) for name in needed}
        except H3deError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise H3deError(
                f"{self.folder / METADATA_FILE}: not a usable h3de export ({type(e).__name__}: {e})"
            ) from None

    def decode(self, stage: str, maps: np.ndarray, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((L, 3) voxel positions, (L,) presence) of the maps (1, L, ...) of ``stage`` ("global" or "local"), whose
        channels are the landmarks (or, for the conditioned local stage, the maps) of index ``channels`` (L,)."""
        graph = self.graphs[f"decode_{stage}"]
        inputs = (maps, channels) if "landmark" in graph.input_names else (maps,)  # anchor maps hold all landmarks
        voxel, presence = graph(*inputs)
        return voxel[0], presence[0]

    def _graph(self, record: dict[str, Any]) -> Graph:
        path = self.folder / record["file"]
        if not path.is_file():
            raise H3deError(f"{path}: missing from the export ({METADATA_FILE} names it)")
        return load_graph(path, self.meta["format"], list(record["inputs"]))


def _graph_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES.values())


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder; H3deError for one that lost its ``h3de_export.json``."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / METADATA_FILE).is_file():
        return True
    if _graph_files(path) and not (path / "checkpoints").is_dir():
        names = ", ".join(p.name for p in _graph_files(path))
        raise H3deError(
            f"{path}: holds exported networks ({names}) but no {METADATA_FILE}, which records the preprocessing "
            "and landmarks: export again with h3de export"
        )
    return False


def read_metadata(folder: Path) -> dict[str, Any]:
    """The parsed ``h3de_export.json`` of ``folder``; H3deError when it is unreadable or not an export's."""
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise H3deError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in SUFFIXES:
        raise H3deError(f"{path}: not an h3de export description (no 'format' of {', '.join(SUFFIXES)})")
    return meta
