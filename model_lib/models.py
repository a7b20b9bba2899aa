"""Keras model builders: a small CNN trained from scratch and transfer-learning models.

Every builder takes keyword hyperparameters, validates them (quoting the bad
value), and returns a ``keras.Model`` whose input is the tf.Transform output
``pixels`` (float32 ``[S, S, C]``, standardized per channel) and whose output
is class probabilities. Each model has a Dense layer named
``schemas.model_artifacts.EMBEDDING_LAYER_NAME`` that gives the penultimate
representation; export L2-normalizes it for the embedding and index jobs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import keras
from keras import layers

from schemas.model_artifacts import EMBEDDING_LAYER_NAME

SMALL_CNN = "small_cnn"
MOBILENET_V2 = "mobilenet_v2"
EFFICIENTNET_B0 = "efficientnet_b0"
RESNET50 = "resnet50"
BACKBONE_LAYER_NAME = "backbone"
OUTPUT_LAYER_NAME = "probabilities"

# ImageNet RGB pixel statistics on the 0..255 scale: the transfer models map
# the dataset-standardized pixels onto them before the backbone's own
# preprocess_input, so pretrained weights see inputs in their usual range.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
_MIN_BACKBONE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class _Backbone:
    constructor: Callable[..., keras.Model]
    preprocess_input: Callable[[Any], Any]


def _backbones() -> dict[str, _Backbone]:
    apps = keras.applications
    return {
        MOBILENET_V2: _Backbone(apps.MobileNetV2, apps.mobilenet_v2.preprocess_input),
        EFFICIENTNET_B0: _Backbone(apps.EfficientNetB0, apps.efficientnet.preprocess_input),
        RESNET50: _Backbone(apps.ResNet50, apps.resnet50.preprocess_input),
    }


BACKBONES: tuple[str, ...] = (MOBILENET_V2, EFFICIENTNET_B0, RESNET50)
ARCHITECTURES: tuple[str, ...] = (SMALL_CNN, *BACKBONES)


@keras.saving.register_keras_serializable(package="vision_pipelines")
class BackbonePreprocess(layers.Layer):
    """Maps standardized pixels to the input a ``keras.applications`` backbone expects.

    The pixels are re-scaled to ImageNet's 0..255 RGB statistics, then passed
    through the backbone's own ``preprocess_input`` (``[-1, 1]`` for
    MobileNetV2, caffe BGR mean subtraction for ResNet50, identity for
    EfficientNet, which rescales inside the network).
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}. Received `backbone={backbone!r}`")
        self.backbone = backbone
        self._preprocess = _backbones()[backbone].preprocess_input

    def call(self, pixels):
        rgb = pixels * keras.ops.convert_to_tensor(IMAGENET_STD) + keras.ops.convert_to_tensor(IMAGENET_MEAN)
        return self._preprocess(rgb)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


def _check_input_shape(input_shape: Sequence[int], min_size: int = 8) -> tuple[int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if (
        len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[0] < min_size
        or shape[1] < min_size
        or shape[2] not in (1, 3)
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels) with sides >= {min_size} and 1 or 3 channels. "
            f"Received `input_shape={input_shape!r}`"
        )
    return shape  # type: ignore[return-value]


def _check_common(num_classes: int, embedding_dim: int, dropout: float) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2. Received `num_classes={num_classes!r}`")
    if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 2:
        raise ValueError(f"embedding_dim must be an int >= 2. Received `embedding_dim={embedding_dim!r}`")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1). Received `dropout={dropout!r}`")


def _head(features, *, num_classes: int, embedding_dim: int, dropout: float):
    """Embedding + classifier shared by every architecture."""
    embedding = layers.Dense(embedding_dim, activation="relu", name=EMBEDDING_LAYER_NAME)(features)
    x = layers.Dropout(dropout, name="head_dropout")(embedding) if dropout else embedding
    return layers.Dense(num_classes, activation="softmax", name=OUTPUT_LAYER_NAME)(x)


def _conv_block(x, filters: int, block_id: int):
    for conv_id in (1, 2):
        prefix = f"block{block_id}_conv{conv_id}"
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=prefix)(x)
        # Momentum 0.9 (not 0.99): with tens of steps per epoch on small datasets
        # the moving statistics must settle within an epoch or validation lags.
        x = layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn")(x)
        x = layers.ReLU(name=f"{prefix}_relu")(x)
    return x


def build_small_cnn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    filters: Sequence[int] = (32, 64, 128),
    embedding_dim: int = 128,
    dropout: float = 0.3,
    augmentation: keras.layers.Layer | None = None,
    name: str = SMALL_CNN,
) -> keras.Model:
    """A VGG-style CNN that trains from scratch in minutes on a CPU.

    Each entry of ``filters`` is a block of two 3x3 conv + BN + ReLU layers;
    blocks are separated by 2x2 max pooling and the last one is globally
    average-pooled into the embedding head.

    Args:
      input_shape: ``(height, width, channels)`` of the standardized pixels.
      num_classes: Number of labels (>= 2).
      filters: Conv filters per block; the image side must survive
        ``len(filters) - 1`` halvings.
      embedding_dim: Width of the ``embedding`` layer.
      dropout: Dropout rate before the classifier.
      augmentation: Optional augmentation block (active only in training).
      name: Model name.

    Returns:
      An uncompiled model from pixels to probabilities.

    Raises:
      ValueError: on any invalid hyperparameter, naming it and its value.
    """
    shape = _check_input_shape(input_shape)
    _check_common(num_classes, embedding_dim, dropout)
    if (
        not isinstance(filters, (list, tuple))
        or not filters
        or not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters)
    ):
        raise ValueError(f"filters must be a non-empty list of positive ints. Received `filters={filters!r}`")
    if min(shape[0], shape[1]) // 2 ** (len(filters) - 1) < 1:
        raise ValueError(
            f"{len(filters)} conv blocks pool a {shape[0]}x{shape[1]} input below 1 pixel. "
            f"Received `filters={filters!r}`"
        )
    inputs = keras.Input(shape=shape, name="pixels")
    x = augmentation(inputs) if augmentation is not None else inputs
    for block_id, block_filters in enumerate(filters, start=1):
        if block_id > 1:
            x = layers.MaxPooling2D(2, name=f"block{block_id}_pool")(x)
        x = _conv_block(x, block_filters, block_id)
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    outputs = _head(x, num_classes=num_classes, embedding_dim=embedding_dim, dropout=dropout)
    return keras.Model(inputs, outputs, name=name)


def _check_weights(weights: str) -> str | None:
    """'none' -> None, 'imagenet' stays, anything else must be an existing weights file."""
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"weights must be 'none', 'imagenet' or a weights file path. Received `weights={weights!r}`")
    if weights.lower() == "none":
        return None
    if weights == "imagenet":
        return weights
    if not weights.endswith(".h5"):
        raise ValueError(f"a weights file must be a Keras .h5 / .weights.h5 file. Received `weights={weights!r}`")
    if not os.path.isfile(weights):
        raise ValueError(f"weights file does not exist. Received `weights={weights!r}`")
    return weights


def is_pretrained(weights: str) -> bool:
    """Whether ``weights`` names pretrained weights (``imagenet`` or a file) rather than ``none``."""
    return isinstance(weights, str) and weights.lower() != "none"


def build_backbone(
    backbone: str, *, input_shape: Sequence[int], weights: str = "none"
) -> keras.Model:
    """A headless ``keras.applications`` network with global average pooling.

    Args:
      backbone: One of ``BACKBONES``.
      input_shape: ``(height, width, 3)``.
      weights: ``none`` (random init), ``imagenet`` (Keras downloads and
        caches the published no-top weights) or the path of a local no-top
        weights file for this backbone.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}. Received `backbone={backbone!r}`")
    keras_weights = _check_weights(weights)
    return _backbones()[backbone].constructor(
        include_top=False,
        weights=keras_weights,
        input_shape=tuple(input_shape),
        pooling="avg",
        name=BACKBONE_LAYER_NAME,
    )


def build_transfer_model(
    *,
    backbone: str,
    input_shape: Sequence[int],
    num_classes: int,
    weights: str = "none",
    embedding_dim: int = 256,
    dropout: float = 0.2,
    augmentation: keras.layers.Layer | None = None,
    name: str | None = None,
) -> keras.Model:
    """A pretrained backbone, frozen, with a new embedding + classifier head.

    Grayscale input is repeated to three channels; pixels are mapped to the
    backbone's expected range by ``BackbonePreprocess``. With pretrained
    weights (``imagenet`` or a file) the backbone is frozen and always called
    with ``training=False``, so its BatchNormalization statistics stay fixed
    even after ``unfreeze_top_layers``. With ``weights="none"`` there is
    nothing to preserve: the whole network trains from scratch.

    Args:
      backbone: One of ``BACKBONES``.
      input_shape: ``(height, width, channels)``, sides >= 32.
      num_classes: Number of labels (>= 2).
      weights: ``none``, ``imagenet`` or a local weights file (see ``build_backbone``).
      embedding_dim: Width of the ``embedding`` layer.
      dropout: Dropout rate before the embedding and before the classifier.
      augmentation: Optional augmentation block (active only in training).
      name: Model name (default: the backbone name).

    Raises:
      ValueError: on any invalid hyperparameter, naming it and its value.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}. Received `backbone={backbone!r}`")
    shape = _check_input_shape(input_shape, min_size=_MIN_BACKBONE_SIZE)
    _check_common(num_classes, embedding_dim, dropout)
    base = build_backbone(backbone, input_shape=(shape[0], shape[1], 3), weights=weights)
    pretrained = is_pretrained(weights)
    base.trainable = not pretrained

    inputs = keras.Input(shape=shape, name="pixels")
    x = augmentation(inputs) if augmentation is not None else inputs
    if shape[2] == 1:
        x = layers.Concatenate(name="grayscale_to_rgb")([x, x, x])
    x = BackbonePreprocess(backbone, name="backbone_preprocess")(x)
    x = base(x, training=False) if pretrained else base(x)
    if dropout:
        x = layers.Dropout(dropout, name="features_dropout")(x)
    outputs = _head(x, num_classes=num_classes, embedding_dim=embedding_dim, dropout=dropout)
    return keras.Model(inputs, outputs, name=name or backbone)


def unfreeze_top_layers(model: keras.Model, num_layers: int) -> int:
    """Makes the top ``num_layers`` backbone layers trainable for fine-tuning.

    BatchNormalization layers stay frozen: updating their statistics on a
    small dataset wrecks the pretrained features. Recompile the model (with a
    lower learning rate) afterwards.

    Args:
      model: A model from ``build_transfer_model``.
      num_layers: How many of the backbone's last layers to unfreeze (> 0).

    Returns:
      The number of layers made trainable (BatchNormalization excluded).

    Raises:
      ValueError: if the model has no backbone or ``num_layers`` is invalid.
    """
    try:
        base = model.get_layer(BACKBONE_LAYER_NAME)
    except ValueError as error:
        raise ValueError(f"model {model.name!r} has no {BACKBONE_LAYER_NAME!r} layer to fine-tune") from error
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1. Received `num_layers={num_layers!r}`")
    base.trainable = True
    unfrozen = 0
    boundary = max(0, len(base.layers) - num_layers)
    for index, layer in enumerate(base.layers):
        train = index >= boundary and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = train
        unfrozen += int(train)
    return unfrozen


def build_model(
    arch: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    embedding_dim: int | None = None,
    dropout: float | None = None,
    weights: str = "none",
    filters: Sequence[int] = (32, 64, 128),
    augmentation: keras.layers.Layer | None = None,
) -> keras.Model:
    """Builds any architecture in ``ARCHITECTURES`` by name.

    ``weights`` applies to transfer models only, ``filters`` to ``small_cnn``
    only; ``embedding_dim`` and ``dropout`` default per architecture.

    Raises:
      ValueError: for an unknown ``arch`` or any invalid hyperparameter.
    """
    if arch == SMALL_CNN:
        if is_pretrained(weights):
            raise ValueError(f"{SMALL_CNN} trains from scratch; weights must be 'none'. Received `weights={weights!r}`")
        return build_small_cnn(
            input_shape=input_shape,
            num_classes=num_classes,
            filters=filters,
            embedding_dim=128 if embedding_dim is None else embedding_dim,
            dropout=0.3 if dropout is None else dropout,
            augmentation=augmentation,
        )
    if arch in BACKBONES:
        return build_transfer_model(
            backbone=arch,
            input_shape=input_shape,
            num_classes=num_classes,
            weights=weights,
            embedding_dim=256 if embedding_dim is None else embedding_dim,
            dropout=0.2 if dropout is None else dropout,
            augmentation=augmentation,
        )
    raise ValueError(f"arch must be one of {ARCHITECTURES}. Received `arch={arch!r}`")


def embedding_dim_of(model: keras.Model) -> int:
    """Width of the model's embedding layer."""
    return int(model.get_layer(EMBEDDING_LAYER_NAME).output.shape[-1])
