"""The output rule every job that writes a directory follows: write aside, publish last.

Beam's file sinks only clean up shards with the same shard count, and readers
glob ``*-of-*``, so writing into a directory that already holds an output
would mix two runs. Instead a job writes each run into a fresh directory and
switches a one-line pointer file to it only once the run has succeeded:

    OUTPUT/CURRENT           the name of the published run directory
    OUTPUT/run-<time>-<id>/  one run's files, complete before CURRENT names it
                             (with an empty ``_SUCCESS`` once published)

A reader resolves ``OUTPUT`` with ``published_dir`` and sees exactly one whole
run: a failed or killed run never becomes current, a rerun never mixes with
the previous one, and a concurrent reader keeps reading the run it resolved
(the run being replaced is kept until the next publish). The pointer is one
small object: on a local disk it is replaced with an atomic rename, on gs://
a single object write is atomic, so the scheme needs no directory rename
(which GCS does not have). The same pointer publishes train's ``best/`` model
and is what a streaming job watches to refresh its model.

Batch jobs publish from inside their pipeline, as its last step
(``transforms.publishing.PublishWhenWritten``), not from the process that
launched it: a Dataflow Flex Template launch submits the job and does not
wait for it.

A directory without ``CURRENT`` (a run directory itself, or data written by
other tools) resolves to itself.
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import os
import re
import time
import uuid

from apache_beam.io.filesystems import FileSystems

_LOGGER = logging.getLogger(__name__)

POINTER_FILE = "CURRENT"
SUCCESS_FILE = "_SUCCESS"  # Written into a run just before it is published.
RUN_PREFIX = "run-"
ABANDONED_AFTER_SECONDS = 2 * 24 * 3600  # An unpublished run this old was killed, not still writing.
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class OutputExistsError(ValueError):
    """The output directory already holds files and ``--overwrite`` was not given."""


def join(directory: str, *parts: str) -> str:
    return FileSystems.join(directory, *parts)


def new_run_name() -> str:
    """A run directory name that sorts by start time and never repeats."""
    return f"{RUN_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _is_remote(path: str) -> bool:
    return "://" in path


def write_file_atomically(path: str, data: bytes) -> None:
    """Writes a whole file so that readers see the old content or the new one, never a part.

    Local paths are written to a temporary file beside the target and renamed
    over it (``os.replace`` is atomic on POSIX); an object store's single
    ``create`` is atomic already.
    """
    if _is_remote(path):
        with FileSystems.create(path) as handle:
            handle.write(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_pointer(output_dir: str) -> str | None:
    """The run directory name ``OUTPUT/CURRENT`` names, or None when there is no pointer.

    Raises:
      ValueError: The pointer holds something that is not a run directory name.
    """
    pointer = join(output_dir, POINTER_FILE)
    if not FileSystems.exists(pointer):
        return None
    with FileSystems.open(pointer, compression_type="uncompressed") as handle:
        name = handle.read().decode("utf-8").strip()
    if not _RUN_NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"{pointer} does not name a run directory: {name!r}")
    return name


def published_dir(path: str) -> str:
    """The directory readers should read for ``path``: its published run, or itself.

    Args:
      path: A job's output directory (local or gs://), or a run directory.

    Returns:
      ``path/<run>`` when ``path/CURRENT`` names ``<run>``; otherwise ``path``.
    """
    path = path.rstrip("/")
    name = read_pointer(path)
    return path if name is None else join(path, name)


def has_files(path: str) -> bool:
    """Whether any file exists below ``path`` (empty directories do not count)."""
    return bool(FileSystems.match([join(path.rstrip("/"), "**")])[0].metadata_list)


def _run_dirs(output_dir: str) -> list[str]:
    """Names of the run directories under an output directory, oldest first."""
    if _is_remote(output_dir):
        paths = [m.path for m in FileSystems.match([join(output_dir, f"{RUN_PREFIX}*", "**")])[0].metadata_list]
        prefix = output_dir.rstrip("/") + "/"
        names = {p[len(prefix):].split("/", 1)[0] for p in paths if p.startswith(prefix)}
    elif os.path.isdir(output_dir):
        names = {n for n in os.listdir(output_dir) if n.startswith(RUN_PREFIX) and os.path.isdir(join(output_dir, n))}
    else:
        names = set()
    return sorted(names)


def _run_started(name: str) -> float | None:
    """Start time (epoch seconds) encoded in a run directory name, or None."""
    try:
        return calendar.timegm(time.strptime(name[len(RUN_PREFIX):len(RUN_PREFIX) + 15], "%Y%m%dT%H%M%S"))
    except ValueError:
        return None


def _is_obsolete(output_dir: str, name: str, keep: set[str | None], now: float) -> bool:
    """Whether a run directory can go: an older published run, or one abandoned long ago.

    Runs that never published and started less than ``ABANDONED_AFTER_SECONDS``
    ago may be concurrent jobs still writing, so they stay.
    """
    if name in keep:
        return False
    if FileSystems.exists(join(output_dir, name, SUCCESS_FILE)):
        return True
    started = _run_started(name)
    return started is not None and now - started > ABANDONED_AFTER_SECONDS


def _delete_tree(path: str) -> None:
    if _is_remote(path):
        files = [m.path for m in FileSystems.match([join(path, "**")])[0].metadata_list]
        if files:
            FileSystems.delete(files)
    elif os.path.exists(path):
        FileSystems.delete([path])


@dataclasses.dataclass(frozen=True)
class OutputRun:
    """One run of a job into an output directory, published only when it succeeded.

    Attributes:
      output_dir: The directory users name (``--output_dir``).
      run_name: This run's directory name under it.
      replaced: The run published when this one started (None on a new output).
    """

    output_dir: str
    run_name: str
    replaced: str | None

    @property
    def run_dir(self) -> str:
        """Where the job writes every file of this run."""
        return join(self.output_dir, self.run_name)

    @classmethod
    def start(cls, output_dir: str, *, overwrite: bool, flag: str = "--output_dir") -> "OutputRun":
        """Checks the output rule and creates this run's directory.

        Args:
          output_dir: The output directory (local or gs://).
          overwrite: Whether the user allowed replacing a non-empty output.
          flag: The flag that named the directory, for the error message.

        Raises:
          OutputExistsError: ``output_dir`` holds files and ``overwrite`` is False.
        """
        output_dir = output_dir.rstrip("/")
        if not overwrite and has_files(output_dir):
            raise OutputExistsError(
                f"{flag} {output_dir} is not empty; pass --overwrite to replace its contents "
                "(the current output stays readable until the new run has succeeded)"
            )
        run = cls(output_dir, new_run_name(), read_pointer(output_dir))
        if not _is_remote(output_dir):
            os.makedirs(run.run_dir, exist_ok=True)
        return run

    def publish(self) -> str:
        """Makes this run the current one, then removes runs no reader should still need.

        ``_SUCCESS`` is written into the run first, then ``CURRENT`` is
        switched. The run that was current until now is kept, so a reader that
        resolved it a moment ago can finish; older published runs and runs
        abandoned long ago (killed jobs) are deleted. Unpublished recent runs
        may be concurrent jobs still writing and are left alone.

        Publishing twice is harmless, so the pipeline step that publishes may
        be retried: once ``CURRENT`` names this run, a second call rewrites
        ``_SUCCESS`` and removes nothing (it no longer knows which run this one
        replaced, which must stay; the next publish removes what is left).

        Returns:
          The published run directory.

        Raises:
          FileNotFoundError: This run's directory holds no files; nothing is switched.
        """
        if not has_files(self.run_dir):
            raise FileNotFoundError(f"cannot publish {self.run_dir}: it holds no files")
        write_file_atomically(join(self.run_dir, SUCCESS_FILE), b"")
        previous = read_pointer(self.output_dir)
        if previous == self.run_name:
            _LOGGER.info("%s is published already", self.run_dir)
            return self.run_dir
        write_file_atomically(join(self.output_dir, POINTER_FILE), f"{self.run_name}\n".encode("utf-8"))
        keep = {self.run_name, previous}
        now = time.time()
        for name in _run_dirs(self.output_dir):
            if _is_obsolete(self.output_dir, name, keep, now):
                _delete_tree(join(self.output_dir, name))
        _LOGGER.info("published %s (replacing %s)", self.run_dir, previous)
        return self.run_dir

    def is_published(self) -> bool:
        """Whether ``CURRENT`` names this run (a later run may have replaced it since)."""
        return read_pointer(self.output_dir) == self.run_name

    def abandon(self) -> None:
        """Removes this run's directory after a failure; the published run is untouched.

        A run that ``CURRENT`` names is kept: the pipeline publishes its own
        run as its last step, so a failure reported after that step (a
        runner that failed while shutting down) must not delete what readers
        now read.
        """
        try:
            if self.is_published():
                _LOGGER.warning("not removing %s: it is published", self.run_dir)
                return
        except ValueError:  # A damaged pointer names no run, so not this one.
            pass
        try:
            _delete_tree(self.run_dir)
        except OSError as error:  # Best effort: the next publish removes it anyway.
            _LOGGER.warning("could not remove the failed run %s: %s", self.run_dir, error)
