"""Benchmark: stream_predict on the local streaming runner against the Pub/Sub emulator.

A publisher sends real digit images (``json_base64`` messages) at fixed rates,
one rate after another, to one running job (a subprocess of
``beam_jobs.stream_predict`` on the BundleBasedDirectRunner). For every rate it
reports the sustained throughput (messages out / time from the first publish
to the last output), end-to-end latency percentiles (an output's publish time
minus its input's publish time, both stamped by the emulator, so one clock),
messages lost (published but never predicted; must be 0) and duplicates.

Run:
  python -m benchmarks.stream_predict --model_dir MODEL --rates 2,5,10,20,40 --seconds_per_rate 20
MODEL is any exported model directory (the numbers in docs/benchmarks.md use
the default CNN trained on the digits sample, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.machine import cpu_description
from transforms.local_services import stop_process_group
from transforms.pubsub_emulator import start_emulator
from transforms.stream_probe import image_message, publish_all, pull_predictions

PROJECT = "bench-project"
WARMUP_MESSAGES = 20


def digit_images(count: int) -> list[bytes]:
    from model_lib import sample_data

    directory = tempfile.mkdtemp(prefix="bench-stream-digits-")
    written = sample_data.write_digits(directory, limit=count)
    with open(written.manifest) as handle:
        paths = [line.split(",")[0] for line in handle.read().splitlines()]
    images = []
    for path in paths:
        with open(path, "rb") as image:
            images.append(image.read())
    shutil.rmtree(directory)
    return images


def run_rate(publisher: Any, subscriber: Any, paths: dict[str, str], images: list[bytes], rate: float,
             seconds: float, tag: str) -> dict[str, Any]:
    count = max(1, int(rate * seconds))
    ids = [f"{tag}-{i}" for i in range(count)]
    start = time.monotonic()
    publish_all(publisher, paths["input"], [image_message(image_id, images[i % len(images)])
                                            for i, image_id in enumerate(ids)], rate=rate)
    outputs = pull_predictions(subscriber, paths["output_sub"], set(ids), timeout_s=max(90.0, seconds * 3))
    seen = {image_id: [latency for _, latency in rows] for image_id, rows in outputs.items()}
    elapsed = time.monotonic() - start
    latencies = np.array([value for values in seen.values() for value in values])
    return {
        "rate": rate,
        "published": count,
        "received": int(sum(len(v) for v in seen.values())),
        "lost": len(set(ids) - set(seen)),
        "duplicates": int(sum(len(v) - 1 for v in seen.values())),
        "throughput": round(len(seen) / elapsed, 2),
        "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies.size else None,
        "p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies.size else None,
        "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies.size else None,
    }


def start_warm_job(publisher: Any, subscriber: Any, model_dir: str, work_dir: str, prefix: str,
                   subscribed: tuple[str, ...]) -> tuple[dict[str, str], subprocess.Popen]:
    """Creates the input/output/dead topics (subscriptions for ``subscribed``), starts stream_predict, warms it up.

    Returns the topic and subscription paths (``NAME`` and ``NAME_sub``) and the job's process (its own
    session: kill its group to stop it). Raises when the job does not answer the warm-up messages.
    """
    paths = {name: f"projects/{PROJECT}/topics/{prefix}-{name}" for name in ("input", "output", "dead")}
    for topic in paths.values():
        publisher.create_topic(name=topic)
    for name in subscribed:
        paths[f"{name}_sub"] = f"projects/{PROJECT}/subscriptions/{prefix}-{name}"
        subscriber.create_subscription(name=paths[f"{name}_sub"], topic=paths[name], ack_deadline_seconds=60)
    command = [sys.executable, "-m", "beam_jobs.stream_predict", "--model_dir", model_dir,
               "--input_subscription", paths["input_sub"], "--output_topic", paths["output"],
               "--dead_letter_topic", paths["dead"], "--message_format", "json_base64"]
    job_log = open(os.path.join(work_dir, f"{prefix}-stream-predict.log"), "wb")
    job = subprocess.Popen(command, stdout=job_log, stderr=subprocess.STDOUT, start_new_session=True)
    warmup = run_rate(publisher, subscriber, paths, digit_images(WARMUP_MESSAGES), WARMUP_MESSAGES, 1.0, "warmup")
    if warmup["lost"]:
        os.killpg(job.pid, signal.SIGKILL)
        raise RuntimeError(f"the job did not answer the warm-up messages: {warmup}")
    return paths, job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--rates", default="2,5,10,20,40", help="Messages per second, comma-separated.")
    parser.add_argument("--seconds_per_rate", type=float, default=20.0)
    parser.add_argument("--work_dir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)

    emulator, host = start_emulator(os.path.join(args.work_dir, "bench-pubsub-emulator.log"))
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    job = None
    try:
        from google.cloud import pubsub_v1

        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        paths, job = start_warm_job(publisher, subscriber, args.model_dir, args.work_dir, "bench", ("input", "output"))
        images = digit_images(100)
        results = [run_rate(publisher, subscriber, paths, images, float(rate), args.seconds_per_rate, f"r{rate}")
                   for rate in args.rates.split(",")]
    finally:
        if job is not None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        stop_process_group(emulator)
    print(json.dumps({"machine": cpu_description(),
                      "model_dir": args.model_dir, "results": results}, indent=2))
    print("\n| rate (msg/s) | published | lost | duplicates | throughput (msg/s) | p50 (s) | p95 (s) | p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rate']:g} | {r['published']} | {r['lost']} | {r['duplicates']} | {r['throughput']} "
              f"| {r['p50_s']} | {r['p95_s']} | {r['p99_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
