"""Credentials out of everything a job shows: dead letters, log records, tracebacks, console lines.

A URI can carry credentials: a signed URL's ``X-Goog-Signature``/``X-Amz-Signature``,
an ``access_token`` query parameter, a ``user:password@`` part. A job quotes its
inputs' URIs in dead letters, in error messages (a manifest or ``--input`` that
does not match, a failing ``gs://`` read whose message echoes the URL) and in
log lines, ours and Beam's, TensorFlow's/absl's and the Google Cloud clients'.
``redact_secrets`` replaces those values; the rest of the URI (scheme, host,
path, harmless parameters) stays, so the message still says which input failed.

Redaction happens where text is made, not in each place it is written:

- ``install_redaction`` wraps the log-record factory, so every record any
  logger in the process creates from then on is redacted before any handler
  sees it (handlers added later included: pytest's, a file handler, Beam's
  ``FnApiLogRecordHandler`` that ships an SDK worker's records to the runner),
  and replaces the default ``sys.excepthook``/``threading.excepthook`` so an
  uncaught traceback is printed redacted.
- ``redacted_console`` redacts what the job prints to ``sys.stdout``/``sys.stderr``
  itself (``vision-pipelines JOB: error: ...`` lines that quote a flag).

Not covered: what C++ code (TensorFlow, gRPC) writes straight to descriptor 2,
and records created before ``install_redaction`` ran.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, TextIO

REDACTED = "REDACTED"
# Query parameters that carry credentials: signed-URL signatures and credentials, tokens, keys.
_SECRET_PARAMETER = re.compile(
    r"([?&;](?:x-goog-signature|x-goog-credential|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|signature|sig|token|access_token|id_token|key|api_key|apikey|password|credential)=)[^&#,\s'\"]*",
    re.IGNORECASE,
)
_USER_INFO = re.compile(r"(://)[^/?#@\s'\"]+@")
# An OAuth token in an Authorization header a client's debug log may echo.
_BEARER_TOKEN = re.compile(r"(\bbearer\s+)[A-Za-z0-9._~+/-]+=*", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """``text`` with the credentials of every URL (and any bearer token) in it replaced by ``REDACTED``."""
    text = _SECRET_PARAMETER.sub(rf"\1{REDACTED}", text)
    return _BEARER_TOKEN.sub(rf"\1{REDACTED}", _USER_INFO.sub(rf"\1{REDACTED}@", text))


class RedactingFilter(logging.Filter):
    """Redacts a record's message, traceback and stack in place; lets every record through.

    A record that holds no credential is left untouched (``msg``/``args`` stay
    lazy). One that does gets its formatted, redacted message as ``msg`` with
    no ``args``, and its redacted traceback as ``exc_text`` with ``exc_info``
    cleared: every ``logging.Formatter`` prints ``exc_text``, while a handler
    that formats ``exc_info`` itself (Beam's worker log handler does) would
    print the exception's unredacted message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # Malformed %-args: logging reports them when a handler formats the record.
            message = None
        if message is not None and redact_secrets(message) != message:
            record.msg, record.args = redact_secrets(message), ()
        exc_text = record.exc_text
        if not exc_text and record.exc_info:
            exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if exc_text and redact_secrets(exc_text) != exc_text:
            record.exc_text, record.exc_info = redact_secrets(exc_text), None
        if record.stack_info:
            record.stack_info = redact_secrets(record.stack_info)
        return True


_FILTER = RedactingFilter()
_REDACTING = "_vision_pipelines_redacting"  # Marks the factory install_redaction made.


def install_redaction() -> None:
    """Redacts every log record this process creates from now on, and uncaught tracebacks.

    A filter on the root logger's handlers would miss records of loggers that
    do not propagate and every handler added later; the record factory sees
    each record once, when a logger makes it. Safe to call more than once.
    """
    factory = logging.getLogRecordFactory()
    if not getattr(factory, _REDACTING, False):
        logging.setLogRecordFactory(_redacting_factory(factory))
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _print_redacted_traceback
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _print_redacted_thread_traceback


def _redacting_factory(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        _FILTER.filter(record)
        return record

    setattr(make_record, _REDACTING, True)
    return make_record


def _print_redacted_traceback(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    sys.stderr.write(redact_secrets("".join(traceback.format_exception(kind, error, tb))))


def _print_redacted_thread_traceback(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # As the default hook: a thread's sys.exit() is not an error.
        return
    name = args.thread.name if args.thread is not None else threading.get_ident()
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(f"Exception in thread {name}:\n{redact_secrets(text)}")


class RedactingStream:
    """A text stream that writes what it is given redacted and passes everything else to ``stream``.

    Each ``write`` is redacted on its own: ``print`` and ``traceback`` write a
    URL within one call, so it is never split between two.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_secrets(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_console() -> Iterator[None]:
    """Redacts what is printed to ``sys.stdout`` and ``sys.stderr`` for the duration."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
