"""ImageModelHandler and PredictImages on the real exported digits model."""

from __future__ import annotations

import io
import random

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from model_lib import sample_data
from schemas import model_artifacts
from schemas.model_artifacts import ModelInfo
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.image_inputs import ImageInput
from transforms.model_handler import (
    INFERENCE_FAILED,
    MODEL_LOADS_COUNTER,
    RETRIED_BATCHES_COUNTER,
    ImageModelHandler,
    ModelOutputs,
    PredictImages,
)
from transforms.prediction_rows import prediction_row, top_k
from transforms.splitting import image_id_for_uri


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory) -> list[ImageInput]:
    """60 real digits as PNG files, read back as inputs."""
    written = sample_data.write_digits(str(tmp_path_factory.mktemp("digits")), limit=60)
    inputs = []
    with open(written.manifest) as handle:
        for line in handle.read().splitlines():
            uri, label = line.split(",")
            with open(uri, "rb") as image:
                inputs.append(ImageInput(image_id_for_uri(uri), uri, image.read(), label=label))
    return inputs


def saved_model_outputs(model_dir: str, images: list[bytes]) -> dict[str, np.ndarray]:
    """What the SavedModel itself answers for a batch, called without Beam."""
    loaded = tf.saved_model.load(f"{model_dir}/{model_artifacts.SAVED_MODEL_DIR}")
    signature = loaded.signatures[model_artifacts.SERVING_SIGNATURE]
    outputs = signature(**{model_artifacts.IMAGE_BYTES_INPUT: tf.constant(images, dtype=tf.string)})
    return {key: value.numpy() for key, value in outputs.items()}


def tiff_bytes() -> bytes:
    """A valid image Pillow decodes but the model's tf.io.decode_image rejects."""
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 200).save(buffer, format="TIFF")
    return buffer.getvalue()


def comparable(element: tuple[str, PredictionResult]) -> tuple:
    key, result = element
    outputs: ModelOutputs = result.inference
    return (key, result.example.image_id, result.example.image_bytes, outputs.label, outputs.label_index,
            outputs.probabilities.tolist(), outputs.embedding.tolist(), result.model_id)


def matches_saved_model(expected: dict[str, tuple]):
    """A matcher: every key predicted once, with the SavedModel's own outputs."""

    def check(actual: list[tuple]) -> None:
        assert sorted(a[0] for a in actual) == sorted(expected)
        for key, image_id, image_bytes, label, label_index, probabilities, embedding, model_id in actual:
            want_id, want_label, want_index, want_probabilities, want_embedding, want_version = expected[key]
            assert image_id == want_id
            assert image_bytes == b"", "results must not carry image bytes"
            assert (label, label_index) == (want_label, want_index), key
            np.testing.assert_allclose(probabilities, want_probabilities, atol=1e-5)
            np.testing.assert_allclose(embedding, want_embedding, atol=1e-5)
            assert model_id == want_version

    return check


def expected_by_key(model_dir: str, keyed: list[tuple[str, ImageInput]]) -> dict[str, tuple]:
    outputs = saved_model_outputs(model_dir, [image.image_bytes for _, image in keyed])
    version = ModelInfo.read(model_dir).model_version
    return {
        key: (
            image.image_id,
            outputs[model_artifacts.OUTPUT_LABEL][i].decode("utf-8"),
            int(outputs[model_artifacts.OUTPUT_LABEL_INDEX][i]),
            outputs[model_artifacts.OUTPUT_PROBABILITIES][i].tolist(),
            outputs[model_artifacts.OUTPUT_EMBEDDING][i].tolist(),
            version,
        )
        for i, (key, image) in enumerate(keyed)
    }


def counter(result, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))["counters"]
    return sum(c.committed for c in found)


def batch_count(result) -> int:
    found = result.metrics().query(MetricsFilter().with_name("inference_request_batch_size"))["distributions"]
    return sum(d.committed.count for d in found)


def test_predictions_equal_the_saved_model_with_keys_kept(trained_digits_model, digit_images):
    keyed = [(f"key-{i:03d}", image) for i, image in enumerate(digit_images)]
    random.Random(7).shuffle(keyed)
    expected = expected_by_key(trained_digits_model, keyed)
    handler = ImageModelHandler(trained_digits_model, min_batch_size=4, max_batch_size=16)
    with TestPipeline(runner="FnApiRunner") as p:
        predictions, letters = p | beam.Create(keyed) | PredictImages(handler)
        assert_that(predictions | beam.Map(comparable), matches_saved_model(expected), label="CheckPredictions")
        assert_that(letters, equal_to([]), label="CheckNoDeadLetters")


@pytest.mark.parametrize("large_model", [False, True], ids=["per_process", "multi_process_shared"])
def test_a_failed_batch_is_retried_per_element(trained_digits_model, digit_images, large_model):
    good = [(image.image_id, image) for image in digit_images[:11]]
    bad = ImageInput("tiff-id", "/data/scan.tiff", tiff_bytes(), label="3")
    # Fixed batches of 4 put the TIFF in a batch with 3 good images.
    keyed = good[:5] + [(bad.image_id, bad)] + good[5:]
    expected = expected_by_key(trained_digits_model, good)
    handler = ImageModelHandler(trained_digits_model, min_batch_size=4, max_batch_size=4, large_model=large_model)
    p = TestPipeline(runner="FnApiRunner")
    predictions, letters = p | beam.Create(keyed) | PredictImages(handler)
    assert_that(predictions | beam.Map(comparable), matches_saved_model(expected), label="CheckPredictions")
    assert_that(
        letters | beam.Map(lambda d: (d.input_ref, d.stage, d.error_type, "Unknown image file format" in d.message)),
        equal_to([("/data/scan.tiff", "predict", INFERENCE_FAILED, True)]),
        label="CheckDeadLetters",
    )
    result = p.run()
    result.wait_until_finish()
    assert counter(result, RETRIED_BATCHES_COUNTER) == 1
    # The retry uses the copy RunInference loaded (in this process, or in the shared model server).
    assert counter(result, MODEL_LOADS_COUNTER) == 1


def test_model_is_loaded_once_per_process_across_threads_and_bundles(trained_digits_model, digit_images):
    keyed = [(f"{i}-{image.image_id}", image) for i in range(4) for image in digit_images]
    options = PipelineOptions(["--direct_running_mode=multi_threading", "--direct_num_workers=4"])
    handler = ImageModelHandler(trained_digits_model, min_batch_size=2, max_batch_size=8)
    p = TestPipeline(runner="FnApiRunner", options=options)
    predictions, _ = p | beam.Create(keyed) | beam.Reshuffle() | PredictImages(handler)
    assert_that(predictions | beam.combiners.Count.Globally(), equal_to([len(keyed)]))
    result = p.run()
    result.wait_until_finish()
    assert batch_count(result) >= 8, "the run must span many batches for the count to mean anything"
    assert counter(result, MODEL_LOADS_COUNTER) == 1


def test_batches_are_bounded_by_count_and_encoded_bytes(tmp_path, trained_digits_model):
    handler = ImageModelHandler(trained_digits_model, min_batch_size=1, max_batch_size=8, max_batch_bytes=8_000)
    sizes = [100] * 30 + [3_000] * 6 + [20_000]
    keyed = [(str(i), ImageInput(str(i), f"/x/{i}", b"x" * size)) for i, size in enumerate(sizes)]

    def check(batches: list[list]) -> None:
        assert sorted(len(image.image_bytes) for batch in batches for _, image in batch) == sorted(sizes)
        for batch in batches:
            total = sum(len(image.image_bytes) for _, image in batch)
            assert len(batch) <= 8
            assert total <= 8_000 or len(batch) == 1, [len(image.image_bytes) for _, image in batch]

    with TestPipeline(runner="FnApiRunner") as p:
        batches = p | beam.Create(keyed) | beam.BatchElements(**handler.batch_elements_kwargs())
        assert_that(batches, check)


def test_prediction_row_has_top_k_in_schema_order(trained_digits_model, digit_images):
    info = ModelInfo.read(trained_digits_model)
    image = digit_images[0]
    probabilities = np.linspace(0.0, 1.0, len(info.labels), dtype=np.float32)
    probabilities /= probabilities.sum()
    best = int(np.argmax(probabilities))
    result = PredictionResult(
        image, ModelOutputs(info.labels[best], best, probabilities, np.zeros(4, np.float32)), info.model_version)
    row = prediction_row(("k", result), info.labels, 3)
    assert row["image_id"] == image.image_id and row["true_label"] == image.label
    assert row["top_k_labels"] == [info.labels[best], info.labels[best - 1], info.labels[best - 2]]
    assert row["top_k_probabilities"] == sorted(row["top_k_probabilities"], reverse=True)
    assert row["score"] == pytest.approx(float(probabilities[best]))
    assert row["model_version"] == info.model_version


def test_top_k_breaks_ties_by_index():
    labels, probabilities = top_k(np.array([0.25, 0.25, 0.5], np.float32), ["a", "b", "c"], 2)
    assert labels == ["c", "a"] and probabilities == [0.5, 0.25]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"min_batch_size": 0}, "min_batch_size=0"), ({"min_batch_size": 9, "max_batch_size": 8}, "max_batch_size=8"),
     ({"max_batch_bytes": 0}, "max_batch_bytes=0"), ({"model_copies": 0}, "model_copies=0")],
)
def test_invalid_batch_configuration_is_rejected(trained_digits_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageModelHandler(trained_digits_model, **kwargs)


def test_model_copies_shares_the_model_across_processes(trained_digits_model):
    assert ImageModelHandler(trained_digits_model, model_copies=2).share_model_across_processes()
    assert ImageModelHandler(trained_digits_model, large_model=True).model_copies() == 1
    assert not ImageModelHandler(trained_digits_model).share_model_across_processes()


def test_predictions_reach_their_consumers_in_the_stage_that_runs_the_model(trained_digits_model):
    """No fusion break after the model: the FnApiRunner would hold every prediction of the run in memory.

    Beam 2.77's FnApiRunner materializes every multi-input Flatten
    (``translations.sink_flattens``); PredictImages once merged retried
    predictions back with one, which cost about 5 KiB of memory per image.
    """
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    pipeline = beam.Pipeline(runner="FnApiRunner")
    predictions, _ = (pipeline | beam.Create([("k", ImageInput("k", "/x/k.png", b"x"))])
                      | "PredictImages" >> PredictImages(ImageModelHandler(trained_digits_model)))
    _ = predictions | "Consume" >> beam.Map(lambda prediction: prediction)
    _, stages = fn_runner.FnApiRunner().create_stages(pipeline.to_runner_api())

    def stage_of(name: str) -> str:
        return only([stage.name for stage in stages if any(t.unique_name.startswith(name) for t in stage.transforms)])

    assert stage_of("PredictImages/RunModel/BeamML_RunInference") == stage_of("Consume")


def only(items: list[str]) -> str:
    assert len(items) == 1, items
    return items[0]
