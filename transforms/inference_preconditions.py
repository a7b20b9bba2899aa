"""Checks the inference jobs run before launching: a real model directory and inputs that exist.

Without them a wrong ``--model_dir`` ended in a ``FileNotFoundError`` traceback
from a worker and an empty glob in Beam's ``Empty match ... Disallowed``; a
manifest with no rows "succeeded" with nothing written. Each now ends in one
line naming the flag and an ``UnusableInputError`` (exit status 3).
"""

from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from schemas.exit_status import UnusableInputError
from schemas.model_artifacts import MODEL_INFO_FILE
from schemas.publication import published_dir


def check_model_dir(model_dir: str) -> None:
    """Refuses a ``--model_dir`` that holds no exported model.

    Accepts a trial or ``best/`` directory (its published run is resolved).

    Raises:
      UnusableInputError: No such directory, or no model_info.json in it.
    """
    resolved = published_dir(model_dir)
    if not FileSystems.exists(FileSystems.join(resolved, MODEL_INFO_FILE)):
        what = "does not exist" if not FileSystems.exists(model_dir) else f"holds no {MODEL_INFO_FILE}"
        raise UnusableInputError(
            f"--model_dir {model_dir} is not a model directory ({what}); pass a train output's best/ "
            f"or trials/<id>/ directory")


def check_input_matches(pattern: str) -> None:
    """Refuses an ``--input`` file or glob that matches nothing.

    Raises:
      UnusableInputError: The pattern matches no file.
    """
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except OSError as error:  # Beam raises BeamIOError (an IOError) for an unreadable location.
        raise UnusableInputError(f"--input {pattern} cannot be listed: {error}") from error
    if not matched:
        raise UnusableInputError(f"--input {pattern} matches no files: nothing to read")


def no_inputs_message(input_flag: str) -> str:
    """The line a job prints when its input held no rows at all."""
    return f"--input {input_flag} held no images (0 read)"
