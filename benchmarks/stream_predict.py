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
import base64
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np

PROJECT = "bench-project"
WARMUP_MESSAGES = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_emulator(log_path: str) -> tuple[subprocess.Popen, str]:
    """Starts the Cloud SDK's Pub/Sub emulator; returns the process and its host:port."""
    root = subprocess.run(["gcloud", "info", "--format=value(installation.sdk_root)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    port = _free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([os.path.join(root, "platform/pubsub-emulator/bin/cloud-pubsub-emulator"),
                                    "--host=127.0.0.1", f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}/", timeout=2):
                return process, host
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the Pub/Sub emulator did not start")


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


def pull_outputs(subscriber: Any, subscription: str, want: set[str], timeout_s: float) -> dict[str, list[float]]:
    """image_id -> latencies (s) of every output for it, until every wanted id came (or the timeout)."""
    seen: dict[str, list[float]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not want <= set(seen):
        response = subscriber.pull(request={"subscription": subscription, "max_messages": 500}, timeout=10)
        if not response.received_messages:
            continue
        subscriber.acknowledge(request={"subscription": subscription,
                                        "ack_ids": [m.ack_id for m in response.received_messages]})
        for received in response.received_messages:
            row = json.loads(received.message.data)
            event = np.datetime64(row["event_time"].replace("+00:00", ""), "us").astype(float) / 1e6
            published = received.message.publish_time.timestamp()
            seen.setdefault(row["image_id"], []).append(published - event)
    return seen


def run_rate(publisher: Any, subscriber: Any, paths: dict[str, str], images: list[bytes], rate: float,
             seconds: float, tag: str) -> dict[str, Any]:
    count = max(1, int(rate * seconds))
    ids = [f"{tag}-{i}" for i in range(count)]
    start = time.monotonic()
    futures = []
    for i, image_id in enumerate(ids):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        body = json.dumps({"image_id": image_id, "image_base64": base64.b64encode(images[i % len(images)]).decode()})
        futures.append(publisher.publish(paths["input"], body.encode()))
    for future in futures:
        future.result(timeout=60)
    seen = pull_outputs(subscriber, paths["output_sub"], set(ids), timeout_s=max(90.0, seconds * 3))
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
        paths = {name: f"projects/{PROJECT}/topics/bench-{name}" for name in ("input", "output", "dead")}
        for topic in paths.values():
            publisher.create_topic(name=topic)
        for name in ("input", "output"):
            paths[f"{name}_sub"] = f"projects/{PROJECT}/subscriptions/bench-{name}"
            subscriber.create_subscription(name=paths[f"{name}_sub"], topic=paths[name], ack_deadline_seconds=60)
        command = [sys.executable, "-m", "beam_jobs.stream_predict", "--model_dir", args.model_dir,
                   "--input_subscription", paths["input_sub"], "--output_topic", paths["output"],
                   "--dead_letter_topic", paths["dead"], "--message_format", "json_base64"]
        job_log = open(os.path.join(args.work_dir, "bench-stream-predict.log"), "wb")
        job = subprocess.Popen(command, stdout=job_log, stderr=subprocess.STDOUT, start_new_session=True)
        images = digit_images(100)
        warmup = run_rate(publisher, subscriber, paths, images, WARMUP_MESSAGES, 1.0, "warmup")
        if warmup["lost"]:
            raise RuntimeError(f"the job did not answer the warm-up messages: {warmup}")
        results = [run_rate(publisher, subscriber, paths, images, float(rate), args.seconds_per_rate, f"r{rate}")
                   for rate in args.rates.split(",")]
    finally:
        if job is not None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        emulator.terminate()
        emulator.wait(timeout=30)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "model_dir": args.model_dir, "results": results}, indent=2))
    print("\n| rate (msg/s) | published | lost | duplicates | throughput (msg/s) | p50 (s) | p95 (s) | p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rate']:g} | {r['published']} | {r['lost']} | {r['duplicates']} | {r['throughput']} "
              f"| {r['p50_s']} | {r['p95_s']} | {r['p99_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
