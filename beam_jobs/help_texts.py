"""Every job's ``--help`` text, rendered once from its parser and kept in ``beam_jobs/help/``.

A job module imports Apache Beam (about 2 s of CPU on its own) and often
TensorFlow (5-10 s more), so a ``--help`` that builds the job's parser cannot
answer in under 2 s. ``vision-pipelines COMMAND --help`` therefore prints the
text rendered here, importing nothing of the job. The texts are regenerated
with ``python -m beam_jobs.help_texts`` after a flag changes, and a test
renders every job's help from its real parser and fails when a committed text
differs, so the printed help is never stale.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from typing import Iterator

HELP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "help")
# argparse wraps to the terminal width; the committed texts use one fixed width.
HELP_COLUMNS = "100"
PROGRAM = "vision-pipelines"


def help_path(command: str) -> str:
    return os.path.join(HELP_DIR, f"{command}.txt")


@contextlib.contextmanager
def _as_printed_by_the_cli(command: str) -> Iterator[None]:
    """``COLUMNS`` fixed and ``sys.argv[0]`` the CLI's command line (argparse's ``prog``), restored afterwards."""
    saved_columns, saved_argv = os.environ.get("COLUMNS"), sys.argv
    os.environ["COLUMNS"], sys.argv = HELP_COLUMNS, [f"{PROGRAM} {command}"]
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved_columns


def render(command: str) -> str:
    """What the job's ``main(["--help"])`` prints, at ``HELP_COLUMNS`` wide, as ``vision-pipelines COMMAND``."""
    from beam_jobs.cli import COMMANDS

    module_name = COMMANDS[command]
    module = importlib.import_module(module_name)
    printed = io.StringIO()
    with _as_printed_by_the_cli(command), contextlib.redirect_stdout(printed):
        try:
            module.main(["--help"])
        except SystemExit as finished:
            if finished.code not in (0, None):
                raise RuntimeError(f"{module_name} --help exited with {finished.code}") from None
    return printed.getvalue()


def main() -> int:
    from beam_jobs.cli import COMMANDS

    os.makedirs(HELP_DIR, exist_ok=True)
    for command in sorted(COMMANDS):
        with open(help_path(command), "w") as handle:
            handle.write(render(command))
        print(help_path(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
