"""Augmentation layers: active only in training, validated config."""

from __future__ import annotations

import numpy as np
import pytest

from model_lib import augmentation


def _images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")


def test_augmentation_is_identity_at_inference_and_random_in_training():
    config = augmentation.AugmentationConfig(
        flip="horizontal", crop=0.2, translate=0.1, rotate=0.1, brightness=0.3, contrast=0.3, seed=3
    )
    block = augmentation.build_augmentation(config)
    images = _images()
    np.testing.assert_array_equal(np.asarray(block(images, training=False)), images)
    augmented = np.asarray(block(images, training=True))
    assert augmented.shape == images.shape
    assert not np.allclose(augmented, images)
    assert np.isfinite(augmented).all()


def test_color_jitter_does_not_clip_standardized_pixels():
    jitter = augmentation.ColorJitter(brightness=0.5, contrast=0.0, seed=1)
    images = _images()
    out = np.asarray(jitter(images, training=True))
    # A pure brightness shift moves every pixel of an image by one constant, negatives included.
    shift = out - images
    np.testing.assert_allclose(shift, shift[:, :1, :1, :1] * np.ones_like(shift), atol=1e-5)
    assert (out < 0).any()


def test_disabled_config_builds_nothing():
    assert augmentation.build_augmentation(augmentation.AugmentationConfig()) is None


@pytest.mark.parametrize(
    "kwargs,message",
    [({"flip": "diagonal"}, "flip='diagonal'"), ({"crop": 1.5}, "crop=1.5"), ({"brightness": -0.1}, "brightness=-0.1")],
)
def test_invalid_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        augmentation.AugmentationConfig(**kwargs)
