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
import json
import os
import platform
import re
import resource
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


IMPORTS = {
    "interpreter start (python -c pass)": "pass",
    "import apache_beam": "import apache_beam",
    "import keras (alone)": "import keras",
    "import tensorflow (its __init__ also imports keras)": "import tensorflow",
    "import tensorflow_transform.beam (with TF)": "import tensorflow_transform.beam",
    "import beam_jobs.create_dataset (Beam only since TF is lazy)": "import beam_jobs.create_dataset",
}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_imports(repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each import in a fresh interpreter (OS file cache warm after the first).

    CPU seconds (user + system) are what a shared machine distorts least.
    """
    medians = {}
    for name, statement in IMPORTS.items():
        times = []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), _children_cpu_s()
            subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
            times.append((time.perf_counter() - start, _children_cpu_s() - cpu))
        medians[name] = sorted(times)[len(times) // 2]
    return medians


def phase_child(manifest: str, output_dir: str, analyze: bool) -> dict[str, float]:
    """One create_dataset run in this process, timed phase by phase along the job's own ``run``."""
    phases: dict[str, tuple[float, float]] = {}
    clock = (time.perf_counter(), time.process_time())

    def lap(name: str) -> None:
        nonlocal clock
        now = (time.perf_counter(), time.process_time())
        phases[name] = (now[0] - clock[0], now[1] - clock[1])
        clock = now

    from beam_jobs import create_dataset as job
    lap("import the job module (Beam)")
    import apache_beam as beam

    from transforms.runner_policy import make_pipeline_options
    argv = ["--manifest", manifest, "--output_dir", output_dir, "--image_size", "64",
            *([] if analyze else ["--skip_analysis"])]
    options = make_pipeline_options(argv, job_options=job.CreateDatasetOptions)
    config = job.CreateDatasetConfig.from_options(options)
    output = job.OutputRun.start(config.output_dir, overwrite=config.overwrite)
    temp_dir = config.tft_temp_dir(output)
    job.write_schema(output.run_dir)
    lap("parse flags, validate, start the run, write schema.pbtxt (no TF)")
    traces = 0
    if analyze:
        import model_lib.preprocessing as preprocessing
        import transforms.tft_analysis  # noqa: F401  What CreateDataset.expand imports when analysis is on.
        lap("import the tf.Transform analysis step (TF, tf.Transform, Keras)")
        make = preprocessing.make_preprocessing_fn

        def counting_make(*args, **kwargs):
            inner = make(*args, **kwargs)

            def traced(inputs):
                nonlocal traces
                traces += 1
                return inner(inputs)
            return traced
        preprocessing.make_preprocessing_fn = counting_make
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | "CreateDataset" >> job.CreateDataset(config, output.run_dir, temp_dir)
    lap("construct the pipeline (with analysis, tf.Transform traces preprocessing_fn here)")
    traced_at_construction = traces
    result = pipeline.run()
    result.wait_until_finish()
    lap("run: runner start-up, images, analysis (if on), writes")
    if os.path.exists(temp_dir):
        shutil.rmtree(temp_dir)
    output.publish()
    job.report_summary(job.read_dataset_info(published_dir(output_dir)))
    lap("finalize: publish CURRENT, read and print the summary")
    empty = beam.Pipeline(options=make_pipeline_options([], job_options=beam.options.pipeline_options.PipelineOptions))
    _ = empty | "One" >> beam.Create([1]) | "Count" >> beam.combiners.Count.Globally()
    empty.run().wait_until_finish()
    lap("reference: a 1-element pipeline on the same runner (runner start-up alone)")
    if analyze:
        phases["preprocessing_fn traces while constructing"] = (float(traced_at_construction), 0.0)
        phases["preprocessing_fn traces in all"] = (float(traces), 0.0)
    return phases


def fixed_costs(work_dir: str, count: int, import_repeats: int = 3, shared: bool = False) -> str:
    """The fixed-cost breakdown section: imports in fresh interpreters, then a small run's phases."""
    data_dir = os.path.join(work_dir, f"synthetic_{count}_64px")
    manifest = os.path.join(data_dir, sample_data.MANIFEST_FILE)
    if not os.path.exists(manifest):
        sample_data.write_synthetic(data_dir, count=count, size=64, image_format="jpeg")
    imports = measure_imports(import_repeats)
    runs = {}
    for analyze in (True, False):
        output_dir = os.path.join(work_dir, "fixed_out")
        shutil.rmtree(output_dir, ignore_errors=True)
        start, cpu = time.perf_counter(), _children_cpu_s()
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.create_dataset", "--phase_child", manifest, "--work_dir", output_dir,
             *([] if analyze else ["--skip_analysis_child"])], capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-3000:])
        phases = json.loads(completed.stdout.strip().splitlines()[-1])
        phases["whole process, interpreter start and imports included"] = (
            time.perf_counter() - start, _children_cpu_s() - cpu)
        runs["with analysis" if analyze else "--skip_analysis"] = phases
    from benchmarks.machine import cpu_description

    lines = [
        f"## Fixed costs: where a small create_dataset run's time goes ({count} images, 64x64 JPEG)",
        "",
        f"Command: `nice -n 10 python -m benchmarks.create_dataset --fixed_costs {count} --import_repeats {import_repeats}"
        f"{' --shared_machine' if shared else ''}`",
        f"Machine: {cpu_description()}, Python {platform.python_version()}"
        + ("; shared with other agents' tests while it ran, so read the shares, not the absolute seconds."
           if shared else "; nothing else running."),
        "",
        f"Imports, each in a fresh interpreter (median of {import_repeats}, interpreter start included):",
        "",
        "| import | wall s | CPU s |",
        "|---|---:|---:|",
        *(f"| {name} | {wall:.2f} | {cpu:.2f} |" for name, (wall, cpu) in imports.items()),
        "",
        "Phases of one run in one process (the job's own `run` steps, timed in order; CPU counts every thread):",
        "",
        "| phase | with analysis: wall s | CPU s | --skip_analysis: wall s | CPU s |",
        "|---|---:|---:|---:|---:|",
    ]
    with_a, without = runs["with analysis"], runs["--skip_analysis"]
    names = list(dict.fromkeys([*with_a, *without]))
    for name in names:
        cells = []
        for run in (with_a, without):
            if name not in run:
                cells += ["", ""]
            elif name.startswith("preprocessing_fn traces"):
                cells += [f"{run[name][0]:.0f}", ""]
            else:
                cells += [f"{run[name][0]:.1f}", f"{run[name][1]:.1f}"]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="500,2000")
    parser.add_argument("--work_dir", default="/tmp/bench_create_dataset")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    parser.add_argument("--fixed_costs", type=int, default=0, metavar="COUNT",
                        help="Instead of the throughput table: the fixed-cost breakdown of a COUNT-image run.")
    parser.add_argument("--import_repeats", type=int, default=3, help="Fresh interpreters per import measured.")
    parser.add_argument("--shared_machine", action="store_true",
                        help="Say in the report that other work shared the machine (read shares, not seconds).")
    # Internal: one phase-timed run in a fresh process.
    parser.add_argument("--phase_child", help=argparse.SUPPRESS)
    parser.add_argument("--skip_analysis_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase_child:
        print(json.dumps(phase_child(args.phase_child, args.work_dir, not args.skip_analysis_child)))
        return 0
    if args.fixed_costs:
        body = fixed_costs(args.work_dir, args.fixed_costs, args.import_repeats, args.shared_machine)
        print(body)
        if not args.no_report:
            write_section("fixed_costs", body)
        return 0
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
