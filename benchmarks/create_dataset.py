"""Benchmark: create_dataset on synthetic 256x256 JPEGs -> 224x224 JPEG records.

Measures, for several image counts, wall time, images/s, output bytes per
image against input bytes per image, and peak RSS of the whole job process
tree (``/usr/bin/time -v`` when present). Peak memory that stays flat as the
count grows shows the job streams images instead of holding them.

Run:
  python -m benchmarks.create_dataset --counts 500,2000 --work_dir /tmp/bench_create_dataset
Results are written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from benchmarks.report import write_section
from model_lib import sample_data
from schemas import layout
from schemas.publication import published_dir


def _job_command(manifest: str, output_dir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "beam_jobs.create_dataset", "--manifest", manifest, "--output_dir", output_dir,
            "--image_size", "224", "--image_format", "jpeg", "--jpeg_quality", "90", *extra]


def _peak_rss_mib(time_output: str) -> float | None:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    return int(match.group(1)) / 1024 if match else None


def run_once(manifest: str, output_dir: str, extra: list[str]) -> dict[str, float | None]:
    shutil.rmtree(output_dir, ignore_errors=True)  # Every run starts fresh: no --overwrite, nothing cached.
    command = _job_command(manifest, output_dir, extra)
    timed = ["/usr/bin/time", "-v", *command] if os.path.exists("/usr/bin/time") else command
    start = time.perf_counter()
    completed = subprocess.run(timed, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"job failed:\n{completed.stderr[-3000:]}")
    dataset_dir = published_dir(output_dir)  # The run the job published under output_dir.
    shards = glob.glob(os.path.join(dataset_dir, f"*{layout.TFRECORD_SUFFIX}"))
    if not shards:  # A size of 0 would be reported as a result; it means the layout changed under us.
        raise RuntimeError(f"no *{layout.TFRECORD_SUFFIX} shards in {dataset_dir}")
    output_bytes = sum(os.path.getsize(p) for p in shards)
    return {"wall_s": wall, "output_bytes": output_bytes, "peak_rss_mib": _peak_rss_mib(completed.stderr)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="500,2000")
    parser.add_argument("--work_dir", default="/tmp/bench_create_dataset")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    modes = {
        "in-memory, with tf.Transform analysis": [],
        "in-memory, --skip_analysis": ["--skip_analysis"],
        "multi-processing x2, with tf.Transform analysis": [
            "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        "multi-processing x2, --skip_analysis": [
            "--direct_running_mode=multi_processing", "--direct_num_workers=2", "--skip_analysis"],
    }
    rows = []
    for count in counts:
        data_dir = os.path.join(args.work_dir, f"synthetic_{count}")
        if not os.path.exists(os.path.join(data_dir, sample_data.MANIFEST_FILE)):
            sample_data.write_synthetic(data_dir, count=count, size=256, image_format="jpeg")
        manifest = os.path.join(data_dir, sample_data.MANIFEST_FILE)
        input_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(data_dir, "images", "*")))
        for mode, extra in modes.items():
            result = run_once(manifest, os.path.join(args.work_dir, "out"), extra)
            rows.append((count, mode, result, input_bytes))
            print(count, mode, result, flush=True)
    lines = [
        "## create_dataset: synthetic 256x256 JPEG -> 224x224 JPEG (quality 90)",
        "",
        f"Command: `python -m benchmarks.create_dataset --counts {args.counts}`",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, local FnApiRunner. "
        "Wall time includes process start, pipeline construction and (where on) tf.Transform analysis.",
        "",
        "| images | mode | wall s | images/s | input KiB/image | output KiB/image | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for count, mode, result, input_bytes in rows:
        rss = result["peak_rss_mib"]
        lines.append(
            f"| {count} | {mode} | {result['wall_s']:.1f} | {count / result['wall_s']:.0f} | "
            f"{input_bytes / count / 1024:.1f} | {result['output_bytes'] / count / 1024:.1f} | "
            f"{'n/a' if rss is None else f'{rss:.0f}'} |"
        )
    if len(counts) > 1:
        lines += ["", "Marginal throughput (images added / time added, i.e. without fixed start-up cost):", ""]
        first, last = counts[0], counts[-1]
        for mode in modes:
            a = next(r for c, m, r, _ in rows if c == first and m == mode)
            b = next(r for c, m, r, _ in rows if c == last and m == mode)
            lines.append(f"- {mode}: {(last - first) / max(b['wall_s'] - a['wall_s'], 1e-9):.0f} images/s")
    lines += ["", "Peak RSS is that of the job's own process (with /usr/bin/time -v, its largest process); "
              "compare across counts: it should not grow with the number of images."]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        write_section("create_dataset", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
