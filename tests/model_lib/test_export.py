"""Exported SavedModel: training-serving parity in a fresh process, signatures, versioning."""

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

from model_lib import export, input_pipeline, preprocessing
from model_lib.dataset_io import read_dataset, split_files
from schemas import dataset, model_artifacts

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


def test_saved_model_in_a_fresh_process_matches_the_in_memory_model(trained_digits_model, digits_dataset, tmp_path):
    images, uris = _parity_images(digits_dataset, str(tmp_path))
    uris_file, output_file = str(tmp_path / "uris.txt"), str(tmp_path / "served.npz")
    with open(uris_file, "w") as handle:
        handle.write("\n".join(uris))
    subprocess.run(
        [sys.executable, "-c", _SERVE_IN_FRESH_PROCESS, trained_digits_model, uris_file, output_file],
        check=True, capture_output=True, timeout=300,
    )
    served = dict(np.load(output_file))
    expected = _in_memory_outputs(trained_digits_model, digits_dataset.dataset_dir, images)
    labels = model_artifacts.ModelInfo.read(trained_digits_model).labels

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
    with open(os.path.join(trained_digits_model, model_artifacts.METRICS_FILE)) as handle:
        assert correct / total == pytest.approx(json.load(handle)["test"]["accuracy"])


def test_signatures_declare_the_contract(trained_digits_model):
    loaded = tf.saved_model.load(os.path.join(trained_digits_model, model_artifacts.SAVED_MODEL_DIR))
    for name, key in ((model_artifacts.SERVING_SIGNATURE, model_artifacts.IMAGE_BYTES_INPUT),
                      (model_artifacts.FROM_URIS_SIGNATURE, model_artifacts.URIS_INPUT)):
        signature = loaded.signatures[name]
        _, inputs = signature.structured_input_signature
        assert list(inputs) == [key]
        assert inputs[key].dtype == tf.string and inputs[key].shape.as_list() == [None]
        assert set(signature.structured_outputs) == {
            model_artifacts.OUTPUT_LABEL, model_artifacts.OUTPUT_LABEL_INDEX,
            model_artifacts.OUTPUT_PROBABILITIES, model_artifacts.OUTPUT_EMBEDDING,
        }


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
