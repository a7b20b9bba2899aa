"""The tf.Transform ``preprocessing_fn``: analyzed on the train split by create_dataset.

It is pure TF (no Beam, no I/O). create_dataset analyzes it over the train
split and writes ``transform_fn/``; training input and every serving signature
apply that same graph through ``TFTransformOutput.transform_features_layer()``,
so the pixel statistics used at serving are exactly those seen in training.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf
import tensorflow_transform as tft

from model_lib.image_ops import ResizeMethod, decode_and_resize_batch
from schemas import dataset

# Transformed feature keys.
PIXELS = "pixels"  # float32 [B, S, S, C], standardized per channel with train-split stats.
LABEL_VOCAB_INDEX = "label_vocab_index"  # int64 [B]: index in the train-split frequency vocabulary.

# The vocabulary file under transform_fn/assets/: the train split's labels,
# most frequent first. Training targets use labels.txt order (the record's
# label_index); this vocabulary documents what the train split contained.
LABEL_VOCABULARY = "label_vocabulary"
_MIN_STD = 1e-3


def make_preprocessing_fn(
    image_size: int, channels: int, resize_method: ResizeMethod = "stretch"
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Builds the preprocessing_fn for images of one size and channel count.

    Args:
      image_size: Side of the square images the dataset stores.
      channels: 1 or 3.
      resize_method: How raw serving images of another size are fitted.

    Returns:
      A function from raw features {image: [B] bytes, label: [B] string} to
      {pixels, label_vocab_index}. ``label`` may be absent at serving time;
      tf.Transform prunes the branch that needs it.
    """

    def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        pixels = decode_and_resize_batch(inputs[dataset.IMAGE], image_size, channels, resize_method)
        per_pixel = tf.reshape(pixels, [-1, channels])
        mean = tft.mean(per_pixel, reduce_instance_dims=False)
        std = tf.sqrt(tft.var(per_pixel, reduce_instance_dims=False))
        standardized = (pixels - mean) / tf.maximum(std, _MIN_STD)
        label_index = tft.compute_and_apply_vocabulary(
            inputs[dataset.LABEL], vocab_filename=LABEL_VOCABULARY
        )
        return {PIXELS: standardized, LABEL_VOCAB_INDEX: label_index}

    return preprocessing_fn


def raw_feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    """The raw features the transform reads, taken from the dataset record schema."""
    spec = dataset.DATASET_RECORD.feature_spec()
    return {key: spec[key] for key in dataset.TRANSFORM_INPUT_KEYS}
