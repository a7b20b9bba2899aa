"""Embedding rows from model results: the one function extract_embeddings and image search share.

``embedding_row`` turns a ``(key, PredictionResult)`` of
``transforms.model_handler`` into a ``schemas.embedding.EMBEDDING_RECORD``
row. extract_embeddings runs it on every image through ``ExtractEmbeddings``;
``QueryEmbedder`` runs a search query image through the same handler
(``ImageModelHandler.run_inference``, the exported SavedModel's serving
signature) and the same ``embedding_row``, so a query vector is computed
exactly as the indexed vectors were.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
from typing import Any, Iterable

import apache_beam as beam
import numpy as np

from schemas import counters
from schemas import embedding as embedding_schema
from transforms import images
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput
from transforms.image_inputs import ImageInput, keyed_image
from transforms.model_handler import ImageModelHandler, KeyedPrediction, LoadedImageModel, ModelOutputs, PredictImages

EMBEDDED_COUNTER = counters.EMBEDDED


def embedding_row(
    result: KeyedPrediction, *, model_version: str, embedding_dim: int, created_at: datetime.datetime
) -> dict[str, Any]:
    """An ``EMBEDDING_RECORD`` row from a keyed model result.

    Raises:
      ValueError: The model's embedding does not have model_info.json's
        dimension (the export contract is broken; no row could be right).
    """
    _, prediction = result
    image: ImageInput = prediction.example
    outputs: ModelOutputs = prediction.inference
    vector = np.asarray(outputs.embedding, dtype=np.float32).reshape(-1)
    if vector.shape[0] != embedding_dim:
        raise ValueError(
            f"model {model_version} returned a {vector.shape[0]}-dim embedding for {image.uri}; "
            f"model_info.json declares embedding_dim={embedding_dim}"
        )
    schema = embedding_schema
    return {
        schema.IMAGE_ID: image.image_id,
        schema.URI: image.uri,
        schema.LABEL: image.label,
        schema.SPLIT: image.split,
        schema.EMBEDDING: [float(v) for v in vector],
        schema.MODEL_VERSION: model_version,
        schema.CREATED_AT: created_at,
    }


class FormatEmbeddingFn(beam.DoFn):
    """``(key, PredictionResult)`` -> an embedding row, counted as embedded."""

    def __init__(self, model_version: str, embedding_dim: int, created_at: datetime.datetime):
        self._model_version = model_version
        self._embedding_dim = embedding_dim
        self._created_at = created_at

    def setup(self) -> None:
        self._embedded = beam.metrics.Metrics.counter(METRICS_NAMESPACE, EMBEDDED_COUNTER)

    def process(self, result: KeyedPrediction) -> Iterable[dict[str, Any]]:
        self._embedded.inc()
        yield embedding_row(result, model_version=self._model_version, embedding_dim=self._embedding_dim,
                            created_at=self._created_at)


class ExtractEmbeddings(beam.PTransform):
    """``(image_id, ImageInput)`` in, embedding rows and dead letters out.

    Every row of one run carries the same ``created_at`` (when the pipeline
    was built), so a run is one point in time in the warehouse.
    """

    def __init__(self, handler: ImageModelHandler, created_at: datetime.datetime | None = None):
        super().__init__()
        self._handler = handler
        self._created_at = created_at or datetime.datetime.now(datetime.timezone.utc)

    def expand(self, keyed_images: beam.PCollection):
        predictions, dead_letters = keyed_images | "PredictImages" >> PredictImages(self._handler)
        info = self._handler.model_info
        rows = predictions | "FormatEmbeddings" >> beam.ParDo(
            FormatEmbeddingFn(info.model_version, info.embedding_dim, self._created_at)
        )
        return rows, dead_letters


class InvalidQueryImage(ValueError):
    """A query image that cannot be embedded; ``reason`` is ``transforms.images``' code (not_an_image, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class QueryEmbedder:
    """Embeds search query images with an exported model, the way extract_embeddings embeds every image.

    The model is loaded once and shared by the threads of a process (a search
    service answers many queries); the image is validated like any input
    (``keyed_image``: format allowlist, pixel limit) before it reaches the model.
    """

    def __init__(self, model_dir: str):
        self._handler = ImageModelHandler(model_dir)
        self._model: LoadedImageModel | None = None
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self._handler.model_info.model_version

    def embed(self, image_bytes: bytes) -> tuple[np.ndarray, str]:
        """``(vector, model_version)`` of one encoded image.

        Raises:
          InvalidQueryImage: Empty, not an image, an unsupported format, corrupt or too many pixels.
        """
        info = self._handler.model_info
        max_pixels = info.serving_max_pixels or images.ImageSpec.max_pixels
        digest = hashlib.sha256(image_bytes).hexdigest()
        try:
            keyed = keyed_image(f"query-{digest[:16]}", f"query:{digest[:16]}", image_bytes, max_pixels)
        except RejectedInput as error:
            raise InvalidQueryImage(error.error_type, str(error)) from error
        with self._lock:
            if self._model is None:
                self._model = self._handler.load_model()
            model = self._model
        result = list(self._handler.run_inference([keyed], model))[0]
        row = embedding_row(result, model_version=result[1].model_id, embedding_dim=info.embedding_dim,
                            created_at=datetime.datetime.now(datetime.timezone.utc))
        return np.asarray(row[embedding_schema.EMBEDDING], dtype=np.float32), row[embedding_schema.MODEL_VERSION]
