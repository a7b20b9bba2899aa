"""The exit statuses every ``vision-pipelines`` command returns: a contract scripts rely on.

0 success; 1 the run finished but failed its own checks (accounting, no trial
succeeded, ``--strict`` warnings); 2 a usage error (fix the command line);
3 the flags are well-formed but what they name cannot be used (fix the data).
Kept free of Beam and TensorFlow so light commands (``sql``) share it.
"""

from __future__ import annotations

CHECKS_FAILED_EXIT = 1
USAGE_ERROR_EXIT = 2
UNUSABLE_INPUT_EXIT = 3


class UnusableInputError(ValueError):
    """The flags are well-formed but what they name cannot be used (exit status 3).

    An empty input or table, a directory that is not a model, a dataset that
    train cannot learn from, an index built by another model: scripts can tell
    these (fix the data) from a usage error (fix the command line, status 2).
    """
