"""TensorFlow image decoding and resizing: the serving-time twin of create_dataset's.

create_dataset normalizes images with Pillow (EXIF orientation, CMYK/palette
conversion, decompression-bomb guard) and resizes them with the same three
methods defined here. The tf.Transform graph and the exported serving
signatures use these functions, so an image sent raw to the model is decoded
and resized the way the training data was.

``limit_pixels`` is the serving-time twin of the jobs' ``--max_pixels`` guard:
it reads each image's declared size from its header (JPEG, PNG, GIF, BMP,
WebP: every format ``tf.io.decode_image`` takes) and refuses the batch before
any pixel is decoded, so a decompression bomb sent straight to a SavedModel
or TF Serving cannot allocate its decoded image.

JPEGs are decoded with libjpeg's accurate integer IDCT (``JPEG_DCT_METHOD``),
the one Pillow uses: TensorFlow's default, the fast one, moves pixels (by up
to 5 levels on photo-like JPEGs), so training (whose tf.Transform graph
decodes the stored JPEGs with these functions) and serving would otherwise
see other pixels than create_dataset's Pillow decode did
(``tests/model_lib/test_image_ops.py``). Measured, it costs no more than
noise: the same at 224x224, under 0.2 ms (best of 100) at 1024x768
(``python -m benchmarks.jpeg_decode``, docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Literal

import tensorflow as tf

ResizeMethod = Literal["stretch", "pad", "crop"]
RESIZE_METHODS: tuple[str, ...] = ("stretch", "pad", "crop")

_HEADER_BYTES = 32  # Covers every fixed-offset size field read below.
_UNKNOWN, _JPEG, _PNG, _GIF, _BMP, _WEBP = range(6)
_GIF_IMAGE_DESCRIPTOR, _GIF_EXTENSION = 0x2C, 0x21
_BMP_CORE_HEADER_SIZE = 12  # OS/2 BITMAPCOREHEADER: uint16 width and height.
_WEBP_ANIMATED_FLAG = 0x02
# Pillow's libjpeg IDCT (JDCT_ISLOW); tf.io.decode_image has no dct_method and takes INTEGER_FAST.
JPEG_DCT_METHOD = "INTEGER_ACCURATE"


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
    """Decodes one encoded image (JPEG, PNG, GIF, BMP, WebP) to float32 [S, S, channels]."""
    image = _decode(image_bytes, channels)
    image = resize_image(image, image_size, method)
    return tf.ensure_shape(image, [image_size, image_size, channels])


def _decode(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes one image to uint8 [H, W, channels], the first frame of an animation.

    TensorFlow has no 1-channel decoder for GIF, BMP or WebP, and libjpeg
    cannot turn a CMYK JPEG into gray, so for a 1-channel model those are
    decoded as RGB and converted with the ITU-R 601 weights Pillow's
    ``convert("L")`` uses in create_dataset. Every other image takes the direct
    1-channel decode, so stored dataset images keep decoding bit-exactly.
    """
    if channels != 1:
        return _decode_as(image_bytes, channels)
    code = _format(image_bytes)

    def is_cmyk_jpeg() -> tf.Tensor:
        return tf.equal(tf.io.extract_jpeg_shape(image_bytes)[2], 4)

    needs_rgb = tf.logical_or(
        tf.reduce_any(tf.equal(code, [_GIF, _BMP, _WEBP])),
        tf.cond(tf.equal(code, _JPEG), is_cmyk_jpeg, lambda: tf.constant(False)),
    )
    return tf.cond(
        needs_rgb,
        lambda: tf.image.rgb_to_grayscale(_decode_as(image_bytes, 3)),
        lambda: _decode_as(image_bytes, 1),
    )


def _decode_as(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
    """``tf.io.decode_image`` to ``channels`` (first frame), except that a JPEG takes Pillow's IDCT.

    ``tf.io.is_jpeg`` tells JPEGs by the first bytes ``decode_image`` itself
    goes by, so every other format takes the same decoder as before.
    """
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=channels, dct_method=JPEG_DCT_METHOD),
        lambda: tf.io.decode_image(image_bytes, channels=channels, expand_animations=False),
    )


def decode_and_resize_batch(
    image_bytes: tf.Tensor, image_size: int, channels: int, method: ResizeMethod = "stretch"
) -> tf.Tensor:
    """Batch form of ``decode_and_resize``: [B] strings to float32 [B, S, S, channels]."""
    return tf.map_fn(
        lambda b: decode_and_resize(b, image_size, channels, method),
        image_bytes,
        fn_output_signature=tf.TensorSpec([image_size, image_size, channels], tf.float32),
    )


def _uint(octets: tf.Tensor, offset: tf.Tensor | int, length: int, *, big_endian: bool = False) -> tf.Tensor:
    """The unsigned integer in ``octets[offset:offset + length]`` as int64.

    Indices past the end read the last byte instead of failing: only a
    truncated file has them, and decoding rejects it anyway.
    """
    last = tf.cast(tf.size(octets), tf.int64) - 1
    indices = tf.minimum(tf.cast(offset, tf.int64) + tf.range(length, dtype=tf.int64), last)
    values = tf.cast(tf.gather(octets, tf.maximum(indices, 0)), tf.int64)
    shifts = tf.range(length, dtype=tf.int64) * 8
    if big_endian:
        shifts = tf.reverse(shifts, [0])
    return tf.reduce_sum(tf.bitwise.left_shift(values, shifts))


def _int32(octets: tf.Tensor, offset: int) -> tf.Tensor:
    """A little-endian signed int32 as int64."""
    value = _uint(octets, offset, 4)
    return tf.where(value >= 2**31, value - 2**32, value)


def _head(image_bytes: tf.Tensor) -> tf.Tensor:
    """The first ``_HEADER_BYTES`` bytes, zero-padded when the file is shorter (substr past the end fails)."""
    padded = tf.strings.join([tf.strings.substr(image_bytes, 0, _HEADER_BYTES), b"\0" * _HEADER_BYTES])
    return tf.strings.substr(padded, 0, _HEADER_BYTES)


def _header(image_bytes: tf.Tensor) -> tf.Tensor:
    """``_head`` as uint8 [_HEADER_BYTES]."""
    return tf.io.decode_raw(_head(image_bytes), tf.uint8)


def _format(image_bytes: tf.Tensor) -> tf.Tensor:
    """The ``_JPEG`` ... ``_WEBP`` code of one encoded image, ``_UNKNOWN`` otherwise (as decode_image tells them)."""

    head = _head(image_bytes)

    def starts_with(magic: bytes, offset: int = 0) -> tf.Tensor:
        return tf.equal(tf.strings.substr(head, offset, len(magic)), magic)

    code = tf.constant(_UNKNOWN)
    for fmt, test in (
        (_WEBP, tf.logical_and(starts_with(b"RIFF"), starts_with(b"WEBP", 8))),
        (_BMP, starts_with(b"BM")),
        (_GIF, starts_with(b"GIF8")),
        (_PNG, starts_with(b"\x89PNG\r\n\x1a\n")),
        (_JPEG, starts_with(b"\xff\xd8\xff")),
    ):
        code = tf.where(test, fmt, code)
    return code


def _jpeg_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
    return shape[0] * shape[1]


def _png_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    header = _header(image_bytes)  # IHDR: big-endian width and height at bytes 16..24.
    return _uint(header, 16, 4, big_endian=True) * _uint(header, 20, 4, big_endian=True)


def _bmp_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    header = _header(image_bytes)  # Little-endian; a negative height means top-down rows.
    core = tf.equal(_uint(header, 14, 4), _BMP_CORE_HEADER_SIZE)
    width = tf.where(core, _uint(header, 18, 2), tf.abs(_int32(header, 18)))
    height = tf.where(core, _uint(header, 20, 2), tf.abs(_int32(header, 22)))
    return width * height


def _gif_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """The canvas plus every frame's own rectangle.

    TensorFlow's GIF decoder decodes all frames into memory before it keeps
    the first one, so every frame counts, not just the logical screen at bytes
    6..10. The loop walks the block structure (descriptors, extensions, their
    sub-blocks) without decoding any image data.
    """
    octets = tf.io.decode_raw(image_bytes, tf.uint8)
    size = tf.cast(tf.size(octets), tf.int64)

    def color_table(packed: tf.Tensor) -> tf.Tensor:
        has_table = tf.not_equal(tf.bitwise.bitwise_and(packed, 0x80), 0)
        size = 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), packed & 7)
        return tf.where(has_table, size, tf.zeros_like(size))

    canvas = _uint(octets, 6, 2) * _uint(octets, 8, 2)
    start = 13 + color_table(_uint(octets, 10, 1))

    def body(position, total, in_sub_blocks, done):
        block = _uint(octets, position, 1)
        descriptor = tf.logical_and(tf.logical_not(in_sub_blocks), tf.equal(block, _GIF_IMAGE_DESCRIPTOR))
        extension = tf.logical_and(tf.logical_not(in_sub_blocks), tf.equal(block, _GIF_EXTENSION))
        frame = _uint(octets, position + 5, 2) * _uint(octets, position + 7, 2)
        # A descriptor is 10 bytes, its local color table, then the LZW code size byte.
        after_descriptor = position + 11 + color_table(_uint(octets, position + 9, 1))
        after_sub_block = position + 1 + block
        position = tf.where(in_sub_blocks, after_sub_block,
                            tf.where(descriptor, after_descriptor, position + 2))
        total = total + tf.where(descriptor, frame, tf.zeros_like(frame))
        done = tf.logical_and(tf.logical_not(in_sub_blocks), tf.logical_not(tf.logical_or(descriptor, extension)))
        in_sub_blocks = tf.where(in_sub_blocks, tf.not_equal(block, 0), tf.logical_or(descriptor, extension))
        return position, total, in_sub_blocks, done

    _, total, _, _ = tf.while_loop(
        lambda position, total, in_sub_blocks, done: tf.logical_and(tf.logical_not(done), position < size),
        body,
        (start, canvas, tf.constant(False), tf.constant(False)),
    )
    return total


def _webp_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """Lossy (VP8), lossless (VP8L) or extended (VP8X) canvas; an animation counts each frame."""
    header = _header(image_bytes)
    chunk = tf.strings.substr(_head(image_bytes), 12, 4)
    lossy = _uint(header, 26, 2) & 0x3FFF, _uint(header, 28, 2) & 0x3FFF
    bits = _uint(header, 21, 4)
    lossless = (bits & 0x3FFF) + 1, (tf.bitwise.right_shift(bits, 14) & 0x3FFF) + 1
    canvas = _uint(header, 24, 3) + 1, _uint(header, 27, 3) + 1
    width = tf.where(tf.equal(chunk, b"VP8 "), lossy[0], tf.where(tf.equal(chunk, b"VP8L"), lossless[0], canvas[0]))
    height = tf.where(tf.equal(chunk, b"VP8 "), lossy[1], tf.where(tf.equal(chunk, b"VP8L"), lossless[1], canvas[1]))
    animated = tf.logical_and(
        tf.equal(chunk, b"VP8X"), tf.not_equal(_uint(header, 20, 1) & _WEBP_ANIMATED_FLAG, 0)
    )
    frames = tf.cond(animated, lambda: _webp_frames(image_bytes), lambda: tf.constant(1, tf.int64))
    return width * height * frames


def _webp_frames(image_bytes: tf.Tensor) -> tf.Tensor:
    """The ANMF chunks of an animated WebP, found by walking the RIFF chunks after VP8X."""
    octets = tf.io.decode_raw(image_bytes, tf.uint8)
    size = tf.cast(tf.size(octets), tf.int64)
    anmf = int.from_bytes(b"ANMF", "little")

    def body(position, frames):
        length = _uint(octets, position + 4, 4)
        frames = frames + tf.cast(tf.equal(_uint(octets, position, 4), anmf), tf.int64)
        return position + 8 + length + (length & 1), frames

    _, frames = tf.while_loop(
        lambda position, frames: position + 8 <= size, body, (tf.constant(30, tf.int64), tf.constant(0, tf.int64))
    )
    return tf.maximum(frames, 1)


def declared_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """Pixels one encoded image would decode to, read from its header only (int64 scalar).

    Unknown formats give 0: ``tf.io.decode_image`` refuses them itself. A
    JPEG whose header cannot be parsed fails here, as it would in decoding.
    """
    return tf.switch_case(
        _format(image_bytes),
        branch_fns={
            _UNKNOWN: lambda: tf.constant(0, tf.int64),
            _JPEG: lambda: _jpeg_pixels(image_bytes),
            _PNG: lambda: _png_pixels(image_bytes),
            _GIF: lambda: _gif_pixels(image_bytes),
            _BMP: lambda: _bmp_pixels(image_bytes),
            _WEBP: lambda: _webp_pixels(image_bytes),
        },
    )


def limit_pixels(image_bytes: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """Returns ``image_bytes`` [B] gated by a check that no image declares more than ``max_pixels``.

    Anything computed from the returned tensor runs only after the check, so
    an oversized image fails the call with an InvalidArgumentError naming the
    limit, its batch position and its pixel count, before decoding allocates
    it. The whole batch fails, as any error inside one signature call does;
    the inference jobs check each image in Python first
    (``transforms.images.check_image``) and retry a failed batch image by
    image, so there this is a second line of defence.
    """
    pixels = tf.map_fn(declared_pixels, image_bytes, fn_output_signature=tf.TensorSpec([], tf.int64))
    over = pixels > max_pixels
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(over)),
        [
            f"image refused before decoding: it declares more than max_pixels={max_pixels} pixels "
            "(the model's serving_max_pixels); batch positions and pixel counts:",
            tf.reshape(tf.where(over), [-1]),
            tf.boolean_mask(pixels, over),
        ],
        summarize=16,
    )
    with tf.control_dependencies([check]):
        return tf.identity(image_bytes)
