"""The bytes an inference job hands the serving signature: the file itself, or a PNG of its pixels.

create_dataset decodes every image with Pillow and applies its EXIF
orientation (``transforms.images.normalize_image``). The exported serving
signature decodes with TensorFlow (``model_lib.image_ops``), which reads
JPEG, PNG, GIF, BMP and WebP but not TIFF, ignores EXIF orientation (a phone
photo is predicted sideways) and reads a palette BMP's indices as gray. An
image TensorFlow would read differently is therefore handed to the model as a
lossless PNG of the pixels create_dataset would have used; every other image
is passed through untouched, so the common path costs a look at the first
bytes and the EXIF block Pillow has already parsed.

This runs inside the inference jobs (``transforms.image_inputs.keyed_image``,
through which batch_predict, extract_embeddings, stream_predict and search's
query embedding all pass). A direct caller of the SavedModel or TF Serving
still gets TensorFlow's decoding: a TIFF fails the call and EXIF orientation
is ignored there; such a caller can send ``serving_bytes`` of its images.
"""

from __future__ import annotations

import io
import struct

from PIL import Image, ImageOps

from transforms import images

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = range(2, 9)  # EXIF orientations 2..8 flip or rotate; 1 (and any other) is upright.
# What tf.io.decode_image recognizes, by the same first bytes (model_lib.image_ops._format).
_JPEG, _PNG, _GIF, _BMP = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM"
_RIFF, _WEBP = b"RIFF", b"WEBP"
# BMP: TensorFlow reads only uncompressed 24- and 32-bit pixels as colors (an 8-bit palette image
# comes out as its palette indices, 1- and 4-bit ones fail). Offsets in BITMAPINFOHEADER.
_BMP_HEADER_SIZE_AT, _BMP_BITS_AT, _BMP_COMPRESSION_AT = 14, 28, 30
_BMP_CORE_HEADER_SIZE = 12
_BMP_DIRECT_BITS = (24, 32)
_BMP_UNCOMPRESSED = 0
_PNG_COMPRESS_LEVEL = 1  # Lossless at any level; the re-encoded image is decoded once and discarded.


def serving_bytes(data: bytes, decoded: Image.Image) -> bytes:
    """``data`` if TensorFlow decodes it as create_dataset's Pillow does, else a PNG of Pillow's pixels.

    Re-encoded: a format TensorFlow cannot read (TIFF), a BMP other than
    uncompressed 24- or 32-bit, and any image whose EXIF orientation rotates
    or flips it (2..8), which is applied as create_dataset applies it
    (``ImageOps.exif_transpose``). The PNG holds the image in L or RGB after
    create_dataset's own mode steps (``images.to_8bit``: palette, 16-bit), so
    the serving signature's resize and channel conversion start from the
    pixels create_dataset's did (its gray conversion of an RGB PNG is
    libpng's, within one level of Pillow's). Alpha is dropped, as both
    create_dataset and the signature drop it.

    The pixel limit stays in force: ``decoded`` comes from
    ``images.check_image``, which refused an oversized image from its header
    before decoding, and nothing here decodes again.

    Only the inference jobs call this. A direct caller of the SavedModel gets
    TensorFlow's decoding of whatever it sends (see the module docstring).

    Args:
      data: The encoded image, already validated.
      decoded: Its first frame as ``images.check_image`` decoded it.

    Returns:
      The bytes to feed the serving signature.
    """
    orientation = decoded.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in _TRANSPOSED_ORIENTATIONS and tensorflow_reads_like_pillow(data):
        return data
    image = ImageOps.exif_transpose(decoded) if orientation in _TRANSPOSED_ORIENTATIONS else decoded
    image = images.to_8bit(image)
    image = image.convert("L" if image.mode in ("1", "L", "LA", "La", "F") else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def tensorflow_reads_like_pillow(data: bytes) -> bool:
    """Whether ``tf.io.decode_image`` gives the pixels Pillow gives, told from the first bytes alone.

    JPEG, PNG, GIF and WebP: yes (EXIF orientation aside). BMP: only
    uncompressed 24- or 32-bit. Anything else (TIFF): no.

    "Like" is as close as one libjpeg gets to itself: TensorFlow's default
    JPEG IDCT is the fast integer one, Pillow's the accurate one, which moves
    pixels by a few levels. That skew affects every JPEG and belongs in the
    signature's decoder (``model_lib.image_ops``); re-encoding every JPEG
    here would cost a decode and a PNG encode per image.
    """
    if data.startswith((_JPEG, _PNG, _GIF)) or (data.startswith(_RIFF) and data[8:12] == _WEBP):
        return True
    if not data.startswith(_BMP) or len(data) < _BMP_COMPRESSION_AT + 4:
        return False
    header_size, = struct.unpack_from("<I", data, _BMP_HEADER_SIZE_AT)
    bits, = struct.unpack_from("<H", data, _BMP_BITS_AT)
    compression, = struct.unpack_from("<I", data, _BMP_COMPRESSION_AT)
    return header_size != _BMP_CORE_HEADER_SIZE and bits in _BMP_DIRECT_BITS and compression == _BMP_UNCOMPRESSED
