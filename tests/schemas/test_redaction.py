"""Redaction of log records, tracebacks and console lines (``schemas.redaction``), here and in SDK workers."""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Iterator

import apache_beam as beam
import pytest
from absl import logging as absl_logging
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle

from schemas.redaction import REDACTED, RedactingFilter, install_redaction, redact_secrets, redacted_console
from transforms.runner_policy import WORKER_REDACTION_PLUGIN, make_pipeline_options

SECRET = "s3cr3t-T0KEN"
SIGNED_URL = f"https://storage.googleapis.com/bucket/a/img.png?X-Goog-Algorithm=GOOG4&X-Goog-Signature={SECRET}"
READABLE = "https://storage.googleapis.com/bucket/a/img.png?X-Goog-Algorithm=GOOG4&X-Goog-Signature=REDACTED"
TOKEN_URI = f"gs://bucket/b/manifest.csv?access_token={SECRET}"


class _Uri:
    """A non-string log argument whose text holds a credential."""

    def __str__(self) -> str:
        return TOKEN_URI


def _record(msg: object, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("test", logging.ERROR, __file__, 1, msg, args or None, exc_info)


def _formatted(record: logging.LogRecord) -> str:
    return logging.Formatter("%(message)s").format(record)


def test_redact_secrets_keeps_the_host_path_and_harmless_parameters():
    text = f"{SIGNED_URL}, https://user:{SECRET}@h.example/x.png, Authorization: Bearer {SECRET}.x-y, {TOKEN_URI}"
    assert redact_secrets(text) == (f"{READABLE}, https://REDACTED@h.example/x.png, Authorization: Bearer REDACTED, "
                                    "gs://bucket/b/manifest.csv?access_token=REDACTED")


def test_the_filter_redacts_a_percent_formatted_message_and_its_non_string_args():
    records = [
        _record("reading %s (attempt %d)", SIGNED_URL, 2),
        _record("reading %(uri)s", {"uri": _Uri()}),
        _record(OSError(f"no such object: {TOKEN_URI}")),  # A bare exception as the message.
        _record("%s", _Uri()),
    ]
    for record in records:
        assert RedactingFilter().filter(record) is True
        assert SECRET not in _formatted(record) and REDACTED in record.getMessage()
        assert record.args == ()  # Formatted once, redacted, stored back: no handler formats the args again.
    assert records[0].getMessage() == f"reading {READABLE} (attempt 2)"
    assert records[1].getMessage() == "reading gs://bucket/b/manifest.csv?access_token=REDACTED"


def test_the_filter_leaves_a_record_without_credentials_lazy():
    record = _record("read %d of %s", 3, "gs://bucket/x.png?generation=7")
    RedactingFilter().filter(record)
    assert (record.msg, record.args) == ("read %d of %s", (3, "gs://bucket/x.png?generation=7"))


def test_the_filter_redacts_a_traceback_and_its_chained_exceptions():
    try:
        try:
            raise FileNotFoundError(f"no file at {TOKEN_URI}")
        except FileNotFoundError as missing:
            raise ValueError(f"cannot read manifest {SIGNED_URL}") from missing
    except ValueError:
        record = _record("load failed for %s", SIGNED_URL, exc_info=sys.exc_info())
    RedactingFilter().filter(record)
    text = _formatted(record)
    assert SECRET not in text
    assert record.exc_info is None  # A handler that formats exc_info itself (Beam's worker handler) sees none.
    assert f"ValueError: cannot read manifest {READABLE}" in text
    assert "FileNotFoundError: no file at gs://bucket/b/manifest.csv?access_token=REDACTED" in text
    assert "The above exception was the direct cause" in text and "Traceback (most recent call last)" in text


@pytest.fixture
def fresh_process_state() -> Iterator[None]:
    """The logging factory and exception hooks of a process that never installed redaction; put back after.

    Also the ``google`` logger's propagation: google-api-core turns it off when
    the process makes its first Google client (another test's, in the suite).
    """
    google = logging.getLogger("google")
    saved = logging.getLogRecordFactory(), sys.excepthook, threading.excepthook, google.propagate
    logging.setLogRecordFactory(logging.LogRecord)
    sys.excepthook, threading.excepthook = sys.__excepthook__, threading.__excepthook__
    google.propagate = True
    try:
        yield
    finally:
        logging.setLogRecordFactory(saved[0])
        sys.excepthook, threading.excepthook = saved[1], saved[2]
        google.propagate = saved[3]


def _capture(logger: logging.Logger) -> tuple[logging.Handler, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    return handler, stream


def test_installed_redaction_covers_every_logger_and_handlers_added_later(fresh_process_state):
    isolated = logging.getLogger("tests.redaction.isolated")
    isolated.propagate = False  # Its records never reach the root logger's handlers.
    install_redaction()
    install_redaction()  # Idempotent: one wrapper, not two.
    handlers = [(logging.getLogger(), *_capture(logging.getLogger())), (isolated, *_capture(isolated))]
    try:
        isolated.error("reading %s", SIGNED_URL)
        absl_logging.error("absl reading %s", TOKEN_URI)  # TensorFlow logs through absl.
        logging.getLogger("apache_beam.io.gcp.gcsio").error("HTTP 403 for %s", SIGNED_URL)
        try:
            raise OSError(f"GET {SIGNED_URL} returned 404")
        except OSError:
            logging.getLogger("google.cloud.storage").exception("download failed")
    finally:
        for logger, handler, _ in handlers:
            logger.removeHandler(handler)
    root_text, isolated_text = handlers[0][2].getvalue(), handlers[1][2].getvalue()
    assert f"reading {READABLE}" in isolated_text
    assert "absl reading gs://bucket/b/manifest.csv?access_token=REDACTED" in root_text
    assert f"HTTP 403 for {READABLE}" in root_text and f"OSError: GET {READABLE} returned 404" in root_text
    assert SECRET not in root_text + isolated_text
    assert logging.getLogRecordFactory()("n", logging.INFO, "p", 1, "%s", (SIGNED_URL,), None).getMessage() == READABLE


def test_an_uncaught_traceback_is_printed_redacted(fresh_process_state, capsys):
    install_redaction()
    try:
        raise RuntimeError(f"pipeline failed reading {SIGNED_URL}")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    thread = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError(f"bad {TOKEN_URI}")), name="reader")
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    assert SECRET not in err
    assert f"RuntimeError: pipeline failed reading {READABLE}" in err
    assert "Exception in thread reader:" in err and "access_token=REDACTED" in err


def test_redacted_console_redacts_prints_and_passes_the_rest_through(capsys):
    with redacted_console():
        print(f"vision-pipelines search: error: {TOKEN_URI} holds no published index", file=sys.stderr)
        sys.stdout.writelines([f"{SIGNED_URL}\n"])
        sys.stdout.flush()
        encoding = sys.stdout.encoding
    captured = capsys.readouterr()
    assert captured.err == "vision-pipelines search: error: gs://bucket/b/manifest.csv?access_token=REDACTED " \
                           "holds no published index\n"
    assert captured.out == f"{READABLE}\n" and encoding == sys.stdout.encoding


class LogSecretFn(beam.DoFn):
    """Logs, in whichever process runs it, a line and a traceback that quote a signed URL."""

    def process(self, element: int) -> list[int]:
        logger = logging.getLogger("tests.redaction.worker")
        logger.warning("worker reading %s", SIGNED_URL)
        print(f"worker printing {SIGNED_URL}", file=sys.stderr)
        try:
            raise OSError(f"worker cannot open {SIGNED_URL}")
        except OSError:
            logger.exception("worker read failed")
        return [element]


def _runner_passing_options_to_workers(options: PipelineOptions) -> fn_runner.FnApiRunner:
    """FnApiRunner that hands SDK workers the pipeline options, as Beam's DirectRunner builds it.

    A bare ``FnApiRunner`` starts multi-process workers with no options at
    all; Dataflow, portable runners and the DirectRunner give them the job's,
    ``--beam_plugins`` included, which is the route under test.
    """
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def test_an_sdk_worker_process_redacts_its_records_and_prints(fresh_process_state, caplog, capfd):
    options = make_pipeline_options(["--direct_running_mode", "multi_processing", "--direct_num_workers", "1"],
                                    job_options=PipelineOptions)
    assert WORKER_REDACTION_PLUGIN in options.view_as(SetupOptions).beam_plugins
    # Only the worker redacts: this process relays its records as they arrive, unredacted here.
    logging.setLogRecordFactory(logging.LogRecord)
    with caplog.at_level(logging.WARNING):
        with beam.Pipeline(runner=_runner_passing_options_to_workers(options), options=options) as pipeline:
            _ = pipeline | beam.Create([1]) | beam.ParDo(LogSecretFn())
    relayed = "\n".join(record.getMessage() for record in caplog.records)
    assert "worker reading https://storage.googleapis.com/bucket/a/img.png" in relayed  # Came from the worker.
    assert "worker cannot open https://storage.googleapis.com/bucket/a/img.png" in relayed
    assert SECRET not in relayed and "X-Goog-Signature=REDACTED" in relayed
    printed = capfd.readouterr().err  # The worker process writes to this process's descriptor 2.
    assert f"worker printing {READABLE}" in printed and SECRET not in printed
