"""The ``vision-pipelines`` command: one sub-command per job.

``vision-pipelines create-dataset ARGS`` is the same as
``python -m beam_jobs.create_dataset ARGS``; everything after the sub-command,
Beam pipeline options included, goes to the job untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import sys
import tempfile

from beam_jobs import console

# Sub-command -> module whose ``main(argv)`` runs it.
COMMANDS: dict[str, str] = {
    "make-sample-data": "beam_jobs.make_sample_data",
    "create-dataset": "beam_jobs.create_dataset",
    "train": "beam_jobs.train",
    "batch-predict": "beam_jobs.batch_predict",
    "stream-predict": "beam_jobs.stream_predict",
    "extract-embeddings": "beam_jobs.extract_embeddings",
    "sql": "beam_jobs.sql",
    "build-index": "beam_jobs.build_index",
    "search": "beam_jobs.search",
    "serve-search": "beam_jobs.serve_search",
    "near-duplicates": "beam_jobs.near_duplicates",
    "demo": "beam_jobs.demo",
}


_HELP_FLAGS = ("-h", "--help")
# The packages whose code defines the jobs' flags: a change to any file in them invalidates cached help.
_PACKAGES = ("beam_jobs", "transforms", "schemas", "model_lib", "retrieval")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_fingerprint(root: str = _PROJECT_ROOT, packages: tuple[str, ...] = _PACKAGES) -> str:
    """A digest of the path, size and mtime of every ``.py`` file under ``packages``: cheap (stat only)."""
    digest = hashlib.sha256(f"{sys.version}|{os.path.basename(sys.argv[0])}".encode())
    for package in packages:
        for directory, subdirectories, files in os.walk(os.path.join(root, package)):
            subdirectories.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    stat = os.stat(path)
                    digest.update(f"{os.path.relpath(path, root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def help_cache_path(command: str, fingerprint: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "vision-pipelines", "help", f"{command}-{fingerprint}.txt")


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy, so the help a job prints can be cached."""

    def __init__(self, stream: io.TextIOBase):
        self._stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


def _store_help(path: str, text: str) -> None:
    """Writes the cache file atomically; a read-only or full disk only means no cache."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError:
        pass


def print_job_help(command: str, module_name: str, argv: list[str]) -> None:
    """Prints a job's ``--help`` and exits 0, importing the job only when its help is not cached.

    A job module imports Apache Beam (about 2 s of CPU on its own) and often
    TensorFlow (5-10 s more), so building the help from the job's options
    class cannot answer quickly. The text it printed is kept under
    ``$XDG_CACHE_HOME/vision-pipelines/help/`` keyed by a fingerprint of the
    project's source files, so the next ``--help`` prints it without importing
    anything, and a changed flag (a changed file) is never served stale.

    Raises:
      SystemExit: always, as argparse's ``--help`` does (status 0 on success).
    """
    path = help_cache_path(command, code_fingerprint())
    try:
        with open(path) as handle:
            sys.stdout.write(handle.read())
        raise SystemExit(0)
    except OSError:
        pass
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        try:
            importlib.import_module(module_name).main(argv)
        except SystemExit as finished:
            if finished.code in (0, None) and tee.copy.getvalue():
                _store_help(path, tee.copy.getvalue())
            raise
    raise SystemExit(0)


def _usage() -> str:
    names = "\n  ".join(sorted(COMMANDS))
    return f"usage: vision-pipelines COMMAND [ARGS ...]\n\ncommands:\n  {names}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"unknown command {command!r}\n\n{_usage()}")
        return 2
    if any(arg in _HELP_FLAGS for arg in rest):
        print_job_help(command, COMMANDS[command], rest)
    console.configure_logging()  # Libraries' INFO off the terminal unless VISION_PIPELINES_VERBOSE=1.
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
