"""Reading, validating and normalizing image files with Pillow.

Every job that touches raw image files goes through these functions, so a
missing file, an empty file, a non-image, a truncated image or a
decompression bomb is rejected the same way everywhere, with a stable
``error_type`` (see ``RejectedInput``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Literal

from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps, UnidentifiedImageError

from transforms.dead_letters import RejectedInput

# Pillow's own bomb check raises a warning or error at 89M/179M pixels; the
# job applies its own configurable limit before decoding instead.
Image.MAX_IMAGE_PIXELS = None

_EXIF_ORIENTATION = 0x0112
EncodedFormat = Literal["jpeg", "png"]
ResizeMethod = Literal["stretch", "pad", "crop"]

# Stable rejection reasons (error_type values).
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How images are normalized for storage.

    Attributes:
      image_size: Side of the square stored image.
      channels: 3 (RGB) or 1 (grayscale).
      resize_method: ``stretch``, ``pad`` (letterbox) or ``crop`` (center crop);
        mirrored by ``model_lib.image_ops.resize_image`` at serving time.
      image_format: Encoding of stored images.
      jpeg_quality: JPEG quality when ``image_format`` is jpeg.
      max_pixels: Images with more source pixels are rejected before decoding.
    """

    image_size: int = 224
    channels: int = 3
    resize_method: ResizeMethod = "stretch"
    image_format: EncodedFormat = "jpeg"
    jpeg_quality: int = 90
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive. Received `image_size={self.image_size}`")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3. Received `channels={self.channels}`")
        if self.resize_method not in ("stretch", "pad", "crop"):
            raise ValueError(f"resize_method must be stretch, pad or crop. Received `resize_method={self.resize_method}`")
        if self.image_format not in ("jpeg", "png"):
            raise ValueError(f"image_format must be jpeg or png. Received `image_format={self.image_format}`")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100. Received `jpeg_quality={self.jpeg_quality}`")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive. Received `max_pixels={self.max_pixels}`")


@dataclasses.dataclass(frozen=True)
class NormalizedImage:
    """An image re-encoded at the dataset's size, with its provenance."""

    encoded: bytes
    format: str
    height: int
    width: int
    channels: int
    original_height: int
    original_width: int


def read_image_bytes(uri: str) -> bytes:
    """Reads a whole file through Beam's FileSystems (local paths, gs://, ...).

    Raises:
      RejectedInput: ``missing_file``, ``empty_file`` or ``unreadable_file``.
    """
    try:
        if not FileSystems.exists(uri):
            raise RejectedInput(MISSING_FILE, f"no file at {uri}")
        with FileSystems.open(uri, compression_type="uncompressed") as handle:
            data = handle.read()
    except RejectedInput:
        raise
    except (OSError, ValueError) as error:  # BeamIOError is an IOError.
        raise RejectedInput(UNREADABLE_FILE, f"cannot read {uri}: {error}") from error
    if not data:
        raise RejectedInput(EMPTY_FILE, f"{uri} has zero bytes")
    return data


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens an image lazily, rejecting decompression bombs before any pixel is decoded.

    Raises:
      RejectedInput: ``not_an_image``, ``corrupt_image`` (a known format whose
        header is cut or broken) or ``too_many_pixels``.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise RejectedInput(NOT_AN_IMAGE, "not a decodable image (JPEG, PNG, GIF, BMP, ...)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedInput(CORRUPT_IMAGE, f"image header is truncated or corrupt: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise RejectedInput(
            TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels exceeds --max_pixels={max_pixels}"
        )
    return image


def check_image(data: bytes, max_pixels: int) -> None:
    """Fully decodes an encoded image, rejecting what a model could not take.

    Inference jobs call it before batching, so one bad file cannot fail the
    batch it would have joined.

    Raises:
      RejectedInput: ``not_an_image``, ``corrupt_image`` or ``too_many_pixels``.
    """
    image = open_image(data, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedInput(CORRUPT_IMAGE, f"image data is truncated or corrupt: {error}") from error


def _fit(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resizes to a square of ``spec.image_size`` with the configured method."""
    size = spec.image_size
    width, height = image.size
    if (width, height) == (size, size):
        return image
    resample = Image.Resampling.BILINEAR
    if spec.resize_method == "stretch":
        return image.resize((size, size), resample)
    if spec.resize_method == "pad":
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new(image.mode, (size, size))
        canvas.paste(image.resize((new_w, new_h), resample), ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))


def normalize_image(data: bytes, spec: ImageSpec) -> NormalizedImage:
    """Decodes, orients, converts, resizes and re-encodes one image.

    EXIF orientation is applied; grayscale, RGBA, palette, CMYK and 16-bit
    images are converted to ``spec.channels``.

    Raises:
      RejectedInput: ``not_an_image``, ``too_many_pixels`` or ``corrupt_image``.
    """
    image = open_image(data, spec.max_pixels)
    try:
        header_width, header_height = image.size
        transposed = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the target is much smaller.
            image.draft("RGB" if spec.channels == 3 else "L", (spec.image_size, spec.image_size))
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedInput(CORRUPT_IMAGE, f"image data is truncated or corrupt: {error}") from error
    original_width, original_height = (
        (header_height, header_width) if transposed else (header_width, header_height)
    )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    image = image.convert("RGB" if spec.channels == 3 else "L")
    image = _fit(image, spec)
    buffer = io.BytesIO()
    if spec.image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=spec.jpeg_quality)
    else:
        image.save(buffer, format="PNG", compress_level=6)
    return NormalizedImage(
        encoded=buffer.getvalue(),
        format=spec.image_format,
        height=spec.image_size,
        width=spec.image_size,
        channels=spec.channels,
        original_height=original_height,
        original_width=original_width,
    )
