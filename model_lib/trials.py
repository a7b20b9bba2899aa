"""Trial specs for the train job: a grid and/or a list of hyperparameter sets from YAML/JSON.

A spec file looks like::

    base:                  # applied to every trial (optional)
      epochs: 10
    grid:                  # cartesian product, in file order (optional)
      learning_rate: [0.001, 0.003]
      dropout: [0.2, 0.4]
    trials:                # explicit trials merged over base (optional)
      - {id: mobilenet, arch: mobilenet_v2, weights: none}

Grid trials come first, then listed ones; without ``grid`` and ``trials``
the spec is the single trial ``base``. Structural problems (not a mapping, an
empty grid axis, duplicate ids) raise ``TrialSpecError`` before the job
starts. Hyperparameter *values* are not checked here: a bad value fails only
its own trial, which the train job sends to the dead letter while the other
trials finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from typing import Any, Mapping

import yaml

_TOP_LEVEL_KEYS = ("base", "grid", "trials")
_ID_KEY = "id"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TrialSpecError(ValueError):
    """The trial spec is malformed (as opposed to one trial's bad value)."""


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """One trial: a stable id (a directory name) and its hyperparameter overrides.

    Attributes:
      trial_id: Unique within a job; ``OUTPUT/trials/<trial_id>/``.
      hparams: Overrides of ``model_lib.training.HParams`` defaults, as read
        from the spec (unvalidated).
    """

    trial_id: str
    hparams: Mapping[str, Any]

    @property
    def input_ref(self) -> str:
        """How dead letters name this trial."""
        return f"trial:{self.trial_id}"

    def to_json(self) -> str:
        return json.dumps({"trial_id": self.trial_id, "hparams": dict(self.hparams)}, sort_keys=True)


def _digest(hparams: Mapping[str, Any]) -> str:
    canonical = json.dumps(dict(hparams), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TrialSpecError(f"{where} must be a mapping of hyperparameter names to values. Received `{value!r}`")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TrialSpecError(f"{where} has non-string keys {bad}")
    return dict(value)


def _grid_combinations(grid: dict[str, Any]) -> list[dict[str, Any]]:
    axes: list[list[Any]] = []
    for name, values in grid.items():
        options = list(values) if isinstance(values, (list, tuple)) else [values]
        if not options:
            raise TrialSpecError(f"grid axis {name!r} has no values")
        axes.append(options)
    return [dict(zip(grid, combination)) for combination in itertools.product(*axes)]


def build_trials(spec: Any, overrides: Mapping[str, Any] | None = None) -> list[TrialSpec]:
    """Expands a parsed spec into trials.

    Args:
      spec: The parsed YAML/JSON (a mapping with ``base``/``grid``/``trials``),
        or None for a single trial of ``overrides``.
      overrides: Hyperparameters given on the command line; they replace
        ``base`` values but not per-trial grid/list values.

    Returns:
      The trials in a deterministic order with unique ids
      (``NNN-<hash>``, or the ``id`` a listed trial gives).

    Raises:
      TrialSpecError: on a malformed spec.
    """
    spec = {} if spec is None else spec
    if not isinstance(spec, Mapping):
        raise TrialSpecError(f"a trial spec must be a mapping with keys {_TOP_LEVEL_KEYS}. Received `{spec!r}`")
    unknown = sorted(set(spec) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise TrialSpecError(f"unknown trial spec keys {unknown}; expected some of {_TOP_LEVEL_KEYS}")
    base = {**_mapping(spec.get("base"), "base"), **dict(overrides or {})}
    grid = _mapping(spec.get("grid"), "grid")
    listed = spec.get("trials") or []
    if not isinstance(listed, list):
        raise TrialSpecError(f"trials must be a list of mappings. Received `{listed!r}`")

    entries: list[tuple[str | None, dict[str, Any]]] = []
    if grid:
        entries += [(None, {**base, **combination}) for combination in _grid_combinations(grid)]
    for position, item in enumerate(listed):
        values = _mapping(item, f"trials[{position}]")
        explicit_id = values.pop(_ID_KEY, None)
        entries.append((None if explicit_id is None else str(explicit_id), {**base, **values}))
    if not entries:
        entries = [(None, base)]

    trials: list[TrialSpec] = []
    for index, (explicit_id, hparams) in enumerate(entries):
        trial_id = explicit_id if explicit_id is not None else f"{index:03d}-{_digest(hparams)}"
        if not _ID_PATTERN.match(trial_id):
            raise TrialSpecError(
                f"trial id must be 1-64 letters, digits, '_', '.' or '-'. Received `id={trial_id!r}`"
            )
        trials.append(TrialSpec(trial_id, hparams))
    ids = [t.trial_id for t in trials]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise TrialSpecError(f"trial ids must be unique; repeated: {duplicates}")
    return trials


def parse_trials(text: str, overrides: Mapping[str, Any] | None = None) -> list[TrialSpec]:
    """Parses YAML or JSON text (JSON is YAML) into trials; see ``build_trials``."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TrialSpecError(f"trial spec is neither valid YAML nor JSON: {error}") from error
    return build_trials(spec, overrides)


def load_trials(path: str | None, overrides: Mapping[str, Any] | None = None) -> list[TrialSpec]:
    """Reads a trial spec file (local or gs://); without a path, one trial of ``overrides``."""
    if path is None:
        return build_trials(None, overrides)
    import tensorflow as tf  # gfile reads gs:// without Beam; imported lazily to keep parsing cheap.

    with tf.io.gfile.GFile(path) as handle:
        return parse_trials(handle.read(), overrides)
