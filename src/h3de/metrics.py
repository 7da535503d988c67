"""Localization metrics in world millimetres, over present landmarks only.

- MRE: mean radial (Euclidean) error in mm, with its standard deviation (population, ddof=0); the median
  (the mean of the two middle values for an even count) and the maximum (``describe_errors``).
- SDR@r: successful detection rate, the percentage of present landmarks with error <= r mm.
- per-landmark MRE.
- presence: how well a per-landmark presence probability separates present from absent landmarks
  (AUROC), and, at a threshold (0.5 by default), its accuracy and the absent class's precision, recall
  and F1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "radial_errors",
    "summarize_errors",
    "describe_errors",
    "sdr_key",
    "presence_calls",
    "presence_auroc",
    "presence_summary",
    "LandmarkErrors",
    "PresenceScores",
]


def radial_errors(predicted: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, L) Euclidean errors in mm between (B, L, 3) world points; NaN where not ``present``."""
    errors = torch.linalg.vector_norm(predicted.double() - target.double(), dim=-1)
    return torch.where(present, errors, torch.full_like(errors, torch.nan))


def sdr_key(radius: float) -> str:
    """Metric name of SDR at ``radius`` mm: 2 -> 'sdr_2mm', 2.5 -> 'sdr_2.5mm'."""
    return f"sdr_{radius:g}mm"


def summarize_errors(errors: torch.Tensor, radii_mm: Sequence[float]) -> dict[str, float]:
    """Summary of an (N, L) error matrix (NaN = absent): mre_mm, mre_sd_mm, sdr_<r>mm (%), count.

    Every value is NaN when no landmark is present.
    """
    valid = errors[~torch.isnan(errors)].double()
    n = valid.numel()
    nan = float("nan")
    summary = {
        "mre_mm": valid.mean().item() if n else nan,
        "mre_sd_mm": valid.std(correction=0).item() if n else nan,
    }
    for r in radii_mm:
        summary[sdr_key(r)] = 100.0 * (valid <= r).double().mean().item() if n else nan
    summary["count"] = n
    return summary


def describe_errors(errors: torch.Tensor, radii_mm: Sequence[float]) -> dict[str, float]:
    """:func:`summarize_errors` plus ``median_mm`` and ``max_mm``, in report order (NaN where none present)."""
    valid = errors[~torch.isnan(errors)].double()
    summary = summarize_errors(errors, radii_mm)
    spread = {
        "median_mm": valid.quantile(0.5).item() if valid.numel() else float("nan"),
        "max_mm": valid.max().item() if valid.numel() else float("nan"),
    }
    first = {k: summary.pop(k) for k in ("count", "mre_mm", "mre_sd_mm")}
    return {**first, **spread, **summary}


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def presence_calls(called_present: torch.Tensor, present: torch.Tensor) -> dict:
    """How (N, L) bool calls of present/absent match the ground truth's (N, L) bool ``present``.

    The absent class is the positive one of the precision, recall and F1 (as the MML benchmark reports them).
    Returns:

    - ``absent``: landmarks absent from the ground truth;
    - ``absent_detected``: absent and called absent (the true positives); ``present_called_absent``: present
      and called absent (the false positives, missed detections);
    - ``presence_accuracy``: the fraction of landmarks called rightly (present or absent);
    - ``absent_precision``, ``absent_recall``, ``absent_f1``: of the absent class, None where the
      denominator is 0 (nothing called absent; nothing absent; neither).
    """
    called_absent, present = ~called_present.flatten().bool(), present.flatten().bool()
    true_pos = int((called_absent & ~present).sum())
    false_pos = int((called_absent & present).sum())
    false_neg = int((~called_absent & ~present).sum())
    absent = int((~present).sum())
    return {
        "absent": absent,
        "absent_detected": true_pos,
        "present_called_absent": false_pos,
        "presence_accuracy": _ratio(present.numel() - false_pos - false_neg, present.numel()),
        "absent_precision": _ratio(true_pos, true_pos + false_pos),
        "absent_recall": _ratio(true_pos, absent),
        "absent_f1": _ratio(2 * true_pos, 2 * true_pos + false_pos + false_neg),
    }


def presence_auroc(score: torch.Tensor, present: torch.Tensor) -> float | None:
    """AUROC of a presence probability with present as the positive class; None unless both kinds occur."""
    score, present = score.flatten().double(), present.flatten().bool()
    both = bool(present.any() and (~present).any())
    return binary_auroc(score, present.long()).item() if both else None


def presence_summary(score: torch.Tensor, present: torch.Tensor, threshold: float = 0.5) -> dict:
    """How a (N, L) presence probability separates present from absent landmarks ((N, L) bool).

    A score below ``threshold`` calls a landmark absent. Returns ``presence_auroc``
    (:func:`presence_auroc`), ``presence_threshold`` and the counts and rates of :func:`presence_calls`.
    """
    calls = presence_calls(score >= threshold, present)
    return {
        "absent": calls.pop("absent"),
        "presence_auroc": presence_auroc(score, present),
        "presence_threshold": threshold,
        **calls,
    }


class LandmarkErrors(Metric):
    """Accumulates per-sample, per-landmark radial errors (mm); syncs across processes by concatenation.

    Args:
        radii_mm: SDR radii in mm.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, radii_mm: Sequence[float] = (2.0, 2.5, 3.0, 4.0)) -> None:
        super().__init__()
        self.radii_mm = tuple(float(r) for r in radii_mm)
        self.add_state("errors", default=[], dist_reduce_fx="cat")

    def update(self, predicted: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> None:
        """predicted, target: (B, L, 3) world mm; present: (B, L) bool."""
        self.errors.append(radial_errors(predicted, target, present))

    def compute(self) -> dict[str, torch.Tensor]:
        """Summary values plus ``per_landmark`` ((L,) MRE in mm, NaN for never-present landmarks) and ``errors``
        (the (N, L) errors in mm of every sample, over all processes; NaN = absent)."""
        errors = dim_zero_cat(self.errors)
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in summarize_errors(errors, self.radii_mm).items()}
        out["per_landmark"] = torch.nanmean(errors, dim=0)
        out["errors"] = errors
        return out


class PresenceScores(Metric):
    """Accumulates (B, L) presence probabilities and ground-truth presence; syncs across processes by
    concatenation; computes :func:`presence_summary` at ``threshold``."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("present", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, present: torch.Tensor) -> None:
        """scores: (B, L) in [0, 1]; present: (B, L) bool."""
        self.scores.append(scores.float())
        self.present.append(present.bool())

    def compute(self) -> dict:
        return presence_summary(dim_zero_cat(self.scores), dim_zero_cat(self.present), self.threshold)
