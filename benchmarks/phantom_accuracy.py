"""Accuracy side by side on the phantom's test split: H3DE-Net (tiny), its ablations and the baselines.

Trains each experiment with its own config once per seed (0, 1, 2 by default), evaluates each best
checkpoint (lowest val MRE) on the test split, and writes the table of seed means to
benchmarks/phantom_accuracy.md. The phantom's mirrored pairs
(orbit, ear, tooth L/R) look identical locally, so they are where global context should pay: their
MRE is reported apart.

    .venv/bin/python benchmarks/phantom_accuracy.py [EXPERIMENT.yaml ...] [--seeds N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch
from report import write_report

from h3de.config import load_config
from h3de.data.phantom import PHANTOM_MIRRORED_PAIRS, generate_phantom
from h3de.evaluate import evaluate
from h3de.networks import network_params
from h3de.profile import profile_network
from h3de.train import train

DEFAULT = [
    "experiments/phantom_h3de.yaml",
    "experiments/phantom_unet_64.yaml",
    "experiments/phantom_h3de_no_attention.yaml",
    "experiments/phantom_h3de_no_sr.yaml",
    "experiments/phantom_h3de_no_ffm.yaml",
    "experiments/phantom_h3de_full_res.yaml",
    "experiments/phantom_h3de_anchor.yaml",
]


def run(experiment: str, seed: int) -> dict:
    """Train and test one experiment with one seed."""
    overrides = ["logger=csv", "output_dir=runs/benchmarks", "trainer.enable_progress_bar=false", f"seed={seed}"]
    cfg = load_config(experiment, overrides)
    if not (Path(cfg.data.root) / cfg.data.manifest).is_file():
        generate_phantom(cfg.data.root, seed=0)
    result = train(cfg)
    evaluation = evaluate(result.best_checkpoint, "test")
    presence = evaluate(result.best_checkpoint, "val").summary  # the test split has no absent landmark
    names = list(evaluation.summary["per_landmark_mre_mm"])
    paired = [names.index(n) for pair in PHANTOM_MIRRORED_PAIRS for n in pair]
    s = evaluation.summary
    return {
        "experiment": Path(experiment).stem,
        "model": cfg.model.name,
        "epochs": cfg.trainer.max_epochs,
        "val": result.best_val_mre_mm,
        "test": s["mre_mm"],
        "sd": s["mre_sd_mm"],
        "sdr2": s["sdr_2mm"],
        "sdr4": s["sdr_4mm"],
        "paired": torch.nanmean(evaluation.errors[:, paired]).item(),
        "auroc": presence["presence_auroc"],
        "absent": presence["absent"],
        "val_count": presence["absent"] + presence["count"],
    }


def cost(experiment: str) -> dict:
    """Parameters (M) and forward GFLOPs of an experiment's network at its patch size."""
    cfg = load_config(experiment)
    result = profile_network(cfg.model.name, network_params(cfg.model), list(cfg.data.patch_size), 11, repeats=1)
    return {"params_m": result.parameters / 1e6, "gflops": result.forward_gflops}


def over_seeds(runs: list[dict]) -> dict:
    """One row per experiment: seed means, plus the test MRE of every seed and their SD."""
    row = dict(runs[0])
    for key in ("val", "test", "sd", "sdr2", "sdr4", "paired"):
        row[key] = statistics.fmean(r[key] for r in runs)
    aurocs = [r["auroc"] for r in runs if r["auroc"] is not None]  # None: no absent landmark in val
    row["auroc"] = statistics.fmean(aurocs) if aurocs else None
    row["tests"] = [r["test"] for r in runs]
    row["seed_sd"] = statistics.stdev(row["tests"]) if len(runs) > 1 else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=DEFAULT)
    parser.add_argument("--seeds", type=int, default=3, help="train each experiment with seeds 0..N-1")
    args = parser.parse_args()
    rows = [{**over_seeds([run(e, seed) for seed in range(args.seeds)]), **cost(e)} for e in args.experiments]
    lines = [
        "# Phantom accuracy, side by side",
        "",
        f"Test split of data/phantom (seed 0: 28 train / 6 val / 6 test cases), each experiment trained "
        f"{args.seeds} times (training seeds 0..{args.seeds - 1}) on {torch.get_num_threads()} CPU threads "
        f"({platform.machine()}); errors in world mm over the landmarks present, averaged over the seeds. "
        "Test MRE ± SD: the seed mean of the MRE ± the seed mean of the SD over landmarks; seeds: each "
        "seed's test MRE and their SD. GFLOPs: one forward pass of a (1, 1, patch) input. Paired: MRE of the "
        "three left/right pairs (orbit, ear, tooth), which only global context tells apart. Presence AUROC (val): how "
        "well each landmark's presence score ranks the present landmarks above the absent ones, on the val "
        f"split ({rows[0]['absent']} absent landmarks among {rows[0]['val_count']}, so a coarse measure; the test "
        "split has none); 0.5 is chance.",
        "",
        "| experiment | model | params (M) | GFLOPs | epochs | best val MRE | test MRE ± SD | test MRE per seed "
        "(SD) | SDR 2 mm | SDR 4 mm | paired MRE | presence AUROC (val) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        *[
            f"| {r['experiment']} | {r['model']} | {r['params_m']:.2f} | {r['gflops']:.1f} | {r['epochs']} "
            f"| {r['val']:.2f} | {r['test']:.2f} ± {r['sd']:.2f} | {', '.join(f'{t:.2f}' for t in r['tests'])} "
            f"({r['seed_sd']:.2f}) | {r['sdr2']:.1f}% | {r['sdr4']:.1f}% "
            f"| {r['paired']:.2f} | {'-' if r['auroc'] is None else format(r['auroc'], '.3f')} |"
            for r in rows
        ],
        "",
        f"Reproduce: `.venv/bin/python benchmarks/phantom_accuracy.py {' '.join(args.experiments)} "
        f"--seeds {args.seeds}`",
        "",
    ]
    write_report(__file__, lines)


if __name__ == "__main__":
    main()
