"""The exported-model contract shared by train (writer) and every inference job (readers).

A model directory (``train``'s ``OUTPUT/best`` or ``OUTPUT/trials/<id>``) holds:

- ``saved_model/``: a TF SavedModel whose signatures take raw encoded image
  bytes (or, only when exported with an allowlisted prefix, URIs) and run the
  same decode/resize and tf.Transform graph as training;
- ``model.keras``: the Keras model (without the tf.Transform layer);
- ``model_info.json``: the fields of ``ModelInfo`` below;
- ``metrics.json`` and PNG plots from evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from apache_beam.io.filesystems import FileSystems

from schemas.publication import write_file_atomically

SAVED_MODEL_DIR = "saved_model"
KERAS_MODEL_FILE = "model.keras"
MODEL_INFO_FILE = "model_info.json"
METRICS_FILE = "metrics.json"
TRIALS_DIR = "trials"
BEST_DIR = "best"
TRIALS_LEADERBOARD_FILE = "trials.json"

# Serving signatures.
SERVING_SIGNATURE = "serving_default"  # input IMAGE_BYTES_INPUT: tf.string [batch]
FROM_URIS_SIGNATURE = "from_uris"  # input URIS_INPUT: tf.string [batch]; opt-in, see ModelInfo
IMAGE_BYTES_INPUT = "image_bytes"
URIS_INPUT = "uris"

# Signature outputs.
OUTPUT_LABEL = "label"  # tf.string [batch]
OUTPUT_LABEL_INDEX = "label_index"  # tf.int64 [batch]
OUTPUT_PROBABILITIES = "probabilities"  # tf.float32 [batch, num_classes]
OUTPUT_EMBEDDING = "embedding"  # tf.float32 [batch, embedding_dim], L2-normalized

EMBEDDING_LAYER_NAME = "embedding"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What an inference job needs to know about an exported model.

    ``model_version`` is a hash of the weights, so two exports of the same
    weights share it and any retraining changes it; it travels with every
    prediction, embedding row and index built from the model.

    ``serving_uri_prefix`` is None when the SavedModel has no
    ``FROM_URIS_SIGNATURE`` (the default); otherwise that signature reads only
    URIs under it. ``serving_max_pixels`` is the per-image decoded-pixel limit
    both signatures enforce before decoding; None in files written before the
    limit existed (their signatures have none).
    """

    architecture: str
    image_size: int
    channels: int
    labels: list[str]
    embedding_dim: int
    model_version: str
    dataset_fingerprint: str
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    serving_uri_prefix: str | None = None
    serving_max_pixels: int | None = None

    @property
    def has_from_uris(self) -> bool:
        return self.serving_uri_prefix is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, model_dir: str) -> "ModelInfo":
        with FileSystems.open(FileSystems.join(model_dir, MODEL_INFO_FILE)) as handle:
            return cls.from_json(handle.read().decode("utf-8"))

    def write(self, model_dir: str) -> None:
        """Writes ``model_dir/model_info.json`` whole or not at all."""
        write_file_atomically(FileSystems.join(model_dir, MODEL_INFO_FILE), self.to_json().encode("utf-8"))
