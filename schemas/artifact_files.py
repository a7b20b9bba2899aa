"""Reading and writing the project's JSON artifacts, whole or not at all.

Every typed artifact contract (``DatasetInfo``, ``ModelMetrics``,
``EvalReport``) goes through these helpers, so each file is written the same
way (pretty, sorted keys for stable diffs, atomically) and a missing or
incomplete file fails with the path and the missing keys instead of a
``KeyError`` deep in a reader.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from apache_beam.io.filesystems import FileSystems

from schemas.publication import write_file_atomically


def to_json_text(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=2, sort_keys=True)


def write_json(path: str, content: dict[str, Any]) -> None:
    """Writes ``content`` to ``path`` (local or gs://) so readers see all of it or none."""
    write_file_atomically(path, to_json_text(content).encode("utf-8"))


def read_json(path: str) -> dict[str, Any]:
    """The JSON object stored at ``path`` (local or gs://).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file does not hold a JSON object.
    """
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        content = json.loads(handle.read().decode("utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return content


def field_values(cls: type, content: dict[str, Any], source: str) -> dict[str, Any]:
    """The entries of ``content`` that are fields of dataclass ``cls``.

    Keys the contract does not declare (derived values such as ``balanced``,
    or fields a newer writer added) are ignored; a declared field without a
    default that is missing is an error naming ``source``.

    Raises:
      ValueError: a required field is missing.
    """
    fields = dataclasses.fields(cls)
    required = {
        f.name for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(content))
    if missing:
        raise ValueError(f"{source} is not a valid {cls.__name__}: missing {', '.join(missing)}")
    names = {f.name for f in fields}
    return {key: value for key, value in content.items() if key in names}
