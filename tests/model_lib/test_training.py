"""Training on the digits dataset from create_dataset: learning, artifacts, resume, failures."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from model_lib import evaluation, export, models, training
from schemas import model_artifacts
from schemas.classification_metrics import ModelMetrics
from schemas.dataset_info import DatasetInfo
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from tests.fixtures.models import TRAINED_DIGITS_HPARAMS

# A tiny CNN for the tests that exercise mechanics rather than accuracy.
TINY = {"filters": [8, 16], "embedding_dim": 16, "batch_size": 128}


def test_trained_model_learns_and_writes_every_artifact(trained_digits_model, digits_dataset):
    metrics = ModelMetrics.read(trained_digits_model)
    # Ten classes: chance is 0.10. The short fixture run must still be a good classifier.
    assert metrics.test.accuracy >= 0.90
    assert metrics.validation.accuracy >= 0.90
    assert metrics.test.count == sum(sum(row) for row in metrics.test.confusion_matrix)
    assert len(metrics.test.per_class) == len(metrics.test.confusion_matrix) == 10
    assert 0.85 <= metrics.test.macro_f1 <= 1.0
    assert len(metrics.history["val_accuracy"]) == metrics.epochs_run == TRAINED_DIGITS_HPARAMS["epochs"]

    info = ModelInfo.read(trained_digits_model)
    dataset_run = published_dir(digits_dataset.dataset_dir)
    with open(os.path.join(dataset_run, "labels.txt")) as handle:
        assert info.labels == handle.read().split()
    assert info.dataset_fingerprint == DatasetInfo.read(dataset_run).fingerprint
    assert (info.architecture, info.image_size, info.channels, info.embedding_dim) == ("small_cnn", 32, 1, 128)
    keras_model = keras.models.load_model(os.path.join(trained_digits_model, model_artifacts.KERAS_MODEL_FILE))
    assert info.model_version == export.model_version(keras_model) == metrics.model_version

    for name in (evaluation.TRAINING_CURVES_PLOT, evaluation.CONFUSION_MATRIX_PLOT):
        with open(os.path.join(trained_digits_model, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert glob.glob(os.path.join(trained_digits_model, training.TENSORBOARD_DIR, "**", "events.out.tfevents.*"),
                     recursive=True)
    checkpoints = os.path.join(trained_digits_model, training.CHECKPOINT_DIR)
    last = TRAINED_DIGITS_HPARAMS["epochs"]  # The last two epochs' checkpoints are kept.
    assert sorted(os.listdir(checkpoints)) == sorted(
        [f"epoch-{last - 1:04d}.weights.h5", f"epoch-{last:04d}.weights.h5", training.BEST_WEIGHTS_FILE,
         training.STATE_FILE]
    )


class _Interrupt(Exception):
    pass


class _InterruptAfterEpoch(keras.callbacks.Callback):
    """Stands in for a killed worker: fails right after an epoch's checkpoint is written."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch
        self.weights: list[np.ndarray] = []

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.weights = self.model.get_weights()
            raise _Interrupt(f"interrupted after epoch {self.epoch}")


class _CountEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.started: list[int] = []
        self.initial_weights: list[np.ndarray] = []

    def on_train_begin(self, logs=None):
        self.initial_weights = self.initial_weights or self.model.get_weights()

    def on_epoch_begin(self, epoch, logs=None):
        self.started.append(epoch)


def test_interrupted_training_resumes_from_the_last_checkpoint(small_digits_dataset, tmp_path):
    output = str(tmp_path / "run")
    hparams = {**TINY, "epochs": 3, "early_stopping_patience": 0}
    interrupt = _InterruptAfterEpoch(1)
    with pytest.raises(_Interrupt):
        training.train_and_export(small_digits_dataset.dataset_dir, output, hparams, callbacks=[interrupt])
    with open(os.path.join(output, training.CHECKPOINT_DIR, training.STATE_FILE)) as handle:
        state = json.load(handle)
    assert state["epochs_done"] == 1
    assert not os.path.exists(os.path.join(output, model_artifacts.SAVED_MODEL_DIR))

    counter = _CountEpochs()
    result = training.train_and_export(small_digits_dataset.dataset_dir, output, hparams, callbacks=[counter])
    assert result.initial_epoch == 1
    assert counter.started == [1, 2]  # Epoch 0 was not redone.
    assert result.epochs_run == 3
    history = result.metrics.history
    assert len(history["loss"]) == 3
    assert history["loss"][0] == pytest.approx(state["history"]["loss"][0])
    # Training went on from the weights of epoch 1, not from a fresh initialization.
    assert len(counter.initial_weights) == len(interrupt.weights)
    for resumed, interrupted in zip(counter.initial_weights, interrupt.weights):
        np.testing.assert_array_equal(resumed, interrupted)


def test_a_finished_run_is_not_retrained(small_digits_dataset, tmp_path, caplog):
    output = str(tmp_path / "run")
    hparams = {**TINY, "epochs": 1}
    with caplog.at_level("INFO", logger="model_lib.training"):
        first = training.train_and_export(small_digits_dataset.dataset_dir, output, hparams)
    # A long training stage shows progress: one line per epoch with its metrics.
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(progress) == 1 and progress[0].startswith("epoch 1/1  accuracy ") and "val_accuracy" in progress[0]
    counter = _CountEpochs()
    again = training.train_and_export(small_digits_dataset.dataset_dir, output, hparams, callbacks=[counter])
    assert counter.started == []
    assert again.model_info.model_version == first.model_info.model_version


def test_a_checkpoint_of_other_hyperparameters_is_not_resumed(small_digits_dataset, tmp_path):
    output = str(tmp_path / "run")
    training.train_and_export(small_digits_dataset.dataset_dir, output, {**TINY, "epochs": 1})
    counter = _CountEpochs()
    result = training.train_and_export(
        small_digits_dataset.dataset_dir, output, {**TINY, "epochs": 1, "learning_rate": 0.01}, callbacks=[counter]
    )
    assert result.initial_epoch == 0
    assert counter.started == [0]


def test_early_stopping_restores_the_best_epoch(small_digits_dataset, tmp_path):
    # A learning rate this low barely moves the weights: validation stops improving quickly.
    result = training.train_and_export(
        small_digits_dataset.dataset_dir, str(tmp_path / "run"),
        {**TINY, "epochs": 30, "early_stopping_patience": 1, "learning_rate": 1e-5, "lr_schedule": "constant"},
    )
    history = result.metrics.history
    assert result.epochs_run < 30
    best = int(np.argmax(np.array(history["val_accuracy"]) - 1e-9 * np.array(history["val_loss"])))
    assert result.best_epoch == best + 1
    assert result.metrics.validation.accuracy == pytest.approx(history["val_accuracy"][best], abs=1e-6)


def test_a_diverging_run_raises_training_diverged(small_digits_dataset, tmp_path):
    with pytest.raises(training.TrainingDiverged, match="lower the learning rate") as caught:
        training.train_and_export(
            small_digits_dataset.dataset_dir, str(tmp_path / "run"),
            {**TINY, "epochs": 2, "learning_rate": 10.0, "lr_schedule": "constant"},
        )
    assert caught.value.error_type == "diverged"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"arch": "vgg99"}, "arch='vgg99'"),
        ({"epochs": 0}, "epochs=0"),
        ({"learning_rate": -1}, "learning_rate=-1"),
        ({"lr_schedule": "linear"}, "lr_schedule='linear'"),
        ({"fine_tune_layers": 3}, "fine_tune_layers=3"),
        ({"flip": "diagonal"}, "flip='diagonal'"),
        ({"batch_sise": 3}, "unknown hyperparameters \\['batch_sise'\\]"),
    ],
)
def test_invalid_hyperparameters_name_the_value(values, message):
    with pytest.raises(training.InvalidHyperparameter, match=message) as caught:
        training.HParams.from_dict(values)
    assert caught.value.error_type == "invalid_hyperparameter"


def test_builder_errors_surface_as_invalid_hyperparameters(small_digits_dataset, tmp_path):
    with pytest.raises(training.InvalidHyperparameter, match="filters="):
        training.train_and_export(small_digits_dataset.dataset_dir, str(tmp_path / "run"), {"filters": [8] * 7})


def test_strategy_uses_one_device_without_gpus():
    strategy = training.choose_strategy()
    assert strategy.num_replicas_in_sync >= 1
    if strategy.num_replicas_in_sync == 1:
        assert isinstance(strategy, training.tf.distribute.OneDeviceStrategy)


def _bn_statistics(model: keras.Model) -> list[np.ndarray]:
    base = model.get_layer(models.BACKBONE_LAYER_NAME)
    return [np.asarray(v) for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


def test_fine_tuning_resumes_in_its_own_phase_and_keeps_batchnorm_frozen(small_digits_dataset, tmp_path):
    backbone = models.build_backbone(models.MOBILENET_V2, input_shape=(32, 32, 3), weights="none")
    weights = str(tmp_path / "mobilenet_v2_notop.weights.h5")
    backbone.save_weights(weights)
    output = str(tmp_path / "run")
    hparams = {
        "arch": models.MOBILENET_V2, "weights": weights, "embedding_dim": 16, "batch_size": 128,
        "epochs": 1, "fine_tune_layers": 30, "fine_tune_epochs": 2, "early_stopping_patience": 0,
    }
    interrupt = _InterruptAfterEpoch(2)  # After the first fine-tuning epoch.
    with pytest.raises(_Interrupt):
        training.train_and_export(small_digits_dataset.dataset_dir, output, hparams, callbacks=[interrupt])
    counter = _CountEpochs()
    result = training.train_and_export(small_digits_dataset.dataset_dir, output, hparams, callbacks=[counter])
    assert (result.initial_epoch, counter.started, result.epochs_run) == (2, [2], 3)
    for resumed, interrupted in zip(counter.initial_weights, interrupt.weights):
        np.testing.assert_array_equal(resumed, interrupted)

    def build(backbone_weights: str) -> keras.Model:
        return models.build_model(models.MOBILENET_V2, input_shape=(32, 32, 1), num_classes=10,
                                  embedding_dim=16, weights=backbone_weights)

    original = build(weights)
    fine_tuned = build(weights)  # The state after one fine-tuning epoch, as checkpointed.
    fine_tuned.set_weights(interrupt.weights)
    for before, after in zip(_bn_statistics(original), _bn_statistics(fine_tuned)):
        np.testing.assert_array_equal(before, after)
    # The last conv (inside the top 30 layers) was fine-tuned; the first conv stayed frozen.
    top, bottom = (original.get_layer(models.BACKBONE_LAYER_NAME).layers[i].name for i in (-4, 1))

    def kernel(model: keras.Model, name: str) -> np.ndarray:
        layer = model.get_layer(models.BACKBONE_LAYER_NAME).get_layer(name)
        assert isinstance(layer, keras.layers.Conv2D)
        return layer.get_weights()[0]

    assert not np.array_equal(kernel(original, top), kernel(fine_tuned, top))
    np.testing.assert_array_equal(kernel(original, bottom), kernel(fine_tuned, bottom))


_MIRRORED_ON_TWO_CPUS = """
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from model_lib import training

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
result = training.train_and_export(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), strategy=strategy)
print(json.dumps({k: getattr(result.metrics, k) for k in ("replicas", "global_batch_size", "epochs_run")}))
"""


def test_mirrored_strategy_scales_the_global_batch(small_digits_dataset, tmp_path):
    # Two logical CPU devices stand in for two GPUs: same MirroredStrategy code path.
    completed = subprocess.run(
        [sys.executable, "-c", _MIRRORED_ON_TWO_CPUS, small_digits_dataset.dataset_dir, str(tmp_path / "run"),
         json.dumps({**TINY, "batch_size": 32, "epochs": 1})],
        check=True, capture_output=True, text=True, timeout=300,
    )
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary == {"replicas": 2, "global_batch_size": 64, "epochs_run": 1}
    assert model_artifacts.ModelInfo.read(str(tmp_path / "run")).model_version


def test_replica_batches_split_evenly_across_replicas():
    assert training.replica_batch(43, 64, 2) == 42  # A validation split smaller than one global batch.
    assert training.replica_batch(315, 64, 2) == 64
    assert training.replica_batch(43, 64, 1) == 64  # One replica: any last batch is fine.
    assert training.replica_batch(1, 64, 2) == 64  # Fewer examples than replicas: make_dataset keeps it whole.
