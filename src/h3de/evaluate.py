"""Evaluation in world mm: ``evaluate(checkpoint, split)`` predicts a split with a trained model;
``evaluate_files(pred_dir, truth_dir)`` scores landmark files that exist already (from ``h3de predict`` or any
other tool). Both score with :func:`h3de.report.score` and write :func:`h3de.report.write_report`'s files
(``summary.json``, ``per_landmark.csv``, ``per_case.csv``, ``errors.csv``, ``cpe.png``), so one set of
predictions gives the same report either way: ``evaluate`` at a threshold equals ``h3de predict`` at that
threshold followed by ``evaluate_files``.

``evaluate`` also writes ``predictions/<case>.mrk.json`` (opens in 3D Slicer; landmarks called absent, presence
below the threshold, are "missing"). The folder is written whole beside the old one, then replaces it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from h3de.checkpoints import newest_run, read_checkpoint
from h3de.config import ExperimentConfig, config_from_dict
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.landmark_io import LANDMARK_SUFFIXES, read_landmarks, write_landmarks
from h3de.errors import DataError, H3deError
from h3de.io_utils import atomic_dir
from h3de.module import LandmarkModule
from h3de.report import Scores, check_radii, score, write_report

__all__ = ["EvaluationResult", "evaluate", "evaluate_files", "load_checkpoint", "resolve_checkpoint"]

_PREDICT_OUTPUTS = ("predictions.csv", "summary.json")  # written by h3de predict beside the landmark files


@dataclass
class EvaluationResult:
    out_dir: Path
    summary: dict
    errors: torch.Tensor  # (N, L) mm, NaN unless present and called present
    case_ids: list[str]
    landmark_names: list[str]
    warnings: list[str] = field(default_factory=list)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint that ``path`` names.

    - a file: that checkpoint;
    - a folder: a run directory; its ``checkpoints/best.ckpt``;
    - ``<folder>/latest``, where no such file or folder exists: the newest run in ``<folder>``
      (``runs/<experiment>``; newest by the ``<timestamp>[-n]`` names ``h3de train`` gives) that holds a
      ``checkpoints/best.ckpt``.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        best = path / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise H3deError(f"{path}: a folder without checkpoints/best.ckpt (give a run directory or a .ckpt file)")
        return best
    if path.name == "latest":
        run = newest_run(path.parent, "checkpoints/best.ckpt")
        if run is None:
            raise H3deError(f"{path}: no run in {path.parent} has a checkpoints/best.ckpt")
        return run / "checkpoints" / "best.ckpt"
    raise H3deError(f"checkpoint not found: {path}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LandmarkModule:
    """Rebuild a :class:`LandmarkModule` from a checkpoint file alone (:func:`h3de.checkpoints.read_checkpoint`:
    ``weights_only``; a truncated file is named as such)."""
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    try:
        hparams = ckpt["hyper_parameters"]
        module = LandmarkModule(hparams["config"], hparams["landmark_names"])
        if module.local_network is not None and not any(k.startswith("local_network.") for k in ckpt["state_dict"]):
            raise H3deError(f"{path}: its config is coarse-to-fine, but it holds no local stage weights")
        module.load_state_dict(ckpt["state_dict"])
    except H3deError:
        raise
    except Exception as e:
        raise H3deError(f"{path}: not a loadable h3de checkpoint ({type(e).__name__}: {e})") from None
    return module.eval()


def _check_threshold(presence_threshold: float) -> None:
    if not 0.0 <= presence_threshold <= 1.0:
        raise H3deError(f"presence threshold must be in [0, 1], got {presence_threshold}")


def evaluate(
    checkpoint: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
    presence_threshold: float = 0.5,
    radii: Sequence[float] | None = None,
) -> EvaluationResult:
    """Evaluate ``checkpoint`` on ``split`` of its dataset (or of the manifest under ``data_root``).

    Args:
        checkpoint: a ``.ckpt`` written by ``h3de train``, a run directory or ``runs/<experiment>/latest``
            (:func:`resolve_checkpoint`).
        split: "train", "val" or "test".
        out_dir: output folder; default ``<run dir>/eval_<split>`` beside the checkpoint folder.
        data_root: dataset folder overriding the one in the checkpoint's config.
        batch_size: evaluation batch size, a positive integer (default: the config's).
        presence_threshold: presence probability in [0, 1] below which a landmark is called absent
            (every readout trains its presence so that 0.5 separates present from absent; 0 calls
            every landmark present, and then the MRE is that of every present landmark, as ``val/mre_mm``).
        radii: SDR radii in mm (default: the checkpoint config's ``sdr_radii_mm``).
    """
    if split not in ("train", "val", "test"):
        raise H3deError(f"unknown split '{split}' (expected train, val or test)")
    _check_threshold(presence_threshold)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise H3deError(f"batch size must be a positive integer, got {batch_size}")
    radii = check_radii(radii) if radii is not None else None
    checkpoint = resolve_checkpoint(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = load_checkpoint(checkpoint, map_location=device).to(device)
    cfg = config_from_dict(module.hparams["config"])
    if data_root is not None:
        cfg.data.root = str(data_root)
    if batch_size is not None:
        cfg.data.batch_size = batch_size
    datamodule = LandmarkDataModule(cfg.data, heatmaps=False, detection=cfg.detection, local=cfg.local)
    if datamodule.landmark_names != module.landmark_names:
        raise DataError(
            f"{datamodule.manifest.path}: landmarks {datamodule.landmark_names} differ from the "
            f"checkpoint's {module.landmark_names}"
        )
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.resolve().parent.parent / f"eval_{split}"

    case_ids, predicted, truth, presence = [], [], [], []
    with torch.inference_mode():
        for batch in datamodule.eval_dataloader(split):
            for sample, found in zip(batch, module.detect_batch(batch), strict=True):
                predicted.append(found.world[None].cpu())
                presence.append(found.presence[None].cpu())
                truth.append(sample["landmarks_world"][None])  # NaN rows = absent
                case_ids.append(sample["case_id"])
    names = module.landmark_names
    radii = radii or check_radii(cfg.sdr_radii_mm)
    scores = score(names, case_ids, *(torch.cat(x) for x in (truth, predicted, presence)), presence_threshold, radii)
    summary = write_report(out_dir, scores, {"checkpoint": str(checkpoint.resolve()), "split": split})
    _write_markups(out_dir / "predictions", scores)
    return EvaluationResult(out_dir, summary, scores.errors, case_ids, names)


def _write_markups(folder: Path, scores: Scores) -> None:
    """``<case>.mrk.json`` of every case, landmarks called absent as missing; replaces the folder whole."""
    with atomic_dir(folder) as tmp:
        for c, case in enumerate(scores.case_ids):
            positions = torch.where(scores.called_present[c, :, None], scores.predicted[c], torch.nan)
            write_landmarks(tmp / f"{case}.mrk.json", scores.names, positions.numpy(), scores.presence[c].numpy())


def evaluate_files(
    pred_dir: str | Path,
    truth_dir: str | Path,
    out_dir: str | Path | None = None,
    presence_threshold: float = 0.5,
    radii: Sequence[float] | None = None,
) -> EvaluationResult:
    """Score the landmark files of ``pred_dir`` against those of ``truth_dir``.

    Files pair by case id (the file name without its landmark suffix); either folder may hold any supported
    format (``h3de.data.landmark_io``). Landmarks pair by name. A truth landmark missing from a prediction
    file, or written as absent, is called absent; so is one whose presence probability (csv ``presence``
    column, h3de json ``presence``) is below ``presence_threshold``. A landmark named in some truth files but
    not in another is absent from that case (``.fcsv`` cannot mark one missing).

    Args:
        pred_dir: folder of ``<case>.<suffix>`` prediction files.
        truth_dir: folder of ``<case>.<suffix>`` ground-truth files.
        out_dir: output folder (default ``<pred_dir>/eval``).
        presence_threshold: in [0, 1].
        radii: SDR radii in mm (default: the config default ``sdr_radii_mm``).

    Returns:
        The result; ``warnings`` names prediction files without truth and landmark names the truth does not
        know (neither is scored).

    Raises:
        H3deError: before any output: a missing folder, a truth case without a prediction file (named), an
            unreadable file, a presence that is not a probability.
    """
    _check_threshold(presence_threshold)
    radii = check_radii(radii if radii is not None else ExperimentConfig().sdr_radii_mm)
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    truth_files, pred_files = _landmark_files(truth_dir, "truth"), _landmark_files(pred_dir, "prediction")
    case_ids = sorted(truth_files)
    missing = [case for case in case_ids if case not in pred_files]
    if missing:
        raise DataError(
            f"{pred_dir}: no prediction file for {len(missing)} truth case(s): {', '.join(missing)} "
            f"(expected <case>{'|'.join(LANDMARK_SUFFIXES)})"
        )
    warnings = []
    extra = sorted(p.name for c, p in pred_files.items() if c not in truth_files and p.name not in _PREDICT_OUTPUTS)
    if extra:
        warnings.append(f"{len(extra)} prediction file(s) without truth, not scored: {', '.join(extra)}")

    truth_read = {case: read_landmarks(truth_files[case]) for case in case_ids}
    names = list(dict.fromkeys(n for case in case_ids for n in truth_read[case][0]))  # first-seen order
    index = {n: i for i, n in enumerate(names)}
    shape = (len(case_ids), len(names))
    truth, predicted, presence = np.full((*shape, 3), np.nan), np.full((*shape, 3), np.nan), np.full(shape, np.nan)
    unknown: dict[str, list[str]] = {}
    for c, case in enumerate(case_ids):
        for name, xyz in zip(*truth_read[case], strict=True):
            truth[c, index[name]] = xyz
        pred_names, positions = read_landmarks(pred_files[case])
        for name, xyz, p in zip(pred_names, positions, _read_presence(pred_files[case], pred_names), strict=True):
            if name not in index:
                unknown.setdefault(name, []).append(case)
                continue
            predicted[c, index[name]], presence[c, index[name]] = xyz, p
    for name, cases in unknown.items():
        warnings.append(f"landmark '{name}' is not in the truth, not scored ({len(cases)} case(s): {', '.join(cases)})")

    tensors = (torch.from_numpy(a) for a in (truth, predicted, presence))
    scores = score(names, case_ids, *tensors, presence_threshold, radii)
    out_dir = Path(out_dir) if out_dir is not None else pred_dir / "eval"
    header = {"predictions": str(pred_dir.resolve()), "truth": str(truth_dir.resolve()), "warnings": warnings}
    summary = write_report(out_dir, scores, header)
    return EvaluationResult(out_dir, summary, scores.errors, case_ids, names, warnings)


def _landmark_files(folder: Path, role: str) -> dict[str, Path]:
    """case id -> the landmark file ``<case><suffix>`` in ``folder``; one file a case."""
    if not folder.is_dir():
        raise H3deError(f"{folder}: no such {role} folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in LANDMARK_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file() or path.name.startswith("."):
            continue
        case = path.name[: -len(suffix)]
        if case in files:
            raise DataError(f"{folder}: case '{case}' has two {role} files: {files[case].name} and {path.name}")
        files[case] = path
    if not files and role == "truth":
        raise DataError(f"{folder}: no landmark files (expected <case>{'|'.join(LANDMARK_SUFFIXES)})")
    return files


def _read_presence(path: Path, names: list[str]) -> np.ndarray:
    """(L,) presence probabilities a prediction file carries (a csv ``presence`` column, an h3de json
    ``presence`` field), in the order of ``names``; NaN where it carries none."""
    lower, values = path.name.lower(), {}
    if lower.endswith(".csv"):
        lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]  # declarations
        rows = [row for row in csv.reader(lines) if row and any(c.strip() for c in row)]
        header = [c.strip().lower() for c in rows[0]]
        if "presence" in header and "name" in header:
            column, name = header.index("presence"), header.index("name")
            values = {row[name].strip(): row[column].strip() if len(row) > column else "" for row in rows[1:]}
    elif lower.endswith(".json") and not lower.endswith(".mrk.json"):
        values = {e["name"]: e.get("presence") for e in json.loads(path.read_text())["landmarks"]}
    out = np.full(len(names), np.nan)
    for i, name in enumerate(names):
        value = values.get(name)
        if value is None or (isinstance(value, str) and value.lower() in ("", "nan")):
            continue
        try:
            p = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            p = math.nan
        if not 0.0 <= p <= 1.0:
            raise DataError(f"{path}: presence {value!r} of '{name}' is not a probability in [0, 1]")
        out[i] = p
    return out
