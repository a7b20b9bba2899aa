"""Training-time image augmentation as Keras layers inside the model.

The layers sit at the front of the Keras model, so they run on the device
with the model and are inactive at inference (Keras random layers only
transform when ``training=True``); the exported serving graph therefore sees
them as identity. Inputs are the tf.Transform output ``pixels``: float32
images standardized per channel, so colour jitter works in standard-deviation
units and never clips to a 0..255 range.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import layers

FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Which augmentations to apply and how strongly.

    Attributes:
      flip: One of ``FLIP_MODES``. Off by default: flipping changes the meaning
        of digits and text.
      crop: Largest fraction zoomed in (a random crop resized back to the
        input size), 0 to disable.
      translate: Largest shift as a fraction of height/width.
      rotate: Largest rotation as a fraction of a full turn.
      brightness: Largest additive shift, in per-channel standard deviations.
      contrast: Largest relative change of contrast around each image's mean.
      seed: Seed of the random layers, for reproducible runs.
    """

    flip: str = "none"
    crop: float = 0.0
    translate: float = 0.0
    rotate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}. Received `flip={self.flip!r}`")
        for name in ("crop", "translate", "rotate", "brightness", "contrast"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1). Received `{name}={value!r}`")

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or any(
            (self.crop, self.translate, self.rotate, self.brightness, self.contrast)
        )


@keras.saving.register_keras_serializable(package="vision_pipelines")
class ColorJitter(layers.Layer):
    """Random per-image brightness shift and contrast scaling of standardized pixels.

    Keras' RandomBrightness/RandomContrast clip to a value range such as
    0..255, which would destroy standardized (zero-mean) pixels; this layer
    works in standard-deviation units and does not clip.

    Args:
      brightness: Shift drawn from U(-brightness, brightness) per image.
      contrast: Factor drawn from U(1 - contrast, 1 + contrast) per image,
        applied around the image's mean.
      seed: Seed of the layer's random generator.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool | None = None):
        if not training:
            return images
        ops = keras.ops
        batch = ops.shape(images)[0]
        shift = keras.random.uniform(
            (batch, 1, 1, 1), -self.brightness, self.brightness, seed=self._seed_generator
        )
        factor = keras.random.uniform(
            (batch, 1, 1, 1), 1.0 - self.contrast, 1.0 + self.contrast, seed=self._seed_generator
        )
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        return (images - mean) * factor + mean + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast, "seed": self.seed}


def build_augmentation(config: AugmentationConfig, name: str = "augmentation") -> keras.Sequential | None:
    """Builds the augmentation block for ``config``; None when nothing is enabled.

    Geometric layers fill with the nearest edge pixel: a constant fill would
    paint the dataset mean (0 after standardization) into a black border.
    """
    if not config.enabled:
        return None
    block: list[layers.Layer] = []
    if config.flip != "none":
        block.append(layers.RandomFlip(config.flip, seed=config.seed, name=f"{name}_flip"))
    if config.rotate:
        block.append(
            layers.RandomRotation(config.rotate, fill_mode="nearest", seed=config.seed + 1, name=f"{name}_rotate")
        )
    if config.crop:
        block.append(
            layers.RandomZoom(
                height_factor=(-config.crop, 0.0), fill_mode="nearest", seed=config.seed + 2, name=f"{name}_crop"
            )
        )
    if config.translate:
        block.append(
            layers.RandomTranslation(
                config.translate, config.translate, fill_mode="nearest", seed=config.seed + 3,
                name=f"{name}_translate",
            )
        )
    if config.brightness or config.contrast:
        block.append(ColorJitter(config.brightness, config.contrast, seed=config.seed + 4, name=f"{name}_color"))
    return keras.Sequential(block, name=name)
