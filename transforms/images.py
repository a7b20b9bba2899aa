"""Reading, validating and normalizing image files with Pillow.

Every job that touches raw image files goes through these functions, so a
missing file, an empty file, a non-image, an unsupported format, a truncated
image or a decompression bomb is rejected the same way everywhere, with a
stable ``error_type`` (see ``RejectedInput``).

Only the formats in ``SUPPORTED_FORMATS`` are ever handed to a decoder. Pillow
would otherwise try every plugin it has, some of which run external programs
(EPS is rendered by Ghostscript) or parse rarely exercised formats; a file of
a format Pillow knows but the jobs do not support is recognized from its
first bytes alone and rejected as ``unsupported_format``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import zlib
from typing import Callable, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from transforms import file_reads
from transforms.dead_letters import RejectedInput
from transforms.file_reads import DEFAULT_RETRY, RetryPolicy, read_file_bytes

# Pillow's own bomb check raises a warning or error at 89M/179M pixels; the
# job applies its own configurable limit before decoding instead.
Image.MAX_IMAGE_PIXELS = None

_EXIF_ORIENTATION = 0x0112
EncodedFormat = Literal["jpeg", "png"]
ResizeMethod = Literal["stretch", "pad", "crop"]

# Stable rejection reasons (error_type values).
MISSING_FILE = file_reads.MISSING_FILE
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = file_reads.UNREADABLE_FILE
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"

# Pillow format ids the jobs decode: all are decoded in-process by Pillow's own
# codecs (libjpeg, zlib, libwebp, libtiff), none by an external program.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
_PREFIX_BYTES = 16  # What Pillow's plugins' ``accept`` functions look at.
_PNG_SIGNATURE_BYTES = 8
_PNG_CHUNK_OVERHEAD = 12  # Length, type, CRC.


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


def read_image_bytes(uri: str, retry: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """Reads a whole image file through Beam's FileSystems (local paths, gs://, ...).

    Transient storage errors are retried (see ``transforms.file_reads``).

    Raises:
      RejectedInput: ``missing_file``, ``empty_file`` or ``unreadable_file``.
      StorageUnavailable: storage kept failing after the retries; callers let it
        escape so the job fails instead of silently losing images.
    """
    data = read_file_bytes(uri, retry)
    if not data:
        raise RejectedInput(EMPTY_FILE, f"{uri} has zero bytes")
    return data


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recognized_format(data: bytes) -> str | None:
    """The Pillow format whose signature ``data`` starts with, found without decoding anything.

    Only the plugins' ``accept`` functions (byte-prefix checks) run. Formats
    whose plugin has no signature check cannot be told apart from arbitrary
    bytes this way; their files stay ``not_an_image``.
    """
    Image.init()
    prefix = data[:_PREFIX_BYTES]
    # Supported formats first, so a damaged JPEG is never reported as another format.
    candidates = sorted(Image.OPEN.items(), key=lambda item: item[0] not in SUPPORTED_FORMATS)
    for format_id, (_, accept) in candidates:
        if accept is not None and _accepts(accept, prefix):
            return format_id
    return None


def _accepts(accept: Callable[[bytes], bool | str], prefix: bytes) -> bool:
    """Runs one plugin's signature check; a check that cannot parse a short prefix says no."""
    try:
        # A plugin may answer with a string: "mine, but a variant I cannot open".
        return bool(accept(prefix))
    except (struct.error, IndexError, ValueError, TypeError):
        return False


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens an image lazily, rejecting decompression bombs before any pixel is decoded.

    A PNG whose chunk checksums do not match its data is ``corrupt_image``
    here too (``check_png_checksums``), so create_dataset and the inference
    jobs refuse it before the model's decoder would.

    Raises:
      RejectedInput: ``not_an_image``, ``unsupported_format``, ``corrupt_image``
        (a supported format whose header is cut or broken, a PNG chunk whose
        checksum is wrong) or ``too_many_pixels``.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as error:
        known = recognized_format(data)
        if known in SUPPORTED_FORMATS:
            raise RejectedInput(CORRUPT_IMAGE, f"{known} header is truncated or corrupt") from error
        if known is not None:
            raise RejectedInput(
                UNSUPPORTED_FORMAT, f"looks like {known}, which is not a supported format ({', '.join(SUPPORTED_FORMATS)})"
            ) from error
        raise RejectedInput(NOT_AN_IMAGE, f"not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedInput(CORRUPT_IMAGE, f"image header is truncated or corrupt: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise RejectedInput(
            TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels exceeds --max_pixels={max_pixels}"
        )
    if image.format == "PNG":
        check_png_checksums(data)
    return image


def check_png_checksums(data: bytes) -> None:
    """Refuses a PNG any chunk of which fails its CRC, as libpng (the model's PNG decoder) does.

    Pillow checks the CRCs of the chunks before the image data when it opens
    a PNG, but not those of IDAT and later chunks when it loads one, so a PNG
    with damaged image data would be stored by create_dataset and then fail
    at inference (``inference_failed``). The CRCs of a 1024x768 photo-like PNG
    (1.8 MB) cost about 0.5 ms against 15 ms to decode it
    (``python -m benchmarks.jpeg_decode``, docs/benchmarks.md). A chunk
    that runs past the end of the file is left to decoding, which reports the
    truncation.

    Raises:
      RejectedInput: ``corrupt_image``, naming the chunk and its offset.
    """
    view = memoryview(data)
    position = _PNG_SIGNATURE_BYTES
    while position + _PNG_CHUNK_OVERHEAD <= len(data):
        length, = struct.unpack_from(">I", data, position)
        end = position + _PNG_CHUNK_OVERHEAD + length
        if end > len(data):
            return
        kind = bytes(view[position + 4:position + 8])
        stored, = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[position + 4:end - 4]) != stored:
            raise RejectedInput(
                CORRUPT_IMAGE, f"PNG {kind.decode('latin-1')!r} chunk at byte {position} fails its CRC check")
        if kind == b"IEND":
            return
        position = end


def check_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decodes an encoded image, rejecting what a model could not take.

    Inference jobs call it before batching, so one bad file cannot fail the
    batch it would have joined.

    Returns:
      The decoded image (its first frame), so a caller that needs its pixels
      (``transforms.serving_bytes``) does not decode it again.

    Raises:
      RejectedInput: ``not_an_image``, ``unsupported_format``, ``corrupt_image`` or
        ``too_many_pixels``.
    """
    image = open_image(data, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedInput(CORRUPT_IMAGE, f"image data is truncated or corrupt: {error}") from error
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """Palette images with transparency as RGBA, 16- and 32-bit integer images scaled to 8-bit gray.

    The mode steps every stored or served image takes before its final
    conversion to RGB or L, so both see the same pixels.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    return image


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
      RejectedInput: ``not_an_image``, ``unsupported_format``, ``too_many_pixels`` or
        ``corrupt_image``.
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
    image = to_8bit(image).convert("RGB" if spec.channels == 3 else "L")
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
