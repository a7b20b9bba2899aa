"""demo: the whole chain on the embedded digits, one progress line per stage, and ``report.html``.

Runs the jobs a user would run, through their own ``main``/``run`` functions
with the flags documented in the README (the command of each stage is shown
in the report and the log), in a work directory:

  make-sample-data -> create-dataset (plus three deliberately bad manifest
  rows, to show dead letters) -> train -> batch-predict on the test split,
  with evaluation -> extract-embeddings into DuckDB -> build-index -> search
  for a few test images -> sql (``neighbors``, ``label_outliers``,
  ``near_duplicates``); with ``--streaming``, then stream-predict: the
  Cloud SDK's Pub/Sub emulator is started, stream_predict runs on the
  trained model, ``--stream_messages`` test images are published and their
  labels published late, so its windowed accuracy (late-label evaluation)
  and end-to-end latency show; the job and the emulator are stopped however
  the stage ends

Outputs under ``--workdir W``: ``digits/``, ``bad_inputs/``, ``dataset/``,
``model/``, ``predictions/``, ``warehouse.duckdb``, ``index/``, ``demo.log``
(everything the libraries logged), with ``--streaming`` also
``pubsub-emulator.log``, and ``report.html`` (self-contained: open it from
disk). A non-empty ``W`` needs ``--overwrite``; a rerun then
follows each job's output rule (``--overwrite``, ``--write_disposition
truncate``, reused training trial), so it is safe and gives the same answers.

Example:
  vision-pipelines demo --workdir out/demo --streaming
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import shlex
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TextIO

from beam_jobs.console import Tee, configure_logging, quiet_stderr, tail
from schemas.redaction import redacted_console

if TYPE_CHECKING:
    from schemas.leaderboard import Leaderboard

_LOGGER = logging.getLogger(__name__)

DEFAULT_EPOCHS = 3
SEARCH_QUERIES = 3  # Test images searched for (one per label, the first labels).
SEARCH_K = 5
NEIGHBORS_K = 5
SQL_LIMIT = 8
_COUNT_SQL = "SELECT COUNT(*) AS images, COUNT(DISTINCT label) AS labels FROM {table}"
PREDICTION_EXAMPLES = 12  # Right predictions shown (every wrong one is shown, up to this many too).
# Bad manifest rows appended to the digits: each becomes a dead letter with its own reason.
BAD_ROWS = (("missing.png", "3", None), ("notes.png", "1", b"these are notes, not an image\n"),
            ("truncated.png", "7", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"))
DEFAULT_STREAM_MESSAGES = 300
MAX_STREAM_MESSAGES = 10_000
STREAM_PROJECT = "demo-project"  # Any name does on the emulator.
# Images are published at a steady rate the local runner keeps up with (the streaming benchmark sustained 15/s),
# so latency is the job's, not a queue's: a burst of 300 waits on the runner's 10-message pulls (p50 17 s).
STREAM_RATE = 10.0
STREAM_EVAL_INTERVAL_SECS = 2  # Short windows, so a few hundred images give several.
STREAM_COLLECT_TIMEOUT_S = 240.0
STREAM_STOP_TIMEOUT_S = 60.0
# The local runner needs a message on each source every second (transforms.stream_probe): on the images'
# one malformed on purpose (each is dead-lettered), on the labels' one for an image never predicted (it waits
# in the join until the job stops, scored nowhere).
WAKE_UP = b"wake up"
WAKE_UP_LABEL = b'{"image_id": "wake-up", "label": "wake-up"}'


class StageFailed(RuntimeError):
    """A job of the chain did not succeed; ``status`` is its exit status."""

    def __init__(self, stage: str, status: int, message: str):
        super().__init__(f"{stage} failed (exit status {status}): {message}")
        self.status = status


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    workdir: str
    overwrite: bool
    verbose: bool
    epochs: int
    limit: int | None
    streaming: bool = False
    stream_messages: int = DEFAULT_STREAM_MESSAGES

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    @property
    def warehouse(self) -> str:
        return f"duckdb:{self.path('warehouse.duckdb')}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-pipelines demo", allow_abbrev=False,
                                     description="Run the whole chain on the embedded digits and write report.html.")
    parser.add_argument("--workdir", required=True, help="Directory that receives every output and report.html.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Rerun into a non-empty --workdir (each job replaces its output under the output rule).")
    parser.add_argument("--verbose", action="store_true",
                        help="Show what TensorFlow, absl and Beam log (by default it goes to WORKDIR/demo.log).")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"Training epochs (default {DEFAULT_EPOCHS}).")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N digits (default: all 1,797).")
    parser.add_argument("--streaming", action="store_true",
                        help="Also run stream-predict through the Pub/Sub emulator (needs the Google Cloud SDK "
                             "and its pubsub-emulator component), with late labels and windowed accuracy.")
    parser.add_argument("--stream_messages", type=int, default=DEFAULT_STREAM_MESSAGES,
                        help=f"Test images published with --streaming (default {DEFAULT_STREAM_MESSAGES}; the test "
                             "split is repeated under new image ids when it has fewer).")
    return parser


def parse_config(argv: list[str]) -> DemoConfig:
    """argparse exits with status 2 on an unknown flag; a bad value raises ValueError."""
    args = _parser().parse_args(argv)
    if not 1 <= args.epochs <= 200:
        raise ValueError(f"--epochs must be in [1, 200]. Received `--epochs={args.epochs}`")
    if args.limit is not None and args.limit < 50:
        raise ValueError(f"--limit must be at least 50 (every split needs images). Received `--limit={args.limit}`")
    if not 1 <= args.stream_messages <= MAX_STREAM_MESSAGES:
        raise ValueError(f"--stream_messages must be in [1, {MAX_STREAM_MESSAGES}]. "
                         f"Received `--stream_messages={args.stream_messages}`")
    return DemoConfig(os.path.abspath(args.workdir), args.overwrite, args.verbose, args.epochs, args.limit,
                      args.streaming, args.stream_messages)


@dataclasses.dataclass
class Stage:
    """A stage's outcome: the line shown, the command(s) a user would type, what the job printed."""

    name: str
    detail: str = ""
    commands: list[str] = dataclasses.field(default_factory=list)
    printed: str = ""
    seconds: float = 0.0


class Demo:
    """Runs the stages in order, keeping what the report needs."""

    def __init__(self, config: DemoConfig, console: TextIO, errors: TextIO):
        self.config = config
        self.console = console
        self.errors = errors
        self.stages: list[Stage] = []
        self.values: dict[str, Any] = {}

    # -- running one job -------------------------------------------------------------------------------------

    def call(self, stage: Stage, command: str, function: Callable[[list[str]], Any], argv: list[str]) -> Any:
        """Runs one job function with ``argv``, keeping what it prints; a non-zero status fails the stage."""
        stage.commands.append(shlex.join(["vision-pipelines", command, *argv]))
        _LOGGER.info("demo: %s", stage.commands[-1])
        tee = Tee(self.console if self.config.verbose else None)
        with contextlib.redirect_stdout(tee):
            outcome = function(argv)
        stage.printed += tee.copy.getvalue()
        if isinstance(outcome, int) and outcome != 0:
            raise StageFailed(stage.name, outcome, f"`{stage.commands[-1]}` returned {outcome}")
        return outcome

    def run_stage(self, number: int, total: int, name: str, body: Callable[[Stage], None]) -> None:
        stage = Stage(name)
        prefix = f"[{number}/{total}] {name:<19}"
        # With --verbose the jobs' own output follows, so the stage's result gets a line of its own at the end.
        self.console.write(f"{prefix.rstrip()} ...\n" if self.config.verbose else prefix)
        self.console.flush()
        # On a terminal the line counts the seconds while the stage runs, so a long training step does not look hung.
        ticking = self.console.isatty() and not self.config.verbose
        stop = threading.Event()
        ticker = threading.Thread(target=_tick, args=(self.console, prefix, stop), daemon=True)
        if ticking:
            ticker.start()
        started = time.monotonic()
        try:
            body(stage)
        finally:
            stage.seconds = time.monotonic() - started
            if ticking:
                stop.set()
                ticker.join()
        restart = "\r\x1b[K" + prefix if ticking else prefix if self.config.verbose else ""
        self.console.write(f"{restart}{stage.detail}  ({stage.seconds:.1f} s)\n")
        self.console.flush()
        self.stages.append(stage)

    # -- the stages --------------------------------------------------------------------------------------------

    def make_sample_data(self, stage: Stage) -> None:
        from beam_jobs import make_sample_data

        argv = ["--dataset", "digits", "--output_dir", self.config.path("digits")]
        if self.config.limit:
            argv += ["--limit", str(self.config.limit)]
        self.call(stage, "make-sample-data", make_sample_data.main, argv)
        bad_dir = self.config.path("bad_inputs")
        os.makedirs(bad_dir, exist_ok=True)
        rows = []
        for name, label, content in BAD_ROWS:
            path = os.path.join(bad_dir, name)
            if content is not None:
                with open(path, "wb") as handle:
                    handle.write(content)
            elif os.path.exists(path):
                os.remove(path)
            rows.append(f"{path},{label}\n")
        with open(os.path.join(bad_dir, "manifest.csv"), "w") as handle:
            handle.writelines(rows)
        with open(self.config.path("digits", "all_data.csv")) as handle:
            images = sum(1 for line in handle if line.strip())
        stage.detail = f"{images} digit images + {len(BAD_ROWS)} bad manifest rows"

    def create_dataset(self, stage: Stage) -> None:
        from beam_jobs import create_dataset
        from schemas.dataset_info import DatasetInfo
        from schemas.publication import published_dir

        argv = ["--manifest", self.config.path("digits", "all_data.csv"),
                "--manifest", self.config.path("bad_inputs", "manifest.csv"),
                "--labels_file", self.config.path("digits", "labels.txt"),
                "--output_dir", self.config.path("dataset"), "--image_size", "32", "--channels", "1",
                "--image_format", "png", "--overwrite"]
        self.call(stage, "create-dataset", create_dataset.main, argv)
        info = DatasetInfo.read(published_dir(self.config.path("dataset")))
        self.values["dataset"] = info
        splits = " / ".join(f"{split} {info.counts[split].total}" for split in info.split_names)
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(info.rejected.items())) or "none"
        stage.detail = (f"read {info.accounting.read} = written {info.accounting.written} + rejected "
                        f"{info.accounting.rejected} ({reasons}); {splits}")

    def train(self, stage: Stage) -> None:
        from beam_jobs import train
        from schemas.classification_metrics import ModelMetrics
        from schemas.leaderboard import Leaderboard
        from schemas.publication import published_dir

        argv = ["--dataset_dir", self.config.path("dataset"), "--output_dir", self.config.path("model"),
                "--epochs", str(self.config.epochs), "--seed", "0"]
        self.call(stage, "train", train.main, argv)
        board = Leaderboard.read(self.config.path("model"))
        metrics = ModelMetrics.read(published_dir(self.config.path("model", "best")))
        self.values["leaderboard"], self.values["model_metrics"] = board, metrics
        test = f"test accuracy {metrics.test.accuracy:.4f}" if metrics.test else "no test split"
        stage.detail = (f"{len(board.trials)} trial, {metrics.epochs_run} epochs, val accuracy "
                        f"{metrics.validation.accuracy:.4f}, {test}; {_publication_text(board)}")

    def batch_predict(self, stage: Stage) -> None:
        from beam_jobs import batch_predict
        from schemas import layout, prediction
        from schemas.classification_metrics import EvalReport
        from schemas.publication import published_dir

        test_shards = layout.split_pattern(published_dir(self.config.path("dataset")), "test")
        argv = ["--model_dir", self.config.path("model", "best"), "--input", test_shards,
                "--output", self.config.path("predictions"), "--overwrite"]
        self.call(stage, "batch-predict", batch_predict.main, argv)
        run_dir = published_dir(self.config.path("predictions"))
        evaluation = EvalReport.read(layout.join(run_dir, prediction.EVAL_FILE))
        rows = []
        for path in sorted(glob.glob(prediction.jsonl_predictions_pattern(run_dir))):
            with open(path) as handle:
                rows.extend(json.loads(line) for line in handle if line.strip())
        rows.sort(key=lambda row: row[prediction.URI])
        self.values["evaluation"], self.values["prediction_rows"] = evaluation, rows
        wrong = sum(1 for row in rows if row[prediction.LABEL] != row[prediction.TRUE_LABEL])
        stage.detail = (f"test split: {len(rows)} predicted, {wrong} wrong, accuracy {evaluation.accuracy:.4f}, "
                        f"macro F1 {evaluation.macro_f1:.4f}")

    def extract_embeddings(self, stage: Stage) -> None:
        from beam_jobs import extract_embeddings, sql
        from schemas.model_artifacts import ModelInfo
        from schemas.publication import published_dir

        argv = ["--model_dir", self.config.path("model", "best"), "--input", self.config.path("dataset"),
                "--warehouse", self.config.warehouse, "--write_disposition", "truncate"]
        self.call(stage, "extract-embeddings", extract_embeddings.main, argv)
        count = self.call(stage, "sql", sql.run, ["--warehouse", self.config.warehouse, "--sql", _COUNT_SQL])
        rows, labels = count.rows[0]
        dimension = ModelInfo.read(published_dir(self.config.path("model", "best"))).embedding_dim
        stage.printed += sql.format_table(count)
        stage.detail = f"{rows} images, {labels} labels, dimension {dimension}, in {self.config.warehouse}"

    def build_index(self, stage: Stage) -> None:
        from beam_jobs import build_index
        from schemas.index import IndexInfo
        from schemas.publication import published_dir

        argv = ["--warehouse", self.config.warehouse, "--output_dir", self.config.path("index"),
                "--model_dir", self.config.path("model", "best"), "--overwrite"]
        self.call(stage, "build-index", build_index.main, argv)
        info = IndexInfo.read(published_dir(self.config.path("index")))
        self.values["index"] = info
        stage.detail = (f"{info.count} indexed, {info.rejected} rejected; recall@{info.k} {info.recall_at_k:.4f} "
                        f"at {info.qps:.0f} queries/s")

    def search(self, stage: Stage) -> None:
        from beam_jobs import search
        from model_lib.report_html import SearchExample
        from schemas import prediction

        queries, seen = [], set()
        for row in self.values["prediction_rows"]:
            if row[prediction.TRUE_LABEL] not in seen and len(queries) < SEARCH_QUERIES:
                seen.add(row[prediction.TRUE_LABEL])
                queries.append(row)
        examples = []
        for row in sorted(queries, key=lambda row: row[prediction.TRUE_LABEL]):
            argv = ["--index_dir", self.config.path("index"), "--image", row[prediction.URI], "--k", str(SEARCH_K)]
            hits = self.call(stage, "search", lambda argv: search.run(search.parse_config(argv)), argv)
            stage.printed += f"query {row[prediction.URI]}\n{search.format_table(hits)}"
            examples.append(SearchExample(row[prediction.URI], row[prediction.IMAGE_ID], row[prediction.TRUE_LABEL],
                                          hits))
        self.values["searches"] = examples
        others = [hit for example in examples for hit in example.hits if hit.image_id != example.query_image_id]
        same = sum(1 for example in examples for hit in example.hits
                   if hit.image_id != example.query_image_id and hit.label == example.query_label)
        stage.detail = (f"{len(examples)} test images, {len(others)} neighbours, "
                        f"{same / max(1, len(others)):.0%} with the query's label")

    def sql_queries(self, stage: Stage) -> None:
        from beam_jobs import sql
        from model_lib.report_html import SqlSection

        query = self.values["searches"][0]
        plans = (
            ("neighbors", f"The {NEIGHBORS_K} nearest neighbours of the first search query, by cosine similarity.",
             ["--query", "neighbors", "--image_id", query.query_image_id, "--k", str(NEIGHBORS_K)]),
            ("label_outliers", "Images closer to another label's centroid than to their own: likely label errors.",
             ["--query", "label_outliers", "--limit", str(SQL_LIMIT)]),
            ("near_duplicates", "Pairs of images whose embeddings are nearly identical.",
             ["--query", "near_duplicates", "--limit", str(SQL_LIMIT)]),
        )
        sections, counts = [], []
        for title, explanation, params in plans:
            argv = ["--warehouse", self.config.warehouse, *params]
            result = self.call(stage, "sql", sql.run, argv)
            stage.printed += f"{title}:\n{sql.format_table(result)}"
            sections.append(SqlSection(title, stage.commands[-1], result, explanation))
            counts.append(f"{title} {len(result.rows)} rows")
        self.values["sql"] = sections
        stage.detail = ", ".join(counts)

    def stream_predict(self, stage: Stage) -> None:
        from google.cloud import pubsub_v1

        from beam_jobs import stream_predict
        from model_lib.report_html import LATENCY_PERCENTILES, StreamingRecord, StreamingWindow, percentile
        from schemas import prediction
        from schemas.dead_letter import DeadLetter
        from schemas.exit_status import CHECKS_FAILED_EXIT
        from transforms import pubsub_emulator, stream_probe
        from transforms.image_inputs import message_ref

        chosen = stream_selection(self.values["prediction_rows"], self.config.stream_messages)
        images = []
        for row in chosen:
            with open(row[prediction.URI], "rb") as handle:
                images.append(handle.read())
        ids = [stream_image_id(n) for n in range(len(chosen))]
        with (pubsub_emulator.running_emulator(self.config.path("pubsub-emulator.log")) as host,
              pubsub_emulator.clients_pointed_at(host)):
            publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
            paths = {name: stream_probe.create_topic_and_subscription(publisher, subscriber, STREAM_PROJECT,
                                                                      f"demo-{name}")
                     for name in ("images", "predictions", "dead-letters", "metrics", "labels")}
            argv = ["--model_dir", self.config.path("model", "best"), "--input_subscription", paths["images"][1],
                    "--output_topic", paths["predictions"][0], "--dead_letter_topic", paths["dead-letters"][0],
                    "--message_format", "json_base64", "--metrics_topic", paths["metrics"][0],
                    "--labels_subscription", paths["labels"][1],
                    "--eval_interval_secs", str(STREAM_EVAL_INTERVAL_SECS)]
            result = self.call(stage, "stream-predict", stream_predict.run, argv)
            wake_ups = {paths["images"][0]: WAKE_UP, paths["labels"][0]: WAKE_UP_LABEL}
            with stream_probe.waking(publisher, wake_ups) as woken:
                try:
                    # Event time is each message's publish time; the image_id attribute names it for a reader.
                    message_ids = stream_probe.publish_all(
                        publisher, paths["images"][0],
                        [stream_probe.image_message(i, data) for i, data in zip(ids, images)],
                        rate=STREAM_RATE, attributes=[{prediction.IMAGE_ID: image_id} for image_id in ids])
                    outputs = stream_probe.pull_predictions(subscriber, paths["predictions"][1], set(ids),
                                                            STREAM_COLLECT_TIMEOUT_S)
                    # The labels come late: only once every prediction is out.
                    stream_probe.publish_all(publisher, paths["labels"][0], [
                        stream_probe.label_message(image_id, str(row[prediction.TRUE_LABEL]))
                        for image_id, row in zip(ids, chosen)])
                    reports = stream_probe.pull_evaluations(subscriber, paths["metrics"][1], len(outputs),
                                                            STREAM_COLLECT_TIMEOUT_S)
                finally:
                    _stop_streaming_job(result)  # While the sources are woken, so the runner's pulls return.
            letters = [DeadLetter.from_json(message.data.decode("utf-8"))
                       for message in stream_probe.pull_remaining(subscriber, paths["dead-letters"][1])]
        refs = {message_ref(message_id) for message_id in message_ids}
        latencies = [latency for rows in outputs.values() for _, latency in rows]
        record = StreamingRecord(
            messages_in=len(ids), predictions_out=sum(len(rows) for rows in outputs.values()),
            dead_letters=sum(1 for letter in letters if letter.input_ref in refs),
            wake_ups=len(woken[paths["images"][0]]),
            latencies_s=latencies, windows=[StreamingWindow(report.count, report.accuracy) for report in reports],
            command=stage.commands[-1])
        labeled = sum(window.count for window in record.windows)
        if len(outputs) < len(ids) or labeled < len(outputs):
            raise StageFailed(stage.name, CHECKS_FAILED_EXIT,
                              f"{len(ids) - len(outputs)} of {len(ids)} images got no prediction and "
                              f"{len(outputs) - labeled} predictions no windowed accuracy within "
                              f"{STREAM_COLLECT_TIMEOUT_S:.0f} s each")
        self.values["streaming"] = record
        accuracy = sum(window.accuracy * window.count for window in record.windows) / max(1, labeled)
        timing = ", ".join(f"p{q} {percentile(latencies, q):.2f} s" for q in LATENCY_PERCENTILES[:2]) \
            if latencies else "no latency"
        stage.detail = (f"{record.messages_in} images in, {record.predictions_out} predictions out, "
                        f"{record.dead_letters} dead letters (+{record.wake_ups} wake-ups); latency {timing}; "
                        f"windowed accuracy {accuracy:.4f} over {len(record.windows)} windows "
                        f"({labeled} labeled)")
        stage.printed += "".join(f"window {n}: {window.count} labeled, accuracy {window.accuracy:.4f}\n"
                                 for n, window in enumerate(record.windows, start=1))

    # -- the report ----------------------------------------------------------------------------------------

    def write_report(self, total_seconds: float) -> str:
        from model_lib import report_html
        from schemas import prediction
        from schemas.publication import write_file_atomically

        rows = self.values["prediction_rows"]
        wrong = [row for row in rows if row[prediction.LABEL] != row[prediction.TRUE_LABEL]][:PREDICTION_EXAMPLES]
        right = _spread_by_label([row for row in rows if row[prediction.LABEL] == row[prediction.TRUE_LABEL]],
                                 PREDICTION_EXAMPLES)
        examples = [report_html.PredictionExample(row[prediction.URI], row[prediction.TRUE_LABEL],
                                                  row[prediction.LABEL], float(row[prediction.SCORE]))
                    for row in right + wrong]
        uris = {example.uri for example in examples}
        for search in self.values["searches"]:
            uris.add(search.query_uri)
            uris.update(hit.uri for hit in search.hits)
        for section in self.values["sql"]:
            for record in section.result.records():
                uris.update(str(value) for column, value in record.items()
                            if column == "uri" or column.startswith("uri_"))
        report = report_html.DemoReport(
            stages=[report_html.StageRecord(stage.name, "\n".join(stage.commands), stage.seconds, stage.detail)
                    for stage in self.stages],
            dataset=self.values["dataset"], leaderboard=self.values["leaderboard"],
            model_metrics=self.values["model_metrics"], evaluation=self.values["evaluation"],
            predictions=examples, index=self.values["index"], searches=self.values["searches"],
            sql=self.values["sql"], thumbnails={uri: _thumbnail(uri) for uri in sorted(uris)},
            total_seconds=total_seconds, streaming=self.values.get("streaming"),
        )
        path = self.config.path("report.html")
        write_file_atomically(path, report_html.render(report).encode("utf-8"))
        return path


def stream_selection(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The test split's prediction rows to stream: ``count`` of them, repeating the split when it is shorter."""
    return [rows[n % len(rows)] for n in range(count)]


def stream_image_id(number: int) -> str:
    """The image_id of the ``number``-th streamed image: unique even when the split repeats."""
    return f"stream-{number:05d}"


def _stop_streaming_job(result: Any) -> None:
    """Cancels the running stream-predict job.

    Raises:
      RuntimeError: It did not stop within ``STREAM_STOP_TIMEOUT_S``.
    """
    stopper = threading.Thread(target=result.cancel, daemon=True)
    stopper.start()
    stopper.join(STREAM_STOP_TIMEOUT_S)
    if stopper.is_alive():
        raise RuntimeError(f"stream-predict did not stop within {STREAM_STOP_TIMEOUT_S:.0f} s")


def _tick(console: TextIO, prefix: str, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(1.0):
        console.write(f"\r\x1b[K{prefix}{time.monotonic() - started:.0f} s ...")
        console.flush()


def _publication_text(board: "Leaderboard") -> str:
    """What happened to best/, short: a rerun that reproduces the published model is not news."""
    decision = board.publication
    if decision is None or decision.model_version is None:
        return "nothing published"
    best = next((trial for trial in board.trials if trial.trial_id == board.best_trial), None)
    version = decision.model_version[:12]
    if decision.published:
        return f"published model {version}"
    if best is not None and best.model_version == decision.model_version:
        return f"model {version} (already published)"
    return f"best/ keeps model {version}: {decision.reason}"


def _spread_by_label(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` rows taking each true label in turn (rows sorted by URI would all be digit 0)."""
    from schemas import prediction

    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(str(row[prediction.TRUE_LABEL]), []).append(row)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < count and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(chosen) < count:
                chosen.append(by_label[label].pop(0))
    return chosen


def _thumbnail(uri: str) -> str:
    """The image's thumbnail ``data:`` URI, or "" for a file that is gone or not an image."""
    from model_lib.report_html import thumbnail_data_uri

    try:
        with open(uri, "rb") as handle:
            return thumbnail_data_uri(handle.read())
    except (OSError, ValueError):
        return ""


STAGES: tuple[tuple[str, str], ...] = (
    ("make-sample-data", "make_sample_data"),
    ("create-dataset", "create_dataset"),
    ("train", "train"),
    ("batch-predict", "batch_predict"),
    ("extract-embeddings", "extract_embeddings"),
    ("build-index", "build_index"),
    ("search", "search"),
    ("sql", "sql_queries"),
)
STREAMING_STAGE = ("stream-predict", "stream_predict")


def stages(config: DemoConfig) -> tuple[tuple[str, str], ...]:
    """The stages the demo runs: the batch chain, then streaming with ``--streaming``."""
    return STAGES + ((STREAMING_STAGE,) if config.streaming else ())


def run(config: DemoConfig, console: TextIO, errors: TextIO) -> Demo:
    """Runs every stage and writes the report; returns the finished demo.

    Raises:
      StageFailed: A job returned a non-zero exit status.
    """
    demo = Demo(config, console, errors)
    started = time.monotonic()
    chain = stages(config)
    for number, (name, method) in enumerate(chain, start=1):
        demo.run_stage(number, len(chain), name, getattr(demo, method))
    total = time.monotonic() - started
    demo.values["report"] = demo.write_report(total)
    demo.values["total_seconds"] = total
    return demo


def _summary(demo: Demo) -> str:
    lines = []
    for stage in demo.stages:
        if stage.printed.strip():
            lines.append(f"\n== {stage.name} ==\n{stage.printed.rstrip()}")
    config = demo.config
    lines.append(f"\ndone in {demo.values['total_seconds']:.0f} s; report: {demo.values['report']}")
    lines.append(f"outputs in {config.workdir}: dataset/, model/best/, predictions/, warehouse.duckdb, index/"
                 + ("" if config.verbose else f"; library logs in {config.path('demo.log')}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; exit status 0, 2 for a flag error or a non-empty --workdir without --overwrite, 3 for
    --streaming without the Pub/Sub emulator, else the failing job's status."""
    from schemas.exit_status import UnusableInputError
    from transforms import pubsub_emulator
    from transforms.runner_policy import report_usage_error

    try:
        config = parse_config(list(sys.argv[1:] if argv is None else argv))
    except ValueError as error:
        return report_usage_error("demo", error)
    if config.streaming and pubsub_emulator.emulator_launcher() is None:
        return report_usage_error("demo", UnusableInputError(f"--streaming: {pubsub_emulator.MISSING}"))
    if os.path.isdir(config.workdir) and os.listdir(config.workdir) and not config.overwrite:
        return report_usage_error("demo", ValueError(
            f"--workdir {config.workdir} is not empty; pass --overwrite to run the demo again there "
            "(each job then replaces its output under the output rule)"))
    os.makedirs(config.workdir, exist_ok=True)
    # Every library logs in full: to the terminal with --verbose, otherwise into demo.log, off the screen.
    configure_logging(verbose=True)
    log_path = config.path("demo.log")
    console = sys.stdout
    console.write(f"vision-pipelines demo into {config.workdir}"
                  + ("" if config.verbose else f" (library logs: {log_path})") + "\n")
    quiet = contextlib.nullcontext(sys.stderr) if config.verbose else quiet_stderr(log_path)
    with quiet as errors:
        try:
            demo = run(config, console, errors)
        except StageFailed as failure:
            console.write("FAILED\n")
            errors.write(f"vision-pipelines demo: error: {failure}\n")
            if not config.verbose:
                errors.write(f"last lines of {log_path}:\n{tail(log_path)}\n")
            return failure.status
        except Exception as error:  # A job raised instead of returning a status: show it, keep the traceback.
            console.write("FAILED\n")
            _LOGGER.exception("demo failed")
            errors.write(f"vision-pipelines demo: error: {type(error).__name__}: {error}\n"
                         + ("" if config.verbose else f"(traceback in {log_path})\n"))
            return 1
    console.write(_summary(demo))
    return 0


if __name__ == "__main__":
    with redacted_console():
        sys.exit(main())
