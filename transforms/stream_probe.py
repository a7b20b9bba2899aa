"""Driving a running stream_predict job from outside, as its clients would: publish, then read back.

The demo's ``--streaming`` stage and the streaming benchmarks publish
``json_base64`` image messages (and late labels) with google-cloud-pubsub
and pull what the job wrote. End-to-end latency is an output message's
publish time minus its row's ``event_time`` (the input's publish time): both
are stamped by Pub/Sub, so one clock, whatever machine the job ran on.

Known local-runner behaviour (Beam 2.77's BundleBasedDirectRunner) shapes
``waking``: it reads each Pub/Sub source 10 messages per pull, and a pull of
an idle source blocks up to 30 s, holding the other source up (a job with late
labels has two); a processing-time pane (windowed accuracy) fires only when
the runner runs again. So while a job runs, a message on each source every
second keeps it moving.
No pipeline here: only Pub/Sub clients (and the job's report contract).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import threading
import time
from typing import Any, Iterator, Sequence

from schemas import prediction
from schemas.stream_prediction import EVALUATION_KIND, EVENT_TIME, EvaluationReport, latest_per_window
from transforms.pubsub_io import IMAGE_BASE64_KEY

PULL_BATCH = 500
ACK_DEADLINE_S = 60
WAKE_INTERVAL_S = 1.0


def create_topic_and_subscription(publisher: Any, subscriber: Any, project: str, name: str) -> tuple[str, str]:
    """Creates ``projects/P/topics/NAME`` and a subscription ``NAME-sub`` to it; returns both paths."""
    topic = f"projects/{project}/topics/{name}"
    subscription = f"projects/{project}/subscriptions/{name}-sub"
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=ACK_DEADLINE_S)
    return topic, subscription


def image_message(image_id: str, image: bytes) -> bytes:
    """A ``json_base64`` message: ``{"image_id", "image_base64"}``."""
    return json.dumps({prediction.IMAGE_ID: image_id, IMAGE_BASE64_KEY: base64.b64encode(image).decode()}).encode()


def label_message(image_id: str, label: str) -> bytes:
    """A late ground-truth message: ``{"image_id", "label"}`` (``transforms.streaming_eval``)."""
    return json.dumps({prediction.IMAGE_ID: image_id, prediction.LABEL: label}).encode()


def publish_all(publisher: Any, topic: str, messages: Sequence[bytes], rate: float | None = None,
                attributes: Sequence[dict[str, str]] | None = None) -> list[str]:
    """Publishes ``messages`` (at ``rate`` per second, or as fast as possible); returns their message ids."""
    start = time.monotonic()
    futures = []
    for i, data in enumerate(messages):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        futures.append(publisher.publish(topic, data, **(attributes[i] if attributes else {})))
    return [future.result(timeout=60) for future in futures]


def _pull(subscriber: Any, subscription: str) -> list[Any]:
    """One pull (acknowledged at once): the received ``PubsubMessage``s."""
    response = subscriber.pull(request={"subscription": subscription, "max_messages": PULL_BATCH}, timeout=10)
    if response.received_messages:
        subscriber.acknowledge(request={"subscription": subscription,
                                        "ack_ids": [m.ack_id for m in response.received_messages]})
    return [m.message for m in response.received_messages]


def latency_s(row: dict[str, Any], output_publish_time: datetime.datetime) -> float:
    """Seconds from the input's publish time (the row's event time) to the output's publish time."""
    event = datetime.datetime.fromisoformat(row[EVENT_TIME])
    if event.tzinfo is None:
        event = event.replace(tzinfo=datetime.timezone.utc)
    return output_publish_time.timestamp() - event.timestamp()


def pull_predictions(subscriber: Any, subscription: str, want: set[str],
                     timeout_s: float) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """image_id -> every ``(row, latency_s)`` published for it, until each wanted id came (or the timeout)."""
    seen: dict[str, list[tuple[dict[str, Any], float]]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not want <= set(seen):
        for message in _pull(subscriber, subscription):
            row = json.loads(message.data)
            seen.setdefault(row[prediction.IMAGE_ID], []).append((row, latency_s(row, message.publish_time)))
    return seen


def pull_evaluations(subscriber: Any, subscription: str, labeled: int, timeout_s: float) -> list[EvaluationReport]:
    """Each event-time window's evaluation report once they cover ``labeled`` predictions (or the timeout).

    Panes accumulate, so a window's report is its latest pane
    (``schemas.stream_prediction.latest_per_window``). Other reports on the
    topic (monitoring) are skipped.
    """
    found: list[EvaluationReport] = []
    deadline = time.monotonic() + timeout_s
    while sum(report.count for report in latest_per_window(found)) < labeled and time.monotonic() < deadline:
        for message in _pull(subscriber, subscription):
            body = json.loads(message.data.decode("utf-8"))
            if body.get("kind") == EVALUATION_KIND:
                found.append(EvaluationReport(**body))
    return latest_per_window(found)


@contextlib.contextmanager
def waking(publisher: Any, messages: dict[str, bytes], interval_s: float = WAKE_INTERVAL_S
           ) -> Iterator[dict[str, list[str]]]:
    """Publishes ``messages[topic]`` to each topic every ``interval_s`` while the block runs (see the module
    docstring); yields topic -> the message ids published so far."""
    published: dict[str, list[str]] = {topic: [] for topic in messages}
    stop = threading.Event()

    def wake() -> None:
        while not stop.wait(interval_s):
            for topic, data in messages.items():
                published[topic].append(publisher.publish(topic, data).result(timeout=60))

    thread = threading.Thread(target=wake, name="wake-stream-sources", daemon=True)
    thread.start()
    try:
        yield published
    finally:
        stop.set()
        thread.join(timeout=60)


def pull_remaining(subscriber: Any, subscription: str, quiet_s: float = 3.0) -> list[Any]:
    """Every message the subscription holds now: pulls until one ``quiet_s`` pause brings nothing more."""
    received: list[Any] = []
    quiet_until = time.monotonic() + quiet_s
    while time.monotonic() < quiet_until:
        batch = _pull(subscriber, subscription)
        if batch:
            received.extend(batch)
            quiet_until = time.monotonic() + quiet_s
        else:
            time.sleep(0.2)
    return received
