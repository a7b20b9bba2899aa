"""The inference jobs hand the model the pixels create_dataset saw: TIFF and EXIF orientation.

``transforms.serving_bytes`` re-encodes, as PNG, what TensorFlow would decode
differently from Pillow. The first tests decode its output the way the serving
signature does (``tf.io.decode_image``) and compare with Pillow's pixels after
create_dataset's orientation and mode steps; the job tests run batch_predict
and extract_embeddings (and search's query embedder) on the trained digits
model and compare each TIFF or EXIF-rotated image with the same pixels sent as
a PNG.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os

import duckdb
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.gcp.pubsub import PubsubMessage
from PIL import Image, ImageOps

from beam_jobs import batch_predict, extract_embeddings
from schemas import prediction
from schemas.publication import published_dir
from tests.fixtures.datasets import DIGITS_IMAGE_SIZE
from tests.fixtures.image_corpus import digit_image
from transforms import images, pubsub_io
from transforms.dead_letters import RejectedInput, read_dead_letters
from transforms.embedding_rows import QueryEmbedder
from transforms.image_inputs import keyed_image
from transforms.serving_bytes import serving_bytes

MAX_PIXELS = 1_000_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORIENTATION = 0x0112
TOLERANCE = 1e-5


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def asymmetric_rgb() -> Image.Image:
    """24x40, a different color in each corner, so any flip or rotation changes the pixels."""
    pixels = np.full((24, 40, 3), 30, np.uint8)
    pixels[:8, :10] = (250, 20, 20)
    pixels[:8, -6:] = (20, 250, 20)
    pixels[-5:, :4] = (20, 20, 250)
    pixels[12:, 20:] += np.arange(20, dtype=np.uint8)[None, :, None] * 10
    return Image.fromarray(pixels, "RGB")


def with_orientation(image: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **kwargs)


def prepared(data: bytes) -> bytes:
    return serving_bytes(data, images.check_image(data, MAX_PIXELS))


def tf_pixels(data: bytes, channels: int) -> np.ndarray:
    return tf.io.decode_image(data, channels=channels, expand_animations=False).numpy().astype(int)


def pillow_pixels(data: bytes, mode: str) -> np.ndarray:
    """create_dataset's pixels before resizing: oriented, 8-bit, then RGB or L (transforms.images.normalize_image)."""
    image = images.to_8bit(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))).convert(mode)
    return np.asarray(image).reshape(image.size[1], image.size[0], -1).astype(int)


def palette_bmp() -> bytes:
    return encode(asymmetric_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "BMP")


PASSED_THROUGH = {
    "jpeg": lambda: encode(asymmetric_rgb(), "JPEG", quality=90),
    "jpeg_upright_exif": lambda: with_orientation(asymmetric_rgb(), "JPEG", 1, quality=90),
    "png": lambda: encode(asymmetric_rgb(), "PNG"),
    "gif": lambda: encode(asymmetric_rgb().convert("P"), "GIF"),
    "webp": lambda: encode(asymmetric_rgb(), "WEBP", lossless=True),
    "bmp_24_bit": lambda: encode(asymmetric_rgb(), "BMP"),
}


@pytest.mark.parametrize("name", sorted(PASSED_THROUGH))
def test_images_tensorflow_reads_like_pillow_pass_through_untouched(name: str) -> None:
    data = PASSED_THROUGH[name]()
    assert prepared(data) is data


RE_ENCODED = {
    "tiff_gray": lambda: encode(digit_image(3, size=DIGITS_IMAGE_SIZE)[0], "TIFF"),
    "tiff_rgb_lzw": lambda: encode(asymmetric_rgb(), "TIFF", compression="tiff_lzw"),
    "tiff_16_bit": lambda: encode(Image.fromarray(np.asarray(asymmetric_rgb().convert("L"), np.uint16) * 257), "TIFF"),
    "tiff_cmyk": lambda: encode(asymmetric_rgb().convert("CMYK"), "TIFF"),
    "tiff_rotated": lambda: with_orientation(asymmetric_rgb(), "TIFF", 8),
    "bmp_palette": palette_bmp,
    "bmp_1_bit": lambda: encode(asymmetric_rgb().convert("1"), "BMP"),
    "jpeg_orientation_6": lambda: with_orientation(asymmetric_rgb(), "JPEG", 6, quality=90),
    "jpeg_gray_orientation_3": lambda: with_orientation(asymmetric_rgb().convert("L"), "JPEG", 3, quality=90),
    "png_orientation_5": lambda: with_orientation(asymmetric_rgb(), "PNG", 5),
}


@pytest.mark.parametrize("name", sorted(RE_ENCODED))
def test_what_tensorflow_reads_differently_becomes_a_png_of_pillows_oriented_pixels(name: str) -> None:
    data = RE_ENCODED[name]()
    out = prepared(data)
    assert out.startswith(PNG_MAGIC)
    want_rgb = pillow_pixels(data, "RGB")
    np.testing.assert_array_equal(tf_pixels(out, 3), want_rgb)
    # A 1-channel model's gray comes from libpng's conversion, within a level of Pillow's.
    assert np.abs(tf_pixels(out, 1) - pillow_pixels(data, "L")).max() <= 1
    # ... and TensorFlow alone would have failed or seen other pixels (so the test can fail).
    try:
        raw = tf_pixels(data, 3)
    except tf.errors.InvalidArgumentError:
        return
    assert raw.shape != want_rgb.shape or np.abs(raw - want_rgb).max() > 20


def test_a_tiff_bomb_and_a_broken_tiff_keep_their_reasons() -> None:
    bomb = encode(Image.new("L", (1200, 1000)), "TIFF", compression="tiff_lzw")
    with pytest.raises(RejectedInput) as refused:
        keyed_image("bomb", "/x/bomb.tiff", bomb, MAX_PIXELS)
    assert refused.value.error_type == images.TOO_MANY_PIXELS
    whole = encode(asymmetric_rgb(), "TIFF")
    with pytest.raises(RejectedInput) as broken:
        keyed_image("cut", "/x/cut.tiff", whole[: len(whole) // 2], MAX_PIXELS)
    assert broken.value.error_type == images.CORRUPT_IMAGE


def test_stream_messages_are_prepared_like_files() -> None:
    tiff = RE_ENCODED["tiff_gray"]()
    message = PubsubMessage(tiff, {pubsub_io.IMAGE_ID_KEY: "scan"}, message_id="m1")
    _, image = pubsub_io.image_of_message(message, "raw_bytes", max_pixels=MAX_PIXELS, event_time=0.0)
    assert image.image_bytes == prepared(tiff) and image.image_bytes.startswith(PNG_MAGIC)


# --- The jobs, on the trained digits model ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pairs:
    """Image files written for the job tests, by role; each job must treat a pair's members alike."""

    paths: dict[str, str]
    manifest: str


def _digit_pairs(directory: str) -> Pairs:
    digit, _ = digit_image(7, size=DIGITS_IMAGE_SIZE)  # A 7 is asymmetric: turned, it is no longer a 7.
    # Stored turned a quarter left; orientation 6 tells viewers to turn it a quarter right, upright again.
    rotated = with_orientation(digit.transpose(Image.Transpose.ROTATE_90), "JPEG", 6, quality=95)
    as_stored = Image.open(io.BytesIO(rotated))
    color, _ = digit_image(4, size=DIGITS_IMAGE_SIZE)
    color = Image.merge("RGB", (color, color.point(lambda v: v // 2), color.point(lambda v: 255 - v)))
    files = {
        "rotated.jpg": rotated,
        # What create_dataset sees in rotated.jpg (Pillow's decode, oriented) and what ignoring EXIF would see.
        "upright.png": encode(ImageOps.exif_transpose(as_stored), "PNG"),
        "sideways.png": encode(as_stored, "PNG"),
        "gray.tiff": encode(digit_image(2, size=DIGITS_IMAGE_SIZE)[0], "TIFF"),
        "gray.png": encode(digit_image(2, size=DIGITS_IMAGE_SIZE)[0], "PNG"),
        "color.tiff": encode(color, "TIFF", compression="tiff_lzw"),
        "color.png": encode(color, "PNG"),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(directory, name)
        with open(paths[name], "wb") as handle:
            handle.write(data)
    manifest = os.path.join(directory, "manifest.csv")
    with open(manifest, "w") as handle:
        handle.write("".join(f"{path},7\n" for path in paths.values()))
    return Pairs(paths, manifest)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Pairs:
    return _digit_pairs(str(tmp_path_factory.mktemp("serving_pairs")))


@pytest.fixture(scope="module")
def predictions(pairs: Pairs, trained_digits_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """batch_predict's row of each file (all 10 classes' probabilities), by file name."""
    out = str(tmp_path_factory.mktemp("serving_predictions") / "out")
    assert batch_predict.main(["--model_dir", trained_digits_model, "--input", pairs.manifest, "--output", out,
                               "--top_k", "10", "--max_pixels", str(MAX_PIXELS)]) == 0
    assert read_dead_letters(out) == []
    rows = {}
    for path in glob.glob(prediction.jsonl_predictions_pattern(published_dir(out))):
        with open(path) as handle:
            for line in filter(str.strip, handle):
                row = json.loads(line)
                rows[os.path.basename(row["uri"])] = row
    return rows


@pytest.fixture(scope="module")
def embeddings(pairs: Pairs, trained_digits_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """extract_embeddings' vector of each file, by file name."""
    database = str(tmp_path_factory.mktemp("serving_embeddings") / "warehouse.duckdb")
    assert extract_embeddings.main(["--model_dir", trained_digits_model, "--input", pairs.manifest,
                                    "--warehouse", f"duckdb:{database}", "--max_pixels", str(MAX_PIXELS)]) == 0
    with duckdb.connect(database, read_only=True) as connection:
        rows = connection.execute("SELECT uri, embedding FROM embeddings").fetchall()
    return {os.path.basename(uri): np.asarray(vector, np.float32) for uri, vector in rows}


def probabilities(row: dict) -> dict[str, float]:
    return dict(zip(row["top_k_labels"], row["top_k_probabilities"]))


def assert_same_prediction(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert probabilities(got) == pytest.approx(probabilities(want), abs=TOLERANCE)


@pytest.mark.parametrize("tiff, png", [("gray.tiff", "gray.png"), ("color.tiff", "color.png")])
def test_batch_predict_predicts_a_tiff_as_the_same_pixels_in_a_png(predictions: dict, tiff: str, png: str) -> None:
    assert_same_prediction(predictions[tiff], predictions[png])


def test_batch_predict_applies_exif_orientation(predictions: dict) -> None:
    assert_same_prediction(predictions["rotated.jpg"], predictions["upright.png"])
    assert predictions["upright.png"]["label"] == "7"
    # The control: the pixels as stored, unturned, are predicted otherwise.
    sideways, upright = probabilities(predictions["sideways.png"]), probabilities(predictions["upright.png"])
    assert max(abs(sideways[label] - upright[label]) for label in upright) > 0.05


@pytest.mark.parametrize("tiff, png", [("gray.tiff", "gray.png"), ("color.tiff", "color.png")])
def test_extract_embeddings_embeds_a_tiff_as_the_same_pixels_in_a_png(embeddings: dict, tiff: str, png: str) -> None:
    np.testing.assert_allclose(embeddings[tiff], embeddings[png], atol=TOLERANCE)


def test_extract_embeddings_applies_exif_orientation(embeddings: dict) -> None:
    np.testing.assert_allclose(embeddings["rotated.jpg"], embeddings["upright.png"], atol=TOLERANCE)
    assert np.abs(embeddings["sideways.png"] - embeddings["upright.png"]).max() > 100 * TOLERANCE


def test_search_queries_are_embedded_like_extract_embeddings(pairs: Pairs, embeddings: dict,
                                                             trained_digits_model: str) -> None:
    embedder = QueryEmbedder(trained_digits_model)
    for name in ("rotated.jpg", "gray.tiff", "color.tiff"):
        with open(pairs.paths[name], "rb") as handle:
            vector, _ = embedder.embed(handle.read())
        np.testing.assert_allclose(vector, embeddings[name], atol=TOLERANCE)
