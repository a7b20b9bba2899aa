"""Benchmark: how the jobs scale with the number of images (time, throughput, memory).

create_dataset runs on growing subsets of one set of small synthetic JPEGs
(64x64 drawn shapes, stored at 64x64), with the in-process FnApiRunner and with
two worker processes (``--direct_running_mode=multi_processing
--direct_num_workers=2``). Then, on the largest subset, batch_predict and
extract_embeddings run with an untrained small CNN (64x64 input, 128-d
embedding; untrained weights cost the same to run), next to raw TensorFlow
computing the same embeddings on ``tf.data`` batches (the ceiling).

Every measurement is a fresh process. Wall time includes interpreter start,
imports and pipeline construction; peak RSS is the largest sum of the resident
memory of the job's whole process tree (the job and every worker process it
starts), sampled from /proc every 0.2 s.

Run:
  nice -n 10 python -m benchmarks.scale --counts 500,5000,50000,100000 --work_dir /tmp/bench_scale
It writes docs/scale.png, the ``scale`` section of docs/benchmarks.md and
``WORK_DIR/scale_results.json`` (what docs/scaling.md derives its figures from).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.machine import cpu_description

IMAGE_SIZE = 64
CREATE_MODES = {
    "in-process": [],
    "multi-process x2": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_SAMPLE_S = 0.2


def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, read from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{name}/statm") as handle:
                resident = int(handle.read().split()[1]) * _PAGE_BYTES
        except (OSError, IndexError, ValueError):
            continue  # The process ended while we looked.
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(name)] = int(fields[1])
        rss[int(name)] = resident
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(rss.get(pid, 0) for pid in tree)


def measure(command: list[str], log_path: str) -> dict[str, float]:
    """Runs ``command``; returns its wall seconds, CPU seconds (user + system, its tree) and peak tree RSS (MiB)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        peak = [0]
        finished = threading.Event()

        def sample() -> None:  # Never polls the process: reaping it here would take wait4's rusage away.
            while not finished.wait(_SAMPLE_S):
                peak[0] = max(peak[0], _tree_rss_bytes(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4, not wait: its rusage is the CPU time of the job and of the workers it waited for.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        returncode = process.returncode
        finished.set()
        sampler.join()
    wall = time.perf_counter() - start
    if returncode != 0:
        with open(log_path) as log:
            raise RuntimeError(f"{command[:4]} failed (exit {returncode}):\n{log.read()[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak[0] / 2**20}


def prepare_images(work_dir: str, counts: list[int]) -> dict[int, str]:
    """Writes max(counts) synthetic JPEGs once (cached) and one manifest per count (its first N rows)."""
    from model_lib import sample_data

    data_dir = os.path.join(work_dir, f"synthetic_{max(counts)}_{IMAGE_SIZE}px")
    manifest = os.path.join(data_dir, sample_data.MANIFEST_FILE)
    if not os.path.exists(manifest):
        shutil.rmtree(data_dir, ignore_errors=True)
        sample_data.write_synthetic(data_dir, count=max(counts), size=IMAGE_SIZE, image_format="jpeg")
    with open(manifest) as handle:
        rows = [line for line in handle if line.strip()]
    manifests = {}
    for count in counts:
        path = os.path.join(work_dir, f"manifest_{count}.csv")
        with open(path, "w") as handle:
            handle.writelines(rows[:count])
        manifests[count] = path
    return manifests


def create_dataset_command(manifest: str, output_dir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "beam_jobs.create_dataset", "--manifest", manifest, "--output_dir", output_dir,
            "--image_size", str(IMAGE_SIZE), *extra]


def export_model(dataset_dir: str, model_dir: str) -> None:
    """Exports an untrained small CNN with the dataset's transform, as train would."""
    import tensorflow_transform as tft

    from model_lib import export as model_export
    from model_lib import models, sample_data
    from schemas.publication import published_dir

    labels = sorted(sample_data.SHAPES)
    model = models.build_model("small_cnn", input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_classes=len(labels))
    model_export.export_model(
        model, model_dir=model_dir, transform_output=tft.TFTransformOutput(published_dir(dataset_dir)),
        labels=labels, architecture="small_cnn", image_size=IMAGE_SIZE, channels=3,
        dataset_fingerprint="benchmark", hyperparameters={},
    )


def raw_tf_embeddings(model_dir: str, manifest: str, output: str, batch_size: int = 64) -> int:
    """The SavedModel's embedding output on tf.data batches of file bytes, saved as one .npy: no Beam."""
    import numpy as np
    import tensorflow as tf

    from schemas import model_artifacts
    from schemas.publication import published_dir

    signature = tf.saved_model.load(
        os.path.join(published_dir(model_dir), model_artifacts.SAVED_MODEL_DIR)
    ).signatures[model_artifacts.SERVING_SIGNATURE]
    with open(manifest) as handle:
        uris = [line.split(",")[0] for line in handle.read().splitlines() if line]
    batches = (
        tf.data.Dataset.from_tensor_slices(uris)
        .map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    embeddings = [signature(**{model_artifacts.IMAGE_BYTES_INPUT: batch})[model_artifacts.OUTPUT_EMBEDDING].numpy()
                  for batch in batches]
    stacked = np.concatenate(embeddings)
    np.save(output, stacked)
    return int(stacked.shape[0])


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def run_create_dataset(work_dir: str, manifests: dict[int, str], results: list[dict[str, Any]]) -> str:
    """create_dataset at every count and mode; returns the dataset directory of the largest in-process run."""
    largest = max(manifests)
    kept = os.path.join(work_dir, "dataset_largest")
    for count, manifest in sorted(manifests.items()):
        for mode, extra in CREATE_MODES.items():
            output_dir = os.path.join(work_dir, "out", "create_dataset")
            shutil.rmtree(output_dir, ignore_errors=True)
            measured = measure(create_dataset_command(manifest, output_dir, extra),
                               os.path.join(work_dir, f"create_dataset_{count}_{mode.replace(' ', '_')}.log"))
            row = {"job": "create_dataset", "mode": mode, "images": count, **measured}
            results.append(row)
            print(json.dumps(row), flush=True)
            if count == largest and mode == "in-process":
                shutil.rmtree(kept, ignore_errors=True)
                shutil.move(output_dir, kept)
    return kept


def run_inference(work_dir: str, dataset_dir: str, manifest: str, count: int,
                  results: list[dict[str, Any]]) -> None:
    """batch_predict, extract_embeddings and raw TF embeddings on the same images with the same model."""
    model_dir = os.path.join(work_dir, "model_small_cnn_64")
    shutil.rmtree(model_dir, ignore_errors=True)
    subprocess.run(_module("benchmarks.scale", "--export", "--dataset_dir", dataset_dir, "--model_dir", model_dir),
                   check=True, capture_output=True)
    from schemas.publication import published_dir

    served = published_dir(model_dir)
    out = os.path.join(work_dir, "out")
    runs = {
        "raw_tf_embeddings": _module("benchmarks.scale", "--raw_tf", "--model_dir", model_dir, "--manifest",
                                     manifest, "--output", os.path.join(out, "raw_tf_embeddings.npy")),
        "extract_embeddings": _module("beam_jobs.extract_embeddings", "--model_dir", served, "--input", manifest,
                                      "--warehouse", f"parquet:{os.path.join(out, 'warehouse')}"),
        "batch_predict": _module("beam_jobs.batch_predict", "--model_dir", served, "--input", manifest,
                                 "--output", os.path.join(out, "predictions")),
    }
    for job, command in runs.items():
        shutil.rmtree(out, ignore_errors=True)  # Every job writes into a fresh directory: nothing to --overwrite.
        os.makedirs(out)
        measured = measure(command, os.path.join(work_dir, f"{job}_{count}.log"))
        row = {"job": job, "mode": "in-process", "images": count, **measured}
        results.append(row)
        print(json.dumps(row), flush=True)


PER_IMAGE_CASES = ((64, 64), (256, 224), (1024, 224))


def per_image_probe(images: int = 200) -> list[dict[str, Any]]:
    """CPU milliseconds per image, on one thread, of the two image passes create_dataset makes.

    ``pillow_ms``: ``transforms.images.normalize_image`` (decode, resize,
    re-encode as JPEG 90), the job's own per-image work. ``tf_analysis_ms``:
    the tf.Transform preprocessing graph's decode + resize of the stored JPEG
    (``model_lib.image_ops.decode_and_resize_batch``), what analysis adds per
    train image. Source images are synthetic shapes saved as JPEG 95.
    """
    import io

    import numpy as np
    import tensorflow as tf

    from model_lib.image_ops import decode_and_resize_batch
    from model_lib.sample_data import SHAPES, draw_shape
    from transforms.images import ImageSpec, normalize_image

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for source, target in PER_IMAGE_CASES:
        encoded = []
        for i in range(images):
            buffer = io.BytesIO()
            draw_shape(rng, SHAPES[i % len(SHAPES)], source).save(buffer, format="JPEG", quality=95)
            encoded.append(buffer.getvalue())
        spec = ImageSpec(image_size=target)
        start = time.process_time()
        stored = [normalize_image(data, spec).encoded for data in encoded]
        pillow_ms = 1000 * (time.process_time() - start) / images
        batch = tf.constant(stored)
        # As a graph, like tf.Transform runs it (eager map_fn would add ~4 ms of Python per image).
        graph = tf.function(functools.partial(decode_and_resize_batch, image_size=target, channels=3),
                            input_signature=[tf.TensorSpec([None], tf.string)])
        graph(batch[:2])  # Warm-up: the first call traces.
        start = time.process_time()
        graph(batch).numpy()
        tf_ms = 1000 * (time.process_time() - start) / images
        row = {"source_px": source, "stored_px": target, "source_kib": sum(map(len, encoded)) / images / 1024,
               "stored_kib": sum(map(len, stored)) / images / 1024, "pillow_ms": pillow_ms, "tf_analysis_ms": tf_ms}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _self_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE_BYTES


def scann_shard_probe(counts: list[int], dimension: int = 128, queries: int = 200) -> list[dict[str, Any]]:
    """Builds build_index's ScaNN configuration over random unit vectors; memory, build time, query latency.

    The parameters are ``retrieval.index_build.choose_params`` for each count
    (what build_index would use for a shard of that size). Memory is the
    growth of this process's RSS from before the vectors existed to after the
    build with this script's reference to them dropped (ScaNN keeps the float32
    datapoints for re-scoring), i.e. what a serving process holds per shard. Latency is one query per call
    on one thread (p50 and p99 over ``queries`` calls).
    """
    import gc

    import numpy as np

    from retrieval.index_build import choose_params
    from retrieval.scann_compat import build

    rng = np.random.default_rng(0)
    rows = []
    for count in counts:
        gc.collect()
        before = _self_rss_bytes()
        # Clustered data (1,000 centres plus noise) rather than uniform noise, like real embeddings.
        centres = rng.standard_normal((1000, dimension)).astype(np.float32)
        vectors = centres[rng.integers(0, 1000, count)] + 0.5 * rng.standard_normal((count, dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        probe = vectors[rng.integers(0, count, queries)] + 0.05 * rng.standard_normal((queries, dimension)).astype(
            np.float32)
        start = time.perf_counter()
        params = choose_params(count, dimension)
        searcher = build(vectors, params, k=10, training_threads=1)
        build_s = time.perf_counter() - start
        del vectors
        gc.collect()
        held = _self_rss_bytes() - before
        latencies = []
        for query in probe:
            start = time.perf_counter()
            searcher.search(query[None, :], 10)
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        batch_start = time.perf_counter()
        searcher.search(probe, 10)
        batch_qps = queries / (time.perf_counter() - batch_start)
        row = {"vectors": count, "algorithm": params.algorithm, "num_leaves": params.num_leaves,
               "leaves_to_search": params.leaves_to_search_default, "build_s": build_s,
               "held_mib": held / 2**20, "bytes_per_vector": held / count,
               "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
               "batched_qps_one_thread": batch_qps}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del searcher
        gc.collect()
    return rows


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Wall time and peak RSS against the number of images, one line per create_dataset mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    modes = dict.fromkeys(r["mode"] for r in results if r["job"] == "create_dataset")  # Runs merged in, too.
    for mode in modes:
        rows = sorted((r for r in results if r["job"] == "create_dataset" and r["mode"] == mode),
                      key=lambda r: r["images"])
        counts = [r["images"] for r in rows]
        left.plot(counts, [r["wall_s"] for r in rows], marker="o", label=mode)
        right.plot(counts, [r["peak_rss_mib"] / 1024 for r in rows], marker="o", label=mode)
    for axis, label in ((left, "wall time (s)"), (right, "peak RSS of the process tree (GiB)")):
        axis.set_xscale("log")
        axis.set_xlabel(f"images ({IMAGE_SIZE}x{IMAGE_SIZE} JPEG)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    right.set_ylim(bottom=0)
    left.set_yscale("log")
    figure.suptitle("create_dataset: wall time and peak memory against images (shared 2-core machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def report(results: list[dict[str, Any]], command: str, shared: bool) -> str:
    largest_create = max((r["images"] for r in results if r["job"] == "create_dataset"), default=0)
    largest_inference = max((r["images"] for r in results if r["job"] != "create_dataset"), default=0)
    lines = [
        f"## Scale: create_dataset up to {largest_create:,} images, batch_predict and extract_embeddings up to "
        f"{largest_inference:,} ({IMAGE_SIZE}x{IMAGE_SIZE} JPEG)",
        "",
        f"Command: `{command}`",
        f"Machine: {cpu_description()}, Python {platform.python_version()}, no GPU"
        + ("; shared with other agents' tests while it ran (compare rows within this table only)." if shared else "."),
        "",
        "| job | mode | images | wall s | CPU s | images/s | marginal images/s | marginal CPU ms/image "
        "| peak RSS MiB (process tree) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous: dict[tuple[str, str], dict[str, Any]] = {}
    for row in results:
        key = (row["job"], row["mode"])
        before = previous.get(key)
        added_s = 0.0 if before is None else row["wall_s"] - before["wall_s"]
        marginal = f"{(row['images'] - before['images']) / added_s:.0f}" if before and added_s > 0 else ""
        marginal_cpu = (f"{1000 * (row['cpu_s'] - before['cpu_s']) / (row['images'] - before['images']):.2f}"
                        if before and "cpu_s" in row and "cpu_s" in before else "")
        previous[key] = row
        cpu = f"{row['cpu_s']:.1f}" if "cpu_s" in row else "n/a"
        lines.append(f"| {row['job']} | {row['mode']} | {row['images']:,} | {row['wall_s']:.1f} | {cpu} | "
                     f"{row['images'] / row['wall_s']:.0f} | {marginal} | {marginal_cpu} | {row['peak_rss_mib']:.0f} |")
    def largest(job_name: str) -> dict[str, Any] | None:
        return max((r for r in results if r["job"] == job_name), key=lambda r: r["images"], default=None)

    raw, job = largest("raw_tf_embeddings"), largest("extract_embeddings")
    lines += [
        "",
        "- Wall time is the whole process (interpreter, imports, pipeline construction, run, publish). "
        "Marginal images/s = images added / seconds added against the previous size: the rate without fixed "
        "start-up cost. CPU s = user + system seconds of the job and the workers it waited for (rows measured "
        "before CPU was recorded say n/a). Peak RSS sums every process of the job's tree (multi-process workers "
        "included).",
        f"- create_dataset stores {IMAGE_SIZE}x{IMAGE_SIZE} JPEG (quality 90) with tf.Transform analysis of the "
        "train split (the default). Inference: untrained small CNN, 64x64 input, 128-d embedding, default flags.",
    ]
    if raw and job:
        by_cpu = (f", {raw['cpu_s'] / job['cpu_s']:.2f}x by CPU seconds"
                  if "cpu_s" in raw and "cpu_s" in job else "")
        lines.append(f"- extract_embeddings vs raw TF embeddings on the same {job['images']:,} images and model: "
                     f"{raw['wall_s'] / job['wall_s']:.2f}x by wall time{by_cpu} (both whole processes, imports "
                     "included; target >= 0.8x).")
    lines.append("- Plot: [scale.png](scale.png).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="500,5000,50000,100000")
    parser.add_argument("--work_dir", default="/tmp/bench_scale")
    parser.add_argument("--skip_inference", action="store_true", help="Only create_dataset.")
    parser.add_argument("--inference_only", action="store_true",
                        help="Only the inference jobs, at every count, with the model exported from "
                             "WORK_DIR/dataset_largest of an earlier run.")
    parser.add_argument("--merge_results", default=None,
                        help="A scale_results.json whose rows come first in this run's results and report.")
    parser.add_argument("--shared_machine", action="store_true", help="Say in the report that others used the CPU.")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/ alone.")
    parser.add_argument("--from_results", default=None,
                        help="Only rewrite the report and plot from a scale_results.json of an earlier run.")
    # Internal: one export or one raw TF run in a fresh process.
    parser.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw_tf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset_dir", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--scann", default=None, metavar="COUNTS",
                        help="Only the ScaNN shard probe at these vector counts (JSON lines on stdout).")
    parser.add_argument("--per_image", action="store_true",
                        help="Only the per-image CPU cost probe (Pillow pass and tf.Transform pass), JSON lines.")
    args = parser.parse_args(argv)
    if args.per_image:
        per_image_probe()
        return 0
    if args.scann:
        scann_shard_probe([int(c) for c in args.scann.split(",")])
        return 0
    if args.export:
        export_model(args.dataset_dir, args.model_dir)
        return 0
    if args.raw_tf:
        print(raw_tf_embeddings(args.model_dir, args.manifest, args.output))
        return 0
    command = "nice -n 10 python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_results:
        with open(args.from_results) as handle:
            saved = json.load(handle)
        results, command = saved["results"], saved["command"]
    else:
        counts = sorted(int(c) for c in args.counts.split(","))
        os.makedirs(args.work_dir, exist_ok=True)
        manifests = prepare_images(args.work_dir, counts)
        results = []
        if args.merge_results:
            with open(args.merge_results) as handle:
                results.extend(json.load(handle)["results"])
        if args.inference_only:
            dataset_dir = os.path.join(args.work_dir, "dataset_largest")
        else:
            dataset_dir = run_create_dataset(args.work_dir, manifests, results)
        if not args.skip_inference:
            # Normally the largest size only; --inference_only measures every size (marginal rates).
            for count in (counts if args.inference_only else [max(counts)]):
                run_inference(args.work_dir, dataset_dir, manifests[count], count, results)
        with open(os.path.join(args.work_dir, "scale_results.json"), "w") as handle:
            json.dump({"cpu": cpu_description(), "command": command.replace(" --no_report", ""), "results": results},
                      handle, indent=1)
    body = report(results, command.strip(), args.shared_machine)
    print(body)
    if not args.no_report:
        from benchmarks.report import BENCHMARKS_DOC, write_section

        plot(results, os.path.join(os.path.dirname(BENCHMARKS_DOC), "scale.png"))
        write_section("scale", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
