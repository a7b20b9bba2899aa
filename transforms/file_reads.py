"""Reading whole files through Beam's FileSystems, retrying what storage may fix by itself.

A storage read fails for one of two kinds of reason. Some are facts about the
input: the file is missing, is a directory, or may not be read (permission
denied, HTTP 401/403/404); retrying cannot help, so the caller dead-letters
the input. The others are the storage's: a dropped connection, a timeout, an
HTTP 5xx or 429, a flaky disk. Those are retried a bounded number of times
with exponential backoff, and when storage keeps failing the read raises
``StorageUnavailable``, which callers let escape: a job whose storage is down
must fail loudly rather than "succeed" with fewer images. Each retry counts in
the ``storage_retries`` counter, so a job's metrics show how flaky its storage was.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import BinaryIO, Callable, TypeVar

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from google.api_core import exceptions as google_exceptions

from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput

MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
STORAGE_RETRIES = "storage_retries"  # Counter in METRICS_NAMESPACE: transient failures that were retried.

_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
# Client errors that name the request, not the service: retrying gives the same answer.
_PERMANENT_API_ERRORS = (
    google_exceptions.BadRequest,
    google_exceptions.Unauthorized,
    google_exceptions.Forbidden,
    google_exceptions.NotFound,
)
_TRANSIENT_API_ERRORS = (
    google_exceptions.ServerError,
    google_exceptions.TooManyRequests,
)

T = TypeVar("T")

_RETRIES = Metrics.counter(METRICS_NAMESPACE, STORAGE_RETRIES)


class StorageUnavailable(Exception):
    """Storage kept failing after every retry; the job must stop, not dead-letter the input.

    It derives from ``Exception``, so it must be raised outside any step with
    ``with_exception_handling`` (which would turn it into a dead letter).
    """


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient storage error is retried.

    Attributes:
      attempts: Total tries, the first included.
      initial_delay_s: Wait before the second try; doubled after each failure.
      max_delay_s: Upper bound of one wait.
    """

    attempts: int = 5
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1. Received `attempts={self.attempts}`")
        if not 0 <= self.initial_delay_s <= self.max_delay_s:
            raise ValueError(
                "delays must satisfy 0 <= initial_delay_s <= max_delay_s. "
                f"Received `initial_delay_s={self.initial_delay_s}`, `max_delay_s={self.max_delay_s}`"
            )

    def delay_s(self, failures: int) -> float:
        """The wait after ``failures`` failed tries, with jitter so workers do not retry in lockstep."""
        return min(self.max_delay_s, self.initial_delay_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def _root_cause(error: BaseException) -> BaseException:
    """The error a BeamIOError wraps (it keeps per-path causes in ``exception_details``)."""
    details = getattr(error, "exception_details", None)
    if isinstance(details, dict) and len(details) == 1:
        inner = next(iter(details.values()))
        if isinstance(inner, BaseException):
            return _root_cause(inner)
    return error


def is_transient(error: BaseException) -> bool:
    """Whether retrying the read may succeed: storage trouble, not a fact about the file."""
    cause = _root_cause(error)
    if isinstance(cause, _PERMANENT_OS_ERRORS + _PERMANENT_API_ERRORS):
        return False
    return isinstance(cause, (OSError, *_TRANSIENT_API_ERRORS))


def with_retries(operation: Callable[[], T], description: str, policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """Runs a storage operation, retrying transient errors.

    Raises:
      StorageUnavailable: the operation still failed transiently after ``policy.attempts`` tries.
      Exception: any non-transient error, unchanged, on its first occurrence.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except Exception as error:  # Classified below; anything not transient is re-raised as is.
            if not is_transient(error):
                raise
            if attempt == policy.attempts:
                raise StorageUnavailable(
                    f"{description} failed {attempt} times, last with {type(error).__name__}: {error}"
                ) from error
            _RETRIES.inc()
            time.sleep(policy.delay_s(attempt))
    raise AssertionError("unreachable: the loop returns or raises")


def open_file(uri: str, compression_type: str = CompressionTypes.UNCOMPRESSED) -> BinaryIO:
    """Opens a file for reading; missing and permanently unreadable files raise ``RejectedInput``.

    Transient errors are raised unchanged for ``with_retries`` to retry.
    """
    try:
        if not FileSystems.exists(uri):
            raise RejectedInput(MISSING_FILE, f"no file at {uri}")
        return FileSystems.open(uri, compression_type=compression_type)
    except ValueError as error:  # No file system for the scheme, or a malformed path.
        raise RejectedInput(UNREADABLE_FILE, f"cannot read {uri}: {error}") from error
    except Exception as error:
        _raise_if_permanent(uri, error)
        raise


def _raise_if_permanent(uri: str, error: Exception) -> None:
    if is_transient(error) or isinstance(error, RejectedInput):
        return
    cause = _root_cause(error)
    if isinstance(cause, (FileNotFoundError, google_exceptions.NotFound)):
        raise RejectedInput(MISSING_FILE, f"no file at {uri}: {error}") from error
    if isinstance(cause, _PERMANENT_OS_ERRORS + _PERMANENT_API_ERRORS):
        raise RejectedInput(UNREADABLE_FILE, f"cannot read {uri}: {error}") from error


def _read_once(uri: str) -> bytes:
    with open_file(uri) as handle:
        try:
            return handle.read()
        except Exception as error:
            _raise_if_permanent(uri, error)
            raise


def read_file_bytes(uri: str, policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """Reads a whole file (local, gs://, any Beam file system), retrying transient errors.

    Returns:
      The file's bytes, possibly empty.

    Raises:
      RejectedInput: ``missing_file`` or ``unreadable_file`` (a directory,
        permission denied, no file system for the scheme).
      StorageUnavailable: storage kept failing after ``policy.attempts`` tries.
    """
    return with_retries(functools.partial(_read_once, uri), f"reading {uri}", policy)
