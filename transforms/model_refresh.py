"""Switching a running streaming job to a newly published model, without a restart, on every runner.

train publishes its best model as ``MODEL_DIR/CURRENT`` naming a complete
``MODEL_DIR/run-*/`` export (``schemas.publication``). A streaming job keeps
serving from the export the pointer named at launch and, at most every
``refresh_secs`` per worker process, reads the pointer again. A new target is
loaded *first*, beside the serving copy, and checked (signature, outputs,
same labels, and one probe image through the serving signature); only then is
the serving reference swapped, in one assignment, so every batch runs wholly
on one version and its results carry that version's ``model_version``. A
target that fails the check is refused: the old version keeps serving, one
alert per worker process goes to the dead-letter output, and the same target
is not retried until the pointer moves again.

Why not Beam's own mechanisms: RunInference's ``model_metadata_pcoll`` side
input fed from a Pub/Sub control topic gives no output at all on the
BundleBasedDirectRunner (the side input's global window never closes), and
Beam 2.77's file-pattern watcher (``WatchFilePattern``) fails on the local
runners. A pointer read from inside the pipeline works the same everywhere.

The check runs in ``WatchModelPointerFn``, a pass-through step before
``PredictImages``: it looks up the model object ``RunInference`` loaded in the
process (``model_handler.loaded_model``) and never loads one itself, so the
job loads one copy at start and the alert is an ordinary Beam output.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from typing import Callable, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from PIL import Image

from schemas import model_artifacts
from schemas.dead_letter import DeadLetter
from schemas.publication import published_dir
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.image_inputs import KeyedImage
from transforms.model_handler import ImageModelHandler, LoadedImageModel, loaded_model

_LOGGER = logging.getLogger(__name__)

STAGE = "model_refresh"
MODEL_REFUSED = "model_version_refused"
SWITCHES_COUNTER = "model_switches"
REFUSALS_COUNTER = "model_refusals"
ALERTS = "alerts"


def _probe_image() -> bytes:
    """A small valid PNG: a new export must predict it before it may serve."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def check_candidate(model: LoadedImageModel, labels: list[str]) -> None:
    """Refuses an export that cannot serve in place of one with ``labels``.

    Raises:
      ValueError: The labels differ (outputs would change meaning mid-stream),
        or the probe image does not give one finite probability per label.
    """
    if list(model.info.labels) != list(labels):
        raise ValueError(f"labels {model.info.labels} differ from the serving model's {labels}")
    _, outputs = model.predict([_probe_image()])
    probabilities = outputs[model_artifacts.OUTPUT_PROBABILITIES]
    if probabilities.shape != (1, len(labels)) or not np.all(np.isfinite(probabilities)):
        raise ValueError(f"probe prediction has probabilities of shape {probabilities.shape} "
                         f"(want (1, {len(labels)})) or non-finite values")


@dataclasses.dataclass(frozen=True)
class RefreshOutcome:
    """What one pointer check did: switched from ``previous`` to ``target``, or refused ``target``."""

    target: str
    previous_version: str
    new_version: str | None
    error: str | None

    @property
    def switched(self) -> bool:
        return self.error is None


class SwitchableImageModel:
    """The serving model of a streaming job: one ``LoadedImageModel`` at a time, swapped atomically.

    Methods only (no attribute access from outside), so it also works behind
    Beam's ``MultiProcessShared`` proxy. Weak-referenceable, as ``Shared`` needs.
    """

    def __init__(self, watched_dir: str, refresh_secs: float, clock: Callable[[], float] = time.monotonic):
        self._watched_dir = watched_dir
        self._refresh_secs = refresh_secs
        self._clock = clock
        self._serving = LoadedImageModel(published_dir(watched_dir))
        self._labels = list(self._serving.info.labels)
        self._refused: set[str] = set()
        self._next_check = clock() + refresh_secs
        self._check_lock = threading.Lock()  # One check (and candidate load) at a time per process.

    def predict(self, image_bytes: list[bytes]) -> tuple[str, dict[str, np.ndarray]]:
        serving = self._serving  # Read once: the whole batch runs on one version.
        return serving.predict(image_bytes)

    def claim_load_report(self) -> bool:
        return self._serving.claim_load_report()

    def serving_version(self) -> str:
        return self._serving.info.model_version

    def check_pointer(self) -> RefreshOutcome | None:
        """Reads the pointer if ``refresh_secs`` have passed; switches to a new good target.

        Returns:
          None when it was not time, the pointer is unchanged, or names a
          target refused before; otherwise what happened.
        """
        if self._clock() < self._next_check or not self._check_lock.acquire(blocking=False):
            return None
        try:
            self._next_check = self._clock() + self._refresh_secs
            return self._check_now()
        finally:
            self._check_lock.release()

    def _check_now(self) -> RefreshOutcome | None:
        previous = self._serving
        try:
            target = published_dir(self._watched_dir)
        except (ValueError, OSError) as error:  # A pointer that names nothing readable.
            target = f"{self._watched_dir} (pointer)"
            if target in self._refused:
                return None
            self._refused.add(target)
            return RefreshOutcome(target, previous.info.model_version, None, f"{type(error).__name__}: {error}")
        if target == previous.model_dir or target in self._refused:
            return None
        try:
            candidate = LoadedImageModel(target)
            check_candidate(candidate, self._labels)
        except Exception as error:  # Any failure to load or probe refuses the version; serving goes on.
            self._refused.add(target)
            _LOGGER.error("Refusing model %s: %s", target, error)
            return RefreshOutcome(target, previous.info.model_version, None, f"{type(error).__name__}: {error}"[:2000])
        self._serving = candidate
        _LOGGER.info("Switched model %s -> %s (%s)", previous.info.model_version, candidate.info.model_version, target)
        return RefreshOutcome(target, previous.info.model_version, candidate.info.model_version, None)


class RefreshingImageModelHandler(ImageModelHandler):
    """An ``ImageModelHandler`` whose shared model follows ``watched_dir``'s pointer.

    Args:
      watched_dir: The model directory whose ``CURRENT`` names the export to serve.
      refresh_secs: Least time between two pointer reads in a process.
      **kwargs: As ``ImageModelHandler``.
    """

    def __init__(self, watched_dir: str, *, refresh_secs: float, **kwargs):
        if refresh_secs <= 0:
            raise ValueError(f"refresh_secs must be > 0. Received `refresh_secs={refresh_secs}`")
        super().__init__(watched_dir, **kwargs)
        self._watched_dir = watched_dir.rstrip("/")
        self._refresh_secs = refresh_secs

    def _new_model(self) -> SwitchableImageModel:
        return SwitchableImageModel(self._watched_dir, self._refresh_secs)


@beam.typehints.with_output_types(KeyedImage, alerts=DeadLetter)
class WatchModelPointerFn(beam.DoFn):
    """Passes images through unchanged; checks the model pointer on the way (at most every refresh_secs).

    A refused version becomes one ``DeadLetter`` (stage ``model_refresh``,
    error_type ``model_version_refused``) on the ``alerts`` output.
    """

    def __init__(self, handler: RefreshingImageModelHandler):
        self._handler = handler

    def setup(self) -> None:
        self._model: SwitchableImageModel | None = None
        self._switches = Metrics.counter(METRICS_NAMESPACE, SWITCHES_COUNTER)
        self._refusals = Metrics.counter(METRICS_NAMESPACE, REFUSALS_COUNTER)

    def process(self, element: KeyedImage) -> Iterable[KeyedImage | beam.pvalue.TaggedOutput]:
        if self._model is None:  # Until RunInference has loaded it in this process, nothing to check.
            self._model = loaded_model(self._handler)
        outcome = self._model.check_pointer() if self._model is not None else None
        if outcome is not None:
            if outcome.switched:
                self._switches.inc()
            else:
                self._refusals.inc()
                yield beam.pvalue.TaggedOutput(ALERTS, DeadLetter(
                    input_ref=outcome.target,
                    stage=STAGE,
                    error_type=MODEL_REFUSED,
                    message=f"kept serving {outcome.previous_version}: {outcome.error}",
                ))
        yield element
