"""stream_predict end to end on the BundleBasedDirectRunner against the real Pub/Sub emulator.

Each test starts the job with ``stream_predict.run`` (which returns while the
pipeline runs in the runner's threads), publishes real digit images, reads the
output and dead-letter topics back through their own subscriptions, and stops
the job. Known local-runner behaviour shapes the helpers: a pull blocks up to
30 s when the input is idle, so ``cancel`` is preceded by one more message;
``--max_batch_duration_secs 0`` (the default) because the runner does not
fire batching timers while it waits on Pub/Sub.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import io
import json
import os
import shutil
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest
import tensorflow as tf
from google.api_core.exceptions import NotFound
from PIL import Image

from beam_jobs import stream_predict
from model_lib import sample_data
from schemas import model_artifacts, prediction, stream_prediction
from schemas.dead_letter import DeadLetter
from schemas.model_artifacts import ModelInfo
from schemas.publication import POINTER_FILE, write_file_atomically
from schemas.stream_prediction import PANE_LATE, EvaluationReport, MonitoringReport, latest_per_window, report_from_json
from tests.fixtures.image_corpus import bad_idat_crc_png, model_refused_png
from transforms import images, model_refresh, pubsub_io, stream_probe, streaming_eval
from transforms.model_handler import INFERENCE_FAILED

MESSAGES = 100
MAX_PIXELS = 1_000_000
COLLECT_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> list[tuple[str, bytes]]:
    """100 real digit PNGs: ``(path, bytes)``."""
    written = sample_data.write_digits(str(tmp_path_factory.mktemp("stream_digits")), limit=MESSAGES)
    files = []
    with open(written.manifest) as handle:
        for line in handle.read().splitlines():
            path = line.split(",")[0]
            with open(path, "rb") as image:
                files.append((path, image.read()))
    return files


@pytest.fixture(scope="module")
def serving(trained_digits_model):
    """The SavedModel's own answers for a list of encoded images, called without Beam."""
    loaded = tf.saved_model.load(os.path.join(trained_digits_model, model_artifacts.SAVED_MODEL_DIR))
    signature = loaded.signatures[model_artifacts.SERVING_SIGNATURE]

    def predict(data: list[bytes]) -> list[dict[str, np.ndarray]]:
        outputs = signature(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant(data)})
        arrays = {key: value.numpy() for key, value in outputs.items()}
        return [{key: value[i] for key, value in arrays.items()} for i in range(len(data))]

    return predict


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 7).save(buffer, format="PNG")
    return buffer.getvalue()


def json_message(**fields: Any) -> bytes:
    return json.dumps(fields).encode("utf-8")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@contextlib.contextmanager
def topics(pubsub_emulator) -> Iterator[dict[str, str]]:
    """Fresh input/output/dead-letter topics and a subscription to each."""
    paths = {name: pubsub_emulator.create_topic() for name in ("input", "output", "dead")}
    paths["input_sub"] = pubsub_emulator.create_subscription(paths["input"])
    paths["output_sub"] = pubsub_emulator.create_subscription(paths["output"])
    paths["dead_sub"] = pubsub_emulator.create_subscription(paths["dead"])
    yield paths


def publish(pubsub_emulator, topic: str, messages: list[tuple[bytes, dict[str, str]]]) -> list[str]:
    """Publishes ``(data, attributes)`` messages; returns their message ids in order."""
    publisher = pubsub_emulator.publisher()
    futures = [publisher.publish(topic, data, **attributes) for data, attributes in messages]
    return [future.result(timeout=30) for future in futures]


def collect(pubsub_emulator, subscription: str, count: int, timeout_s: float = COLLECT_TIMEOUT_S) -> list[Any]:
    """Pulls until ``count`` messages arrived (or the timeout); returns them (data, attributes)."""
    received: list[Any] = []
    deadline = time.monotonic() + timeout_s
    with pubsub_emulator.subscriber() as subscriber:
        while len(received) < count and time.monotonic() < deadline:
            response = subscriber.pull(request={"subscription": subscription, "max_messages": 100}, timeout=10)
            if response.received_messages:
                subscriber.acknowledge(request={"subscription": subscription,
                                                "ack_ids": [m.ack_id for m in response.received_messages]})
                received.extend(m.message for m in response.received_messages)
            else:
                time.sleep(0.2)
    return received


def collect_reports(pubsub_emulator, nudge_topics: list[str], subscription: str, predictions: int, labeled: int = 0,
                    timeout_s: float = 150.0) -> tuple[list[MonitoringReport], list[EvaluationReport]]:
    """Each window's monitoring and evaluation report (its latest pane) once they cover ``predictions`` and
    ``labeled`` predictions.

    A processing-time pane fires only when the local runner runs again, so
    idle inputs are nudged with one (malformed, dead-lettered or never joined)
    message a second.
    """
    monitoring: list[MonitoringReport] = []
    evaluations: list[EvaluationReport] = []
    deadline = time.monotonic() + timeout_s

    def covered(reports: list) -> int:
        return sum(report.count for report in latest_per_window(reports))

    with pubsub_emulator.subscriber() as subscriber:
        while (covered(monitoring) < predictions or covered(evaluations) < labeled) and time.monotonic() < deadline:
            for topic in nudge_topics:
                publish(pubsub_emulator, topic, [(b"nudge", {})])
            response = subscriber.pull(request={"subscription": subscription, "max_messages": 100}, timeout=10)
            if response.received_messages:
                subscriber.acknowledge(request={"subscription": subscription,
                                                "ack_ids": [m.ack_id for m in response.received_messages]})
                for message in response.received_messages:
                    report = report_from_json(message.message.data)
                    (monitoring if isinstance(report, MonitoringReport) else evaluations).append(report)
            time.sleep(1)
    return latest_per_window(monitoring), latest_per_window(evaluations)


def rows_of(messages: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.data.decode("utf-8")) for m in messages]


def letters_of(messages: list[Any]) -> list[DeadLetter]:
    return [DeadLetter.from_json(m.data.decode("utf-8")) for m in messages]


@contextlib.contextmanager
def running_job(pubsub_emulator, paths: dict[str, str], model_dir: str, *extra: str):
    """Runs stream-predict on ``paths`` until the block ends, then stops it."""
    result = stream_predict.run([
        "--model_dir", model_dir,
        "--input_subscription", paths["input_sub"],
        "--output_topic", paths["output"],
        "--dead_letter_topic", paths["dead"],
        "--max_pixels", str(MAX_PIXELS),
        "--top_k", "3",
        *extra,
    ])
    try:
        yield result
    finally:
        # One more message ends the runner's blocking pull, so cancel returns promptly.
        publish(pubsub_emulator, paths["input"], [(b"stop", {})])
        stopper = threading.Thread(target=result.cancel, daemon=True)
        stopper.start()
        stopper.join(STOP_TIMEOUT_S)
        assert not stopper.is_alive(), "the streaming job did not stop"


def assert_matches_saved_model(row: dict[str, Any], want: dict[str, np.ndarray], info: ModelInfo) -> None:
    probabilities = want[model_artifacts.OUTPUT_PROBABILITIES]
    assert list(row) == stream_prediction.STREAM_PREDICTION_RECORD.names
    assert row["label"] == want[model_artifacts.OUTPUT_LABEL].decode("utf-8")
    assert row["label_index"] == int(want[model_artifacts.OUTPUT_LABEL_INDEX])
    assert row["score"] == pytest.approx(float(probabilities[row["label_index"]]), abs=1e-5)
    assert row["top_k_labels"][0] == row["label"] and len(row["top_k_labels"]) == 3
    np.testing.assert_allclose(
        row["top_k_probabilities"], [probabilities[info.labels.index(label)] for label in row["top_k_labels"]],
        atol=1e-5)


def test_every_message_gives_one_prediction_equal_to_the_saved_model_and_bad_ones_dead_letter(
    pubsub_emulator, trained_digits_model, digit_files, serving
):
    info = ModelInfo.read(trained_digits_model)
    good = [(f"digit-{i:03d}", data) for i, (_, data) in enumerate(digit_files)]
    bad = {
        "malformed": (b"{not json", pubsub_io.MALFORMED_MESSAGE),
        "no_id": (json_message(image_base64=b64(good[0][1])), pubsub_io.MALFORMED_MESSAGE),
        "bad_base64": (json_message(image_id="x1", image_base64="@@@"), pubsub_io.MALFORMED_MESSAGE),
        "not_image": (json_message(image_id="x2", image_base64=b64(b"plain text, not a PNG")), images.NOT_AN_IMAGE),
        "oversized": (json_message(image_id="x3", image_base64=b64(png(1200, 1000))), images.TOO_MANY_PIXELS),
        # The jobs' checks accept it, the model's decoder refuses it: only a retried batch saves its mates.
        "model_refused": (json_message(image_id="x4", image_base64=b64(model_refused_png())), INFERENCE_FAILED),
        # Pillow would load it, the model's decoder would not: the jobs' PNG CRC check refuses it first.
        "bad_idat_crc": (json_message(image_id="x5", image_base64=b64(bad_idat_crc_png())), images.CORRUPT_IMAGE),
    }
    messages = [(json_message(image_id=image_id, image_base64=b64(data)), {}) for image_id, data in good]
    # The bad ones sit among the good, evenly spread, so they share bundles and batches with them.
    for offset, (data, _) in enumerate(bad.values()):
        messages.insert((offset + 1) * (MESSAGES // (len(bad) + 1)) + offset, (data, {}))

    with topics(pubsub_emulator) as paths:
        metrics_topic = pubsub_emulator.create_topic()
        metrics_sub = pubsub_emulator.create_subscription(metrics_topic)
        started = time.time()
        with running_job(pubsub_emulator, paths, trained_digits_model, "--message_format", "json_base64",
                         "--max_batch_size", "8", "--metrics_topic", metrics_topic,
                         "--monitoring_interval_secs", "2", "--report_refresh_secs", "1"):
            ids = publish(pubsub_emulator, paths["input"], messages)
            outputs = collect(pubsub_emulator, paths["output_sub"], MESSAGES)
            dead = collect(pubsub_emulator, paths["dead_sub"], len(bad))
            reports, _ = collect_reports(pubsub_emulator, [paths["input"]], metrics_sub, MESSAGES)

    rows = rows_of(outputs)
    assert len(rows) == MESSAGES
    by_id = {row["image_id"]: row for row in rows}
    assert sorted(by_id) == sorted(image_id for image_id, _ in good)
    wants = serving([data for _, data in good])
    for (image_id, _), want in zip(good, wants):
        assert_matches_saved_model(by_id[image_id], want, info)
    message_ids = dict(zip((m[0] for m in messages), ids))
    for (image_id, data), row in ((g, by_id[g[0]]) for g in good):
        assert row["message_id"] == message_ids[json_message(image_id=image_id, image_base64=b64(data))]
        assert row["model_version"] == info.model_version
        event = datetime.datetime.fromisoformat(row["event_time"]).timestamp()
        processed = datetime.datetime.fromisoformat(row["processing_time"]).timestamp()
        assert started - 2 <= event <= processed <= time.time()
    assert {m.attributes["image_id"] for m in outputs} == set(by_id)

    assert sum(r.count for r in reports) == MESSAGES
    assert sum((collections.Counter(r.label_counts) for r in reports), collections.Counter()) == \
        collections.Counter(row["label"] for row in rows)
    assert {v for r in reports for v in r.model_versions} == {info.model_version}
    assert all(0 <= r.latency_p50_s <= r.latency_p95_s <= r.latency_p99_s < COLLECT_TIMEOUT_S for r in reports)

    letters = letters_of(dead)
    want_letters = {f"pubsub:{message_ids[data]}": reason for data, reason in bad.values()}
    assert {letter.input_ref: letter.error_type for letter in letters} == want_letters
    assert {m.attributes["error_type"] for m in dead} == set(want_letters.values())


def export_copy(model_dir: str, destination: str, model_version: str) -> str:
    """A copy of an export that reports another model_version (as a retrained model would)."""
    shutil.copytree(model_dir, destination)
    info = ModelInfo.read(destination)
    ModelInfo(**{**info.__dict__, "model_version": model_version}).write(destination)
    return destination


def point(watched: str, run_name: str) -> None:
    write_file_atomically(os.path.join(watched, POINTER_FILE), f"{run_name}\n".encode("utf-8"))


def test_pointer_switch_changes_model_version_without_restart_and_a_broken_export_is_refused(
    pubsub_emulator, trained_digits_model, digit_files, tmp_path
):
    watched = str(tmp_path / "best")
    os.makedirs(watched)
    first = ModelInfo.read(trained_digits_model).model_version
    export_copy(trained_digits_model, os.path.join(watched, "run-a"), first)
    export_copy(trained_digits_model, os.path.join(watched, "run-b"), "retrained-b")
    broken = os.path.join(watched, "run-c")
    export_copy(trained_digits_model, broken, "broken-c")
    with open(os.path.join(broken, model_artifacts.SAVED_MODEL_DIR, "saved_model.pb"), "wb") as handle:
        handle.write(b"not a SavedModel")
    point(watched, "run-a")
    missing = str(tmp_path / "missing.png")
    oversized = str(tmp_path / "big.png")
    with open(oversized, "wb") as handle:
        handle.write(png(1200, 1000))
    not_image = str(tmp_path / "notes.png")
    with open(not_image, "w") as handle:
        handle.write("not an image\n")

    def uri_messages(prefix: str, count: int) -> list[tuple[bytes, dict[str, str]]]:
        return [(json_message(image_id=f"{prefix}-{i}", uri=path), {})
                for i, (path, _) in enumerate(digit_files[:count])]

    with topics(pubsub_emulator) as paths:
        with running_job(pubsub_emulator, paths, watched, "--message_format", "json_uri",
                         "--model_refresh_secs", "1"):
            bad = [(json_message(image_id="m", uri=missing), {}), (json_message(image_id="o", uri=oversized), {}),
                   (json_message(image_id="n", uri=not_image), {})]
            bad_ids = publish(pubsub_emulator, paths["input"], bad + uri_messages("a", 10))
            phase_a = rows_of(collect(pubsub_emulator, paths["output_sub"], 10))
            dead_a = letters_of(collect(pubsub_emulator, paths["dead_sub"], 3))

            point(watched, "run-b")
            time.sleep(1.5)
            publish(pubsub_emulator, paths["input"], uri_messages("b", 10))
            phase_b = rows_of(collect(pubsub_emulator, paths["output_sub"], 10))

            point(watched, "run-c")
            time.sleep(1.5)
            publish(pubsub_emulator, paths["input"], uri_messages("c", 10))
            phase_c = rows_of(collect(pubsub_emulator, paths["output_sub"], 10))
            alerts = letters_of(collect(pubsub_emulator, paths["dead_sub"], 1))

    assert {row["image_id"] for row in phase_a} == {f"a-{i}" for i in range(10)}
    assert {row["model_version"] for row in phase_a} == {first}
    assert {letter.input_ref: letter.error_type for letter in dead_a} == {
        f"pubsub:{bad_ids[0]}": images.MISSING_FILE,
        f"pubsub:{bad_ids[1]}": images.TOO_MANY_PIXELS,
        f"pubsub:{bad_ids[2]}": images.NOT_AN_IMAGE,
    }
    assert {row["image_id"] for row in phase_b} == {f"b-{i}" for i in range(10)}
    assert {row["model_version"] for row in phase_b} == {"retrained-b"}
    assert {row["image_id"] for row in phase_c} == {f"c-{i}" for i in range(10)}
    assert {row["model_version"] for row in phase_c} == {"retrained-b"}, "the broken export must not serve"
    assert [(a.stage, a.error_type, a.input_ref) for a in alerts] == [
        (model_refresh.STAGE, model_refresh.MODEL_REFUSED, broken)]
    assert "retrained-b" in alerts[0].message


def test_raw_bytes_messages_take_the_image_id_attribute_and_stream_into_bigquery_once_per_message(
    pubsub_emulator, bigquery_emulator, trained_digits_model, digit_files, serving
):
    """A message published again (a new message id, the same content) gets a second prediction, not a second row."""
    info = ModelInfo.read(trained_digits_model)
    good = [(f"raw-{i}", data) for i, (_, data) in enumerate(digit_files[:5])]
    late = ("raw-late", digit_files[5][1])
    table = f"{bigquery_emulator.create_dataset()}.stream_predictions"
    with topics(pubsub_emulator) as paths:
        with running_job(pubsub_emulator, paths, trained_digits_model, "--message_format", "raw_bytes",
                         "--bigquery_table", table):
            ids = publish(pubsub_emulator, paths["input"],
                          [(data, {"image_id": image_id}) for image_id, data in good] + [(good[0][1], {})])
            rows = rows_of(collect(pubsub_emulator, paths["output_sub"], len(good)))
            dead = letters_of(collect(pubsub_emulator, paths["dead_sub"], 1))
            stored = read_table(bigquery_emulator, table, len(good))
            # The same message again, with a new one beside it: once the new one's row is in, the copy had its turn.
            republished = publish(pubsub_emulator, paths["input"],
                                  [(good[1][1], {"image_id": good[1][0]}), (late[1], {"image_id": late[0]})])
            again = rows_of(collect(pubsub_emulator, paths["output_sub"], 2))
            read_table(bigquery_emulator, table, len(good) + 1)
            time.sleep(2)
            stored_after = read_table(bigquery_emulator, table, len(good) + 1)
    by_id = {row[prediction.IMAGE_ID]: row for row in rows}
    assert sorted(by_id) == sorted(image_id for image_id, _ in good)
    for (image_id, _), want in zip(good, serving([data for _, data in good])):
        assert_matches_saved_model(by_id[image_id], want, info)
        assert by_id[image_id]["uri"] == f"pubsub:{by_id[image_id]['message_id']}"
    assert [(d.input_ref, d.error_type) for d in dead] == [(f"pubsub:{ids[-1]}", pubsub_io.MALFORMED_MESSAGE)]
    assert sorted((r["image_id"], r["message_id"], r["message_digest"], r["label"], r["model_version"])
                  for r in stored) == sorted(
        (row["image_id"], row["message_id"], row["message_digest"], row["label"], row["model_version"])
        for row in rows)
    # The output topic has one prediction per message: the copy's carries its own message id, the same digest.
    copy = next(row for row in again if row["image_id"] == good[1][0])
    assert copy["message_id"] == republished[0] != by_id[good[1][0]]["message_id"]
    assert copy["message_digest"] == by_id[good[1][0]]["message_digest"]
    assert sorted(row["image_id"] for row in again) == sorted([good[1][0], late[0]])
    # The table has one row per message content.
    assert sorted(r["image_id"] for r in stored_after) == sorted([image_id for image_id, _ in good] + [late[0]])
    assert len({r["message_digest"] for r in stored_after}) == len(good) + 1


def read_table(bigquery_emulator, table: str, count: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    """The table's rows once ``count`` are there (the sink and the topic are separate branches)."""
    stored: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(stored) < count and time.monotonic() < deadline:
        try:
            stored = [dict(r) for r in bigquery_emulator.client().query(f"SELECT * FROM `{table}`").result()]
        except NotFound:  # The table does not exist until the sink's setup created it.
            pass
        time.sleep(0.5)
    return stored


@pytest.mark.parametrize("argv, fragment", [
    (["--model_dir", "m", "--output_topic", "projects/p/topics/out", "--dead_letter_topic", "projects/p/topics/dlq"],
     "exactly one of --input_subscription and --input_topic"),
    (["--model_dir", "m", "--input_topic", "topic", "--output_topic", "projects/p/topics/out",
      "--dead_letter_topic", "projects/p/topics/dlq"], "Received `input_topic=topic`"),
    (["--model_dir", "m", "--input_topic", "projects/p/topics/in", "--output_topic", "projects/p/topics/out",
      "--dead_letter_topic", "projects/p/topics/dlq", "--model_refresh_secs", "0"], "model_refresh_secs=0"),
    (["--model_dir", "m", "--input_topic", "projects/p/topics/in", "--output_topic", "projects/p/topics/out",
      "--dead_letter_topic", "projects/p/topics/dlq", "--bigquery_dedup_secs", "-1"], "bigquery_dedup_secs=-1"),
    (["--model_dir", "m", "--input_topic", "projects/p/topics/in", "--output_topic", "projects/p/topics/out",
      "--dead_letter_topic", "projects/p/topics/dlq", "--drift_min_predictions", "0"], "drift_min_predictions=0"),
    (["--model_dir", "m", "--input_topic", "projects/p/topics/in", "--output_topic", "projects/p/topics/out",
      "--dead_letter_topic", "projects/p/topics/dlq", "--report_refresh_secs", "0"], "report_refresh_secs=0"),
    (["--model_dir", "m", "--input_topic", "projects/p/topics/in", "--output_topic", "projects/p/topics/out",
      "--dead_letter_topic", "projects/p/topics/dlq", "--message_fromat", "raw_bytes"], "--message_format"),
])
def test_bad_flags_end_in_one_line_and_exit_2(argv, fragment, capsys):
    assert stream_predict.main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_late_labels_join_into_windowed_accuracy_and_shifted_predictions_raise_drift(
    pubsub_emulator, trained_digits_model, digits_dataset, digit_files
):
    # Only zeros and ones: far from the training split's ten balanced digits.
    chosen = [(path, data) for path, data in digit_files if os.path.basename(os.path.dirname(path)) in ("0", "1")][:20]
    truth = {f"late-{i}": os.path.basename(os.path.dirname(path)) for i, (path, _) in enumerate(chosen)}
    for image_id in list(truth)[:3]:  # Three wrong labels, so the accuracy is not trivially 1.
        truth[image_id] = "7"
    with topics(pubsub_emulator) as paths:
        metrics_topic = pubsub_emulator.create_topic()
        metrics_sub = pubsub_emulator.create_subscription(metrics_topic)
        labels_topic = pubsub_emulator.create_topic()
        labels_sub = pubsub_emulator.create_subscription(labels_topic)
        with running_job(pubsub_emulator, paths, trained_digits_model, "--message_format", "json_base64",
                         "--metrics_topic", metrics_topic, "--monitoring_interval_secs", "2",
                         "--labels_subscription", labels_sub, "--eval_interval_secs", "2", "--report_refresh_secs", "1",
                         "--accuracy_alert_threshold", "0.99",
                         "--dataset_dir", digits_dataset.dataset_dir, "--drift_alert_threshold", "0.5",
                         "--drift_min_predictions", "1"):  # 20 images spread over 2 s reports.
            publish(pubsub_emulator, paths["input"], [
                (json_message(image_id=image_id, image_base64=b64(data)), {})
                for image_id, (_, data) in zip(truth, chosen)])
            # Two Pub/Sub sources starve each other on the local runner (a pull on an idle source blocks
            # for 30 s): a label for an image never sent wakes the labels source once a second.
            wake_label = json_message(image_id="wake-up-never-predicted", label="0")
            with stream_probe.waking(pubsub_emulator.publisher(), {labels_topic: wake_label}):
                rows = rows_of(collect(pubsub_emulator, paths["output_sub"], len(truth)))
            publish(pubsub_emulator, labels_topic, [(json_message(image_id=k, label=v), {}) for k, v in truth.items()])
            _, evaluations = collect_reports(pubsub_emulator, [paths["input"], labels_topic], metrics_sub,
                                             len(truth), labeled=len(truth))
            alerts = letters_of(collect(pubsub_emulator, paths["dead_sub"], 100, timeout_s=5))

    predicted = {row["image_id"]: row["label"] for row in rows}
    assert sorted(predicted) == sorted(truth)
    by_hand = sum(predicted[k] == truth[k] for k in truth) / len(truth)
    assert sum(e.count for e in evaluations) == len(truth)
    assert sum(e.accuracy * e.count for e in evaluations) / len(truth) == pytest.approx(by_hand)
    assert by_hand < 0.99
    assert {v for e in evaluations for v in e.model_versions} == {ModelInfo.read(trained_digits_model).model_version}
    kinds = {letter.error_type for letter in alerts if letter.stage == streaming_eval.EVAL_STAGE}
    assert kinds == {streaming_eval.ACCURACY_ALERT, streaming_eval.DRIFT_ALERT}


EVENT_TIME_ATTRIBUTE = "event_ms"
REPORT_WINDOW_SECS = 60


def test_reports_count_exactly_their_event_time_windows_and_late_labels_score_in_their_predictions_window(
    pubsub_emulator, trained_digits_model, digit_files
):
    # Event times (the --timestamp_attribute) in two one-minute windows 20 minutes back: every message is
    # behind the watermark on arrival, yet counts in its own window, and so does its label.
    start = (int(time.time()) // REPORT_WINDOW_SECS - 20) * REPORT_WINDOW_SECS
    windows = {start: 7, start + REPORT_WINDOW_SECS: 5}  # Window start -> messages in it.
    event_ms = [1000 * (window + 3 + 4 * i) for window, count in windows.items() for i in range(count)]
    chosen = digit_files[:len(event_ms)]
    ids = [f"windowed-{i}" for i in range(len(chosen))]
    truth = {image_id: os.path.basename(os.path.dirname(path)) for image_id, (path, _) in zip(ids, chosen)}
    for image_id in (ids[0], ids[1], ids[-1]):  # Wrong labels: two in the first window, one in the second.
        truth[image_id] = str((int(truth[image_id]) + 1) % 10)
    with topics(pubsub_emulator) as paths:
        metrics_topic = pubsub_emulator.create_topic()
        metrics_sub = pubsub_emulator.create_subscription(metrics_topic)
        labels_topic = pubsub_emulator.create_topic()
        labels_sub = pubsub_emulator.create_subscription(labels_topic)
        with running_job(pubsub_emulator, paths, trained_digits_model, "--message_format", "json_base64",
                         "--timestamp_attribute", EVENT_TIME_ATTRIBUTE, "--metrics_topic", metrics_topic,
                         "--monitoring_interval_secs", str(REPORT_WINDOW_SECS),
                         "--eval_interval_secs", str(REPORT_WINDOW_SECS), "--report_refresh_secs", "1",
                         "--allowed_lateness_secs", "3600", "--labels_subscription", labels_sub):
            publish(pubsub_emulator, paths["input"], [
                (json_message(image_id=image_id, image_base64=b64(data)), {EVENT_TIME_ATTRIBUTE: str(ms)})
                for image_id, (_, data), ms in zip(ids, chosen, event_ms)])
            wake_label = json_message(image_id="wake-up-never-predicted", label="0")
            with stream_probe.waking(pubsub_emulator.publisher(), {labels_topic: wake_label}):
                rows = rows_of(collect(pubsub_emulator, paths["output_sub"], len(ids)))
            publish(pubsub_emulator, labels_topic, [(json_message(image_id=k, label=v), {}) for k, v in truth.items()])
            monitoring, evaluations = collect_reports(pubsub_emulator, [paths["input"], labels_topic], metrics_sub,
                                                      len(ids), labeled=len(ids))

    by_id = {row["image_id"]: row for row in rows}
    assert sorted(by_id) == sorted(ids)
    window_of = {}
    for image_id, ms in zip(ids, event_ms):  # The attribute is each row's event time, so its window.
        assert datetime.datetime.fromisoformat(by_id[image_id]["event_time"]).timestamp() == ms / 1000
        window_of[image_id] = iso(ms // 1000 - ms // 1000 % REPORT_WINDOW_SECS)
    want_windows = [(iso(window), iso(window + REPORT_WINDOW_SECS)) for window in windows]
    assert [(r.window_start, r.window_end) for r in monitoring] == want_windows
    assert [(r.window_start, r.window_end) for r in evaluations] == want_windows
    for report in monitoring:
        mine = [by_id[image_id] for image_id in ids if window_of[image_id] == report.window_start]
        assert report.count == len(mine) == windows[int(datetime.datetime.fromisoformat(report.window_start)
                                                        .timestamp())]
        assert report.label_counts == dict(collections.Counter(row["label"] for row in mine))
    for report in evaluations:
        mine = [image_id for image_id in ids if window_of[image_id] == report.window_start]
        assert report.count == len(mine)
        assert report.accuracy == pytest.approx(sum(by_id[k]["label"] == truth[k] for k in mine) / len(mine))
    assert {r.pane for r in monitoring + evaluations} == {PANE_LATE}


def iso(epoch_s: int) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat()


def test_dataflow_defaults_to_streaming_engine_and_throughput_autoscaling_within_max_workers():
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions, WorkerOptions

    from transforms.runner_policy import make_pipeline_options

    options = make_pipeline_options(
        ["--runner", "DataflowRunner", "--max_num_workers", "7"],
        job_options=stream_predict.StreamPredictOptions, streaming=True)
    stream_predict.apply_dataflow_defaults(options)
    assert options.view_as(StandardOptions).streaming
    assert options.view_as(GoogleCloudOptions).enable_streaming_engine
    assert options.view_as(WorkerOptions).autoscaling_algorithm == "THROUGHPUT_BASED"
    assert options.view_as(WorkerOptions).max_num_workers == 7
    local = make_pipeline_options([], job_options=stream_predict.StreamPredictOptions, streaming=True)
    stream_predict.apply_dataflow_defaults(local)
    assert local.view_as(StandardOptions).runner == "BundleBasedDirectRunner"
    assert local.view_as(WorkerOptions).autoscaling_algorithm is None
