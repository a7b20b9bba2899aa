"""Exported SavedModel: training-serving parity in a fresh process, signatures, serving guards, versioning."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from model_lib import export, image_ops, input_pipeline, preprocessing, training
from model_lib.dataset_io import read_dataset, split_files
from schemas import dataset, model_artifacts
from schemas.classification_metrics import ModelMetrics
from schemas.model_artifacts import ModelInfo
from transforms.images import ImageSpec

# The limit of the re-exported model below: small, so oversized test images stay tiny.
_SMALL_MAX_PIXELS = 100_000

_SERVE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    model_dir, uris_file, output_file = sys.argv[1:]
    with open(uris_file) as handle:
        uris = handle.read().splitlines()
    images = []
    for uri in uris:
        with open(uri, "rb") as image:
            images.append(image.read())
    loaded = tf.saved_model.load(model_dir + "/saved_model")
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    by_uris = loaded.signatures["from_uris"](uris=tf.constant(uris))

    def plain(value):
        array = value.numpy()
        return np.array([b.decode() for b in array]) if array.dtype == object else array

    np.savez(
        output_file,
        **{f"bytes_{k}": plain(v) for k, v in by_bytes.items()},
        **{f"uris_{k}": plain(v) for k, v in by_uris.items()},
    )
    """
)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _parity_images(digits_dataset, directory) -> tuple[list[bytes], list[str]]:
    """Stored test-split images, plus source digits re-encoded at other sizes, modes and formats."""
    images: list[bytes] = []
    for batch in read_dataset(split_files(digits_dataset.dataset_dir, "test"), batch_size=24).take(1):
        images += [bytes(b) for b in batch[dataset.IMAGE].numpy()]
    sources = sorted(
        os.path.join(root, name) for root, _, names in os.walk(digits_dataset.source.image_dir) for name in names
    )[::150]
    for path in sources:
        with Image.open(path) as source:
            gray = source.convert("L")
        images.append(_encode(gray.resize((48, 48), Image.Resampling.BICUBIC), "PNG"))
        images.append(_encode(gray.resize((20, 27)).convert("RGB"), "JPEG"))
        images.append(_encode(gray.resize((64, 64)).convert("RGB"), "PNG"))
    uris = []
    for index, data in enumerate(images):
        uri = os.path.join(directory, f"image_{index:03d}.img")
        with open(uri, "wb") as handle:
            handle.write(data)
        uris.append(uri)
    return images, uris


def _in_memory_outputs(model_dir: str, dataset_dir: str, images: list[bytes]) -> dict[str, np.ndarray]:
    """The training path: the dataset's tf.Transform layer then the Keras model, in this process."""
    model = keras.models.load_model(os.path.join(model_dir, model_artifacts.KERAS_MODEL_FILE))
    transform = input_pipeline.load_transform_output(dataset_dir).transform_features_layer()
    pixels = transform({dataset.IMAGE: tf.constant(images)})[preprocessing.PIXELS]
    with_embedding = keras.Model(model.inputs, [model.output, model.get_layer("embedding").output])
    probabilities, embedding = (np.asarray(t) for t in with_embedding(pixels, training=False))
    return {
        "probabilities": probabilities,
        "embedding": embedding / np.linalg.norm(embedding, axis=1, keepdims=True),
    }


@pytest.fixture(scope="module")
def uri_model(trained_digits_model, digits_dataset, tmp_path_factory) -> tuple[str, str]:
    """``trained_digits_model`` re-exported with ``from_uris`` under a fresh directory and a small pixel limit.

    Returns:
      (model_dir, images_dir): ``images_dir + "/"`` is the allowlisted prefix.
    """
    images_dir = str(tmp_path_factory.mktemp("served_images"))
    model_dir = str(tmp_path_factory.mktemp("uri_model"))
    info = ModelInfo.read(trained_digits_model)
    export.export_model(
        keras.models.load_model(os.path.join(trained_digits_model, model_artifacts.KERAS_MODEL_FILE)),
        model_dir=model_dir,
        transform_output=input_pipeline.load_transform_output(digits_dataset.dataset_dir),
        labels=info.labels,
        architecture=info.architecture,
        image_size=info.image_size,
        channels=info.channels,
        dataset_fingerprint=info.dataset_fingerprint,
        hyperparameters=info.hyperparameters,
        serving_uri_prefix=images_dir + "/",
        serving_max_pixels=_SMALL_MAX_PIXELS,
    )
    return model_dir, images_dir


def _signatures(model_dir: str):
    return tf.saved_model.load(os.path.join(model_dir, model_artifacts.SAVED_MODEL_DIR)).signatures


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_saved_model_in_a_fresh_process_matches_the_in_memory_model(uri_model, digits_dataset, tmp_path):
    model_dir, images_dir = uri_model
    images, uris = _parity_images(digits_dataset, images_dir)
    uris_file, output_file = str(tmp_path / "uris.txt"), str(tmp_path / "served.npz")
    with open(uris_file, "w") as handle:
        handle.write("\n".join(uris))
    subprocess.run(
        [sys.executable, "-c", _SERVE_IN_FRESH_PROCESS, model_dir, uris_file, output_file],
        check=True, capture_output=True, timeout=300,
    )
    served = dict(np.load(output_file))
    expected = _in_memory_outputs(model_dir, digits_dataset.dataset_dir, images)
    labels = model_artifacts.ModelInfo.read(model_dir).labels

    for source in ("bytes", "uris"):
        np.testing.assert_allclose(served[f"{source}_probabilities"], expected["probabilities"], atol=1e-5)
        np.testing.assert_allclose(served[f"{source}_embedding"], expected["embedding"], atol=1e-5)
        want_index = expected["probabilities"].argmax(axis=1)
        np.testing.assert_array_equal(served[f"{source}_label_index"], want_index)
        assert list(served[f"{source}_label"]) == [labels[i] for i in want_index]
    assert served["bytes_probabilities"].shape == (len(images), 10)
    assert served["bytes_probabilities"].dtype == np.float32
    assert served["bytes_label_index"].dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(served["bytes_embedding"], axis=1), 1.0, rtol=1e-5)


def test_serving_classifies_stored_test_images_like_the_evaluation(trained_digits_model, digits_dataset):
    loaded = tf.saved_model.load(os.path.join(trained_digits_model, model_artifacts.SAVED_MODEL_DIR))
    signature = loaded.signatures[model_artifacts.SERVING_SIGNATURE]
    correct = total = 0
    for batch in read_dataset(split_files(digits_dataset.dataset_dir, "test"), batch_size=64):
        outputs = signature(**{model_artifacts.IMAGE_BYTES_INPUT: batch[dataset.IMAGE]})
        correct += int(np.sum(outputs[model_artifacts.OUTPUT_LABEL].numpy() == batch[dataset.LABEL].numpy()))
        total += len(batch[dataset.LABEL])
    assert correct / total == pytest.approx(ModelMetrics.read(trained_digits_model).test.accuracy)


def test_signatures_declare_the_contract(uri_model):
    signatures = _signatures(uri_model[0])
    for name, key in ((model_artifacts.SERVING_SIGNATURE, model_artifacts.IMAGE_BYTES_INPUT),
                      (model_artifacts.FROM_URIS_SIGNATURE, model_artifacts.URIS_INPUT)):
        signature = signatures[name]
        _, inputs = signature.structured_input_signature
        assert list(inputs) == [key]
        assert inputs[key].dtype == tf.string and inputs[key].shape.as_list() == [None]
        assert set(signature.structured_outputs) == {
            model_artifacts.OUTPUT_LABEL, model_artifacts.OUTPUT_LABEL_INDEX,
            model_artifacts.OUTPUT_PROBABILITIES, model_artifacts.OUTPUT_EMBEDDING,
        }


def test_from_uris_is_not_exported_by_default(trained_digits_model):
    loaded = tf.saved_model.load(os.path.join(trained_digits_model, model_artifacts.SAVED_MODEL_DIR))
    assert sorted(loaded.signatures) == [model_artifacts.SERVING_SIGNATURE]
    assert not hasattr(loaded, "serve_uris")  # no file-reading function saved at all
    info = ModelInfo.read(trained_digits_model)
    assert info.serving_uri_prefix is None and not info.has_from_uris
    assert info.serving_max_pixels == export.DEFAULT_SERVING_MAX_PIXELS == ImageSpec.max_pixels


def test_model_info_records_the_serving_guards(uri_model):
    model_dir, images_dir = uri_model
    info = ModelInfo.read(model_dir)
    assert info.serving_uri_prefix == images_dir + "/" and info.has_from_uris
    assert info.serving_max_pixels == _SMALL_MAX_PIXELS


def test_model_info_written_before_the_serving_guards_still_reads():
    old = {"architecture": "small_cnn", "image_size": 28, "channels": 1, "labels": ["0", "1"],
           "embedding_dim": 8, "model_version": "0" * 16, "dataset_fingerprint": "f"}
    info = ModelInfo.from_json(json.dumps(old))
    assert info.serving_uri_prefix is None and info.serving_max_pixels is None


def test_from_uris_serves_only_uris_under_its_prefix(uri_model, tmp_path):
    model_dir, images_dir = uri_model
    digit = _encode(Image.new("L", (28, 28), 200), "PNG")
    inside = _write(os.path.join(images_dir, "inside.png"), digit)
    os.makedirs(images_dir + "2", exist_ok=True)
    refused = [
        _write(str(tmp_path / "secret.png"), digit),  # a readable image outside the prefix
        os.path.join(images_dir, "..", os.path.basename(images_dir), "inside.png"),  # resolves inside, still refused
        os.path.join(images_dir, "..", "secret.png"),
        _write(images_dir + "2/sibling.png", digit),  # shares the prefix string, not the directory
        "/etc/hostname",
    ]
    from_uris = _signatures(model_dir)[model_artifacts.FROM_URIS_SIGNATURE]
    served = from_uris(**{model_artifacts.URIS_INPUT: tf.constant([inside])})
    assert served[model_artifacts.OUTPUT_PROBABILITIES].shape == (1, 10)
    for uri in refused:
        with pytest.raises(tf.errors.InvalidArgumentError, match="serving_uri_prefix") as error:
            from_uris(**{model_artifacts.URIS_INPUT: tf.constant([inside, uri])})
        assert uri in str(error.value)


def test_serving_refuses_oversized_png_and_jpeg_before_decoding(trained_digits_model):
    serve = _signatures(trained_digits_model)[model_artifacts.SERVING_SIGNATURE]
    normal = _encode(Image.new("L", (28, 28), 90), "PNG")
    assert serve(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant([normal])})[
        model_artifacts.OUTPUT_LABEL].shape == (1,)
    huge = Image.new("L", (8000, 8000), 128)  # 64,000,000 pixels > 50,000,000; a few KB encoded
    for fmt in ("PNG", "JPEG"):
        data = _encode(huge, fmt)
        assert len(data) < 2_000_000
        with pytest.raises(tf.errors.InvalidArgumentError, match="max_pixels=50000000") as error:
            serve(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant([normal, data])})
        assert "64000000" in str(error.value)


def _animated_gif(size: tuple[int, int], frames: int) -> bytes:
    images = [Image.new("L", size, 20 * i) for i in range(frames)]  # distinct, so Pillow keeps every frame
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    with Image.open(buffer) as written:
        assert written.n_frames == frames
    return buffer.getvalue()


def test_serving_limit_covers_gif_bmp_and_webp(uri_model):
    serve = _signatures(uri_model[0])[model_artifacts.SERVING_SIGNATURE]
    small = Image.new("RGB", (100, 100), (9, 90, 200))  # 10,000 pixels
    large = Image.new("RGB", (400, 400), (9, 90, 200))  # 160,000 pixels > _SMALL_MAX_PIXELS
    # The 1-channel model decodes GIF, BMP and WebP as RGB and converts them to gray (image_ops._decode):
    # the refusals below come from the pixel limit, which names itself.
    served = [_encode(small, fmt) for fmt in ("PNG", "JPEG")]
    assert serve(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant(served)})[
        model_artifacts.OUTPUT_LABEL].shape == (2,)
    # Every GIF frame counts: TF decodes them all before keeping the first.
    refused = [_encode(large, fmt) for fmt in ("GIF", "BMP", "WEBP")] + [_animated_gif((100, 100), 12)]
    for data in refused:
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"max_pixels={_SMALL_MAX_PIXELS}"):
            serve(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant([data])})


def test_declared_pixels_reads_each_format_header():
    declared = tf.function(image_ops.declared_pixels, input_signature=[tf.TensorSpec([], tf.string)])
    image = Image.new("RGB", (123, 45), (10, 200, 30))
    for fmt, options in (("JPEG", {}), ("PNG", {}), ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        assert int(declared(buffer.getvalue())) == 123 * 45, fmt
    top_down = bytearray(_encode(image, "BMP"))  # height field negated: rows stored top-down
    top_down[22:26] = (-45).to_bytes(4, "little", signed=True)
    assert int(declared(bytes(top_down))) == 123 * 45
    assert int(declared(_encode(image, "GIF"))) == 2 * 123 * 45  # canvas + its one frame
    assert int(declared(_animated_gif((60, 50), 5))) == 6 * 60 * 50
    assert int(declared(b"not an image")) == 0 and int(declared(b"")) == 0


def test_serving_options_are_validated():
    for prefix in ("relative/images/", "/data/images", "/", "gs://", "/data//images/", "/data/../images/",
                   "gs://bucket/./images/", "s3://bucket/"):
        with pytest.raises(ValueError, match="serving_uri_prefix"):
            export.validate_serving_options(prefix, 1)
        with pytest.raises(training.InvalidHyperparameter, match="serving_uri_prefix"):
            training.HParams(serving_uri_prefix=prefix)
    for max_pixels in (0, -5, 2.5, True):
        with pytest.raises(training.InvalidHyperparameter, match="serving_max_pixels"):
            training.HParams(serving_max_pixels=max_pixels)
    for prefix in ("/data/images/", "gs://bucket/", "gs://bucket/images/"):
        assert training.HParams(serving_uri_prefix=prefix).serving_uri_prefix == prefix


def test_training_exports_from_uris_when_asked(small_digits_dataset, tmp_path):
    prefix = str(tmp_path / "images") + "/"
    result = training.train_and_export(
        small_digits_dataset.dataset_dir, str(tmp_path / "model"),
        {"epochs": 1, "serving_uri_prefix": prefix, "serving_max_pixels": 1234},
    )
    assert result.model_info.serving_uri_prefix == prefix and result.model_info.serving_max_pixels == 1234
    assert ModelInfo.read(result.model_dir) == result.model_info
    assert model_artifacts.FROM_URIS_SIGNATURE in _signatures(result.model_dir)


def test_model_version_is_a_hash_of_the_weights(trained_digits_model):
    path = os.path.join(trained_digits_model, model_artifacts.KERAS_MODEL_FILE)
    model, same = keras.models.load_model(path), keras.models.load_model(path)
    assert export.model_version(model) == export.model_version(same)
    weights = same.get_weights()
    weights[0] = weights[0] + 1e-3
    same.set_weights(weights)
    assert export.model_version(model) != export.model_version(same)


def test_copy_model_dir_publishes_without_excluded_entries(tmp_path):
    source = tmp_path / "trial"
    (source / "saved_model" / "variables").mkdir(parents=True)
    (source / "saved_model" / "variables" / "v.index").write_bytes(b"index")
    (source / "checkpoints").mkdir()
    (source / "checkpoints" / "state.json").write_text("{}")
    (source / "model_info.json").write_text("{}")
    destination = tmp_path / "best"
    destination.mkdir()
    (destination / "stale.txt").write_text("old")
    export.copy_model_dir(str(source), str(destination), exclude=("checkpoints",))
    copied = sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file())
    assert copied == ["model_info.json", "saved_model/variables/v.index"]
