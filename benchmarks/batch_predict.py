"""Benchmark: batch_predict against raw TensorFlow and a naive per-element Beam job.

On the same images (synthetic 256x256 JPEGs, decoded and resized to 224x224
inside the model's signature) and the same exported model (the default small
CNN and MobileNetV2 with ``weights=none``; untrained weights cost the same to
run), three ways to predict every image are timed side by side:

1. ``raw_tf``: the exported SavedModel called on ``tf.data`` batches of file
   bytes in one process: the ceiling on this CPU;
2. ``job``: ``beam_jobs.batch_predict`` on the default local runner;
3. ``naive``: a Beam job whose DoFn loads the SavedModel per bundle and
   predicts one element at a time.

Each runs in its own process under ``/usr/bin/time -v`` (peak RSS); the
reported time is measured inside that process from just before the model
is loaded (or the pipeline built) to the last prediction, so interpreter and
TensorFlow import time is left out of all three alike.

Run:
  python -m benchmarks.batch_predict --count 2000 --work_dir /tmp/bench_batch_predict
Results are written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Iterable

import apache_beam as beam

from schemas.publication import published_dir

APPROACHES = ("raw_tf", "job", "job_threads", "naive")
MODELS = ("small_cnn", "mobilenet_v2")
IMAGE_SIZE = 224
ANALYSIS_IMAGES = 200  # tf.Transform statistics only need a sample; the model is untrained anyway.


def prepare(work_dir: str, count: int, models: list[str]) -> tuple[str, dict[str, str]]:
    """Writes the images, a tf.Transform output and one exported model per architecture (cached)."""
    from model_lib import sample_data
    from schemas import model_artifacts

    data_dir = os.path.join(work_dir, f"synthetic_{count}")
    manifest = os.path.join(data_dir, sample_data.MANIFEST_FILE)
    if not os.path.exists(manifest):
        sample_data.write_synthetic(data_dir, count=count, size=256, image_format="jpeg")
    dataset_dir = os.path.join(work_dir, "analysis_dataset")
    if not _has_transform_output(dataset_dir):
        # Missing, unpublished or in an older layout: rebuilt from scratch (a fresh directory needs no --overwrite).
        shutil.rmtree(dataset_dir, ignore_errors=True)
        sample_manifest = os.path.join(work_dir, "analysis_manifest.csv")
        with open(manifest) as source, open(sample_manifest, "w") as sample:
            sample.writelines(source.readlines()[:ANALYSIS_IMAGES])
        completed = subprocess.run(
            [sys.executable, "-m", "beam_jobs.create_dataset", "--manifest", sample_manifest,
             "--output_dir", dataset_dir, "--image_size", str(IMAGE_SIZE), "--split", "100,0,0"],
            capture_output=True, text=True,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"create_dataset failed:\n{completed.stderr[-3000:]}")
    model_dirs = {}
    for arch in models:
        model_dir = os.path.join(work_dir, "models", arch)
        if not os.path.exists(os.path.join(model_dir, model_artifacts.MODEL_INFO_FILE)):
            subprocess.run([sys.executable, "-m", "benchmarks.batch_predict", "--export", arch,
                            "--dataset_dir", dataset_dir, "--model_dir", model_dir], check=True)
        model_dirs[arch] = model_dir
    return manifest, model_dirs


def _has_transform_output(dataset_dir: str) -> bool:
    """Whether the dataset directory publishes a run with a tf.Transform output (``transform_fn/``)."""
    import tensorflow_transform as tft

    return os.path.isdir(os.path.join(published_dir(dataset_dir), tft.TFTransformOutput.TRANSFORM_FN_DIR))


def export(arch: str, dataset_dir: str, model_dir: str) -> None:
    """Exports an untrained model of ``arch`` with the dataset's transform, as train would."""
    import tensorflow_transform as tft

    from model_lib import export as model_export
    from model_lib import models, sample_data

    labels = sorted(sample_data.SHAPES)
    model = models.build_model(arch, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_classes=len(labels))
    model_export.export_model(
        model, model_dir=model_dir, transform_output=tft.TFTransformOutput(published_dir(dataset_dir)), labels=labels,
        architecture=arch, image_size=IMAGE_SIZE, channels=3, dataset_fingerprint="benchmark",
        hyperparameters={},
    )


def _uris(manifest: str) -> list[str]:
    with open(manifest) as handle:
        return [line.split(",")[0] for line in handle.read().splitlines() if line]


def measure_raw_tf(model_dir: str, manifest: str, batch_size: int) -> int:
    """The SavedModel on tf.data batches of file bytes: no Beam at all."""
    import tensorflow as tf

    from schemas import model_artifacts

    signature = tf.saved_model.load(os.path.join(model_dir, model_artifacts.SAVED_MODEL_DIR)).signatures[
        model_artifacts.SERVING_SIGNATURE]
    batches = (
        tf.data.Dataset.from_tensor_slices(_uris(manifest))
        .map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    predicted = 0
    for batch in batches:
        outputs = signature(**{model_artifacts.IMAGE_BYTES_INPUT: batch})
        predicted += int(outputs[model_artifacts.OUTPUT_LABEL].shape[0])
    return predicted


def measure_job(model_dir: str, manifest: str, output_dir: str, extra: list[str]) -> int:
    from beam_jobs import batch_predict

    result = batch_predict.run(["--model_dir", model_dir, "--input", manifest, "--output", output_dir, *extra])
    return batch_predict.accounting(result)[batch_predict.PREDICTED_COUNTER]


def measure_naive(model_dir: str, manifest: str, output_dir: str) -> int:
    """A Beam job that does what RunInference exists to avoid."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.runner_policy import make_pipeline_options

    pipeline = beam.Pipeline(options=make_pipeline_options([], job_options=PipelineOptions))
    _ = (
        pipeline
        | "ReadManifest" >> beam.io.ReadFromText(manifest)
        | "PredictOneByOne" >> beam.ParDo(NaivePredictFn(model_dir))
        | "WriteLabels" >> beam.io.WriteToText(os.path.join(output_dir, "naive"))
    )
    pipeline.run().wait_until_finish()
    with open(manifest) as handle:
        return sum(1 for line in handle if line.strip())


class NaivePredictFn(beam.DoFn):
    """Loads the SavedModel per bundle and predicts one image per call."""

    def __init__(self, model_dir: str):
        self._model_dir = model_dir

    def start_bundle(self) -> None:
        import tensorflow as tf

        from schemas import model_artifacts

        self._signature = tf.saved_model.load(
            os.path.join(self._model_dir, model_artifacts.SAVED_MODEL_DIR)
        ).signatures[model_artifacts.SERVING_SIGNATURE]

    def process(self, line: str) -> Iterable[str]:
        import tensorflow as tf

        from schemas import model_artifacts

        uri = line.split(",")[0]
        outputs = self._signature(**{model_artifacts.IMAGE_BYTES_INPUT: tf.reshape(tf.io.read_file(uri), [1])})
        yield f"{uri},{outputs[model_artifacts.OUTPUT_LABEL].numpy()[0].decode()}"


def child(approach: str, model_dir: str, manifest: str, output_dir: str) -> dict[str, Any]:
    """Runs one approach in this process and returns images and seconds."""
    import tensorflow  # noqa: F401  Imported before the clock starts, for every approach alike.

    shutil.rmtree(output_dir, ignore_errors=True)
    model_dir = published_dir(model_dir)  # What the job reads for --model_dir, for every approach alike.
    start = time.perf_counter()
    if approach == "raw_tf":
        images = measure_raw_tf(model_dir, manifest, batch_size=64)
    elif approach == "job":
        images = measure_job(model_dir, manifest, output_dir, [])
    elif approach == "job_threads":
        images = measure_job(model_dir, manifest, output_dir,
                             ["--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    else:
        images = measure_naive(model_dir, manifest, output_dir)
    return {"images": images, "seconds": time.perf_counter() - start}


def run_child(approach: str, model_dir: str, manifest: str, output_dir: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.batch_predict", "--child", approach, "--model_dir", model_dir,
               "--manifest", manifest, "--output_dir", output_dir]
    timed = ["/usr/bin/time", "-v", *command] if os.path.exists("/usr/bin/time") else command
    completed = subprocess.run(timed, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{approach} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", completed.stderr)
    result["peak_rss_mib"] = int(match.group(1)) / 1024 if match else None
    return result


def report(count: int, results: dict[str, dict[str, dict[str, Any]]], command: str) -> str:
    lines = [
        f"## batch_predict: {count} synthetic 256x256 JPEGs, {IMAGE_SIZE}x{IMAGE_SIZE} model input",
        "",
        f"Command: `{command}`",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, no GPU, local FnApiRunner; "
        "all approaches in one run, one after another; compare rows within a run.",
        "",
        "| model | approach | images | seconds | images/s | vs raw TF | vs naive | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, by_approach in results.items():
        raw = by_approach["raw_tf"]["images"] / by_approach["raw_tf"]["seconds"]
        naive = by_approach["naive"]["images"] / by_approach["naive"]["seconds"]
        for approach, result in by_approach.items():
            rate = result["images"] / result["seconds"]
            rss = result["peak_rss_mib"]
            lines.append(
                f"| {arch} | {approach} | {result['images']} | {result['seconds']:.1f} | {rate:.1f} | "
                f"{rate / raw:.2f}x | {rate / naive:.1f}x | {'n/a' if rss is None else f'{rss:.0f}'} |"
            )
    lines += [
        "",
        "- `raw_tf`: SavedModel on tf.data batches of 64 (the ceiling). `job`: `vision-pipelines batch-predict` "
        "with default flags (batches of up to 64 images / 64 MiB, in-process FnApiRunner). `job_threads`: the "
        "same with `--direct_running_mode=multi_threading --direct_num_workers=2` (two bundles in parallel, one "
        "model copy). `naive`: a DoFn that loads the model per bundle and predicts one image per call.",
        "- Seconds are measured inside each process from model load / pipeline construction to the last "
        "prediction (Python and TensorFlow import excluded). Peak RSS is the process's maximum resident set "
        "(`/usr/bin/time -v`).",
        "- Targets from issue 4: job >= 0.8x raw TF and >= 5x naive; the job's peak RSS stays near raw TF's "
        "(one model copy per process, whatever the number of threads).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--approaches", default=",".join(APPROACHES))
    parser.add_argument("--work_dir", default="/tmp/bench_batch_predict")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    # Internal: one measurement, or one export, in a fresh process.
    parser.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--dataset_dir", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.manifest, args.output_dir)))
        return 0
    if args.export:
        export(args.export, args.dataset_dir, args.model_dir)
        return 0
    manifest, model_dirs = prepare(args.work_dir, args.count, args.models.split(","))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for arch, model_dir in model_dirs.items():
        results[arch] = {}
        for approach in args.approaches.split(","):
            result = run_child(approach, model_dir, manifest, os.path.join(args.work_dir, "out", approach))
            results[arch][approach] = result
            print(arch, approach, result, flush=True)
    command = "python -m benchmarks.batch_predict " + " ".join(argv if argv is not None else sys.argv[1:])
    body = report(args.count, results, command.strip())
    print(body)
    if not args.no_report:
        from benchmarks.report import write_section

        write_section("batch_predict", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
