"""A readable terminal for the jobs: library chatter goes to a log file, not the screen.

TensorFlow, absl, gRPC and Beam log at INFO and WARNING from Python *and*
from C++ (which writes straight to file descriptor 2, past any Python logging
setting), so quieting the loggers alone still leaves a screen of noise.
``quiet_stderr`` moves descriptor 2 itself to a log file for the duration
and hands back a stream to the real terminal, so everything the libraries
print is kept for debugging and only what the caller chooses to print is
shown.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterator, TextIO


@contextlib.contextmanager
def quiet_stderr(log_path: str) -> Iterator[TextIO]:
    """Sends descriptor 2 (Python's ``sys.stderr``, logging, C++ logs) to ``log_path`` (appended).

    Yields:
      A text stream writing to the terminal's original stderr, for the
      caller's own error messages.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 2)
    terminal = io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True)
    try:
        yield terminal
    finally:
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
