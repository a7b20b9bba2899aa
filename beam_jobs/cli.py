"""The ``vision-pipelines`` command: one sub-command per job.

``vision-pipelines create-dataset ARGS`` is the same as
``python -m beam_jobs.create_dataset ARGS``; everything after the sub-command,
Beam pipeline options included, goes to the job untouched.
"""

from __future__ import annotations

import importlib
import logging
import sys

# Sub-command -> module whose ``main(argv)`` runs it.
COMMANDS: dict[str, str] = {
    "make-sample-data": "beam_jobs.make_sample_data",
    "create-dataset": "beam_jobs.create_dataset",
    "train": "beam_jobs.train",
    "batch-predict": "beam_jobs.batch_predict",
    "extract-embeddings": "beam_jobs.extract_embeddings",
    "sql": "beam_jobs.sql",
}


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
