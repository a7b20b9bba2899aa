"""Load test: 10,000 messages through stream_predict on the Pub/Sub emulator, 1% of them malformed.

Issue 11's reliability promise for streaming: under sustained load nothing is
lost, every malformed message lands on the dead-letter topic naming the
message it came from, and redeliveries are counted, not hidden. One job (a
subprocess of ``beam_jobs.stream_predict`` on the BundleBasedDirectRunner, as
``benchmarks.stream_predict`` runs it) takes ``--messages`` ``json_base64``
messages of real digit PNGs at ``--rate`` messages/s; every ``--malformed_every``-th
message is malformed instead (a rotation of broken JSON, JSON without an
image_id, base64 that is not an image). Outputs and dead letters are pulled
while the load runs; each output is matched to its input by image_id, each
dead letter to its message by the message id the emulator returned on publish.

Run (the figures in docs/reliability.md):
  python -m benchmarks.streaming_load --model_dir MODEL --messages 10000 --rate 10 --json_out /tmp/load.json
MODEL is any exported model directory (docs use the default CNN trained on the digits sample).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from benchmarks.machine import cpu_description
from benchmarks.report import RELIABILITY_DOC, write_section
from benchmarks.stream_predict import digit_images, start_warm_job
from transforms.local_services import stop_process_group
from transforms.pubsub_emulator import start_emulator
from transforms.stream_probe import image_message, latency_s, publish_all

MALFORMED_BODIES = (
    b"{not json",
    json.dumps({"uri_missing_image_id": True}).encode(),
    json.dumps({"image_id": "bad-b64", "image_base64": base64.b64encode(b"not an image").decode()}).encode(),
)
DRAIN_SECONDS = 180.0


class Collector(threading.Thread):
    """Pulls one subscription until stopped, keeping (data, publish time) of every message."""

    def __init__(self, subscriber: Any, subscription: str):
        super().__init__(daemon=True)
        self._subscriber, self._subscription = subscriber, subscription
        self.messages: list[tuple[bytes, datetime.datetime]] = []
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.is_set():
            try:
                response = self._subscriber.pull(request={"subscription": self._subscription, "max_messages": 500},
                                                 timeout=10)
            except Exception:  # A pull timeout with nothing to deliver; keep pulling.
                continue
            if not response.received_messages:
                continue
            self._subscriber.acknowledge(request={"subscription": self._subscription,
                                                  "ack_ids": [m.ack_id for m in response.received_messages]})
            self.messages.extend((m.message.data, m.message.publish_time) for m in response.received_messages)

    def stop(self) -> None:
        self._stop_requested.set()


def load_messages(images: list[bytes], count: int, malformed_every: int) -> tuple[list[bytes], dict[int, str]]:
    """``count`` message bodies: good images (image_id ``load-I``) and, every ``malformed_every``-th, a bad one.

    Returns the bodies and, for each malformed position, its kind (an index into ``MALFORMED_BODIES``).
    """
    bodies: list[bytes] = []
    malformed: dict[int, str] = {}
    for i in range(count):
        if malformed_every and i % malformed_every == malformed_every - 1:
            kind = (i // malformed_every) % len(MALFORMED_BODIES)
            bodies.append(MALFORMED_BODIES[kind])
            malformed[i] = str(kind)
        else:
            bodies.append(image_message(f"load-{i}", images[i % len(images)]))
    return bodies, malformed


def summarize(good: set[str], malformed: dict[str, str], outputs: list[tuple[bytes, datetime.datetime]],
              letters: list[tuple[bytes, datetime.datetime]], seconds: float) -> dict[str, Any]:
    """Matches outputs to good inputs by image_id and dead letters to malformed ones by message id."""
    latencies: dict[str, list[float]] = {}
    for data, published in outputs:
        row = json.loads(data)
        latencies.setdefault(row["image_id"], []).append(latency_s(row, published))
    lettered: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for data, _ in letters:
        letter = json.loads(data)
        message_id = letter["input_ref"].removeprefix("pubsub:")
        lettered[message_id] = lettered.get(message_id, 0) + 1
        reasons[letter["error_type"]] = reasons.get(letter["error_type"], 0) + 1
    predicted = set(latencies) & good
    values = np.array([v[0] for k, v in latencies.items() if k in good])
    return {
        "published": len(good) + len(malformed),
        "good": len(good),
        "malformed": len(malformed),
        "predicted": len(predicted),
        "good_lost": len(good - predicted),
        "unexpected_outputs": len(set(latencies) - good),
        "output_duplicates": int(sum(len(v) - 1 for v in latencies.values())),
        "malformed_in_dead_letters": len(set(malformed) & set(lettered)),
        "malformed_lost": len(set(malformed) - set(lettered)),
        "dead_letter_duplicates": int(sum(n - 1 for n in lettered.values())),
        "dead_letter_reasons": reasons,
        "throughput_msg_s": round(len(predicted) / seconds, 2),
        "p50_s": round(float(np.percentile(values, 50)), 3) if values.size else None,
        "p95_s": round(float(np.percentile(values, 95)), 3) if values.size else None,
        "p99_s": round(float(np.percentile(values, 99)), 3) if values.size else None,
        "max_s": round(float(values.max()), 3) if values.size else None,
    }


def report(result: dict[str, Any], command: str) -> str:
    """The docs/reliability.md section: the command, the machine, and one table of what went in and came out."""
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(result["dead_letter_reasons"].items()))
    rows = [
        ("messages published", result["published"]),
        ("good messages / predicted / lost", f"{result['good']} / {result['predicted']} / {result['good_lost']}"),
        ("malformed messages / in the dead-letter topic / lost",
         f"{result['malformed']} / {result['malformed_in_dead_letters']} / {result['malformed_lost']}"),
        ("dead letters by reason", reasons or "none"),
        ("duplicate outputs / duplicate dead letters",
         f"{result['output_duplicates']} / {result['dead_letter_duplicates']}"),
        ("outputs for no good input", result["unexpected_outputs"]),
        ("throughput (predictions/s, first publish to last output)", result["throughput_msg_s"]),
        ("latency p50 / p95 / p99 / max (s)",
         f"{result['p50_s']} / {result['p95_s']} / {result['p99_s']} / {result['max_s']}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""## Streaming load: stream_predict on the Pub/Sub emulator

Command (one job on the BundleBasedDirectRunner, `json_base64` messages of real digit PNGs, the default
CNN trained on the digits sample; {result['rate_msg_s']:g} msg/s offered, every
{result['malformed_every']}th message malformed: broken JSON, JSON without an image_id, or base64
that is not an image, in rotation):

```
{command}
```

Machine: {result['machine']}; run took {result['seconds']} s from the first publish to the last output.
Latency is an output's publish time minus its input's publish time, both stamped by the emulator.

| | |
|---|---:|
{table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=10.0, help="Messages per second (default 10).")
    parser.add_argument("--malformed_every", type=int, default=100, help="Every N-th message is malformed (1%).")
    parser.add_argument("--work_dir", default=tempfile.gettempdir())
    parser.add_argument("--json_out", default=None, help="Also write the figures as JSON here.")
    parser.add_argument("--no_report", action="store_true", help="Do not write the docs/reliability.md section.")
    args = parser.parse_args(argv)

    emulator, host = start_emulator(os.path.join(args.work_dir, "load-pubsub-emulator.log"))
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    job = None
    collectors: list[Collector] = []
    try:
        from google.cloud import pubsub_v1

        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        paths, job = start_warm_job(publisher, subscriber, args.model_dir, args.work_dir, "load",
                                    ("input", "output", "dead"))
        images = digit_images(100)
        collectors = [Collector(subscriber, paths["output_sub"]), Collector(subscriber, paths["dead_sub"])]
        for collector in collectors:
            collector.start()
        started = time.monotonic()
        bodies, malformed_at = load_messages(images, args.messages, args.malformed_every)
        message_ids = publish_all(publisher, paths["input"], bodies, rate=args.rate)
        good = {f"load-{i}" for i in range(args.messages) if i not in malformed_at}
        malformed = {message_ids[i]: kind for i, kind in malformed_at.items()}
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            ids = {json.loads(data)["image_id"] for data, _ in list(collectors[0].messages)}
            if good <= ids and len(collectors[1].messages) >= len(malformed):
                break
            time.sleep(2)
        seconds = time.monotonic() - started
    finally:
        for collector in collectors:
            collector.stop()
        if job is not None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        stop_process_group(emulator)
    figures = summarize(good, malformed, collectors[0].messages, collectors[1].messages, seconds)
    result = {"machine": cpu_description(),
              "rate_msg_s": args.rate, "malformed_every": args.malformed_every, "seconds": round(seconds, 1),
              **figures}
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)
    if not args.no_report:
        command = "python -m benchmarks.streaming_load " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section("streaming_load", report(result, command.strip()), RELIABILITY_DOC)
    return 0 if figures["good_lost"] == 0 and figures["malformed_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
