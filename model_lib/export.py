"""Exporting a trained model: SavedModel with serving signatures, model.keras, model_info.json.

The SavedModel is a ``tf.Module`` holding the Keras 3 model and the dataset's
``TFTransformOutput.transform_features_layer()`` as attributes, with one
``tf.function`` per signature (see ``schemas.model_artifacts``). A client
sends encoded image bytes (``serving_default``) or file URIs (``from_uris``);
the signature decodes and resizes them exactly as create_dataset's
preprocessing_fn does, standardizes with the train-split statistics, and
returns label, label index, probabilities and the L2-normalized embedding.
(Keras 3 cannot export a SavedModel containing the tf.Transform layer itself,
and cannot load SavedModel directories; inference jobs load this with
``tf.saved_model.load``.)

Serving is exposed to whoever can reach a TF Serving endpoint, so both
signatures are guarded inside the graph:

- ``from_uris`` makes the server read files, so it is exported only when an
  allowlisted ``serving_uri_prefix`` is given, and refuses any URI outside
  it or with a ``..`` segment before reading anything;
- every image's header-declared pixel count is checked against
  ``serving_max_pixels`` before decoding (``image_ops.limit_pixels``).

Both choices are recorded in model_info.json.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from model_lib import image_ops, preprocessing
from schemas import dataset, model_artifacts
from schemas.model_artifacts import ModelInfo

_LOGGER = logging.getLogger(__name__)

# The same default as the jobs' --max_pixels (transforms.images.ImageSpec.max_pixels).
DEFAULT_SERVING_MAX_PIXELS = 50_000_000
_GCS_SCHEME = "gs://"
# A ``..`` path segment anywhere, or a NUL byte (a C path would end there).
_ESCAPING_URI = r"(?s)(.*/)?\.\.(/.*)?|.*\x00.*"


def validate_serving_options(uri_prefix: str | None, max_pixels: int) -> None:
    """Checks the export-time serving guards; the error quotes the bad value.

    Args:
      uri_prefix: None (no ``from_uris`` signature) or the one directory tree
        ``from_uris`` may read: an absolute local path or a gs:// URI with at
        least one segment (a directory or a bucket), ending with ``/`` (so
        ``/data/images`` cannot also admit ``/data/images2``) and normalized
        (no ``.``, ``..`` or empty segments), since URIs are compared with it
        as strings.
      max_pixels: The decoded-pixel limit per image, >= 1.

    Raises:
      ValueError: naming the option.
    """
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"serving_max_pixels must be an int >= 1. Received `serving_max_pixels={max_pixels!r}`")
    if uri_prefix is None:
        return
    path = None
    if isinstance(uri_prefix, str) and uri_prefix.endswith("/") and "\0" not in uri_prefix:
        if uri_prefix.startswith(_GCS_SCHEME):
            path = uri_prefix[len(_GCS_SCHEME):-1]
        elif uri_prefix.startswith("/"):
            path = uri_prefix[1:-1]
    if path is None or any(segment in ("", ".", "..") for segment in path.split("/")):
        raise ValueError(
            "serving_uri_prefix must be an absolute path or gs:// URI ending with '/', without '.', '..' or empty "
            f"segments. Received `serving_uri_prefix={uri_prefix!r}`"
        )


def model_version(model: keras.Model) -> str:
    """A hash of the model's weights (names, shapes and values) in layer order.

    Two exports of the same weights get the same version; any change of a
    weight changes it. 16 hex digits (64 bits) keep it short in every row.
    """
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(np.asarray(variable))
        digest.update(variable.path.encode("utf-8"))
        digest.update(str(value.dtype).encode("ascii"))
        digest.update(str(value.shape).encode("ascii"))
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


class ServingModule(tf.Module):
    """Raw image bytes (or, opt-in, URIs under one prefix) in; label / index / probabilities / embedding out.

    Args:
      model: The trained Keras model.
      transform_output: The dataset's tf.Transform output.
      labels: Class names in ``label_index`` order.
      max_pixels: Images declaring more pixels are refused before decoding.
      uri_prefix: When set, the module also has ``serve_uris``, which reads
        only URIs under this prefix; when None it has no way to read files.
    """

    def __init__(
        self,
        model: keras.Model,
        transform_output: tft.TFTransformOutput,
        labels: list[str],
        *,
        max_pixels: int = DEFAULT_SERVING_MAX_PIXELS,
        uri_prefix: str | None = None,
    ):
        super().__init__(name="vision_pipelines_serving")
        validate_serving_options(uri_prefix, max_pixels)
        self.model = model
        # Shares the model's weights; adds the embedding layer as a second output.
        self.outputs_model = keras.Model(
            model.inputs,
            {
                model_artifacts.OUTPUT_PROBABILITIES: model.output,
                model_artifacts.OUTPUT_EMBEDDING: model.get_layer(model_artifacts.EMBEDDING_LAYER_NAME).output,
            },
            name=f"{model.name}_serving",
        )
        # Keras 3 keeps augmentation seed states outside the weights the tf.Module
        # tracks; listing every variable makes the traced functions savable.
        self.keras_variables = list(model.variables)
        self.transform_layer = transform_output.transform_features_layer()
        self.labels = tf.Variable(labels, dtype=tf.string, trainable=False, name="labels")
        self._max_pixels = max_pixels
        self._uri_prefix = uri_prefix
        if uri_prefix is not None:
            # Only then is a file-reading function traced and saved at all.
            self.serve_uris = tf.function(
                self._serve_uris, input_signature=[tf.TensorSpec([None], tf.string, name=model_artifacts.URIS_INPUT)]
            )

    def _predict(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        image_bytes = image_ops.limit_pixels(image_bytes, self._max_pixels)
        pixels = self.transform_layer({dataset.IMAGE: image_bytes})[preprocessing.PIXELS]
        outputs = self.outputs_model(pixels, training=False)
        probabilities = tf.cast(outputs[model_artifacts.OUTPUT_PROBABILITIES], tf.float32)
        label_index = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        embedding = tf.math.l2_normalize(tf.cast(outputs[model_artifacts.OUTPUT_EMBEDDING], tf.float32), axis=1)
        return {
            model_artifacts.OUTPUT_LABEL: tf.gather(self.labels, label_index),
            model_artifacts.OUTPUT_LABEL_INDEX: label_index,
            model_artifacts.OUTPUT_PROBABILITIES: probabilities,
            model_artifacts.OUTPUT_EMBEDDING: embedding,
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=model_artifacts.IMAGE_BYTES_INPUT)])
    def serve_image_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._predict(image_bytes)

    def _serve_uris(self, uris: tf.Tensor) -> dict[str, tf.Tensor]:
        prefix = self._uri_prefix
        inside = tf.equal(tf.strings.substr(uris, 0, len(prefix.encode("utf-8"))), prefix)
        allowed = tf.logical_and(inside, tf.logical_not(tf.strings.regex_full_match(uris, _ESCAPING_URI)))
        check = tf.debugging.Assert(
            tf.reduce_all(allowed),
            [
                f"from_uris reads only URIs under serving_uri_prefix={prefix!r} without '..' segments; refused:",
                tf.boolean_mask(uris, tf.logical_not(allowed)),
            ],
            summarize=16,
        )
        with tf.control_dependencies([check]):
            uris = tf.identity(uris)
        image_bytes = tf.map_fn(tf.io.read_file, uris, fn_output_signature=tf.TensorSpec([], tf.string))
        return self._predict(image_bytes)


def export_model(
    model: keras.Model,
    *,
    model_dir: str,
    transform_output: tft.TFTransformOutput,
    labels: list[str],
    architecture: str,
    image_size: int,
    channels: int,
    dataset_fingerprint: str,
    hyperparameters: dict[str, Any],
    serving_uri_prefix: str | None = None,
    serving_max_pixels: int = DEFAULT_SERVING_MAX_PIXELS,
) -> ModelInfo:
    """Writes ``saved_model/``, ``model.keras`` and ``model_info.json`` into ``model_dir``.

    Args:
      model: The trained Keras model (pixels -> probabilities).
      model_dir: Output directory (local or gs://); created if missing.
      transform_output: The dataset's tf.Transform output, embedded in the SavedModel.
      labels: Class names in ``label_index`` order (labels.txt).
      architecture: Builder name, recorded in model_info.json.
      image_size: Model input side.
      channels: Model input channels.
      dataset_fingerprint: create_dataset's fingerprint of the training data.
      hyperparameters: Recorded in model_info.json.
      serving_uri_prefix: Exports the ``from_uris`` signature, reading only
        URIs under this prefix (see ``validate_serving_options``); None (the
        default) exports no file-reading signature.
      serving_max_pixels: Per-image decoded-pixel limit of both signatures.

    Returns:
      The ``ModelInfo`` written.

    Raises:
      ValueError: an invalid serving option, before anything is written.
    """
    module = ServingModule(
        model, transform_output, labels, max_pixels=serving_max_pixels, uri_prefix=serving_uri_prefix
    )
    signatures = {model_artifacts.SERVING_SIGNATURE: module.serve_image_bytes}
    if serving_uri_prefix is not None:
        signatures[model_artifacts.FROM_URIS_SIGNATURE] = module.serve_uris
    tf.io.gfile.makedirs(model_dir)
    tf.saved_model.save(module, tf.io.gfile.join(model_dir, model_artifacts.SAVED_MODEL_DIR), signatures=signatures)
    model.save(tf.io.gfile.join(model_dir, model_artifacts.KERAS_MODEL_FILE))
    info = ModelInfo(
        architecture=architecture,
        image_size=int(image_size),
        channels=int(channels),
        labels=list(labels),
        embedding_dim=int(model.get_layer(model_artifacts.EMBEDDING_LAYER_NAME).output.shape[-1]),
        model_version=model_version(model),
        dataset_fingerprint=dataset_fingerprint,
        hyperparameters=hyperparameters,
        serving_uri_prefix=serving_uri_prefix,
        serving_max_pixels=serving_max_pixels,
    )
    info.write(model_dir)
    _LOGGER.info("exported model %s (version %s) to %s", architecture, info.model_version, model_dir)
    return info


def copy_model_dir(source: str, destination: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Recursively copies a model directory (local or gs://), replacing ``destination``.

    Used to publish the best trial as ``OUTPUT/best``.

    Args:
      source: The model directory.
      destination: Where the copy goes; removed first if it exists.
      exclude: Top-level entries of ``source`` not copied (e.g. checkpoints).
    """
    if tf.io.gfile.exists(destination):
        tf.io.gfile.rmtree(destination)
    source = source.rstrip("/")
    for directory, _, files in tf.io.gfile.walk(source):
        relative = directory[len(source):].lstrip("/")
        if relative.split("/")[0] in exclude:
            continue
        target_dir = tf.io.gfile.join(destination, relative) if relative else destination
        tf.io.gfile.makedirs(target_dir)
        for name in files:
            if not relative and name in exclude:
                continue
            tf.io.gfile.copy(tf.io.gfile.join(directory, name), tf.io.gfile.join(target_dir, name), overwrite=True)
