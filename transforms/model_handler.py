"""The model handler every inference job runs the exported model through.

``ImageModelHandler`` is a Beam ``ModelHandler`` for ``RunInference``: it
loads the exported SavedModel (``schemas.model_artifacts``) once per worker
process through Beam's shared handle, and feeds it batches of *encoded* image
bytes, so decoding and resizing happen inside the model's serving signature,
the same graph training used. Beam's own TensorFlow handlers cannot be used:
they need tensorflow_hub and load through Keras 3, which rejects SavedModel
directories.

Elements are keyed: ``(key, ImageInput)`` in, ``(key, PredictionResult)`` out,
where the result's ``inference`` is a ``ModelOutputs`` holding every signature
output (label, label_index, probabilities, embedding), so prediction and
embedding jobs share the handler. ``PredictImages`` wraps ``RunInference`` with
dead letters: a batch that fails is retried element by element so one bad
image cannot sink its batch-mates.

The retry happens inside the handler's ``run_inference`` (a failed image
comes out as a ``FailedInference`` and is split off right after), not on
``RunInference``'s failed-batch output merged back with a ``Flatten``: Beam
2.77's FnApiRunner never fuses a multi-input Flatten (``sink_flattens``
materializes it), so that merge held every prediction of the run in the
runner's memory, about 5 KiB per image (benchmarks/memory_growth.py).

Batching loses element timestamps: Beam 2.77's ``BatchElements`` emits a
global-window batch at the end of the global window, and its stateful
(``max_batch_duration_secs``) path at whatever flushed the buffer. So an input
that carries its event time (``ImageInput.event_time``, a Pub/Sub message's)
gets it back as its prediction's timestamp after inference, on every path
(batched, retried alone), and event-time windows downstream see each
prediction at its own time.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import threading
import uuid
import weakref
from typing import Any, Iterable, Mapping, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils import multi_process_shared

from schemas import model_artifacts
from schemas.dead_letter import DeadLetter
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from transforms.dead_letters import METRICS_NAMESPACE, dead_letter_from_failure
from transforms.image_inputs import KeyedImage

_LOGGER = logging.getLogger(__name__)

STAGE = "predict"
INFERENCE_FAILED = "inference_failed"
MODEL_LOADS_COUNTER = "model_loads"
RETRIED_BATCHES_COUNTER = "failed_batches_retried"
REQUIRED_OUTPUTS = (
    model_artifacts.OUTPUT_LABEL,
    model_artifacts.OUTPUT_LABEL_INDEX,
    model_artifacts.OUTPUT_PROBABILITIES,
    model_artifacts.OUTPUT_EMBEDDING,
)

DEFAULT_MIN_BATCH_SIZE = 1
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_BATCH_BYTES = 64 * 2**20


KeyedPrediction = tuple[str, PredictionResult]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelOutputs:
    """Every serving-signature output for one image.

    Attributes:
      label: Predicted label text.
      label_index: Position of ``label`` in the model's labels.
      probabilities: float32 [num_classes].
      embedding: float32 [embedding_dim], L2-normalized.
    """

    label: str
    label_index: int
    probabilities: np.ndarray
    embedding: np.ndarray


@dataclasses.dataclass(frozen=True)
class FailedInference:
    """Stands in for ``ModelOutputs`` when an image failed even alone; ``PredictImages`` turns it into its dead letter."""

    dead_letter: DeadLetter


class LoadedImageModel:
    """A loaded SavedModel serving signature, shared by all threads of a process.

    A class (not a dict) so ``shared.Shared`` can hold a weak reference to it;
    only methods are called on it, so it also works behind Beam's
    ``MultiProcessShared`` proxy when the model is shared across processes.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.info = ModelInfo.read(model_dir)
        path = FileSystems.join(model_dir, model_artifacts.SAVED_MODEL_DIR)
        self._saved_model = tf.saved_model.load(path)
        signatures = self._saved_model.signatures
        if model_artifacts.SERVING_SIGNATURE not in signatures:
            raise ValueError(
                f"{path} has no {model_artifacts.SERVING_SIGNATURE!r} signature; it has {sorted(signatures)}"
            )
        self._signature = signatures[model_artifacts.SERVING_SIGNATURE]
        inputs = self._signature.structured_input_signature[1]
        if model_artifacts.IMAGE_BYTES_INPUT not in inputs:
            raise ValueError(
                f"signature {model_artifacts.SERVING_SIGNATURE!r} of {path} takes {sorted(inputs)}, "
                f"not {model_artifacts.IMAGE_BYTES_INPUT!r}"
            )
        missing = [k for k in REQUIRED_OUTPUTS if k not in self._signature.structured_outputs]
        if missing:
            raise ValueError(f"signature {model_artifacts.SERVING_SIGNATURE!r} of {path} lacks outputs {missing}")
        self._lock = threading.Lock()
        self._load_reported = False

    def predict(self, image_bytes: list[bytes]) -> tuple[str, dict[str, np.ndarray]]:
        """Runs the serving signature on a batch of encoded images.

        Returns:
          ``(model_version, outputs)``: the version that predicted (returned
          with the outputs so a model that can switch versions reports the one
          that made them) and each required output as a numpy array whose
          first dimension is the batch.
        """
        outputs = self._signature(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant(image_bytes, dtype=tf.string)})
        return self.info.model_version, {key: outputs[key].numpy() for key in REQUIRED_OUTPUTS}

    def claim_load_report(self) -> bool:
        """True exactly once per load, so the load is counted once in Beam metrics.

        Loads happen in ``DoFn.setup`` where metrics are not attributed to a
        step, so the first batch through the model reports the load instead.
        """
        with self._lock:
            if self._load_reported:
                return False
            self._load_reported = True
            return True


class _EncodedSizeWeight:
    """BatchElements weight of one keyed image, in units of 1/max_batch_size of the byte budget.

    BatchElements bounds a batch by the *sum of weights*, so weighing an image
    ``ceil(bytes / (max_batch_bytes / max_batch_size))`` (at least 1) caps a
    batch at ``max_batch_size`` images and at about ``max_batch_bytes``
    encoded bytes together; an image larger than the budget gets a batch to
    itself.
    """

    def __init__(self, bytes_per_unit: float):
        self._bytes_per_unit = bytes_per_unit

    def __call__(self, element: KeyedImage) -> int:
        return max(1, math.ceil(len(element[1].image_bytes) / self._bytes_per_unit))


class ImageModelHandler(ModelHandler[KeyedImage, KeyedPrediction, LoadedImageModel]):
    """Runs an exported image model on ``(key, ImageInput)`` batches.

    Example:
      handler = ImageModelHandler("gs://bucket/model/best", max_batch_size=32)
      predictions, dead_letters = keyed_images | PredictImages(handler)
    """

    def __init__(
        self,
        model_dir: str,
        *,
        min_batch_size: int = DEFAULT_MIN_BATCH_SIZE,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        large_model: bool = False,
        model_copies: int | None = None,
        max_batch_duration_secs: float = 0,
    ):
        """Reads model_info.json now, so a bad model dir fails before launch.

        Args:
          model_dir: Directory with ``saved_model/`` and ``model_info.json``.
          min_batch_size: Smallest batch (in images of ordinary size).
          max_batch_size: Largest batch in images.
          max_batch_bytes: Largest batch in encoded bytes (approximately).
          large_model: Load one copy per machine, shared by its processes
            (Beam's MultiProcessShared), for models too big for one per process.
          model_copies: Exact number of copies per machine (implies sharing
            across processes).
          max_batch_duration_secs: 0 (the default) batches within a bundle
            and never holds an element back; above 0 (streaming), a batch
            waits up to this long for more elements (Beam's stateful
            batching, one buffer per worker process).

        Raises:
          ValueError: on an invalid batch configuration.
        """
        if min_batch_size < 1:
            raise ValueError(f"min_batch_size must be >= 1. Received `min_batch_size={min_batch_size}`")
        if max_batch_size < min_batch_size:
            raise ValueError(
                f"max_batch_size must be >= min_batch_size. "
                f"Received `max_batch_size={max_batch_size}`, `min_batch_size={min_batch_size}`"
            )
        if max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be >= 1. Received `max_batch_bytes={max_batch_bytes}`")
        if model_copies is not None and model_copies < 1:
            raise ValueError(f"model_copies must be >= 1. Received `model_copies={model_copies}`")
        if max_batch_duration_secs < 0:
            raise ValueError(
                f"max_batch_duration_secs must be >= 0. Received `max_batch_duration_secs={max_batch_duration_secs}`")
        super().__init__(large_model=large_model, model_copies=model_copies)
        self._model_dir = published_dir(model_dir)
        self._info = ModelInfo.read(self._model_dir)
        # One token per handler (per pipeline), pickled to workers with it: the
        # steps of one pipeline share a model copy, separate pipelines don't.
        self._token = uuid.uuid4().hex
        # Passed to BatchElements directly: ModelHandler's own max_batch_weight
        # kwarg is not accepted by BatchElements in Beam 2.77.
        self._batch_kwargs = {
            "min_batch_size": min_batch_size,
            "max_batch_size": max_batch_size,
            "element_size_fn": _EncodedSizeWeight(max_batch_bytes / max_batch_size),
        }
        if max_batch_duration_secs > 0:
            self._batch_kwargs["max_batch_duration_secs"] = max_batch_duration_secs
        self._retry_failed_batches = False

    def retrying_failed_batches(self) -> "ImageModelHandler":
        """This handler (same model copy) whose ``run_inference`` retries a failed batch image by image.

        An image that fails alone comes out as ``(key, PredictionResult)``
        with a ``FailedInference`` instead of raising, so one ``RunInference``
        output holds every image (see the module docstring for why).
        """
        retrying = copy.copy(self)
        retrying._retry_failed_batches = True
        return retrying

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def model_identifier(self) -> str:
        """Tag naming this model in Beam's shared caches: same weights and directory, same copy."""
        digest = hashlib.sha256(self._model_dir.encode("utf-8")).hexdigest()[:12]
        return f"image-model-{self._info.model_version}-{digest}"

    def load_model(self) -> LoadedImageModel:
        """Loads the SavedModel, or returns this pipeline's copy already live in the process."""
        with _LIVE_MODELS_LOCK:
            model = _LIVE_MODELS.get(self._token)
            if model is None:
                _LOGGER.info("Loading model %s (version %s)", self._model_dir, self._info.model_version)
                model = self._new_model()
                _LIVE_MODELS[self._token] = model
            return model

    def _new_model(self) -> LoadedImageModel:
        """The object ``load_model`` shares; a subclass may wrap the loaded model."""
        return LoadedImageModel(self._model_dir)

    def run_inference(
        self,
        batch: Sequence[KeyedImage],
        model: LoadedImageModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[KeyedPrediction]:
        """Predicts a batch; results keep the input order and the keys.

        Raises:
          tf.errors.OpError: when any image in the batch cannot be decoded by
            the model, unless this handler is ``retrying_failed_batches()``.
        """
        if model.claim_load_report():
            Metrics.counter(METRICS_NAMESPACE, MODEL_LOADS_COUNTER).inc()
        if not self._retry_failed_batches:
            return self._predict(batch, model)
        try:
            return self._predict(batch, model)
        except Exception as error:  # Any failure of the batch: each image then gets its own chance.
            Metrics.counter(METRICS_NAMESPACE, RETRIED_BATCHES_COUNTER).inc()
            _LOGGER.warning("Retrying a failed batch of %d images one by one: %s", len(batch), error)
            return [self._predict_alone(element, model) for element in batch]

    def _predict_alone(self, element: KeyedImage, model: LoadedImageModel) -> KeyedPrediction:
        """One image's prediction, or its ``FailedInference`` (stage ``predict``)."""
        try:
            return self._predict([element], model)[0]
        except (tf.errors.OpError, ValueError) as error:
            letter = DeadLetter(input_ref=element[1].input_ref, stage=STAGE, error_type=INFERENCE_FAILED,
                                message=f"{type(error).__name__}: {error}"[:2000])
        except Exception as error:  # Unexpected: described the way with_exception_handling failures are.
            letter = dead_letter_from_failure((element, (type(error), error, None)), STAGE)
        key, image = element
        return key, PredictionResult(dataclasses.replace(image, image_bytes=b""), FailedInference(letter))

    def _predict(self, batch: Sequence[KeyedImage], model: LoadedImageModel) -> list[KeyedPrediction]:
        if not batch:
            return []
        model_version, outputs = model.predict([image.image_bytes for _, image in batch])
        count = len(outputs[model_artifacts.OUTPUT_LABEL])
        if count != len(batch):
            raise ValueError(f"model returned {count} predictions for a batch of {len(batch)}")
        results = []
        for i, (key, image) in enumerate(batch):
            inference = ModelOutputs(
                label=_to_text(outputs[model_artifacts.OUTPUT_LABEL][i]),
                label_index=int(outputs[model_artifacts.OUTPUT_LABEL_INDEX][i]),
                probabilities=np.asarray(outputs[model_artifacts.OUTPUT_PROBABILITIES][i], dtype=np.float32),
                embedding=np.asarray(outputs[model_artifacts.OUTPUT_EMBEDDING][i], dtype=np.float32),
            )
            example = dataclasses.replace(image, image_bytes=b"")
            results.append((key, PredictionResult(example, inference, model_id=model_version)))
        return results

    def get_num_bytes(self, batch: Sequence[KeyedImage]) -> int:
        return sum(len(image.image_bytes) for _, image in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batch_kwargs)

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(f"ImageModelHandler takes no inference_args. Received `inference_args={inference_args}`")


# Models loaded in this process, by handler token: RunInference's DoFn and the
# retry DoFn each hold a Shared handle of their own, and this lets them find
# one copy. Weak values: the Shared handles decide how long a copy lives.
_LIVE_MODELS: "weakref.WeakValueDictionary[str, LoadedImageModel]" = weakref.WeakValueDictionary()
_LIVE_MODELS_LOCK = threading.Lock()


def _to_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _machine_copy(handler: ImageModelHandler) -> LoadedImageModel:
    """The ``MultiProcessShared`` copy of a model shared across processes (loaded by whoever asks first)."""
    # RunInference names the first copy f"{tag}0" (base._get_tags_for_copies).
    return multi_process_shared.MultiProcessShared(
        handler.load_model, tag=f"{handler.model_identifier}0", always_proxy=True).acquire()


def loaded_model(handler: ImageModelHandler) -> LoadedImageModel | None:
    """The copy ``RunInference`` loaded for ``handler`` in this process, or None before it has: never loads one.

    For a step that only looks at the serving model (the pointer check of
    model refresh). Loading from such a step would hold a second Beam
    ``Shared`` token for one model: Beam keeps only the last token acquired in
    a process alive between bundles, so the first copy is dropped and
    RunInference loads the model again (seen on the BundleBasedDirectRunner,
    which runs each bundle on a fresh copy of the DoFn). With a model shared
    across processes there is one copy per machine whoever asks first, so it
    is acquired as ``acquire_model`` does.
    """
    if handler.share_model_across_processes():
        return _machine_copy(handler)
    with _LIVE_MODELS_LOCK:
        return _LIVE_MODELS.get(handler._token)


@beam.typehints.with_output_types(KeyedPrediction, dead_letters=DeadLetter)
class SplitFailedInferencesFn(beam.DoFn):
    """Predictions pass on; an image's ``FailedInference`` leaves as its dead letter."""

    DEAD_LETTERS = "dead_letters"

    def process(self, result: KeyedPrediction) -> Iterable[KeyedPrediction | beam.pvalue.TaggedOutput]:
        inference = result[1].inference
        if isinstance(inference, FailedInference):
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, inference.dead_letter)
        else:
            yield result


@beam.typehints.with_output_types(KeyedPrediction)
class RestoreEventTimeFn(beam.DoFn):
    """Re-emits a prediction at its input's ``event_time`` (see the module docstring); others pass as they are.

    The window is the input's (the batch keeps it); only the timestamp is restored.
    """

    def process(self, result: KeyedPrediction) -> Iterable[KeyedPrediction | TimestampedValue]:
        event_time = result[1].example.event_time
        yield result if event_time is None else TimestampedValue(result, event_time)


class PredictImages(beam.PTransform):
    """``RunInference`` with dead letters and per-element retry of failed batches.

    Input: ``(key, ImageInput)``. Returns ``(predictions, dead_letters)``:
    ``(key, PredictionResult)`` with ``ModelOutputs`` inference, each at its
    input's event time when the input carries one, and ``DeadLetter``s (stage
    ``predict``) for images the model could not take even alone. Every input
    comes out in exactly one of the two.
    """

    def __init__(self, handler: ImageModelHandler):
        super().__init__()
        self._handler = handler

    def expand(self, images: beam.PCollection[KeyedImage]):
        # One output, no Flatten: failed batches are retried inside the handler (module docstring).
        results = images | "RunModel" >> RunInference(
            self._handler.retrying_failed_batches(), model_identifier=self._handler.model_identifier
        )
        split = results | "SplitFailures" >> beam.ParDo(SplitFailedInferencesFn()).with_outputs(
            SplitFailedInferencesFn.DEAD_LETTERS, main="predictions")
        predictions = split.predictions | "RestoreEventTimes" >> beam.ParDo(RestoreEventTimeFn())
        return predictions, split[SplitFailedInferencesFn.DEAD_LETTERS]
