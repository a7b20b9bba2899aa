"""Benchmark: the default CNN trained by the train job on the digits sample.

Builds the digits dataset (scikit-learn's 1,797 real handwritten digits, 32x32
grayscale PNG, 80/10/10 split) with make-sample-data and create-dataset, then
runs ``vision-pipelines train`` with default hyperparameters as a grid over
``--seeds`` (one trial per seed, so the spread across initializations is
visible), and records per trial the test-split accuracy and macro F1, the
epochs run and the fitting time, plus the job's wall time.

Run:
  python -m benchmarks.train_digits --work_dir /tmp/bench_train_digits
Results are written to the ``train`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from benchmarks.report import write_section
from schemas.classification_metrics import ModelMetrics

QUALITY_BAR = 0.97


def _run(args: list[str]) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "beam_jobs.cli", *args], check=True)
    return time.monotonic() - started


def build_dataset(work_dir: str) -> str:
    """make-sample-data + create-dataset, cached across runs of the benchmark."""
    dataset_dir = os.path.join(work_dir, "dataset")
    if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
        source = os.path.join(work_dir, "digits")
        _run(["make-sample-data", "--dataset", "digits", "--output_dir", source])
        _run([
            "create-dataset", "--manifest", os.path.join(source, "all_data.csv"),
            "--labels_file", os.path.join(source, "labels.txt"), "--output_dir", dataset_dir,
            "--image_size", "32", "--channels", "1", "--image_format", "png", "--split", "80,10,10",
        ])
    return dataset_dir


def format_report(board: dict, wall_seconds: float, seeds: list[int], command: str) -> str:
    rows = sorted(board["trials"], key=lambda row: row["hparams"]["seed"])
    accuracies = [row["test"]["accuracy"] for row in rows]
    lines = [
        "## train: default small CNN on the digits sample",
        "",
        f"Command: `{command}`",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, no GPU, local FnApiRunner "
        "(trials one after another).",
        "",
        "| seed | test accuracy | test macro F1 | val accuracy | epochs run | best epoch | fit seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['hparams']['seed']} | {row['test']['accuracy']:.4f} | {row['test']['macro_f1']:.4f} | "
            f"{row['validation']['accuracy']:.4f} | {row['epochs_run']} | {row['best_epoch']} | "
            f"{row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"- Test split of {rows[0]['test_count']} images: mean test accuracy "
        f"{sum(accuracies) / len(accuracies):.4f}, min {min(accuracies):.4f} over seeds {seeds}; "
        f"quality bar (issue 3) >= {QUALITY_BAR}: "
        f"{'met' if min(accuracies) >= QUALITY_BAR else 'NOT met'} by every seed.",
        f"- Job wall time for {len(rows)} trials: {wall_seconds:.0f} s (includes TensorFlow start-up, "
        "evaluation and export of every trial). `fit seconds` is Keras fitting only.",
        "- Defaults (`model_lib.training.HParams`): 3 conv blocks (32/64/128 filters), 128-d embedding, Adam "
        "3e-3 with cosine decay, batch 64, up to 20 epochs with early stopping (patience 6 on validation "
        "accuracy, ties to lower loss), augmentation: 10% crop, 10% translation, 4% rotation, no flips.",
        f"- Best trial: `{board['best_trial']}`, copied to `best/`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work_dir", default="/tmp/bench_train_digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.work_dir, exist_ok=True)
    dataset_dir = build_dataset(args.work_dir)
    output_dir = os.path.join(args.work_dir, "model")
    shutil.rmtree(output_dir, ignore_errors=True)  # Fresh training, not a resume of an earlier run.
    spec = os.path.join(args.work_dir, "seeds.yaml")
    with open(spec, "w") as handle:
        handle.write(f"grid:\n  seed: {seeds}\n")
    wall = _run(["train", "--dataset_dir", dataset_dir, "--output_dir", output_dir, "--trials", spec])
    with open(os.path.join(output_dir, "trials.json")) as handle:
        board = json.load(handle)
    for row in board["trials"]:
        row["test_count"] = ModelMetrics.read(row["model_dir"]).test.count
    command = f"python -m benchmarks.train_digits --work_dir {args.work_dir} --seeds {args.seeds}"
    report = format_report(board, wall, seeds, command)
    print(report)
    if not args.no_report:
        write_section("train", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
