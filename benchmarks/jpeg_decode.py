"""Benchmark: what decoding JPEGs with Pillow's IDCT, and checking PNG checksums, cost per image.

``model_lib.image_ops`` decodes JPEGs with libjpeg's accurate integer IDCT
(the one Pillow uses, so training and serving see create_dataset's pixels)
instead of TensorFlow's default fast one; ``transforms.images.open_image``
checks every PNG chunk's CRC. Measured on photo-like synthetic images (smooth
gradients plus noise, JPEG quality 90) at 224x224 and 1024x768, each decode
repeated and the median and best times kept:

- ``tf.io.decode_jpeg`` with ``INTEGER_FAST`` (TensorFlow's default) and ``INTEGER_ACCURATE``, and Pillow's
  decode, with the largest pixel difference of each TF method from Pillow;
- ``check_png_checksums`` against Pillow's decode of the same PNG.

Run:
  python -m benchmarks.jpeg_decode
It writes the ``jpeg_decode`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image

from benchmarks.machine import cpu_description
from benchmarks.report import write_section

SIZES = ((224, 224), (1024, 768))


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth colour gradients with fine noise: the IDCT methods round such blocks differently."""
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(width * height).normal(0, 12, (height, width, 3))
    base = np.stack([120 + 80 * np.sin(cols / 37), 110 + 70 * np.cos(rows / 23), 60 + (rows + cols) % 255 / 2], -1)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def timed_ms(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, best) milliseconds over ``repeats`` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--loaded", default="", help="A sentence on the machine's load, for the doc.")
    parser.add_argument("--no_doc", action="store_true")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from transforms.images import check_png_checksums

    def tf_decoder(method: str) -> Callable[[tf.Tensor], tf.Tensor]:
        return tf.function(lambda data: tf.io.decode_jpeg(data, channels=3, dct_method=method))

    decoders = {method: tf_decoder(method) for method in ("INTEGER_FAST", "INTEGER_ACCURATE")}
    lines = ["## JPEG decode (IDCT method) and PNG checksums: cost per image", "",
             "`python -m benchmarks.jpeg_decode`", "",
             f"CPU: {cpu_description()}; {args.repeats} calls per row, one at a time in one process. "
             f"{args.loaded}", "",
             "| image | decode | median ms | best ms | max pixel difference from Pillow |",
             "|---|---|---:|---:|---:|"]
    for width, height in SIZES:
        image = photo_like(width, height)
        jpeg, png = encoded(image, "JPEG"), encoded(image, "PNG")
        pillow = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int64)
        label = f"{width}x{height} JPEG ({len(jpeg) / 1024:.0f} KiB)"
        tensor = tf.constant(jpeg)
        for method, decode in decoders.items():
            median, best = timed_ms(lambda: decode(tensor).numpy(), args.repeats)
            difference = int(np.abs(decode(tensor).numpy().astype(np.int64) - pillow).max())
            lines.append(f"| {label} | `tf.io.decode_jpeg` {method} | {median:.2f} | {best:.2f} | {difference} |")
        median, best = timed_ms(lambda: np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), args.repeats)
        lines.append(f"| {label} | Pillow | {median:.2f} | {best:.2f} | 0 |")
        png_label = f"{width}x{height} PNG ({len(png) / 1024:.0f} KiB)"
        median, best = timed_ms(lambda: check_png_checksums(png), args.repeats)
        lines.append(f"| {png_label} | `check_png_checksums` (CRC of every chunk) | {median:.2f} | {best:.2f} | |")
        median, best = timed_ms(lambda: np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), args.repeats)
        lines.append(f"| {png_label} | Pillow decode | {median:.2f} | {best:.2f} | |")
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_section("jpeg_decode", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
