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
import os
import platform
import shutil
import subprocess
import sys
import time

from benchmarks.report import write_section
from model_lib import sample_data
from schemas.classification_metrics import ModelMetrics
from schemas.dataset_info import DatasetInfo
from schemas.leaderboard import Leaderboard
from schemas.publication import published_dir

QUALITY_BAR = 0.97
SEED = "seed"  # The one hyperparameter the benchmark's grid varies.


def _run(args: list[str]) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "beam_jobs.cli", *args], check=True)
    return time.monotonic() - started


def build_dataset(work_dir: str) -> str:
    """make-sample-data + create-dataset, cached across runs of the benchmark."""
    dataset_dir = os.path.join(work_dir, "dataset")
    if not _has_dataset(dataset_dir):
        # Missing, unpublished or in an older layout: rebuilt from scratch (a fresh directory needs no --overwrite).
        shutil.rmtree(dataset_dir, ignore_errors=True)
        source = os.path.join(work_dir, "digits")
        _run(["make-sample-data", "--dataset", "digits", "--output_dir", source])
        _run([
            "create-dataset", "--manifest", os.path.join(source, sample_data.MANIFEST_FILE),
            "--labels_file", os.path.join(source, sample_data.LABELS_FILE), "--output_dir", dataset_dir,
            "--image_size", "32", "--channels", "1", "--image_format", "png", "--split", "80,10,10",
        ])
    return dataset_dir


def _has_dataset(dataset_dir: str) -> bool:
    """Whether ``dataset_dir`` publishes a create_dataset run whose dataset_info.json reads under the contract."""
    try:
        DatasetInfo.read(published_dir(dataset_dir))
    except (FileNotFoundError, ValueError):
        return False
    return True


def trial_metrics(board: Leaderboard) -> dict[str, ModelMetrics]:
    """Every trial's metrics.json, keyed by trial id; the report needs each one's test split."""
    metrics = {}
    for trial in board.trials:
        metrics[trial.trial_id] = ModelMetrics.read(published_dir(trial.model_dir))
        if metrics[trial.trial_id].test is None:
            raise ValueError(f"trial {trial.trial_id} has no test-split metrics in {trial.model_dir}")
    return metrics


def format_report(board: Leaderboard, metrics: dict[str, ModelMetrics], wall_seconds: float, seeds: list[int],
                  command: str) -> str:
    """The ``train`` section: one row per trial of ``board``, with its ``metrics`` (keyed by trial id)."""
    rows = sorted(board.trials, key=lambda trial: trial.hparams[SEED])
    accuracies = [metrics[row.trial_id].test.accuracy for row in rows]
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
        test, validation = metrics[row.trial_id].test, metrics[row.trial_id].validation
        lines.append(
            f"| {row.hparams[SEED]} | {test.accuracy:.4f} | {test.macro_f1:.4f} | "
            f"{validation.accuracy:.4f} | {row.epochs_run} | {row.best_epoch} | "
            f"{row.train_seconds:.0f} |"
        )
    lines += [
        "",
        f"- Test split of {metrics[rows[0].trial_id].test.count} images: mean test accuracy "
        f"{sum(accuracies) / len(accuracies):.4f}, min {min(accuracies):.4f} over seeds {seeds}; "
        f"quality bar (issue 3) >= {QUALITY_BAR}: "
        f"{'met' if min(accuracies) >= QUALITY_BAR else 'NOT met'} by every seed.",
        f"- Job wall time for {len(rows)} trials: {wall_seconds:.0f} s (includes TensorFlow start-up, "
        "evaluation and export of every trial). `fit seconds` is Keras fitting only.",
        "- Defaults (`model_lib.training.HParams`): 3 conv blocks (32/64/128 filters), 128-d embedding, Adam "
        "3e-3 with cosine decay, batch 64, up to 20 epochs with early stopping (patience 6 on validation "
        "accuracy, ties to lower loss), augmentation: 10% crop, 10% translation, 4% rotation, no flips.",
        f"- Best trial: `{board.best_trial}`, {_publication_note(board)}.",
    ]
    return "\n".join(lines)


def _publication_note(board: Leaderboard) -> str:
    """What train did with ``best/``: published there (by its CURRENT pointer), or why not."""
    publication = board.publication
    if publication is None:
        return "no publication decision recorded"
    return "published to `best/`" if publication.published else f"not published to `best/` ({publication.reason})"


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
        handle.write(f"grid:\n  {SEED}: {seeds}\n")
    wall = _run(["train", "--dataset_dir", dataset_dir, "--output_dir", output_dir, "--trials", spec])
    board = Leaderboard.read(output_dir)
    metrics = trial_metrics(board)
    command = f"python -m benchmarks.train_digits --work_dir {args.work_dir} --seeds {args.seeds}"
    report = format_report(board, metrics, wall, seeds, command)
    print(report)
    if not args.no_report:
        write_section("train", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
