"""Prediction time with the ONNX export (onnxruntime) against PyTorch eager, on the same volume.

For each experiment: an untrained model of its config (time does not depend on the weights), saved as `h3de train`
saves it and exported with `h3de export --format onnx`; then `h3de predict` on one synthetic 1.2 mm head-sized volume
(200 x 220 x 160 voxels), from the checkpoint and from the export (numpy and onnxruntime, no torch: h3de.deploy),
alternately, after one warm-up run of each.
Reported: median seconds per volume of the network part and of the whole prediction (reading, preprocessing,
network, patches, decoding, writing, as `predict` measures them), the export's time, and the largest difference
between the two predictions' landmarks. Both run on the CPU with the same thread count.

    .venv/bin/python benchmarks/export_speed.py [EXPERIMENT.yaml ...] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime
import torch
from report import write_report

from h3de.config import load_config, to_container
from h3de.export import export
from h3de.module import LandmarkModule
from h3de.predict import predict

DEFAULT = ["experiments/phantom_h3de.yaml", "experiments/phantom_1mm_c2f.yaml"]
NAMES = [f"landmark_{i:02d}" for i in range(11)]


def checkpoint(experiment: str, path: Path) -> Path:
    """An untrained model of ``experiment``, saved as `h3de train` does."""
    torch.manual_seed(0)
    cfg = load_config(experiment, ["logger=none"])
    module = LandmarkModule(to_container(cfg), NAMES)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def volume(folder: Path) -> Path:
    """A 200 x 220 x 160 float32 volume of 1.2 mm: an ellipsoid 'head' with a brighter shell and noise."""
    rng = np.random.default_rng(0)
    shape = (200, 220, 160)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid / np.array([0.8, 0.9, 0.85]), axis=-1)
    image = np.where(r < 1, 100.0, 0.0) + np.where((r > 0.9) & (r < 1), 300.0, 0.0)
    image = (image + rng.normal(0, 10, shape)).astype(np.float32)
    path = folder / "head.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.2, 1.2, 1.2, 1.0])), path)
    return path


def timed(model: Path, image: Path, out: Path) -> tuple[float, float, np.ndarray]:
    """(network seconds, total seconds, (L, 3) landmarks) of one `predict` of ``image``."""
    result = predict(model, image, out, fmt="json", progress=False)
    if result.failures:
        raise RuntimeError(f"predict failed: {result.failures}")
    return result.timings["network"], sum(result.timings.values()), result.world[result.case_ids[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load = os.getloadavg()[0]  # before this script's own work
    torch.set_num_threads(args.threads)  # onnxruntime takes one per CPU the process may use (h3de.deploy.bundle)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = volume(tmp)
        for experiment in args.experiments:
            stem = Path(experiment).stem
            ckpt = checkpoint(experiment, tmp / f"{stem}.ckpt")
            start = time.perf_counter()
            exported = export(ckpt, "onnx", tmp / f"{stem}_onnx").out_dir
            export_seconds = time.perf_counter() - start
            times: dict[str, list[tuple[float, float]]] = {"torch": [], "onnx": []}
            worlds = {}
            for repeat in range(args.repeats + 1):  # the first of each is a warm-up
                for kind, model in (("torch", ckpt), ("onnx", exported)):
                    network, total, worlds[kind] = timed(model, image, tmp / f"out_{stem}_{kind}")
                    if repeat:
                        times[kind].append((network, total))
            median = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
            shift = float(np.nanmax(np.linalg.norm(worlds["onnx"] - worlds["torch"], axis=-1)))
            rows.append((stem, median, export_seconds, shift))
            print(stem, median, f"export {export_seconds:.1f} s, landmarks differ by {shift:.2e} mm")

    lines = [
        "# Prediction time: ONNX export (onnxruntime) against PyTorch eager",
        "",
        f"{platform.machine()}, {args.threads} CPU threads for both, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; one synthetic 200 x 220 x 160 volume of 1.2 mm, 11 landmarks, untrained models "
        f"of the experiments' configs; median of {args.repeats} runs after a warm-up, the two alternating; the "
        f"machine's 1-minute load average was {load:.1f} as the runs started (other jobs slow PyTorch's OpenMP "
        "threads far more than onnxruntime's: compare on a quiet machine).",
        "",
        "| experiment | network: PyTorch (s) | network: ONNX (s) | PyTorch / ONNX | predict: PyTorch (s) | "
        "predict: ONNX (s) | PyTorch / ONNX | export (s) | largest landmark difference (mm) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stem, m, export_seconds, shift in rows:
        (tn, tt), (on, ot) = m["torch"], m["onnx"]
        lines.append(
            f"| {stem} | {tn:.2f} | {on:.2f} | {tn / on:.2f} | {tt:.2f} | {ot:.2f} | {tt / ot:.2f} | "
            f"{export_seconds:.1f} | {shift:.1e} |"
        )
    lines += [
        "",
        "The predict columns hold the whole prediction of one volume (reading, preprocessing, network, patches, "
        "decoding, writing): from the checkpoint with MONAI and torch, from the export with numpy, scipy and the "
        "exported decoding graphs, without torch (h3de.deploy).",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/export_speed.py {' '.join(args.experiments)} --repeats "
        f"{args.repeats} --threads {args.threads}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
