"""``predict(checkpoint, inputs, out_dir)``: landmarks of new scans, no ground truth needed.

Each image (NIfTI or NRRD, any orientation, spacing and size) goes through the model's inference path: from a
checkpoint, the experiment's inference chain and :func:`h3de.inference.detect`, the path that validation and
``evaluate`` take (:class:`h3de.checkpoint_runner.CheckpointRunner`); from an ``h3de export`` folder, the same steps
in numpy on the exported graphs, without torch for ONNX (:class:`h3de.deploy.runtime.ExportRunner`). Positions are in
the original image's world space (RAS mm). This module imports neither torch nor MONAI.

Writes into ``out_dir`` (each file atomically):
- ``<case>.<format>``: the landmarks (``mrk.json``, ``fcsv``, ``csv`` or ``json``), those called absent
  (presence below the threshold) as missing, with each landmark's presence probability where the format has room;
- ``<case>_qc.png`` with ``qc``: orthogonal slices through each prediction (and the ground truth, if given);
- ``predictions.csv``: every case and landmark: position, presence, called present;
- ``summary.json``: cases, failures (case -> message), seconds per part.

A case that fails (unreadable image, bad geometry) is reported and skipped; the others complete. When none
succeeds, nothing is written (and an output folder made for the run is removed).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from h3de.data.landmark_io import LANDMARK_SUFFIXES, read_landmarks, write_landmarks
from h3de.deploy.bundle import is_export
from h3de.errors import H3deError, root_cause
from h3de.io_utils import atomic_write, csv_text, missing_folders, remove_empty_folders, removed_if_left_empty

__all__ = ["PredictResult", "predict", "FORMATS", "IMAGE_SUFFIXES", "case_id_of"]

FORMATS = ("mrk.json", "fcsv", "csv", "json")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
TIMED_PARTS = ("reading", "preprocessing", "network", "patches", "decoding", "writing")


@dataclass
class PredictResult:
    out_dir: Path
    case_ids: list[str]  # the cases predicted, in input order
    world: dict[str, np.ndarray]  # case -> (L, 3) RAS mm
    presence: dict[str, np.ndarray]  # case -> (L,)
    failures: dict[str, str] = field(default_factory=dict)  # case -> message
    timings: dict[str, float] = field(default_factory=dict)  # part -> seconds over all cases


def case_id_of(path: Path) -> str:
    """The file name without its image or landmark suffix ("case_001.nii.gz" -> "case_001")."""
    name = path.name
    for suffix in (*IMAGE_SUFFIXES, *LANDMARK_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _images(inputs: Path) -> list[Path]:
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise H3deError(f"{inputs}: no such image or folder")
    found = sorted(p for p in inputs.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise H3deError(f"{inputs}: no images in the folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


def _truth_files(truth: Path | None, images: list[Path]) -> dict[str, Path]:
    """case id -> ground-truth landmark file: ``truth`` itself for one image, else ``truth/<case>.<suffix>``."""
    if truth is None:
        return {}
    if truth.is_file():
        if len(images) != 1:
            raise H3deError(f"--truth {truth} is one file, but there are {len(images)} images: give a folder")
        return {case_id_of(images[0]): truth}
    if not truth.is_dir():
        raise H3deError(f"--truth {truth}: no such landmark file or folder")
    files = {case_id_of(p): p for p in truth.iterdir() if p.name.lower().endswith(LANDMARK_SUFFIXES)}
    return {case_id_of(image): files[case_id_of(image)] for image in images if case_id_of(image) in files}


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".h3de-write-test-"):
            pass
    except OSError as e:
        raise H3deError(f"{out_dir}: cannot write predictions there ({e.strerror or e})") from None


def predict(
    checkpoint: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    fmt: str = "mrk.json",
    qc: bool = False,
    truth: str | Path | None = None,
    presence_threshold: float = 0.5,
    progress: bool = True,
) -> PredictResult:
    """Predict the landmarks of one image or of every image in a folder.

    Args:
        checkpoint: a ``.ckpt`` written by ``h3de train``, a run directory or ``runs/<experiment>/latest``
            (:func:`h3de.evaluate.resolve_checkpoint`), or a folder written by ``h3de export`` (its graphs run
            by onnxruntime or TorchScript: :mod:`h3de.deploy`).
        inputs: an image file, or a folder of them (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``).
        out_dir: output folder (created).
        fmt: landmark file format: ``mrk.json``, ``fcsv``, ``csv`` or ``json``.
        qc: also write ``<case>_qc.png``.
        truth: a landmark file (one image) or a folder of ``<case>.<format>`` files, drawn beside the
            predictions in the QC figures.
        presence_threshold: a landmark whose presence probability is below it is written as absent.
        progress: show a progress bar over the cases (on stderr).

    Raises:
        H3deError: before any output, for a bad checkpoint, format, input path or output folder.
    """
    if fmt not in FORMATS:
        raise H3deError(f"unknown format '{fmt}' (expected one of {', '.join(FORMATS)})")
    if not 0.0 <= presence_threshold <= 1.0:
        raise H3deError(f"presence threshold must be in [0, 1], got {presence_threshold}")
    images = _images(Path(inputs))
    truth_files = _truth_files(Path(truth) if truth is not None else None, images)
    ids = [case_id_of(p) for p in images]
    if len(set(ids)) != len(ids):
        raise H3deError(f"{inputs}: several images share a case id (file name without suffix)")
    runner = _runner(checkpoint)
    out_dir = Path(out_dir)
    made = missing_folders(out_dir)  # the output folder and the parents it lacks, removed again if nothing succeeds
    with removed_if_left_empty(out_dir):
        _check_writable(out_dir)
    names = runner.landmark_names

    result = PredictResult(out_dir, [], {}, {}, timings=dict.fromkeys(TIMED_PARTS, 0.0))
    bar = tqdm(list(zip(ids, images, strict=True)), desc="predict", unit="case", disable=not progress, file=sys.stderr)
    for case, image in bar:
        try:
            start = time.perf_counter()
            loaded = runner.read(image, case)
            result.timings["reading"] += time.perf_counter() - start
            start = time.perf_counter()
            sample = runner.prepare(loaded)
            result.timings["preprocessing"] += time.perf_counter() - start
            world, presence = runner.detect(sample, result.timings)
            start = time.perf_counter()
            called = presence >= presence_threshold
            written = np.where(called[:, None], world, np.nan)
            if qc:
                truth_file = truth_files.get(case)
                volume, affine = runner.qc_volume(sample, loaded)
                _write_qc(out_dir / f"{case}_qc.png", volume, affine, case, names, world, presence, truth_file)
            write_landmarks(out_dir / f"{case}.{fmt}", names, written, presence)  # last: a case's file means success
            result.timings["writing"] += time.perf_counter() - start
        except Exception as e:  # one bad case must not stop the others
            cause = root_cause(e)
            # the user's error as its message; a failure of ours named by its type too
            result.failures[case] = str(cause) if isinstance(cause, H3deError) else f"{type(e).__name__}: {e}"
            if len(images) > 1:
                bar.write(f"h3de: {case}: skipped: {result.failures[case]}", file=sys.stderr)
            continue
        result.case_ids.append(case)
        result.world[case], result.presence[case] = world, presence
    if result.case_ids:
        _write_summary(result, names, presence_threshold, runner.source, fmt)
    else:
        remove_empty_folders(made)  # nothing succeeded: leave no output folder behind
    return result


def _runner(path: str | Path):
    """The runner of an export folder (:class:`h3de.deploy.runtime.ExportRunner`, no torch needed for ONNX) or of a
    checkpoint (:class:`h3de.checkpoint_runner.CheckpointRunner`): ``source``, ``landmark_names``, ``read``,
    ``prepare``, ``detect`` and ``qc_volume``."""
    if is_export(path):
        try:
            from h3de.deploy.runtime import ExportRunner
        except ImportError as e:  # scipy, outside the base install
            raise H3deError(f"running an export needs the package '{e.name}': pip install 'h3de[export]'") from None
        return ExportRunner(path)
    from h3de.checkpoint_runner import CheckpointRunner

    return CheckpointRunner(path)


def _write_qc(path, volume, affine, case: str, names, world, presence, truth_file: Path | None) -> None:
    """Orthogonal slices through each prediction (and the ground truth, if given) of the RAS-oriented ``volume``."""
    from h3de.plots import qc_slices

    truth = None
    if truth_file is not None:
        truth_names, positions = read_landmarks(truth_file)
        order = {n: i for i, n in enumerate(truth_names)}
        truth = np.array([positions[order[n]] if n in order else [np.nan] * 3 for n in names])
    qc_slices(path, volume, affine, names, world, presence, truth, title=case)


def _write_summary(result: PredictResult, names, threshold: float, checkpoint, fmt: str) -> None:
    rows = []
    for case in result.case_ids:
        for i, name in enumerate(names):
            x, y, z = result.world[case][i].tolist()
            p = float(result.presence[case][i])
            rows.append([case, name, x, y, z, f"{p:.4f}", int(p >= threshold)])
    header = ["case_id", "landmark", "x", "y", "z", "presence", "called_present"]
    atomic_write(result.out_dir / "predictions.csv", csv_text(header, rows))
    summary = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "format": fmt,
        "coordinate_system": "RAS",
        "units": "mm",
        "presence_threshold": threshold,
        "cases": result.case_ids,
        "failures": result.failures,
        "seconds": {k: round(v, 4) for k, v in result.timings.items()},
    }
    atomic_write(result.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
