"""Offline sample datasets in the book's manifest format (``uri,label``, no header).

``digits`` writes scikit-learn's bundled 1,797 real handwritten digits as image
files; ``synthetic`` draws labeled shapes for scale tests. Both are
deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

ImageFileFormat = Literal["png", "jpeg"]
MANIFEST_FILE = "all_data.csv"
LABELS_FILE = "labels.txt"
SHAPES = ("circle", "square", "triangle", "cross")
_COLOURS = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (160, 60, 200))


@dataclasses.dataclass(frozen=True)
class SampleData:
    """Where a sample dataset was written."""

    manifest: str
    labels_file: str
    image_dir: str
    count: int
    labels: list[str]


def _write_manifest(output_dir: str, rows: list[tuple[str, str]], labels: list[str], image_dir: str) -> SampleData:
    manifest = os.path.join(output_dir, MANIFEST_FILE)
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    labels_file = os.path.join(output_dir, LABELS_FILE)
    with open(labels_file, "w") as handle:
        handle.write("".join(f"{label}\n" for label in labels))
    return SampleData(manifest, labels_file, image_dir, len(rows), labels)


def _save(image: Image.Image, path: str, image_format: ImageFileFormat) -> None:
    if image_format == "jpeg":
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path, format="PNG", optimize=False)


def write_digits(output_dir: str, *, size: int = 32, image_format: ImageFileFormat = "png",
                 limit: int | None = None) -> SampleData:
    """Writes scikit-learn's handwritten digits (8x8, 17 grey levels) upsampled to ``size``.

    Args:
      output_dir: Receives ``images/<label>/digit_NNNN.<ext>``, the manifest and labels.txt.
      size: Side of the written images (the source is 8x8).
      image_format: ``png`` (lossless) or ``jpeg``.
      limit: Write only the first ``limit`` digits (for quick tests).
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"digits are 8x8; size must be >= 8. Received `size={size}`")
    digits = load_digits()
    count = len(digits.target) if limit is None else min(limit, len(digits.target))
    image_dir = os.path.join(os.path.abspath(output_dir), "images")
    ext = "jpg" if image_format == "jpeg" else "png"
    rows: list[tuple[str, str]] = []
    for i in range(count):
        label = str(int(digits.target[i]))
        pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        label_dir = os.path.join(image_dir, label)
        os.makedirs(label_dir, exist_ok=True)
        path = os.path.join(label_dir, f"digit_{i:04d}.{ext}")
        _save(image, path, image_format)
        rows.append((path, label))
    return _write_manifest(output_dir, rows, [str(d) for d in range(10)], image_dir)


def draw_shape(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    """Draws one shape in a random colour, position and scale on a noisy background."""
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    colour = _COLOURS[int(rng.integers(len(_COLOURS)))]
    radius = int(size * rng.uniform(0.2, 0.4))
    cx, cy = (int(c) for c in rng.integers(radius, size - radius, size=2))
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "cross":
        bar = max(2, radius // 3)
        draw.rectangle([cx - radius, cy - bar, cx + radius, cy + bar], fill=colour)
        draw.rectangle([cx - bar, cy - radius, cx + bar, cy + radius], fill=colour)
    else:
        raise ValueError(f"shape must be one of {SHAPES}. Received `shape={shape}`")
    return image


def write_synthetic(output_dir: str, *, count: int = 1000, size: int = 256,
                    image_format: ImageFileFormat = "jpeg", seed: int = 0) -> SampleData:
    """Writes ``count`` images of drawn shapes labeled by shape, for scale tests."""
    if count < 1:
        raise ValueError(f"count must be >= 1. Received `count={count}`")
    if size < 16:
        raise ValueError(f"size must be >= 16. Received `size={size}`")
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(os.path.abspath(output_dir), "images")
    os.makedirs(image_dir, exist_ok=True)
    ext = "jpg" if image_format == "jpeg" else "png"
    rows: list[tuple[str, str]] = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        path = os.path.join(image_dir, f"{shape}_{i:06d}.{ext}")
        _save(draw_shape(rng, shape, size), path, image_format)
        rows.append((path, shape))
    return _write_manifest(output_dir, rows, sorted(SHAPES), image_dir)
