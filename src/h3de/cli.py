"""The ``h3de`` command: parses arguments and calls one function per stage.

h3de train [EXPERIMENT.yaml] [key=value ...] [resume=last|RUN_DIR|CKPT]
h3de evaluate CHECKPOINT [--split test] [--out DIR] [--data-root DIR] [--batch-size N] [--radii 2,2.5,3,4]
              [--presence-threshold 0.5]
h3de evaluate --pred DIR --truth DIR [--out DIR] [--radii 2,2.5,3,4] [--presence-threshold 0.5]
h3de predict CHECKPOINT_OR_EXPORT IMAGE_OR_FOLDER --out DIR [--format mrk.json|fcsv|csv|json] [--qc] [--truth PATH]
h3de export CHECKPOINT --format onnx|torchscript [--out DIR]
h3de sweep SWEEP.yaml --storage URL [--study NAME] [--trials N] [--gpus 0,1,...] [--heartbeat S]
h3de compare RUN_DIR [RUN_DIR ...] [--out DIR] [--no-flops]
h3de profile MODEL [MODEL ...] [--input D,H,W] [key=value ...]
h3de data phantom --out DIR [--seed 0] [--cases 40] [--voxel-mm 3.0] [--workers 1]
h3de data import IMAGES LANDMARKS --out DIR [--split 0.7,0.15,0.15] [--seed 0] [--mirrored auto|none|A:B,...]
h3de data convert {mml,afids,verse} SRC --out DIR [--split F,F,F] [--seed 0]
h3de data afids --out DIR [--wheel PATH] [--seed 0] [--val 6] [--test 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from h3de.errors import H3deError

if TYPE_CHECKING:
    from h3de.data.importer import ImportReport

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h3de", description="3D anatomical landmark detection (H3DE-Net).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an experiment")
    train.add_argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="an experiment YAML first (optional), then key=value; resume=last (the experiment's newest run), "
        "resume=RUN_DIR or resume=RUN_DIR/checkpoints/X.ckpt continues that run (only trainer.max_epochs, "
        "max_steps, max_time and enable_progress_bar may change)",
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    evaluate = commands.add_parser(
        "evaluate",
        help="score a checkpoint on a split, or prediction files against ground-truth files (errors in world mm)",
        description="Score a checkpoint on a split of its dataset, or a folder of prediction files against a "
        "folder of ground-truth files (paired by case id, the file name without its .mrk.json/.fcsv/.csv/.json "
        "suffix; the formats may differ). Both write summary.json, per_landmark.csv, per_case.csv, errors.csv "
        "and cpe.png; a checkpoint also predictions/<case>.mrk.json. Errors are over the landmarks present in "
        "the truth and called present; present ones called absent are counted and listed as missed.",
    )
    evaluate.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="a .ckpt file; a run directory (its checkpoints/best.ckpt); or runs/<experiment>/latest: the newest "
        "run of that experiment (by its timestamp name) that has a checkpoints/best.ckpt",
    )
    evaluate.add_argument("--pred", metavar="DIR", help="folder of prediction files (with --truth, no checkpoint)")
    evaluate.add_argument("--truth", metavar="DIR", help="folder of ground-truth landmark files (with --pred)")
    evaluate.add_argument("--split", default=None, choices=("train", "val", "test"), help="checkpoint: default test")
    evaluate.add_argument("--out", default=None, help="output folder (default: <run>/eval_<split>, or <PRED>/eval)")
    evaluate.add_argument("--data-root", default=None, help="checkpoint: dataset folder overriding the checkpoint's")
    evaluate.add_argument("--batch-size", type=int, default=None, help="checkpoint: evaluation batch size")
    evaluate.add_argument(
        "--radii",
        default=None,
        metavar="R,R,...",
        help="SDR radii in mm (default: the checkpoint's sdr_radii_mm; for files the config default 2,2.5,3,4)",
    )
    evaluate.add_argument(
        "--presence-threshold",
        type=float,
        default=0.5,
        metavar="P",
        help="call a landmark absent when its presence probability is below P (default 0.5; 0 calls every "
        "landmark with a position present); a prediction without a position is always called absent; "
        "called-absent landmarks are written as missing in the .mrk.json",
    )

    predict = commands.add_parser("predict", help="landmarks of new scans (no ground truth needed)")
    predict.add_argument(
        "checkpoint",
        help="a .ckpt written by h3de train, a run directory, or runs/<experiment>/latest (as evaluate); or a folder "
        "written by h3de export (its networks run by onnxruntime or TorchScript)",
    )
    predict.add_argument("inputs", metavar="IMAGE_OR_FOLDER", help="a NIfTI/NRRD image or a folder of them")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument(
        "--format",
        default="mrk.json",
        choices=("mrk.json", "fcsv", "csv", "json"),
        help="landmark file format, RAS mm (default mrk.json: 3D Slicer markups)",
    )
    predict.add_argument("--qc", action="store_true", help="write <case>_qc.png: slices through each prediction")
    predict.add_argument("--truth", default=None, help="landmark file (one image) or folder of them, drawn in the QC")
    predict.add_argument(
        "--presence-threshold",
        type=float,
        default=0.5,
        metavar="P",
        help="write a landmark as absent when its presence probability is below P (default 0.5)",
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    sweep = commands.add_parser(
        "sweep",
        help="run a W&B-format sweep file on Optuna, without a W&B server",
        description="Run the trials of a sweep file (W&B's format, experiments/sweeps/) on Optuna: grid, random, "
        "bayes (TPE), hyperband pruning from early_terminate. Workers on any machine that give the same --storage "
        "and --study share one study.",
    )
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml")
    sweep.add_argument(
        "--storage", required=True, metavar="URL", help="Optuna storage: sqlite:///sweep.db, postgresql://user@host/db"
    )
    sweep.add_argument("--study", default=None, help="study name (default: the file's name field, else its stem)")
    sweep.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials this worker runs (each --gpus worker: that many); default: "
        "until the grid or run_cap is used up, or forever for random/bayes without run_cap",
    )
    sweep.add_argument("--gpus", default=None, metavar="ID,ID,...", help="one worker process per GPU id")
    sweep.add_argument(
        "--heartbeat",
        type=int,
        default=None,
        metavar="S",
        help="seconds between a running trial's heartbeats (default 60); a trial silent for 2*S (its worker was "
        "killed) is failed and run again by the next worker to start a trial",
    )

    compare = commands.add_parser("compare", help="table and val MRE curves of finished runs, from their folders")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by h3de train")
    compare.add_argument("--out", default="compare", help="folder for compare.md, compare.csv, val_mre.png (./compare)")
    compare.add_argument("--no-flops", action="store_true", help="skip the parameter and FLOP count (one forward pass)")

    export = commands.add_parser(
        "export",
        help="the model's networks (both coarse-to-fine stages) and their decodings as ONNX or TorchScript, checked "
        "against PyTorch",
        description="Export the networks of a checkpoint and their decodings for deployment, with h3de_export.json "
        "(preprocessing, landmarks, detection mode): h3de predict runs from the folder, without torch for ONNX. Each "
        "file is run against PyTorch at two sizes and the largest absolute difference is printed.",
    )
    export.add_argument("checkpoint", help="a .ckpt, a run directory, or runs/<experiment>/latest (as evaluate)")
    export.add_argument("--format", required=True, help="onnx (run by onnxruntime) or torchscript")
    export.add_argument("--out", default=None, help="new or empty output folder (default: <run>/export_<format>)")

    profile = commands.add_parser("profile", help="parameters, FLOPs, time and peak memory of networks")
    profile.add_argument("args", nargs="+", metavar="ARG", help="one or more model names, then key=value overrides")
    profile.add_argument("--config", default=None, help="experiment YAML whose model section is used")
    profile.add_argument("--input", default="128,128,64", help="input size D,H,W in voxels (default 128,128,64)")
    profile.add_argument("--landmarks", type=int, default=14, help="number of landmarks (output channels)")
    profile.add_argument("--batch", type=int, default=1)
    profile.add_argument("--device", default="cpu", help="cpu or cuda")
    profile.add_argument("--repeats", type=int, default=3)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    phantom = data_commands.add_parser("phantom", help="generate the built-in synthetic head phantom")
    phantom.add_argument("--out", required=True, help="output folder (dataset.json is written last)")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--cases", type=int, default=40, help="number of cases")
    phantom.add_argument("--voxel-mm", type=float, default=3.0, help="in-plane voxel size in mm")
    phantom.add_argument("--workers", type=int, default=1, help="processes rendering cases in parallel")

    importer = data_commands.add_parser("import", help="a manifest for a folder of images and one of landmark files")
    importer.add_argument("images", help="folder of NIfTI/NRRD images (case id = file name without suffix)")
    importer.add_argument("landmarks", help="folder of landmark files (.mrk.json, .fcsv, .csv, .json), same case ids")
    importer.add_argument("--out", required=True, help="new or empty output folder (dataset.json is written last)")
    importer.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    importer.add_argument("--seed", type=int, default=0, help="seed of the split draw")
    importer.add_argument(
        "--mirrored",
        default="auto",
        help="left/right pairs: auto (detected from the names, default), none, or A:B,C:D",
    )
    importer.add_argument("--name", default=None, help="dataset name (default: the output folder's name)")

    convert = data_commands.add_parser("convert", help="a manifest for a public landmark dataset as it ships")
    convert.add_argument("kind", choices=("mml", "afids", "verse"), help="the dataset")
    convert.add_argument("src", help="the downloaded dataset's folder")
    convert.add_argument("--out", required=True, help="new or empty output folder (dataset.json is written last)")
    convert.add_argument(
        "--split", default=None, help="train,val,test fractions drawn from --seed (default: the dataset's splits)"
    )
    convert.add_argument("--seed", type=int, default=0, help="seed of the split draw")

    afids = data_commands.add_parser(
        "afids", help="the AFIDs brain example: MNI templates with expert landmarks, synthetic held-out subjects"
    )
    afids.add_argument("--out", required=True, help="output folder (dataset.json is written last)")
    afids.add_argument(
        "--wheel", default=None, help="autoafids-0.1.4-py3-none-any.whl already downloaded (then no network is used)"
    )
    afids.add_argument("--seed", type=int, default=0, help="seed of the synthetic subjects")
    afids.add_argument("--val", type=int, default=6, help="synthetic subjects in the val split")
    afids.add_argument("--test", type=int, default=10, help="synthetic subjects in the test split")
    return parser


def _train(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from h3de.config import load_config
    from h3de.resume import prepare_resume, split_resume
    from h3de.train import train

    items = list(args.args)
    path = items.pop(0) if items and "=" not in items[0] else None
    resume, items = split_resume(items)
    cfg, point = prepare_resume(resume, path, items) if resume is not None else (load_config(path, items), None)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return
    result = train(cfg, resume=point)
    if point is not None and result.is_global_zero:
        print(f"resumed from {point.checkpoint} (after epoch {point.epoch}, step {point.global_step})")
    if not result.is_global_zero:
        return
    print(f"run directory: {result.run_dir}")
    if result.best_checkpoint is not None:
        print(f"best checkpoint: {result.best_checkpoint}")
    for offline_run in sorted((result.run_dir / "wandb").glob("offline-run-*")):
        print(f"W&B run saved offline; upload it with: wandb sync {offline_run}")
    if result.best_val_mre_mm is not None:
        print(f"best val MRE: {result.best_val_mre_mm:.2f} mm", end=" ")
        print(f"(landmark spread: {result.val_spread_mm:.2f} mm, the MRE of predicting mean training positions)")


def _evaluate(args: argparse.Namespace) -> None:
    from h3de.evaluate import evaluate, evaluate_files

    radii = _radii(args.radii) if args.radii is not None else None
    files = args.pred is not None or args.truth is not None
    if files and args.checkpoint is not None:
        raise H3deError("give either a checkpoint or --pred DIR --truth DIR, not both")
    if not files and args.checkpoint is None:
        raise H3deError("give a checkpoint (a .ckpt, a run directory, runs/<experiment>/latest) or --pred and --truth")
    if files:
        if args.pred is None or args.truth is None:
            raise H3deError("--pred and --truth go together: give both folders")
        options = {"--split": args.split, "--data-root": args.data_root, "--batch-size": args.batch_size}
        given = [option for option, value in options.items() if value is not None]
        if given:
            raise H3deError(f"{', '.join(given)}: only with a checkpoint, not with --pred/--truth")
        result = evaluate_files(args.pred, args.truth, args.out, args.presence_threshold, radii)
        title = "predictions"
    else:
        title = args.split or "test"
        threshold = args.presence_threshold
        result = evaluate(args.checkpoint, title, args.out, args.data_root, args.batch_size, threshold, radii)
        print(f"checkpoint: {result.summary['checkpoint']}")
    for warning in result.warnings:
        print(f"h3de: warning: {warning}", file=sys.stderr)
    s = result.summary
    sdr = ", ".join(f"{k} {v:.1f}%" for k, v in s.items() if k.startswith("sdr_") and isinstance(v, float))
    print(
        f"{title}: {s['num_cases']} cases, {s['count']} of {s['present']} present landmarks scored: "
        f"MRE {_mm(s['mre_mm'])} +- {_mm(s['mre_sd_mm'])} mm, median {_mm(s['median_mm'])}, max {_mm(s['max_mm'])} mm"
        + (f", {sdr}" if sdr else "")
    )
    print(
        f"called absent (no position, or presence below {s['presence_threshold']:g}): {s['absent_detected']} of "
        f"{s['absent']} absent landmarks and {s['present_called_absent']} present ones; accuracy "
        f"{_percent(s['presence_accuracy'])}, absent precision {_percent(s['absent_precision'])}, recall "
        f"{_percent(s['absent_recall'])}, F1 {_percent(s['absent_f1'])}"
        + (f", AUROC {s['presence_auroc']:.3f}" if s["presence_auroc"] is not None else "")
    )
    missed = [f"{m['case_id']}/{m['landmark']}" for m in s["missed_detections"]]
    if missed:
        more = f" and {len(missed) - 10} more (summary.json)" if len(missed) > 10 else ""
        print(f"missed detections (present, called absent): {', '.join(missed[:10])}{more}")
    print(f"written to {result.out_dir}")


def _radii(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise H3deError(f"--radii '{text}' is not a comma-separated list of mm (e.g. 2,2.5,3,4)") from None


def _mm(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _predict(args: argparse.Namespace) -> None:
    from h3de.predict import predict

    result = predict(
        args.checkpoint,
        args.inputs,
        args.out,
        fmt=args.format,
        qc=args.qc,
        truth=args.truth,
        presence_threshold=args.presence_threshold,
        progress=not args.no_progress,
    )
    total = len(result.case_ids) + len(result.failures)
    if result.case_ids:
        seconds = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items() if v)
        print(f"predicted {len(result.case_ids)} of {total} cases into {result.out_dir} (seconds: {seconds})")
    if result.failures and total == 1:
        raise H3deError(next(iter(result.failures.values())))
    if result.failures:
        failed = "; ".join(f"{case}: {message}" for case, message in result.failures.items())
        raise H3deError(f"{len(result.failures)} of {total} cases failed: {failed}")


def _export(args: argparse.Namespace) -> None:
    from h3de.export import export

    result = export(args.checkpoint, args.format, args.out)
    for check in result.checks:
        shape = "x".join(map(str, check["input_shape"]))
        print(f"{check['stage']}: input {shape}: max abs diff to PyTorch {check['max_abs_diff']:.2e}")
    print(f"exported {', '.join(p.name for p in result.files.values())} to {result.out_dir}")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _profile(args: argparse.Namespace) -> None:
    from h3de.config import load_config
    from h3de.networks import network_params, network_spec
    from h3de.profile import format_table, profile_network

    names = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    try:
        size = [int(v) for v in args.input.split(",")]
    except ValueError:
        raise H3deError(f"--input '{args.input}' is not D,H,W integers") from None
    results = []
    for name in names:
        loss = "anchor" if network_spec(name).output == "anchor" else "spatial_ce"  # a loss that fits
        cfg = load_config(
            args.config, [*overrides, f"model.name={name}", f"loss.name={loss}", f"data.patch_size={size}"]
        )
        params = network_params(cfg.model)
        results.append(profile_network(name, params, size, args.landmarks, args.batch, args.device, args.repeats))
    print(format_table(results))


def _sweep(args: argparse.Namespace) -> None:
    from h3de.sweep import sweep

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus is not None else None
    if gpus is not None and not gpus:
        raise H3deError(f"--gpus '{args.gpus}' names no GPU id (e.g. --gpus 0,1)")
    heartbeat = {} if args.heartbeat is None else {"heartbeat": args.heartbeat}
    result = sweep(args.sweep_file, args.storage, args.study, args.trials, gpus, **heartbeat)
    print(f"study {result.study}: {result.trials_run} trial(s) run; stopped: {result.stop_reason}")
    if result.best_value is not None:
        print(f"best so far: {result.best_value:.4g} with {json.dumps(result.best_params)} in {result.best_run_dir}")


def _compare(args: argparse.Namespace) -> None:
    from h3de.compare import compare

    result = compare(args.run_dirs, args.out, flops=not args.no_flops)
    print(result.table)
    print(f"written to {result.out_dir}: compare.md, compare.csv, val_mre.png")


def _phantom(args: argparse.Namespace) -> None:
    from h3de.data.phantom import generate_phantom

    try:
        manifest = generate_phantom(
            args.out, seed=args.seed, num_cases=args.cases, voxel_mm=args.voxel_mm, workers=args.workers
        )
    except ValueError as e:
        raise H3deError(str(e)) from None
    counts = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
    print(f"wrote {len(manifest.cases)} cases to {manifest.path.parent} ({json.dumps(counts)})")


def _afids(args: argparse.Namespace) -> None:
    import numpy as np

    from h3de.data.afids import generate_afids, template_baseline_errors

    try:
        manifest = generate_afids(args.out, args.wheel, seed=args.seed, num_val=args.val, num_test=args.test)
    except ValueError as e:
        raise H3deError(str(e)) from None
    counts = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
    baseline = {s: float(np.nanmean(template_baseline_errors(manifest, s))) for s in ("val", "test")}
    print(f"wrote {len(manifest.cases)} cases to {manifest.path.parent} ({json.dumps(counts)})")
    print(f"template-position baseline MRE: val {baseline['val']:.2f} mm, test {baseline['test']:.2f} mm")


def _data(args: argparse.Namespace) -> None:
    {"phantom": _phantom, "import": _import, "convert": _convert, "afids": _afids}[args.data_command](args)


def _split_fractions(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise H3deError(f"--split '{text}' is not train,val,test fractions like 0.7,0.15,0.15") from None


def _import(args: argparse.Namespace) -> None:
    from h3de.data.importer import import_dataset

    try:
        report = import_dataset(
            args.images, args.landmarks, args.out, _split_fractions(args.split), args.seed, args.mirrored, args.name
        )
    except ValueError as e:
        raise H3deError(str(e)) from None
    _print_report(report)


def _convert(args: argparse.Namespace) -> None:
    from h3de.data.converters import CONVERTERS

    fractions = None if args.split is None else _split_fractions(args.split)
    try:
        report = CONVERTERS[args.kind](args.src, args.out, fractions, args.seed)
    except ValueError as e:
        raise H3deError(str(e)) from None
    _print_report(report)


def _print_report(report: ImportReport) -> None:
    """What an import or conversion found and wrote."""
    for what, paths in (
        ("images without a landmark file", report.unpaired_images),
        ("landmark files without an image", report.unpaired_landmarks),
    ):
        if paths:
            print(f"{len(paths)} {what}, skipped: {', '.join(str(p) for p in paths)}")
    for line in report.warnings:
        print(f"warning: {line}")
    manifest = report.manifest
    pairs = ", ".join(f"{a}:{b}" for a, b in manifest.mirrored_pairs) or "none"
    counts = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
    print(f"{manifest.num_landmarks} landmarks: {', '.join(manifest.landmark_names)}")
    print(f"mirrored pairs: {pairs}")
    print(f"wrote {manifest.path} with {len(manifest.cases)} cases ({json.dumps(counts)}, splits {report.splits})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "train": _train,
        "evaluate": _evaluate,
        "predict": _predict,
        "export": _export,
        "profile": _profile,
        "sweep": _sweep,
        "compare": _compare,
        "data": _data,
    }
    handler = handler[args.command]
    try:
        handler(args)
    except H3deError as e:
        print(f"h3de: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
