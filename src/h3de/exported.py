"""A model loaded from an ``h3de export`` folder, in the shape :func:`h3de.inference.detect` reads.

:class:`ExportedModel` has what ``detect`` uses of a :class:`h3de.module.LandmarkModule`: ``cfg``,
``landmark_names``, ``device``, ``network`` and ``readout`` (and ``local_network`` and ``local_readout`` for
coarse-to-fine). Its networks are the exported files, run by onnxruntime (ONNX) or ``torch.jit.load``
(TorchScript); its readouts are rebuilt from the config and the learned values in ``h3de_export.json``. So
``h3de predict EXPORT_DIR`` takes the one inference path (preprocessing, modes, decoding), with the networks
run outside PyTorch for ONNX; preprocessing (MONAI) and decoding still use torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from h3de.config import config_from_dict
from h3de.errors import H3deError
from h3de.networks import network_params, network_spec
from h3de.readout import build_readout

__all__ = ["METADATA_FILE", "SUFFIXES", "ExportedModel", "load_stage", "is_export", "load_model"]

METADATA_FILE = "h3de_export.json"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


class OnnxStage:
    """An ONNX network run by onnxruntime, called like the torch network (torch tensors in and out, on the CPU)."""

    def __init__(self, path: Path, input_names: list[str]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise H3deError("running an ONNX export needs onnxruntime: pip install 'h3de[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch would use
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
        self.input_names = input_names

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {
            name: np.ascontiguousarray(x.detach().cpu().numpy())
            for name, x in zip(self.input_names, inputs, strict=True)
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


class TorchScriptStage:
    """A TorchScript network (``torch.jit.load``) on the CPU."""

    def __init__(self, path: Path) -> None:
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*(x.cpu() for x in inputs))


def load_stage(path: Path, fmt: str, input_names: list[str]) -> Callable[..., torch.Tensor]:
    """The runner of one exported network file."""
    return OnnxStage(path, input_names) if fmt == "onnx" else TorchScriptStage(path)


class ExportedModel:
    """The model of an export folder (see the module docstring).

    Args:
        folder: a folder written by :func:`h3de.export.export`.
    """

    device = torch.device("cpu")

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = read_metadata(self.folder)
        try:
            self.cfg = config_from_dict(meta["config"])
            self.landmark_names = list(meta["landmark_names"])
            fmt, stages, readouts = meta["format"], meta["stages"], meta["readout_state"]
            count = len(self.landmark_names)
            spec = network_spec(self.cfg.model.name)
            params = network_params(self.cfg.model)
            self.readout = build_readout(spec.output, self.cfg.loss, count, params, self.cfg.data.heatmap_sigma)
            _load_state(self.readout, readouts["global"])
            self.network = self._stage(stages["global"], fmt)
            self.local_network, self.local_readout = None, None
            if self.cfg.detection.mode == "coarse_to_fine":
                local = self.cfg.local
                maps = 1 if local.design == "conditioned" else count
                self.local_readout = build_readout(
                    "heatmap", local.loss, maps, network_params(local.model), local.heatmap_sigma
                )
                _load_state(self.local_readout, readouts["local"])
                self.local_network = self._stage(stages["local"], fmt)
        except H3deError:
            raise
        except Exception as e:
            raise H3deError(
                f"{self.folder / METADATA_FILE}: not a usable h3de export ({type(e).__name__}: {e})"
            ) from None

    def _stage(self, record: dict[str, Any], fmt: str) -> Callable[..., torch.Tensor]:
        path = self.folder / record["file"]
        if not path.is_file():
            raise H3deError(f"{path}: missing from the export ({METADATA_FILE} names it)")
        return load_stage(path, fmt, list(record["inputs"]))


def _load_state(readout: torch.nn.Module, state: dict[str, Any]) -> None:
    tensors = {k: torch.tensor(np.array(v, dtype=np.float64)) for k, v in state.items()}  # null -> NaN
    readout.load_state_dict({k: v.to(readout.state_dict()[k].dtype) for k, v in tensors.items()})


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES.values())


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder; H3deError for one that lost its ``h3de_export.json``."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / METADATA_FILE).is_file():
        return True
    if _model_files(path) and not (path / "checkpoints").is_dir():
        names = ", ".join(p.name for p in _model_files(path))
        raise H3deError(
            f"{path}: holds exported networks ({names}) but no {METADATA_FILE}, which records the preprocessing "
            "and landmarks: export again with h3de export"
        )
    return False


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise H3deError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in SUFFIXES:
        raise H3deError(f"{path}: not an h3de export description (no 'format' of {', '.join(SUFFIXES)})")
    return meta


def load_model(path: str | Path, device: torch.device) -> tuple[Any, Path]:
    """The model that ``h3de predict`` runs, and the file or folder it came from: an export folder
    (:class:`ExportedModel`, on the CPU), or a checkpoint (:func:`h3de.evaluate.resolve_checkpoint`)."""
    from h3de.evaluate import load_checkpoint, resolve_checkpoint

    if is_export(path):
        return ExportedModel(path), Path(path)
    checkpoint = resolve_checkpoint(path)
    return load_checkpoint(checkpoint, map_location=device).to(device), checkpoint
