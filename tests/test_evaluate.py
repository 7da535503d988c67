"""``h3de evaluate``: files against files by hand, one report for checkpoints and files, checkpoint resolution,
clean refusals, no stale outputs."""

from __future__ import annotations

import csv
import json
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from h3de.cli import main
from h3de.data.landmark_io import write_landmarks
from h3de.errors import H3deError
from h3de.evaluate import evaluate, evaluate_files, resolve_checkpoint
from h3de.predict import predict
from inference_helpers import save_checkpoint

NAN = [math.nan] * 3
REPORT = {"summary.json", "per_landmark.csv", "per_case.csv", "errors.csv", "cpe.png"}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _close(a, b) -> bool:
    """Equal, with floats (also in dicts) to 1e-6."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-6)
    return a == b


def _hand_case(tmp_path):
    """Two cases, landmarks A, B, C; truth as .mrk.json and .fcsv (C absent: left out), predictions as .csv and
    .json with presence. Scored errors 5, 1, 2 (case_a) and 2.5 (case_b); case_b's B is present but its presence
    0.2 calls it absent (3 mm off); case_b's C is absent and predicted without a position."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    a_truth = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    write_landmarks(truth / "case_a.mrk.json", ["A", "B", "C"], a_truth)
    write_landmarks(truth / "case_b.fcsv", ["A", "B"], np.array([[1.0, 1, 1], [5, 5, 5]]))
    a_pred = a_truth + np.array([[3.0, 4, 0], [0, 0, 1], [0, 2, 0]])
    write_landmarks(pred / "case_a.csv", ["A", "B", "C"], a_pred, np.array([0.9, 0.8, 0.7]))
    b_pred = np.array([[1.0, 1, 3.5], [5, 8, 5], NAN])
    write_landmarks(pred / "case_b.json", ["A", "B", "C"], b_pred, np.array([0.95, 0.2, 0.1]))
    return pred, truth


def test_files_are_scored_as_computed_by_hand(tmp_path, capsys):
    pred, truth = _hand_case(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "4 of 5 present landmarks scored: MRE 2.62 +- 1.47 mm, median 2.25, max 5.00 mm" in printed.out
    assert "missed detections (present, called absent): case_b/B" in printed.out and printed.err == ""
    assert {p.name for p in out.iterdir()} == REPORT

    s = json.loads((out / "summary.json").read_text())
    values = np.array([5.0, 1.0, 2.0, 2.5])
    assert s["num_cases"] == 2 and s["present"] == 5 and s["count"] == 4
    assert s["mre_mm"] == pytest.approx(2.625)
    assert s["mre_sd_mm"] == pytest.approx(math.sqrt(8.6875 / 4)) and values.std() == pytest.approx(s["mre_sd_mm"])
    assert s["median_mm"] == pytest.approx(2.25) and s["max_mm"] == pytest.approx(5.0)
    assert [s[k] for k in ("sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm")] == pytest.approx([50.0, 75.0, 75.0, 75.0])
    assert s["per_landmark_mre_mm"] == pytest.approx({"A": 3.75, "B": 1.0, "C": 2.0})
    # 6 landmarks, 1 absent (case_b C, called absent: TP); case_b B present but called absent (FP)
    assert (s["absent"], s["absent_detected"], s["present_called_absent"]) == (1, 1, 1)
    assert s["presence_accuracy"] == pytest.approx(5 / 6)
    assert s["absent_precision"] == pytest.approx(0.5) and s["absent_recall"] == pytest.approx(1.0)
    assert s["absent_f1"] == pytest.approx(2 / 3)
    assert s["presence_auroc"] == pytest.approx(1.0)  # every present score (>= 0.2) above the absent one (0.1)
    assert s["missed_detections"] == [{"case_id": "case_b", "landmark": "B"}] and s["warnings"] == []

    cases = {r["case_id"]: r for r in _rows(out / "per_case.csv")}
    assert float(cases["case_a"]["mre_mm"]) == pytest.approx(8 / 3)
    assert float(cases["case_a"]["median_mm"]) == pytest.approx(2.0) and float(cases["case_a"]["max_mm"]) == 5.0
    assert (cases["case_b"]["count"], cases["case_b"]["missed"], cases["case_b"]["median_mm"]) == ("1", "1", "2.5")
    landmarks = {r["landmark"]: r for r in _rows(out / "per_landmark.csv")}
    assert float(landmarks["A"]["median_mm"]) == pytest.approx(3.75) and float(landmarks["A"]["max_mm"]) == 5.0
    assert (landmarks["B"]["present"], landmarks["B"]["missed"], landmarks["C"]["present"]) == ("2", "1", "1")
    errors = {(r["case_id"], r["landmark"]): r for r in _rows(out / "errors.csv")}
    assert len(errors) == 6
    assert errors[("case_b", "B")]["error_mm"] == "" and errors[("case_b", "B")]["called_present"] == "0"
    assert errors[("case_b", "B")]["pred_y"] == "8.0" and errors[("case_b", "C")]["present"] == "0"
    assert float(errors[("case_a", "A")]["error_mm"]) == pytest.approx(5.0)

    png = (out / "cpe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.imread(out / "cpe.png").ndim == 3


def test_the_threshold_applies_to_the_presence_the_files_carry(tmp_path):
    pred, truth = _hand_case(tmp_path)
    s = evaluate_files(pred, truth, tmp_path / "eval", presence_threshold=0.15, radii=[3, 2]).summary
    assert s["count"] == 5 and s["present_called_absent"] == 0 and s["missed_detections"] == []
    assert s["mre_mm"] == pytest.approx((5 + 1 + 2 + 2.5 + 3) / 5)
    assert s["sdr_radii_mm"] == [2.0, 3.0] and s["sdr_3mm"] == pytest.approx(80.0) and "sdr_4mm" not in s
    s = evaluate_files(pred, truth, tmp_path / "eval0", presence_threshold=0.0).summary
    assert s["absent_detected"] == 1  # no position: called absent at any threshold


def test_names_and_files_the_truth_does_not_know_are_warned_not_scored(tmp_path, capsys):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    write_landmarks(truth / "c1.mrk.json", ["A", "B"], np.array([[0.0, 0, 0], [1, 1, 1]]))
    write_landmarks(pred / "c1.fcsv", ["A", "Z"], np.array([[0.0, 0, 2], [9, 9, 9]]))  # B missing: called absent
    write_landmarks(pred / "c9.csv", ["A"], np.zeros((1, 3)))
    (pred / "summary.json").write_text("{}")  # h3de predict's own outputs are not prediction files
    (pred / "predictions.csv").write_text("case_id\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "h3de: warning: 1 prediction file(s) without truth, not scored: c9.csv",
        "h3de: warning: landmark 'Z' is not in the truth, not scored (1 case(s): c1)",
    ]
    s = json.loads((out / "summary.json").read_text())
    assert s["count"] == 1 and s["mre_mm"] == pytest.approx(2.0) and s["present_called_absent"] == 1
    assert s["presence_auroc"] is None and len(s["warnings"]) == 2


def test_a_missing_prediction_file_is_an_error_naming_the_case_and_nothing_is_written(tmp_path, capsys):
    pred, truth = _hand_case(tmp_path)
    write_landmarks(truth / "case_c.mrk.json", ["A"], np.zeros((1, 3)))
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no prediction file for 1 truth case(s): case_c" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_evaluate_arguments_give_one_line(tmp_path, capsys):
    pred, truth = _hand_case(tmp_path)
    files = ["--pred", str(pred), "--truth", str(truth)]
    cases = [
        ([], "give a checkpoint"),
        ([str(tmp_path / "m.ckpt"), *files], "not both"),
        (["--pred", str(pred)], "--pred and --truth go together"),
        ([*files, "--split", "val"], "--split: only with a checkpoint"),
        ([*files, "--radii", "2,x"], "--radii '2,x'"),
        ([*files, "--radii", "0,2"], "SDR radii must be positive"),
        ([*files, "--presence-threshold", "2"], "presence threshold must be in [0, 1]"),
        (["--pred", str(tmp_path / "nowhere"), "--truth", str(truth)], "no such prediction folder"),
        ([str(tmp_path / "m.ckpt"), "--batch-size", "0"], "batch size must be a positive integer, got 0"),
        ([str(tmp_path / "m.ckpt"), "--batch-size", "-3"], "batch size must be a positive integer, got -3"),
        ([str(tmp_path / "m.ckpt")], "checkpoint not found"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "out").exists()
    (pred / "case_a.json").write_text((pred / "case_b.json").read_text())
    with pytest.raises(H3deError, match="case 'case_a' has two prediction files"):
        evaluate_files(pred, truth, tmp_path / "out")


def test_latest_a_run_directory_or_a_file_name_the_checkpoint(tmp_path):
    runs = tmp_path / "runs" / "exp"
    for name in ("20260101-120000", "20260102-080000-2", "20260102-080000-10", "20260103-000000", "notes"):
        (runs / name / "checkpoints").mkdir(parents=True)
        if name != "20260103-000000":  # the newest run has no best checkpoint yet (training)
            (runs / name / "checkpoints" / "best.ckpt").write_bytes(b"")
    newest = runs / "20260102-080000-10" / "checkpoints" / "best.ckpt"
    assert resolve_checkpoint(runs / "latest") == newest
    assert resolve_checkpoint(runs / "20260101-120000") == runs / "20260101-120000" / "checkpoints" / "best.ckpt"
    assert resolve_checkpoint(newest) == newest
    with pytest.raises(H3deError, match="a folder without checkpoints/best.ckpt"):
        resolve_checkpoint(runs / "20260103-000000")
    with pytest.raises(H3deError, match="no run in .* has a checkpoints/best.ckpt"):
        resolve_checkpoint(tmp_path / "runs" / "other" / "latest")
    with pytest.raises(H3deError, match="checkpoint not found"):
        resolve_checkpoint(runs / "20991231-000000")


BLOB_OVERRIDES = ["data.spacing_mm=[3,3,3]", "data.patch_size=[16,16,16]"]
BLOB_OVERRIDES += ["model.unet.channels=[4,8]", "model.unet.strides=[2]"]
BLOB_NAMES = ["a_L", "a_R", "top", "front"]


def _blob_run(blob_dataset, run_dir, *overrides):
    overrides = [f"data.root={blob_dataset.parent}", "loss=weighted_mse", *BLOB_OVERRIDES, *overrides]
    return save_checkpoint(run_dir / "checkpoints" / "best.ckpt", overrides, BLOB_NAMES)


def test_evaluate_latest_through_the_cli_and_no_stale_predictions(blob_dataset, tmp_path, capsys):
    runs = tmp_path / "runs" / "blobs"
    (runs / "20250101-000000" / "checkpoints").mkdir(parents=True)
    (runs / "20250101-000000" / "checkpoints" / "best.ckpt").write_bytes(b"an older run, not loadable")
    ckpt = _blob_run(blob_dataset, runs / "20260101-000000")
    assert main(["evaluate", str(runs / "latest"), "--split", "train", "--batch-size", "3"]) == 0
    out = runs / "20260101-000000" / "eval_train"
    assert f"checkpoint: {ckpt.resolve()}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == REPORT | {"predictions"}
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"case_{i}.mrk.json" for i in range(4)]
    rows = _rows(out / "per_case.csv")
    assert len(rows) == 4 and {"median_mm", "max_mm", "missed"} <= set(rows[0])
    # a second evaluation into the same folder: only its own cases remain, no temporary folder is left
    assert main(["evaluate", str(runs / "20260101-000000"), "--split", "test", "--out", str(out)]) == 0
    assert [p.name for p in (out / "predictions").iterdir()] == ["case_5.mrk.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / "summary.json").read_text())["split"] == "test"


def test_a_checkpoint_scores_as_its_predicted_files_do(blob_dataset, tmp_path):
    """evaluate CHECKPOINT at a threshold = h3de predict at that threshold, then evaluate --pred --truth."""
    # the probe's heatmaps are the scan, scaled so that its presence (the peak) is about 0.25-0.3, one per case
    ckpt = _blob_run(blob_dataset, tmp_path / "run", "model.name=intensity_probe")
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["network.gain"] = torch.tensor(0.01)
    torch.save(state, ckpt)
    evaluate(ckpt, "train", tmp_path / "eval", presence_threshold=0.0)
    presence = sorted({float(r["presence_score"]) for r in _rows(tmp_path / "eval" / "errors.csv")})
    assert len(presence) == 4 and presence[-1] < 1.0
    threshold = (presence[1] + presence[2]) / 2  # two of the four cases called absent
    evaluated = evaluate(ckpt, "train", tmp_path / "eval", presence_threshold=threshold)
    assert 0 < evaluated.summary["present_called_absent"] < evaluated.summary["present"]
    images, truth = tmp_path / "train_images", tmp_path / "train_truth"
    images.mkdir()
    truth.mkdir()
    for case in evaluated.case_ids:
        os.symlink(blob_dataset.parent / "images" / f"{case}.nii.gz", images / f"{case}.nii.gz")
        os.symlink(blob_dataset.parent / "landmarks" / f"{case}.mrk.json", truth / f"{case}.mrk.json")
    predict(ckpt, images, tmp_path / "pred", fmt="csv", presence_threshold=threshold, progress=False)
    files = evaluate_files(tmp_path / "pred", truth, presence_threshold=threshold)
    assert files.out_dir == tmp_path / "pred" / "eval" and files.warnings == []
    for key, value in evaluated.summary.items():
        if key not in ("checkpoint", "split"):
            assert _close(files.summary[key], value), key
    np.testing.assert_allclose(files.errors.numpy(), evaluated.errors.numpy(), atol=1e-9, equal_nan=True)
    for name in ("per_landmark.csv", "per_case.csv"):
        assert _rows(tmp_path / "pred" / "eval" / name) == _rows(tmp_path / "eval" / name), name
