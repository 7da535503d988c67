"""Scoring landmarks against the ground truth, and the evaluation report: one implementation for both
``h3de evaluate CHECKPOINT`` (predictions made in memory) and ``h3de evaluate --pred DIR --truth DIR`` (files).

The rules, in world millimetres:

- a landmark is *present* when the ground truth gives its position (a NaN row is absent);
- a prediction is *called present* when it gives a position and, where it carries a presence probability,
  that probability is at least the threshold; otherwise it is *called absent*;
- errors, MRE, SD, median, max and SDR are over the landmarks present AND called present (*scored*); a
  present landmark called absent is a missed detection: counted (``present_called_absent``) and listed
  (``missed_detections``), never given an error;
- presence accuracy and the absent class's precision, recall and F1 compare the calls with the truth
  (:func:`h3de.metrics.presence_calls`); the AUROC needs a probability for every landmark.

:func:`write_report` writes (each file atomically) ``summary.json``, ``per_landmark.csv``, ``per_case.csv``
(count, MRE, SD, median, max and SDR of each), ``errors.csv`` (every case and landmark: truth, prediction,
presence, error, call) and ``cpe.png`` (the cumulative error distribution, the SDR radii marked).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from h3de.errors import H3deError
from h3de.io_utils import atomic_write, csv_text
from h3de.metrics import describe_errors, presence_auroc, presence_calls, radial_errors

__all__ = ["Scores", "score", "write_report", "check_radii"]


@dataclass
class Scores:
    names: list[str]  # L landmark names
    case_ids: list[str]  # N case ids
    truth: torch.Tensor  # (N, L, 3) RAS mm, NaN rows = absent
    predicted: torch.Tensor  # (N, L, 3) RAS mm, NaN rows = no position
    presence: torch.Tensor  # (N, L) probability, NaN = none given
    called_present: torch.Tensor  # (N, L) bool
    errors: torch.Tensor  # (N, L) mm, NaN unless scored (present and called present)
    radii: list[float]  # SDR radii, mm
    summary: dict  # the values of summary.json (NaN where undefined)

    @property
    def present(self) -> torch.Tensor:
        """(N, L) bool: present in the ground truth."""
        return torch.isfinite(self.truth).all(dim=-1)


def check_radii(radii: Sequence[float]) -> list[float]:
    """The SDR radii sorted, without repeats; an H3deError unless there is at least one and all are positive."""
    values = sorted({float(r) for r in radii})
    if not values or not all(math.isfinite(r) and r > 0 for r in values):
        raise H3deError(f"SDR radii must be positive numbers of mm, got {list(radii)}")
    return values


def score(
    names: list[str],
    case_ids: list[str],
    truth: torch.Tensor,
    predicted: torch.Tensor,
    presence: torch.Tensor | None = None,
    threshold: float = 0.5,
    radii: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
) -> Scores:
    """Score predictions against the ground truth by the rules of this module.

    Args:
        names: L landmark names.
        case_ids: N case ids.
        truth: (N, L, 3) RAS mm; NaN rows for landmarks absent from the ground truth.
        predicted: (N, L, 3) RAS mm; NaN rows for landmarks predicted without a position (called absent).
        presence: (N, L) presence probabilities in [0, 1], NaN where none is given; None: none at all.
        threshold: a probability below it calls the landmark absent.
        radii: SDR radii in mm.
    """
    truth, predicted = truth.double(), predicted.double()
    presence = torch.full(truth.shape[:2], math.nan, dtype=torch.float64) if presence is None else presence.double()
    present = torch.isfinite(truth).all(dim=-1)
    called_present = torch.isfinite(predicted).all(dim=-1) & ~(presence < threshold)  # NaN: no probability
    errors = radial_errors(predicted, truth, present & called_present)
    radii = check_radii(radii)
    missed = present & ~called_present
    summary = {
        "num_cases": len(case_ids),
        "num_landmarks": len(names),
        "present": int(present.sum()),
        **describe_errors(errors, radii),
        "sdr_radii_mm": radii,
        "per_landmark_mre_mm": {n: torch.nanmean(errors[:, i]).item() for i, n in enumerate(names)},
        "presence_auroc": presence_auroc(presence, present) if bool(torch.isfinite(presence).all()) else None,
        "presence_threshold": threshold,
        **presence_calls(called_present, present),
        "missed_detections": [
            {"case_id": case_ids[c], "landmark": names[i]} for c, i in torch.nonzero(missed).tolist()
        ],
    }
    return Scores(names, case_ids, truth, predicted, presence, called_present, errors, radii, summary)


def write_report(out_dir: str | Path, scores: Scores, header: dict | None = None) -> dict:
    """Write the report of ``scores`` into ``out_dir`` (created); returns the summary written.

    Args:
        out_dir: output folder.
        scores: from :func:`score`.
        header: entries put first in ``summary.json`` (what was evaluated: checkpoint and split, or folders).
    """
    from h3de.plots import cumulative_errors

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise H3deError(f"{out_dir}: cannot write the evaluation there ({e.strerror or e})") from None
    s = scores
    present, missed = s.present, s.present & ~s.called_present
    stat_keys = list(describe_errors(s.errors[:1, :1], s.radii))
    landmark_rows = [
        [name, int(present[:, i].sum()), int(missed[:, i].sum()), *_stats(s.errors[:, i], s.radii)]
        for i, name in enumerate(s.names)
    ]
    atomic_write(out_dir / "per_landmark.csv", csv_text(["landmark", "present", "missed", *stat_keys], landmark_rows))
    case_rows = [
        [case, int(present[c].sum()), int(missed[c].sum()), *_stats(s.errors[c], s.radii)]
        for c, case in enumerate(s.case_ids)
    ]
    atomic_write(out_dir / "per_case.csv", csv_text(["case_id", "present", "missed", *stat_keys], case_rows))
    atomic_write(out_dir / "errors.csv", _errors_table(s))
    cumulative_errors(out_dir / "cpe.png", s.errors.numpy(), s.radii, title=_plot_title(s))
    summary = _finite({**(header or {}), **s.summary})
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")  # last: the report is complete
    return summary


def _errors_table(s: Scores) -> str:
    header = ["case_id", "landmark", "present", "gt_x", "gt_y", "gt_z", "pred_x", "pred_y", "pred_z"]
    header += ["presence_score", "error_mm", "called_present"]
    rows = []
    for c, case in enumerate(s.case_ids):
        for i, name in enumerate(s.names):
            positions = [_cell(v) for v in (*s.truth[c, i].tolist(), *s.predicted[c, i].tolist())]
            presence, error = _cell(s.presence[c, i].item(), ".4f"), _cell(s.errors[c, i].item(), ".4f")
            rows.append([case, name, int(s.present[c, i]), *positions, presence, error, int(s.called_present[c, i])])
    return csv_text(header, rows)


def _stats(errors: torch.Tensor, radii: list[float]) -> list:
    return [_cell(v) for v in describe_errors(errors, radii).values()]


def _cell(value: float, spec: str = "") -> str | float:
    if math.isnan(value):
        return ""
    return format(value, spec) if spec else value


def _plot_title(s: Scores) -> str:
    missed = s.summary["present_called_absent"]
    title = f"{s.summary['count']} landmarks of {len(s.case_ids)} cases"
    return title + (f" ({missed} present ones called absent, not shown)" if missed else "")


def _finite(value):
    """``value`` with NaN and infinite floats replaced by None, in nested dicts and lists (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
