"""A readable terminal for the jobs: library chatter stays off the screen.

``configure_logging`` (the CLI calls it for every job) keeps the project's
INFO messages and the libraries' warnings. The demo goes further:

TensorFlow, absl, gRPC and Beam log at INFO and WARNING from Python *and*
from C++ (which writes straight to file descriptor 2, past any Python logging
setting), so quieting the loggers alone still leaves some noise, and
``quiet_stderr`` moves descriptor 2 itself to a log file for the duration
and hands back a stream to the real terminal, so everything the libraries
print is kept for debugging and only what the caller chooses to print is
shown.

Whatever the libraries and the jobs log is redacted (``schemas.redaction``):
``configure_logging`` installs it before any job code runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Iterator, TextIO

from schemas.redaction import install_redaction

VERBOSE_ENV = "VISION_PIPELINES_VERBOSE"  # Set to 1 to see every library's INFO log from any job.
# Libraries whose INFO logs are about their own machinery, not about the job's data.
LIBRARY_LOGGERS = ("apache_beam", "tensorflow", "absl", "tensorflow_transform", "tfx_bsl", "keras", "h5py", "google",
                   "urllib3", "grpc", "matplotlib", "PIL", "sqlglot")
_TF_CPP_LEVEL = "TF_CPP_MIN_LOG_LEVEL"  # Read by TensorFlow's C++ logging when TensorFlow is imported.
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_quieted_tf_cpp = False


def configure_logging(verbose: bool | None = None) -> bool:
    """Logging for a job run from the command line: the project's INFO, the libraries' warnings.

    Call it before TensorFlow is imported: its C++ logs are filtered only
    through an environment variable read at import time. TensorFlow 2.21
    still prints the few lines logged while its libraries load (before absl
    logging is initialised: CPU features, oneDNN, CUDA probing) whatever the
    variable says; only moving descriptor 2 hides those (``quiet_stderr``).
    ``verbose`` (default: ``$VISION_PIPELINES_VERBOSE`` set to anything but
    0) shows every library's INFO again. Every record is redacted
    (``install_redaction``), verbose or not, and so is an uncaught traceback.

    Returns:
      Whether the logging is verbose.
    """
    global _quieted_tf_cpp
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    install_redaction()
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if not verbose and _TF_CPP_LEVEL not in os.environ:
        os.environ[_TF_CPP_LEVEL] = "2"  # Errors only (2); 3 would hide TensorFlow's errors too.
        _quieted_tf_cpp = True
    elif verbose and _quieted_tf_cpp:
        os.environ.pop(_TF_CPP_LEVEL, None)
        _quieted_tf_cpp = False
    return verbose


@contextlib.contextmanager
def quiet_stderr(log_path: str) -> Iterator[TextIO]:
    """Sends descriptor 2 (C++ logs, ``sys.stderr``) and the root logger's records to ``log_path`` (appended).

    The root logger gets a file handler of its own for the duration (its
    handlers are put back after): a handler made earlier may write to a
    stream that is not descriptor 2 (a test runner's capture, for one).

    Yields:
      A text stream writing to the terminal's original stderr, for the
      caller's own error messages.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 2)
    terminal = io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.handlers, root.level = [file_handler], min(level, logging.INFO) or logging.INFO
    try:
        yield terminal
    finally:
        root.handlers, root.level = handlers, level
        file_handler.close()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


class Tee(io.TextIOBase):
    """A text stream that keeps a copy of what it writes and, when given one, passes it on."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        if self._stream is not None:
            self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()


def tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file (what to show when a step failed)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
