"""``evaluate(checkpoint, split)``: predict a split with a trained model and report errors in world mm.

Writes into ``out_dir`` (each file atomically):
- ``predictions.csv``: one row per case and landmark: ground truth, prediction (RAS mm), presence score,
  error, and whether it is called present.
- ``per_landmark.csv``: MRE, SD and SDR per landmark.
- ``per_case.csv``: MRE per case.
- ``summary.json``: overall MRE, SD, SDR, counts, presence metrics (``metrics.presence_summary``: AUROC,
  and at the threshold the presence accuracy and the absent class's precision, recall and F1),
  checkpoint and split.
- ``predictions/<case>.mrk.json``: predicted landmarks that open in 3D Slicer; landmarks called absent
  (presence probability below ``presence_threshold``, 0.5 by default) are written as "missing".

Errors are always those of the decoded positions of every landmark present in the ground truth: a
threshold changes what is called absent, never which errors count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from h3de.config import config_from_dict
from h3de.data.datamodule import LandmarkDataModule
from h3de.data.landmark_io import write_landmarks
from h3de.errors import DataError, H3deError
from h3de.io_utils import atomic_write, csv_text
from h3de.metrics import presence_summary, radial_errors, summarize_errors
from h3de.module import LandmarkModule

__all__ = ["EvaluationResult", "evaluate", "load_checkpoint"]


@dataclass
class EvaluationResult:
    out_dir: Path
    summary: dict
    errors: torch.Tensor  # (N, L) mm, NaN = absent
    case_ids: list[str]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LandmarkModule:
    """Rebuild a :class:`LandmarkModule` from a checkpoint file alone (loaded with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise H3deError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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


def evaluate(
    checkpoint: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
    presence_threshold: float = 0.5,
) -> EvaluationResult:
    """Evaluate ``checkpoint`` on ``split`` of its dataset (or of the manifest under ``data_root``).

    Args:
        checkpoint: a ``.ckpt`` written by ``h3de train``.
        split: "train", "val" or "test".
        out_dir: output folder; default ``<run dir>/eval_<split>`` beside the checkpoint folder.
        data_root: dataset folder overriding the one in the checkpoint's config.
        batch_size: evaluation batch size (default: the config's).
        presence_threshold: presence probability in [0, 1] below which a landmark is called absent
            (every readout trains its presence so that 0.5 separates present from absent; 0 calls
            every landmark present).
    """
    if split not in ("train", "val", "test"):
        raise H3deError(f"unknown split '{split}' (expected train, val or test)")
    if not 0.0 <= presence_threshold <= 1.0:
        raise H3deError(f"presence threshold must be in [0, 1], got {presence_threshold}")
    checkpoint = Path(checkpoint)
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

    case_ids, predicted, truth, present, presence = [], [], [], [], []
    with torch.inference_mode():
        for batch in datamodule.eval_dataloader(split):
            for sample, found in zip(batch, module.detect_batch(batch), strict=True):
                predicted.append(found.world[None])
                presence.append(found.presence[None])
                truth.append(sample["landmarks_world"][None])
                present.append(sample["present"][None])
                case_ids.append(sample["case_id"])
    predicted, truth, present, presence = (torch.cat(x) for x in (predicted, truth, present, presence))
    errors = radial_errors(predicted, truth, present)

    radii = list(cfg.sdr_radii_mm)
    names = module.landmark_names
    summary = {
        "checkpoint": str(checkpoint.resolve()),
        "split": split,
        "num_cases": len(case_ids),
        **summarize_errors(errors, radii),
        "per_landmark_mre_mm": {n: _finite_or_none(torch.nanmean(errors[:, i]).item()) for i, n in enumerate(names)},
        **presence_summary(presence, present, presence_threshold),
    }
    called_present = presence >= presence_threshold
    outputs = (names, case_ids, predicted, presence, called_present, truth, present, errors, radii, summary)
    _write_outputs(out_dir, *outputs)
    return EvaluationResult(out_dir, summary, errors, case_ids)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write_outputs(
    out_dir, names, case_ids, predicted, presence, called_present, truth, present, errors, radii, summary
) -> None:
    rows = []
    for c, case in enumerate(case_ids):
        for i, name in enumerate(names):
            gt = truth[c, i].tolist() if present[c, i] else ["", "", ""]
            err = f"{errors[c, i].item():.4f}" if present[c, i] else ""
            score = f"{presence[c, i].item():.4f}"
            called = int(called_present[c, i])
            rows.append([case, name, int(present[c, i]), *gt, *predicted[c, i].tolist(), score, err, called])
    header = ["case_id", "landmark", "present", "gt_x", "gt_y", "gt_z", "pred_x", "pred_y", "pred_z"]
    header += ["presence_score", "error_mm", "called_present"]
    atomic_write(out_dir / "predictions.csv", csv_text(header, rows))

    stat_keys = ["count", "mre_mm", "mre_sd_mm"] + [k for k in summarize_errors(errors[:, :1], radii) if "sdr" in k]
    landmark_rows = [
        [name, *[summarize_errors(errors[:, i], radii)[k] for k in stat_keys]] for i, name in enumerate(names)
    ]
    atomic_write(out_dir / "per_landmark.csv", csv_text(["landmark", *stat_keys], landmark_rows))

    case_rows = [[case, *[summarize_errors(errors[c], radii)[k] for k in stat_keys]] for c, case in enumerate(case_ids)]
    atomic_write(out_dir / "per_case.csv", csv_text(["case_id", *stat_keys], case_rows))

    for c, case in enumerate(case_ids):
        positions = torch.where(called_present[c, :, None], predicted[c], torch.nan)
        write_landmarks(out_dir / "predictions" / f"{case}.mrk.json", names, positions.numpy())
    clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in summary.items()}
    atomic_write(out_dir / "summary.json", json.dumps(clean, indent=2) + "\n")
