"""The ``vision-pipelines`` command: one sub-command per job.

``vision-pipelines create-dataset ARGS`` is the same as
``python -m beam_jobs.create_dataset ARGS``; everything after the sub-command,
Beam pipeline options included, goes to the job untouched.

Credentials in what a job shows stay out of the terminal: its log records
and an uncaught traceback are redacted (``console.configure_logging``), and
so is what it prints itself (``redacted_console``), such as an error line
that quotes an ``--input`` signed URL.
"""

from __future__ import annotations

import importlib
import sys

from beam_jobs import console, help_texts
from schemas.redaction import redacted_console

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


def print_job_help(command: str) -> None:
    """Prints a job's ``--help`` from its committed text (``beam_jobs.help_texts``): no job import, no Beam.

    Raises:
      SystemExit: always, status 0, as argparse's ``--help`` does.
    """
    with open(help_texts.help_path(command)) as handle:
        sys.stdout.write(handle.read())
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
        print_job_help(command)
    console.configure_logging()  # Libraries' INFO off the terminal unless VISION_PIPELINES_VERBOSE=1.
    with redacted_console():  # Entered before the import: a stream a job module binds at import is redacted too.
        module = importlib.import_module(COMMANDS[command])
        return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
