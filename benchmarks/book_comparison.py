"""Benchmark: the book's create-dataset job against ``vision-pipelines create-dataset``, side by side.

Issue 13's target: create_dataset end to end at >= 10x the "Practical ML for
Computer Vision" book's job (``benchmarks/book_jpeg_to_tfrecord.py``, vendored
with its one-line ``.numpy()`` fix) on the same 1,200 synthetic 256x256 JPEGs,
measured in one run on one machine. Each job runs in a fresh process (wall
time includes interpreter start and imports) on the local FnApiRunner; CPU
seconds and peak RSS are of the job's whole process tree
(``benchmarks.scale.measure``). Ours runs with its defaults (224x224 JPEG
records, tf.Transform analysis of the train split) and with
``--skip_analysis``; the book's job writes float32 pixels at full size.

Run:
  python -m benchmarks.book_comparison --count 1200 --work_dir /tmp/bench_book
It writes the ``book_comparison`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from benchmarks.machine import cpu_description
from benchmarks.report import write_section
from benchmarks.scale import measure
from model_lib import sample_data

IMAGE_SIZE = 256
TARGET_SPEEDUP = 10.0


def commands(manifest: str, labels_file: str, work_dir: str) -> dict[str, list[str]]:
    """Job name -> command line; each writes under ``work_dir/out/<name>``."""
    out = os.path.join(work_dir, "out")
    ours = [sys.executable, "-m", "beam_jobs.create_dataset", "--manifest", manifest, "--labels_file", labels_file]
    return {
        "book job (jpeg_to_tfrecord.py)": [
            sys.executable, "-m", "benchmarks.book_jpeg_to_tfrecord", "--all_data", manifest,
            "--labels_file", labels_file, "--project_id", "local", "--output_dir", os.path.join(out, "book")],
        "vision-pipelines, with tf.Transform analysis": [*ours, "--output_dir", os.path.join(out, "ours")],
        "vision-pipelines, --skip_analysis": [*ours, "--output_dir", os.path.join(out, "ours_skip"),
                                              "--skip_analysis"],
    }


def report(count: int, results: dict[str, dict[str, float]], command: str) -> str:
    book = results["book job (jpeg_to_tfrecord.py)"]
    lines = [
        f"## create_dataset against the book's job: {count:,} synthetic {IMAGE_SIZE}x{IMAGE_SIZE} JPEGs", "",
        f"Command: `{command}`",
        f"Machine: {cpu_description()}; one run, each job a fresh process on the local FnApiRunner.", "",
        "| job | wall s | CPU s | peak RSS MiB (process tree) | speed-up (wall) | speed-up (CPU s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, measured in results.items():
        lines.append(f"| {name} | {measured['wall_s']:.1f} | {measured['cpu_s']:.1f} | "
                     f"{measured['peak_rss_mib']:.0f} | {book['wall_s'] / measured['wall_s']:.1f}x | "
                     f"{book['cpu_s'] / measured['cpu_s']:.1f}x |")
    lines += ["", f"Target: >= {TARGET_SPEEDUP:g}x the book's job end to end (imports included). On a shared machine "
              "wall time measures how much CPU each process was given; CPU seconds (the job's process tree) are "
              "the comparable figure there."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--work_dir", default="/tmp/bench_book")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/ alone.")
    args = parser.parse_args(argv)
    images = os.path.join(args.work_dir, f"synthetic_{args.count}_{IMAGE_SIZE}px")
    if not os.path.exists(os.path.join(images, sample_data.MANIFEST_FILE)):
        shutil.rmtree(images, ignore_errors=True)
        sample_data.write_synthetic(images, count=args.count, size=IMAGE_SIZE, image_format="jpeg")
    manifest = os.path.join(images, sample_data.MANIFEST_FILE)
    labels_file = os.path.join(images, sample_data.LABELS_FILE)
    shutil.rmtree(os.path.join(args.work_dir, "out"), ignore_errors=True)
    results = {}
    for name, command in commands(manifest, labels_file, args.work_dir).items():
        log = os.path.join(args.work_dir, f"{name.split()[0].replace(',', '')}_{len(results)}.log")
        results[name] = measure(command, log)
        print(name, results[name], flush=True)
    command = "python -m benchmarks.book_comparison " + " ".join(argv if argv is not None else sys.argv[1:])
    body = report(args.count, results, command.strip())
    print(body)
    if not args.no_report:
        write_section("book_comparison", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
