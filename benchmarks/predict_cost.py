"""What `h3de predict` costs: seconds per part on 1 mm phantom heads, peak memory on a CT-sized volume.

Speed: `h3de predict` on test cases of the 1 mm phantom (a 240 mm head, 262 x 262 x 157 voxels of about
1 x 1 x 1.5 mm, 11 landmarks), for each experiment given, in a fresh process per experiment; seconds per
volume of each part as `predict` measures them (summary.json), and the command's wall time.
Memory: peak resident memory of a fresh `predict` process on a synthetic 512 x 512 x 300 CT-sized volume
(0.7 x 0.7 x 1.0 mm, int16) with 14 landmarks, for each experiment.

Timing and memory do not depend on the weights, so the checkpoints are untrained models of the experiments'
configs (built here, as `h3de train` saves them).

    make data-fine
    .venv/bin/python benchmarks/predict_cost.py [EXPERIMENT.yaml ...] [--cases 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from report import write_report

from h3de.config import load_config, to_container
from h3de.module import LandmarkModule

DEFAULT = ["experiments/phantom_1mm_c2f.yaml", "experiments/phantom_1mm_sliding.yaml"]
PARTS = ("reading", "preprocessing", "network", "patches", "decoding", "writing")

_RUN = """
import json, resource, sys, torch
torch.set_num_threads({threads})
from h3de.predict import predict
result = predict({ckpt!r}, {inputs!r}, {out!r}, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
print(json.dumps({{"peak_gib": peak, "failures": result.failures}}))
"""


def checkpoint(experiment: str, names: list[str], path: Path) -> Path:
    """An untrained model of ``experiment`` with the landmarks ``names``, saved as `h3de train` does."""
    cfg = load_config(experiment, ["logger=none"])
    module = LandmarkModule(to_container(cfg), names)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def run_predict(ckpt: Path, inputs: Path, out: Path, threads: int) -> tuple[dict, float]:
    """(the child's report, wall seconds) of one fresh `predict` process."""
    code = _RUN.format(threads=threads, ckpt=str(ckpt), inputs=str(inputs), out=str(out))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["failures"]:
        raise RuntimeError(f"predict failed: {report['failures']}")
    return report, wall


def ct_volume(folder: Path) -> Path:
    """A 512 x 512 x 300 int16 volume of 0.7 x 0.7 x 1.0 mm: a water cylinder with bone rings and noise."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512), indexing="ij")
    r = np.hypot(x, y)
    slice_ = np.where(r < 0.8, 40, -1000) + np.where((r > 0.7) & (r < 0.75), 900, 0)
    volume = np.repeat(slice_[..., None], 300, axis=2).astype(np.int16)
    volume += rng.integers(-20, 20, volume.shape, dtype=np.int16)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])  # stored in LPS order, as CT often is
    path = folder / "ct_512x512x300.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=DEFAULT)
    parser.add_argument("--cases", type=int, default=3, help="1 mm phantom test cases to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    phantom = Path("data/phantom_1mm/dataset.json")
    if not phantom.is_file():
        sys.exit("data/phantom_1mm is missing: run `make data-fine` first")
    doc = json.loads(phantom.read_text())
    names11 = doc["landmarks"]
    test = [c for c in doc["cases"] if c["split"] == "test"][: args.cases]
    speed, memory = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        heads = tmp / "heads"
        heads.mkdir()
        for case in test:
            (heads / Path(case["image"]).name).symlink_to((phantom.parent / case["image"]).resolve())
        ct = tmp / "ct"
        ct.mkdir()
        ct_volume(ct)
        names14 = [f"landmark_{i:02d}" for i in range(14)]
        for experiment in args.experiments:
            stem = Path(experiment).stem
            ckpt = checkpoint(experiment, names11, tmp / f"{stem}_11.ckpt")
            run_predict(ckpt, heads, tmp / f"warm_{stem}", args.threads)  # file caches warm, imports compiled
            report, wall = run_predict(ckpt, heads, tmp / f"out_{stem}", args.threads)
            seconds = json.loads((tmp / f"out_{stem}" / "summary.json").read_text())["seconds"]
            speed.append((stem, {k: seconds[k] / len(test) for k in PARTS}, wall / len(test)))
            ckpt = checkpoint(experiment, names14, tmp / f"{stem}_14.ckpt")
            report, wall = run_predict(ckpt, ct, tmp / f"ct_{stem}", args.threads)
            memory.append((stem, report["peak_gib"], wall))

    lines = [
        "# What `h3de predict` costs",
        "",
        f"{platform.machine()}, {args.threads} CPU threads, untrained models of the experiments' configs (cost does "
        "not depend on the weights), a fresh process per run after one warm-up run.",
        "",
        f"## Seconds per volume: {len(test)} test heads of data/phantom_1mm (240 mm field of view, about 262 x 262 x "
        "157 voxels of 1 x 1 x 1.5 mm, 11 landmarks)",
        "",
        "| experiment | " + " | ".join(PARTS) + " | total of parts | network share | command wall time per volume |",
        "|---|" + "---:|" * (len(PARTS) + 3),
    ]
    for stem, parts, wall in speed:
        total = sum(parts.values())
        cells = " | ".join(f"{parts[k]:.2f}" for k in PARTS)
        lines.append(f"| {stem} | {cells} | {total:.2f} | {100 * parts['network'] / total:.0f}% | {wall:.2f} |")
    lines += [
        "",
        "The command's wall time also holds starting Python, importing torch and loading the checkpoint, once per "
        "command (divided over the volumes here).",
        "",
        "## Peak memory: a 512 x 512 x 300 CT-sized volume (0.7 x 0.7 x 1.0 mm, int16), 14 landmarks",
        "",
        "| experiment | peak resident memory (GiB) | wall time (s) |",
        "|---|---:|---:|",
        *[f"| {stem} | {peak:.2f} | {wall:.1f} |" for stem, peak, wall in memory],
        "",
        f"Reproduce: `make data-fine && .venv/bin/python benchmarks/predict_cost.py {' '.join(args.experiments)} "
        f"--cases {args.cases} --threads {args.threads}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
