"""`h3de predict` from an ONNX export in a fresh virtual environment that has no torch, against the checkpoint.

Here (with torch): an untrained model of each experiment's config is saved as `h3de train` saves it, exported with
`h3de export --format onnx`, and run by `h3de predict` from the checkpoint on one synthetic 1.2 mm head-sized volume.
Then a new venv gets h3de without its dependencies (`pip install --no-deps`) and only the deployment packages the
README lists; `h3de predict EXPORT_DIR` runs there, as a console command. Reported: the venv's packages, whether it
can import torch, MONAI or Lightning, and the largest difference between the two predictions' landmarks. Needs the
package index (PyPI) the first time; the venv is kept in --venv and reused.

    .venv/bin/python benchmarks/deploy_without_torch.py [EXPERIMENT.yaml ...] [--venv /tmp/h3de-deploy-venv]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from export_speed import DEFAULT, checkpoint, volume
from report import write_report

from h3de.export import export
from h3de.predict import predict

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["numpy", "nibabel", "pynrrd", "isal", "scipy", "onnxruntime", "tqdm", "matplotlib"]  # as the README


def make_venv(folder: Path) -> Path:
    """A venv with h3de (no dependencies) and the deployment packages; its python."""
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(ROOT)],
                   check=True)  # fmt: skip
    return python


def importable(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def landmarks(path: Path) -> np.ndarray:
    with path.open() as f:
        return np.array([[float(row[k]) for k in "xyz"] for row in csv.DictReader(f)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=DEFAULT)
    parser.add_argument("--venv", default="/tmp/h3de-deploy-venv")
    args = parser.parse_args()
    python = make_venv(Path(args.venv))
    packages = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.splitlines()
    imports = {m: importable(python, m) for m in ("torch", "monai", "lightning", "h3de.deploy.runtime")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = volume(tmp)
        for experiment in args.experiments:
            stem = Path(experiment).stem
            ckpt = checkpoint(experiment, tmp / f"{stem}.ckpt")
            exported = export(ckpt, "onnx", tmp / f"{stem}_onnx").out_dir
            predict(ckpt, image, tmp / f"{stem}_ckpt", fmt="csv", progress=False)
            h3de = python.parent / "h3de"
            run = subprocess.run(
                [str(h3de), "predict", str(exported), str(image), "--out", str(tmp / f"{stem}_venv"), "--no-progress"],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                raise RuntimeError(f"{stem}: h3de predict failed in the venv: {run.stderr.strip()}")
            shift = np.abs(
                landmarks(tmp / f"{stem}_venv" / "predictions.csv")
                - landmarks(tmp / f"{stem}_ckpt" / "predictions.csv")
            ).max()
            rows.append(f"| {stem} | {shift:.1e} |")
            print(stem, f"landmarks differ by {shift:.2e} mm")
    lines = [
        "# `h3de predict` from an ONNX export in a venv without torch",
        "",
        f"A fresh venv with h3de installed `--no-deps` and only: {', '.join(PACKAGES)}. It can import: "
        + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in imports.items())
        + ".",
        "",
        "| experiment | largest landmark difference to the checkpoint's prediction (mm) |",
        "|---|---:|",
        *rows,
        "",
        "One synthetic 200 x 220 x 160 volume of 1.2 mm, 11 landmarks, untrained models of the experiments' configs.",
        "",
        f"The venv's packages: {', '.join(packages)}.",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/deploy_without_torch.py {' '.join(args.experiments)}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
