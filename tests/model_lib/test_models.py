"""Model builders: declared shapes, the named embedding layer, validation, fine-tuning."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model_lib import augmentation, models
from schemas.model_artifacts import EMBEDDING_LAYER_NAME


def _predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model(batch, training=False))


@pytest.mark.parametrize(
    "arch,input_shape,embedding_dim",
    [
        (models.SMALL_CNN, (32, 32, 1), 16),
        (models.SMALL_CNN, (40, 40, 3), 24),
        (models.MOBILENET_V2, (32, 32, 1), 32),
        (models.EFFICIENTNET_B0, (32, 32, 3), 32),
        (models.RESNET50, (32, 32, 3), 32),
    ],
)
def test_builder_shapes_and_embedding_layer(arch, input_shape, embedding_dim):
    model = models.build_model(arch, input_shape=input_shape, num_classes=5, embedding_dim=embedding_dim)
    assert tuple(model.input_shape) == (None, *input_shape)
    assert tuple(model.output_shape) == (None, 5)
    embedding = model.get_layer(EMBEDDING_LAYER_NAME)
    assert models.embedding_dim_of(model) == embedding_dim
    # The embedding layer feeds the classifier: it is the penultimate representation.
    assert model.get_layer(models.OUTPUT_LAYER_NAME).input.shape[-1] == embedding.output.shape[-1]
    probabilities = _predict(model, np.random.default_rng(0).normal(size=(2, *input_shape)).astype("float32"))
    assert probabilities.shape == (2, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> str:
    """A local no-top MobileNetV2 weights file: stands in for downloaded pretrained weights."""
    backbone = models.build_backbone(models.MOBILENET_V2, input_shape=(32, 32, 3), weights="none")
    path = str(tmp_path_factory.mktemp("weights") / "mobilenet_v2_notop.weights.h5")
    backbone.save_weights(path)
    return path


def test_pretrained_backbone_is_frozen_with_new_head(mobilenet_weights):
    model = models.build_model(
        models.MOBILENET_V2, input_shape=(32, 32, 3), num_classes=3, embedding_dim=8, weights=mobilenet_weights
    )
    assert model.get_layer(models.BACKBONE_LAYER_NAME).trainable is False
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {EMBEDDING_LAYER_NAME, models.OUTPUT_LAYER_NAME}


def test_backbone_without_pretrained_weights_trains_from_scratch():
    model = models.build_model(models.MOBILENET_V2, input_shape=(32, 32, 3), num_classes=3, embedding_dim=8)
    base = model.get_layer(models.BACKBONE_LAYER_NAME)
    assert base.trainable is True
    assert len(model.trainable_weights) > len(base.layers) // 2


def test_unfreeze_top_layers_keeps_batchnorm_frozen(mobilenet_weights):
    model = models.build_model(
        models.MOBILENET_V2, input_shape=(32, 32, 3), num_classes=3, embedding_dim=8, weights=mobilenet_weights
    )
    before = len(model.trainable_weights)
    unfrozen = models.unfreeze_top_layers(model, 20)
    base = model.get_layer(models.BACKBONE_LAYER_NAME)
    top = base.layers[-20:]
    assert unfrozen == sum(not isinstance(layer, keras.layers.BatchNormalization) for layer in top)
    assert all(not layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert all(not layer.trainable for layer in base.layers[:-20])
    assert len(model.trainable_weights) > before


def test_unfreeze_rejects_models_without_backbone_and_bad_counts():
    cnn = models.build_model(models.SMALL_CNN, input_shape=(16, 16, 1), num_classes=2)
    with pytest.raises(ValueError, match="backbone"):
        models.unfreeze_top_layers(cnn, 3)
    transfer = models.build_model(models.MOBILENET_V2, input_shape=(32, 32, 3), num_classes=3, embedding_dim=8)
    with pytest.raises(ValueError, match="num_layers=0"):
        models.unfreeze_top_layers(transfer, 0)


def test_weights_from_local_file_are_loaded(mobilenet_weights):
    source = models.build_backbone(models.MOBILENET_V2, input_shape=(32, 32, 3), weights=mobilenet_weights)
    model = models.build_model(
        models.MOBILENET_V2, input_shape=(32, 32, 1), num_classes=4, embedding_dim=8, weights=mobilenet_weights
    )
    loaded = model.get_layer(models.BACKBONE_LAYER_NAME).get_weights()
    fresh = models.build_backbone(models.MOBILENET_V2, input_shape=(32, 32, 3), weights="none").get_weights()
    assert len(loaded) == len(source.get_weights())
    for want, got in zip(source.get_weights(), loaded):
        np.testing.assert_array_equal(want, got)
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, loaded))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"arch": "vgg99"}, "arch='vgg99'"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"input_shape": (32, 32, 2)}, r"input_shape=\(32, 32, 2\)"),
        ({"filters": [32, -1]}, r"filters=\[32, -1\]"),
        ({"filters": [8] * 7}, "filters="),
        ({"weights": "imagenet"}, "weights='imagenet'"),
        ({"arch": models.RESNET50, "input_shape": (16, 16, 3)}, r"input_shape=\(16, 16, 3\)"),
        ({"arch": models.RESNET50, "weights": "/no/such.weights.h5"}, "weights='/no/such.weights.h5'"),
        ({"arch": models.RESNET50, "weights": "weights.bin"}, "weights='weights.bin'"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, message):
    args = {"arch": models.SMALL_CNN, "input_shape": (32, 32, 1), "num_classes": 10, **kwargs}
    arch = args.pop("arch")
    with pytest.raises(ValueError, match=message):
        models.build_model(arch, **args)


def test_model_with_augmentation_round_trips_through_keras_file(tmp_path):
    config = augmentation.AugmentationConfig(crop=0.1, translate=0.1, rotate=0.05, brightness=0.2, contrast=0.2)
    model = models.build_model(
        models.MOBILENET_V2, input_shape=(32, 32, 1), num_classes=3, embedding_dim=8,
        augmentation=augmentation.build_augmentation(config),
    )
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    batch = np.random.default_rng(1).normal(size=(3, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(_predict(model, batch), _predict(restored, batch), rtol=1e-5, atol=1e-6)
