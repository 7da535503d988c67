import math

import pytest
import torch

from h3de.metrics import (
    LandmarkErrors,
    describe_errors,
    presence_calls,
    presence_summary,
    radial_errors,
    summarize_errors,
)

NAN = float("nan")


def test_hand_computed_case_with_missing_landmarks():
    target = torch.zeros(2, 3, 3, dtype=torch.float64)
    predicted = target.clone()
    predicted[0, 0] = torch.tensor([3.0, 4.0, 0.0])  # 5 mm
    predicted[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # 1 mm
    predicted[0, 2] = torch.tensor([100.0, 0.0, 0.0])  # absent: ignored
    predicted[1, 0] = torch.tensor([0.0, 0.0, 2.0])  # 2 mm
    predicted[1, 1] = torch.tensor([0.0, 2.5, 0.0])  # 2.5 mm
    predicted[1, 2] = torch.tensor([0.0, 0.0, 0.0])  # 0 mm
    present = torch.tensor([[True, True, False], [True, True, True]])
    errors = radial_errors(predicted, target, present)
    assert math.isnan(errors[0, 2])
    values = [5.0, 1.0, 2.0, 2.5, 0.0]
    mean = sum(values) / 5  # 2.1
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    summary = summarize_errors(errors, (2.0, 2.5, 3.0, 4.0))
    assert summary["mre_mm"] == pytest.approx(2.1)
    assert summary["mre_sd_mm"] == pytest.approx(sd)
    assert summary["sdr_2mm"] == pytest.approx(60.0)  # 1, 2, 0
    assert summary["sdr_2.5mm"] == pytest.approx(80.0)
    assert summary["sdr_4mm"] == pytest.approx(80.0)
    assert summary["count"] == 5

    metric = LandmarkErrors((2.0, 2.5, 3.0, 4.0))
    metric.update(predicted[:1], target[:1], present[:1])  # two batches accumulate
    metric.update(predicted[1:], target[1:], present[1:])
    out = metric.compute()
    assert out["mre_mm"].item() == pytest.approx(2.1)
    assert torch.allclose(out["per_landmark"], torch.tensor([3.5, 1.75, 0.0], dtype=torch.float64))
    assert torch.allclose(out["errors"], errors, equal_nan=True)  # every sample's errors, in update order


def test_nothing_present_gives_nan():
    errors = torch.full((2, 3), NAN)
    summary = summarize_errors(errors, (2.0,))
    assert math.isnan(summary["mre_mm"]) and math.isnan(summary["sdr_2mm"]) and summary["count"] == 0


def test_describe_errors_adds_the_median_and_max():
    errors = torch.tensor([[4.0, NAN, 1.0], [2.0, 3.0, NAN]])
    d = describe_errors(errors, (2.0,))
    assert list(d)[:5] == ["count", "mre_mm", "mre_sd_mm", "median_mm", "max_mm"]
    assert d["median_mm"] == pytest.approx(2.5) and d["max_mm"] == 4.0  # even count: the mean of 2 and 3
    assert d["count"] == 4 and d["mre_mm"] == pytest.approx(2.5) and d["sdr_2mm"] == pytest.approx(50.0)
    nothing = describe_errors(torch.full((1, 2), NAN), (2.0,))
    assert math.isnan(nothing["median_mm"]) and math.isnan(nothing["max_mm"])


def test_presence_calls_count_calls_without_scores():
    called = torch.tensor([[True, False, False], [True, True, False]])
    present = torch.tensor([[True, True, False], [False, True, False]])
    c = presence_calls(called, present)  # TP 2 (absent, called absent), FP 1, FN 1
    assert (c["absent"], c["absent_detected"], c["present_called_absent"]) == (3, 2, 1)
    assert c["presence_accuracy"] == pytest.approx(4 / 6) and c["absent_f1"] == pytest.approx(4 / 6)


def test_presence_summary_ranks_and_counts_absent_landmarks():
    score = torch.tensor([[0.9, 0.2], [0.6, 0.1]])
    present = torch.tensor([[True, False], [True, True]])
    summary = presence_summary(score, present, threshold=0.5)
    # present scores 0.9, 0.6, 0.1 against the absent 0.2: two of three pairs ranked right
    assert summary["presence_auroc"] == pytest.approx(2 / 3)
    assert summary["absent"] == 1 and summary["absent_detected"] == 1 and summary["present_called_absent"] == 1
    # called absent: 0.2 (absent, TP) and 0.1 (present, FP); no absent one missed
    assert summary["presence_accuracy"] == pytest.approx(3 / 4)
    assert summary["absent_precision"] == pytest.approx(1 / 2) and summary["absent_recall"] == pytest.approx(1.0)
    assert summary["absent_f1"] == pytest.approx(2 / 3)
    assert summary["presence_threshold"] == 0.5


def test_presence_summary_absent_class_by_hand():
    # 10 landmarks: 4 absent (scores 0.1, 0.3, 0.45, 0.7), 6 present (0.2, 0.55, 0.6, 0.8, 0.9, 0.95)
    score = torch.tensor([[0.1, 0.3, 0.45, 0.7, 0.2], [0.55, 0.6, 0.8, 0.9, 0.95]])
    present = torch.tensor([[False, False, False, False, True], [True] * 5])
    s = presence_summary(score, present)  # threshold 0.5: TP 3, FP 1 (0.2), FN 1 (0.7), TN 5
    assert (s["absent"], s["absent_detected"], s["present_called_absent"]) == (4, 3, 1)
    assert s["presence_accuracy"] == pytest.approx(8 / 10)
    assert s["absent_precision"] == pytest.approx(3 / 4) and s["absent_recall"] == pytest.approx(3 / 4)
    assert s["absent_f1"] == pytest.approx(3 / 4)
    # 19 of the 24 (absent, present) pairs ranked right; wrong: 0.7 over 0.2, 0.55, 0.6 and 0.3, 0.45 over 0.2
    assert s["presence_auroc"] == pytest.approx(19 / 24)
    strict = presence_summary(score, present, threshold=0.75)  # TP 4, FP 3 (0.2, 0.55, 0.6), FN 0
    assert strict["absent_precision"] == pytest.approx(4 / 7) and strict["absent_recall"] == 1.0
    assert strict["absent_f1"] == pytest.approx(8 / 11) and strict["presence_accuracy"] == pytest.approx(7 / 10)


def test_presence_summary_undefined_ratios_are_none():
    all_present = torch.ones(2, 3, dtype=torch.bool)
    s = presence_summary(torch.full((2, 3), 0.9), all_present)  # nothing absent, nothing called absent
    assert s["presence_auroc"] is None and s["presence_accuracy"] == 1.0
    assert s["absent_precision"] is None and s["absent_recall"] is None and s["absent_f1"] is None
    missed = presence_summary(torch.full((2, 3), 0.9), ~torch.eye(2, 3, dtype=torch.bool))  # 2 absent, none called
    assert missed["absent_recall"] == 0.0 and missed["absent_f1"] == 0.0 and missed["absent_precision"] is None
    assert missed["presence_accuracy"] == pytest.approx(4 / 6)
