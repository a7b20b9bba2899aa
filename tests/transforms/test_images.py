"""Image normalization on real files of every supported form, and each kind of bad file."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.image_corpus import bad_idat_crc_png, model_refused_png
from transforms.dead_letters import RejectedInput
from transforms.images import (
    CORRUPT_IMAGE,
    NOT_AN_IMAGE,
    UNSUPPORTED_FORMAT,
    ImageSpec,
    check_image,
    normalize_image,
    read_image_bytes,
)


def _decode(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)))


def _load(path: str, spec: ImageSpec):
    return normalize_image(read_image_bytes(path), spec)


def test_every_good_form_decodes_to_the_requested_shape(image_corpus):
    spec = ImageSpec(image_size=24, channels=3, image_format="png")
    good = [path for path, outcome in image_corpus.expected.items() if outcome is None]
    assert len(good) == 7
    for path in good:
        normalized = _load(path, spec)
        assert _decode(normalized.encoded).shape == (24, 24, 3), path


def test_grayscale_output_has_one_channel(image_corpus):
    path = next(p for p in image_corpus.expected if p.endswith("rgb.jpg"))
    normalized = _load(path, ImageSpec(image_size=16, channels=1, image_format="png"))
    assert _decode(normalized.encoded).shape == (16, 16)
    assert normalized.channels == 1


def test_exif_orientation_is_applied(image_corpus):
    path = next(p for p in image_corpus.expected if p.endswith("exif_rotated.jpg"))
    normalized = _load(path, ImageSpec(image_size=30, resize_method="pad", image_format="png"))
    # Stored 60x30 landscape, displayed 30x60 portrait.
    assert (normalized.original_width, normalized.original_height) == (30, 60)
    pixels = _decode(normalized.encoded)
    # Padding a portrait image puts black bars left and right, not top and bottom.
    assert pixels[:, :5].max() == 0 and pixels[:, -5:].max() == 0
    assert pixels[:5, 10:20].max() > 0


def test_png_at_the_target_size_is_stored_exactly(image_corpus):
    path = next(p for p in image_corpus.expected if p.endswith("gray.png"))
    normalized = _load(path, ImageSpec(image_size=40, channels=1, image_format="png"))
    np.testing.assert_array_equal(_decode(normalized.encoded), np.asarray(Image.open(path)))


@pytest.mark.parametrize("method,expected_shape", [("stretch", (20, 20, 3)), ("pad", (20, 20, 3)), ("crop", (20, 20, 3))])
def test_resize_methods_give_square_images(image_corpus, method, expected_shape):
    path = next(p for p in image_corpus.expected if p.endswith("exif_rotated.jpg"))
    assert _decode(_load(path, ImageSpec(image_size=20, resize_method=method)).encoded).shape == expected_shape


def test_each_bad_file_is_rejected_with_its_reason(image_corpus):
    spec = ImageSpec(image_size=24, max_pixels=1_000_000)
    bad = {p: o for p, o in image_corpus.expected.items() if o not in (None, "unknown_label")}
    assert len(bad) == 5
    for path, reason in bad.items():
        with pytest.raises(RejectedInput) as raised:
            _load(path, spec)
        assert raised.value.error_type == reason, path


@pytest.mark.parametrize("field,value", [("image_size", 0), ("channels", 2), ("resize_method", "warp"),
                                         ("image_format", "gif"), ("jpeg_quality", 101), ("max_pixels", 0)])
def test_bad_image_spec_names_the_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        ImageSpec(**{field: value})


def _psd(width: int, height: int) -> bytes:
    """A minimal RGB Photoshop file written by hand (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # No colour mode data, image resources or layers.
    pixels = struct.pack(">H", 0) + bytes(range(width * height)) * 3  # Raw, one plane per channel.
    return header + sections + pixels


def _pillow_file(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["eps", "psd", "ico"])
def test_known_but_unsupported_formats_are_never_decoded(tmp_path, name):
    data = _psd(4, 4) if name == "psd" else _pillow_file(name.upper())
    # They are real files of their format: Pillow opens them when allowed to.
    assert Image.open(io.BytesIO(data), formats=[name.upper()]).size in ((4, 4), (16, 16))
    path = tmp_path / f"image.{name}"
    path.write_bytes(data)
    with pytest.raises(RejectedInput) as raised:
        _load(str(path), ImageSpec(image_size=8))
    assert raised.value.error_type == UNSUPPORTED_FORMAT
    assert name.upper() in str(raised.value)
    with pytest.raises(RejectedInput) as checked:
        check_image(data, 1_000_000)
    assert checked.value.error_type == UNSUPPORTED_FORMAT


@pytest.mark.parametrize("name", ["webp", "tiff"])
def test_webp_and_tiff_are_supported(tmp_path, name):
    path = tmp_path / f"image.{name}"
    path.write_bytes(_pillow_file(name.upper()))
    normalized = _load(str(path), ImageSpec(image_size=8, image_format="png"))
    assert _decode(normalized.encoded).shape == (8, 8, 3)


def test_unrecognized_bytes_stay_not_an_image():
    with pytest.raises(RejectedInput) as raised:
        check_image(b"GIF87 is almost a signature, but this is text", 1_000_000)
    assert raised.value.error_type == NOT_AN_IMAGE


def test_a_png_with_a_bad_idat_crc_is_corrupt_for_storage_and_inference_alike():
    data = bad_idat_crc_png()
    # Pillow alone loads it: the CRC check is what refuses it.
    Image.open(io.BytesIO(data)).load()
    for attempt in (lambda: check_image(data, 10_000), lambda: normalize_image(data, ImageSpec(image_size=8))):
        with pytest.raises(RejectedInput) as raised:
            attempt()
        assert raised.value.error_type == CORRUPT_IMAGE
        assert "'IDAT' chunk at byte 33 fails its CRC check" in str(raised.value)


def test_a_png_with_an_unknown_critical_chunk_passes_the_checks():
    # The job tests' stand-in for an image only the model refuses (inference_failed): its CRCs hold,
    # Pillow skips the chunk, libpng refuses it.
    assert check_image(model_refused_png(), 10_000).size == (40, 40)
    assert normalize_image(model_refused_png(), ImageSpec(image_size=8)).height == 8
