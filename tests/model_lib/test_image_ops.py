"""The graph's JPEG decode gives Pillow's pixels: the pixels create_dataset stored and trained on.

``model_lib.image_ops`` decodes in the tf.Transform graph (training reads the
stored JPEGs through it) and in the serving signature. At an image's own size
``decode_and_resize`` only casts, so its output is the decoder's pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from model_lib import image_ops


def photo_jpeg(height: int, width: int, mode: str = "RGB") -> bytes:
    """A JPEG with smooth gradients and fine noise, as photos have: the IDCT methods round it differently."""
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(height * width).integers(0, 30, (height, width, 3))
    pixels = np.stack([128 + 100 * np.sin(cols / 17), 128 + 100 * np.cos(rows / 23), (rows + cols) / 5 % 256], -1)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    """create_dataset's decode (``transforms.images.normalize_image`` before resizing), as [H, W, C]."""
    pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int64)
    return pixels if pixels.ndim == 3 else pixels[..., np.newaxis]


@pytest.mark.parametrize(("side", "mode"), [(64, "RGB"), (224, "RGB"), (64, "L")])
def test_graph_decodes_a_jpeg_to_pillows_pixels_which_the_fast_idct_does_not(side: int, mode: str) -> None:
    data = photo_jpeg(side, side, mode)
    channels = 3 if mode == "RGB" else 1
    want = pillow_pixels(data)

    graph = image_ops.decode_and_resize_batch(tf.constant([data]), side, channels).numpy()[0]
    np.testing.assert_array_equal(graph, want)

    # TensorFlow's default decode (the fast IDCT) does not give these pixels, so the test can fail.
    fast = tf.io.decode_image(data, channels=channels).numpy().astype(np.int64)
    assert not np.array_equal(fast, want)
