"""TensorFlow image decoding and resizing: the serving-time twin of create_dataset's.

create_dataset normalizes images with Pillow (EXIF orientation, CMYK/palette
conversion, decompression-bomb guard) and resizes them with the same three
methods defined here. The tf.Transform graph and the exported serving
signatures use these functions, so an image sent raw to the model is decoded
and resized the way the training data was.
"""

from __future__ import annotations

from typing import Literal

import tensorflow as tf

ResizeMethod = Literal["stretch", "pad", "crop"]
RESIZE_METHODS: tuple[str, ...] = ("stretch", "pad", "crop")


def resize_image(image: tf.Tensor, image_size: int, method: ResizeMethod) -> tf.Tensor:
    """Resizes one [H, W, C] image to [image_size, image_size, C] float32 in 0..255.

    An image already at the target size is returned unchanged (only cast), so
    stored dataset images pass through training preprocessing bit-exactly.

    Args:
      image: uint8 or float image tensor.
      image_size: Side of the square output.
      method: ``stretch`` ignores aspect ratio; ``pad`` fits the longer side and
        pads with black; ``crop`` fits the shorter side and center-crops.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}. Received `method={method}`")
    image = tf.cast(image, tf.float32)
    height = tf.shape(image)[0]
    width = tf.shape(image)[1]
    size = tf.constant(image_size, tf.int32)

    def already_sized() -> tf.Tensor:
        return image

    def resized() -> tf.Tensor:
        if method == "stretch":
            out = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
        elif method == "pad":
            out = tf.image.resize_with_pad(image, image_size, image_size, method="bilinear", antialias=True)
        else:
            scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(height, width), tf.float32)
            new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
            new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
            out = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
            out = tf.image.resize_with_crop_or_pad(out, image_size, image_size)
        return tf.clip_by_value(out, 0.0, 255.0)

    out = tf.cond(tf.logical_and(tf.equal(height, size), tf.equal(width, size)), already_sized, resized)
    return tf.ensure_shape(out, [image_size, image_size, None])


def decode_and_resize(
    image_bytes: tf.Tensor, image_size: int, channels: int, method: ResizeMethod = "stretch"
) -> tf.Tensor:
    """Decodes one encoded image (JPEG, PNG, GIF, BMP) to float32 [S, S, channels]."""
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    image = resize_image(image, image_size, method)
    return tf.ensure_shape(image, [image_size, image_size, channels])


def decode_and_resize_batch(
    image_bytes: tf.Tensor, image_size: int, channels: int, method: ResizeMethod = "stretch"
) -> tf.Tensor:
    """Batch form of ``decode_and_resize``: [B] strings to float32 [B, S, S, channels]."""
    return tf.map_fn(
        lambda b: decode_and_resize(b, image_size, channels, method),
        image_bytes,
        fn_output_signature=tf.TensorSpec([image_size, image_size, channels], tf.float32),
    )
