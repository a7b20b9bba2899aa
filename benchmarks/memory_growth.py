"""Benchmark: where the inference jobs' peak memory grows with the number of images (local runner).

docs/benchmarks.md (Scale) measured batch_predict and extract_embeddings
peaking about 5 KiB of RSS higher per extra image on the in-process
FnApiRunner. This bisects that at small sizes: each *variant* runs in a fresh
process on the first N images of ``benchmarks.scale``'s synthetic 64x64 JPEGs
with its untrained small CNN, and reports the process's peak RSS (VmHWM) and,
with ``--tracemalloc``, the Python heap's peak and its largest live
allocation sites at the end of the run.

Variants (each a prefix of the batch_predict pipeline, or the whole job):
  read           ReadImageInputs, counted
  predict        + PredictImages (RunInference)
  format         + FormatPredictionFn (the prediction rows)
  jsonl          + row_to_json and WriteToText (no eval, dead letters, publishing)
  batch_predict  the job itself (python -m beam_jobs.batch_predict, jsonl output)
  extract_embeddings  the job itself (parquet warehouse)

Run (flags it does not know go to the measured job or pipeline; a fixed batch
size keeps RunInference's adaptive batch shapes out of the comparison):
  nice -n 10 python -m benchmarks.memory_growth --counts 4000,12000 --variants batch_predict \
      --min_batch_size 64 --max_batch_size 64
The per-image growth is (peak at the larger N - peak at the smaller N) / images added.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import apache_beam as beam

from benchmarks import scale

VARIANTS = ("read", "predict", "format", "jsonl", "batch_predict", "extract_embeddings")
MODEL_IMAGES = 200  # create_dataset runs on this many images only to give the exported model its transform.
POOL_IMAGES = 16_000  # Synthetic images written once; every count takes the first N.


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def prepare(work_dir: str, counts: list[int]) -> tuple[str, dict[int, str]]:
    """Manifests of the first N synthetic images and an exported model (both cached in ``work_dir``)."""
    if max(counts) > POOL_IMAGES:
        raise ValueError(f"counts above {POOL_IMAGES} are not what this benchmark is for")
    manifests = scale.prepare_images(work_dir, sorted({MODEL_IMAGES, POOL_IMAGES, *counts}))
    model_dir = os.path.join(work_dir, "model")
    if not os.path.exists(model_dir):
        dataset_dir = os.path.join(work_dir, "dataset")
        shutil.rmtree(dataset_dir, ignore_errors=True)
        subprocess.run(scale.create_dataset_command(manifests[MODEL_IMAGES], dataset_dir, []), check=True,
                       capture_output=True)
        subprocess.run([sys.executable, "-m", "benchmarks.scale", "--export", "--dataset_dir", dataset_dir,
                        "--model_dir", model_dir], check=True, capture_output=True)
    return model_dir, manifests


def _prefix_pipeline(variant: str, model_dir: str, manifest: str, out_dir: str, beam_args: list[str]) -> None:
    """Runs the first steps of batch_predict's pipeline, up to ``variant``, and waits."""
    from beam_jobs.batch_predict import BatchPredictOptions
    from transforms.inference_inputs import ReadImageInputs
    from transforms.inference_options import InferenceConfig
    from transforms.model_handler import PredictImages
    from transforms.prediction_rows import FormatPredictionFn, row_to_json
    from transforms.runner_policy import make_pipeline_options

    options = make_pipeline_options(["--model_dir", model_dir, "--input", manifest, *beam_args],
                                    job_options=BatchPredictOptions)
    config = InferenceConfig.from_options(options)  # The job's own reading and batching flags.
    with beam.Pipeline(options=options) as pipeline:
        images, _ = pipeline | "ReadInputs" >> ReadImageInputs(config.input_spec)
        last = images
        if variant != "read":
            handler = config.make_handler()
            last, _ = images | "PredictImages" >> PredictImages(handler)
            if variant != "predict":
                last = last | "FormatPredictions" >> beam.ParDo(FormatPredictionFn(list(handler.model_info.labels), 5))
                if variant == "jsonl":
                    last = (last | "FormatJsonLines" >> beam.Map(row_to_json)
                            | "WriteJsonLines" >> beam.io.WriteToText(os.path.join(out_dir, "predictions"),
                                                                      file_name_suffix=".jsonl"))
        if variant != "jsonl":
            _ = last | "Count" >> beam.combiners.Count.Globally()


def run_variant(variant: str, model_dir: str, manifest: str, beam_args: list[str], tracemalloc_frames: int) -> dict:
    """One variant in this process; returns its peak RSS and, when traced, the Python heap's figures."""
    if tracemalloc_frames:
        import tracemalloc

        tracemalloc.start(tracemalloc_frames)
    out_dir = tempfile.mkdtemp(prefix=f"memory_growth_{variant}_")
    start = time.perf_counter()
    try:
        if variant in ("batch_predict", "extract_embeddings"):
            from schemas.publication import published_dir

            served = published_dir(model_dir)
            if variant == "batch_predict":
                from beam_jobs import batch_predict as job

                argv = ["--model_dir", served, "--input", manifest, "--output", os.path.join(out_dir, "out")]
            else:
                from beam_jobs import extract_embeddings as job

                argv = ["--model_dir", served, "--input", manifest, "--warehouse",
                        f"parquet:{os.path.join(out_dir, 'warehouse')}"]
            if job.main(argv + beam_args) != 0:
                raise RuntimeError(f"{variant} failed")
        else:
            _prefix_pipeline(variant, model_dir, manifest, out_dir, beam_args)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    row: dict[str, Any] = {"variant": variant, "wall_s": round(time.perf_counter() - start, 1),
                           "peak_rss_mib": round(_vm_hwm_bytes() / 2**20, 1)}
    if tracemalloc_frames:
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
        top = snapshot.statistics("traceback")[:8]
        row.update(py_heap_now_mib=round(current / 2**20, 1), py_heap_peak_mib=round(peak / 2**20, 1),
                   top=[{"kib": round(stat.size / 1024), "count": stat.count,
                         "where": [f"{frame.filename}:{frame.lineno}" for frame in stat.traceback][-4:]}
                        for stat in top])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="2000,8000")
    parser.add_argument("--variants", default="batch_predict")
    parser.add_argument("--work_dir", default="/tmp/bench_memory_growth")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="Trace Python allocations with this many frames (slow).")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="Environment of the measured processes (e.g. MALLOC_ARENA_MAX=2).")
    # Internal: one variant in this process.
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args, beam_args = parser.parse_known_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.model_dir, args.manifest, beam_args,
                                                 args.tracemalloc)), flush=True)
        return 0
    counts = sorted(int(c) for c in args.counts.split(","))
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    os.makedirs(args.work_dir, exist_ok=True)
    model_dir, manifests = prepare(args.work_dir, counts)
    env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
    peaks: dict[tuple[str, int], float] = {}
    for variant in variants:
        for count in counts:
            command = [sys.executable, "-m", "benchmarks.memory_growth", "--one", variant, "--model_dir", model_dir,
                       "--manifest", manifests[count], "--tracemalloc", str(args.tracemalloc), *beam_args]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"{variant} at {count} failed:\n{done.stderr[-3000:]}")
            row = {"images": count, **json.loads(lines[-1][len("RESULT "):])}
            peaks[(variant, count)] = row["peak_rss_mib"]
            if count != counts[0]:
                added = count - counts[0]
                row["growth_kib_per_image"] = round((row["peak_rss_mib"] - peaks[(variant, counts[0])]) * 1024 / added,
                                                    2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
