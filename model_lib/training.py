"""Training one model on a create_dataset output, then evaluating and exporting it.

``train_and_export(dataset_dir, output_dir, hparams)`` is the one entry point:
the train job runs it once per trial, tests and benchmarks call it directly.
It writes into ``output_dir``:

- ``checkpoints/``: weights + optimizer state after every epoch and
  ``state.json`` (epochs done, early-stopping state, history). A rerun with
  the same output_dir resumes after the last completed epoch.
- ``tensorboard/``: TensorBoard logs.
- ``saved_model/``, ``model.keras``, ``model_info.json`` (``model_lib.export``),
  ``metrics.json`` and PNG plots (``model_lib.evaluation``).

Training runs under a tf.distribute strategy chosen from the visible devices
(OneDevice on CPU or one GPU, Mirrored on several GPUs); ``batch_size`` is
per replica and the global batch is scaled by the replica count.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import time
from typing import Any, Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from model_lib import augmentation, evaluation, export, input_pipeline, models
from schemas.classification_metrics import ModelMetrics
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir

_LOGGER = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
STATE_FILE = "state.json"
BEST_WEIGHTS_FILE = "best_weights.npz"
HISTORY_KEY = "history"
LR_SCHEDULES = ("constant", "cosine", "exponential")
OPTIMIZERS = ("adam", "sgd")
SELECTION_METRICS = ("val_accuracy", "val_loss")
_CHECKPOINTS_KEPT = 2
_DIVERGENCE_FACTOR = 3.0
_TRAIN_PHASE = 1
_FINE_TUNE_PHASE = 2
# HParams fields that shape the export, not the weights: they do not invalidate a checkpoint.
_SERVING_HPARAMS = ("serving_uri_prefix", "serving_max_pixels")


class InvalidHyperparameter(ValueError):
    """A hyperparameter value that cannot train; ``error_type`` routes it in dead letters."""

    error_type = "invalid_hyperparameter"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    error_type = "diverged"


def _require(condition: bool, name: str, value: Any, expectation: str) -> None:
    if not condition:
        raise InvalidHyperparameter(f"{name} must be {expectation}. Received `{name}={value!r}`")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class HParams:
    """Hyperparameters of one training run (one trial).

    The defaults train the small CNN to >= 0.97 test accuracy on the digits
    sample in about a minute of CPU time (docs/benchmarks.md).

    Attributes:
      arch: One of ``models.ARCHITECTURES``.
      epochs: Epochs of the first (frozen-backbone, or only) phase.
      batch_size: Per-replica batch; the global batch is this times the replicas.
      learning_rate: Peak learning rate of the first phase.
      lr_schedule: ``constant``, ``cosine`` (decay to 1% over the phase) or
        ``exponential`` (x0.9 per epoch).
      optimizer: ``adam`` or ``sgd`` (momentum 0.9).
      label_smoothing: Cross-entropy label smoothing.
      embedding_dim: Embedding width (default per architecture).
      dropout: Dropout rate (default per architecture).
      filters: Conv filters per block of ``small_cnn``.
      weights: Transfer models: ``none``, ``imagenet`` or a local weights file.
      fine_tune_layers: Transfer models: unfreeze this many top backbone
        layers for a second phase (0 = no fine-tuning).
      fine_tune_epochs: Epochs of the fine-tuning phase.
      fine_tune_learning_rate: Peak learning rate of the fine-tuning phase
        (lower than ``learning_rate``, so pretrained features are not wrecked).
      early_stopping_patience: Epochs without improvement of
        ``selection_metric`` before a phase stops; 0 disables.
      selection_metric: ``val_accuracy`` (maximized) or ``val_loss``
        (minimized); picks the restored epoch and, in the train job, the best trial.
      flip, crop, translate, rotate, brightness, contrast: Augmentation
        (``augmentation.AugmentationConfig``).
      seed: Seeds weights, shuffling and augmentation.
      serving_uri_prefix: Export the ``from_uris`` signature, reading only
        URIs under this prefix (absolute path or gs://, ending with ``/``);
        None (default) exports no file-reading signature. Not a training
        choice: a resumed run with another value only re-exports.
      serving_max_pixels: Per-image decoded-pixel limit of the serving
        signatures (default that of the jobs' ``--max_pixels``).
    """

    arch: str = models.SMALL_CNN
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    optimizer: str = "adam"
    label_smoothing: float = 0.0
    embedding_dim: int | None = None
    dropout: float | None = None
    filters: tuple[int, ...] = (32, 64, 128)
    weights: str = "none"
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-4
    early_stopping_patience: int = 6
    selection_metric: str = "val_accuracy"
    flip: str = "none"
    crop: float = 0.1
    translate: float = 0.1
    rotate: float = 0.04
    brightness: float = 0.0
    contrast: float = 0.0
    seed: int = 0
    serving_uri_prefix: str | None = None
    serving_max_pixels: int = export.DEFAULT_SERVING_MAX_PIXELS

    def __post_init__(self) -> None:
        _require(self.arch in models.ARCHITECTURES, "arch", self.arch, f"one of {models.ARCHITECTURES}")
        _require(_is_int(self.epochs) and self.epochs >= 1, "epochs", self.epochs, "an int >= 1")
        _require(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 < value <= 10, name, value, "a number in (0, 10]")
        _require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        _require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _require(
            _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "label_smoothing", self.label_smoothing, "in [0, 1)",
        )
        for name in ("fine_tune_layers", "fine_tune_epochs", "early_stopping_patience", "seed"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, name, value, "an int >= 0")
        _require(
            self.selection_metric in SELECTION_METRICS,
            "selection_metric", self.selection_metric, f"one of {SELECTION_METRICS}",
        )
        _require(isinstance(self.weights, str), "weights", self.weights, "'none', 'imagenet' or a file path")
        _require(
            self.fine_tune_layers == 0 or (self.arch in models.BACKBONES and models.is_pretrained(self.weights)),
            "fine_tune_layers", self.fine_tune_layers,
            f"0 for arch={self.arch!r} with weights={self.weights!r} (fine-tuning needs a pretrained backbone)",
        )
        try:
            self.augmentation_config()
            export.validate_serving_options(self.serving_uri_prefix, self.serving_max_pixels)
        except ValueError as error:
            raise InvalidHyperparameter(str(error)) from error

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HParams":
        """Builds hyperparameters from a trial spec; unknown keys are errors, lists become tuples.

        Raises:
          InvalidHyperparameter: naming the unknown key or the bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidHyperparameter(f"unknown hyperparameters {unknown}; known: {sorted(known)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["filters"] = list(self.filters)
        return data

    def augmentation_config(self) -> augmentation.AugmentationConfig:
        return augmentation.AugmentationConfig(
            flip=self.flip, crop=self.crop, translate=self.translate, rotate=self.rotate,
            brightness=self.brightness, contrast=self.contrast, seed=self.seed,
        )

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.fine_tune_epochs if self.fine_tune_layers else 0)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one ``train_and_export`` run produced.

    Attributes:
      model_dir: The output directory (an exported model directory).
      model_info: The written model_info.json.
      metrics: The written metrics.json.
      initial_epoch: Epochs already done when this run started (> 0 after a resume).
      epochs_run: Epochs completed in total, including resumed ones.
      best_epoch: 1-based epoch whose weights were kept.
      train_seconds: Wall time of this run's fitting.
    """

    model_dir: str
    model_info: ModelInfo
    metrics: ModelMetrics
    initial_epoch: int
    epochs_run: int
    best_epoch: int
    train_seconds: float

    def selection_value(self, metric: str) -> float:
        """The value of a ``SELECTION_METRICS`` entry, from the validation evaluation."""
        return self.metrics.validation.value(metric.removeprefix("val_"))


def choose_strategy() -> tf.distribute.Strategy:
    """Mirrored over several GPUs, otherwise one device (the GPU, or the CPU)."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def _learning_rate(schedule: str, peak: float, steps_per_epoch: int, epochs: int) -> Any:
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(1, steps_per_epoch * epochs), alpha=0.01)
    return keras.optimizers.schedules.ExponentialDecay(peak, decay_steps=steps_per_epoch, decay_rate=0.9)


def _compile(model: keras.Model, hparams: HParams, learning_rate: Any) -> None:
    if hparams.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate)
    else:
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    if hparams.label_smoothing:
        # Label smoothing needs one-hot targets; the inputs carry indices.
        loss: Any = _SmoothedSparseCrossentropy(hparams.label_smoothing, model.output_shape[-1])
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    optimizer.build(model.trainable_variables)


@keras.saving.register_keras_serializable(package="vision_pipelines")
class _SmoothedSparseCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing on integer targets."""

    def __init__(self, smoothing: float, num_classes: int, name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smoothing = smoothing
        self.num_classes = num_classes

    def call(self, y_true, y_pred):
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"), self.num_classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "smoothing": self.smoothing, "num_classes": self.num_classes}


def replica_batch(count: int, global_batch: int, replicas: int) -> int:
    """The batch size fitting uses for a split of ``count`` examples.

    With several replicas every batch must split evenly across them: a split
    smaller than one global batch (a 43-image validation split on two
    replicas, say) is batched in the largest multiple of ``replicas`` it
    holds instead, so MirroredStrategy never sees a batch its replicas cannot
    share.
    """
    if replicas <= 1 or count >= global_batch or count < replicas:
        return global_batch
    return count - count % replicas


class EpochProgress(keras.callbacks.Callback):
    """One INFO line per epoch (epoch, loss, validation metrics, seconds).

    Keras runs with ``verbose=0`` on workers (its progress bars flood Beam
    logs), so without this a long training stage shows nothing until it ends.
    """

    def __init__(self, total_epochs: int):
        super().__init__()
        self._total_epochs = total_epochs
        self._started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = "  ".join(f"{name} {float(value):.4f}" for name, value in sorted((logs or {}).items()))
        _LOGGER.info("epoch %d/%d  %s  (%.1f s)", epoch + 1, self._total_epochs, metrics,
                     time.monotonic() - self._started)


class ResumableCheckpoint(keras.callbacks.Callback):
    """Checkpoints every epoch, early-stops on the selection metric, and resumes.

    After each epoch it writes ``epoch-NNNN.weights.h5`` (weights and optimizer
    state, the last two kept), ``best_weights.npz`` when the monitored metric
    improved, and ``state.json`` (epochs done, best value/epoch, patience
    counter, full history). Because the state includes the history and the
    early-stopping counters, a resumed run continues exactly where the killed
    one stopped instead of restarting its patience and curves.

    Args:
      directory: Checkpoint directory (local or gs://).
      monitor: ``val_accuracy`` (max; ties go to the lower ``val_loss``) or ``val_loss`` (min).
      patience: Epochs without improvement before ``stop_training``; 0 = never.
      signature: Identifies the run (hyperparameters + dataset); a state
        written by a different run is not resumed.
      num_classes: Sets the divergence threshold: a mean training loss above
        three times ln(num_classes), the loss of a uniform guess, cannot come
        from a converging run.
    """

    def __init__(self, directory: str, *, monitor: str, patience: int, signature: str, num_classes: int):
        super().__init__()
        self.divergence_loss = _DIVERGENCE_FACTOR * math.log(num_classes)
        self.diverged: str | None = None
        self.directory = directory
        self.monitor = monitor
        self.patience = patience
        self.signature = signature
        self.epochs_done = 0
        self.best_score: list[float] | None = None
        self.best_epoch = 0
        self.wait = 0
        self.phase = _TRAIN_PHASE
        self.history: dict[str, list[float]] = {}

    def _path(self, name: str) -> str:
        return tf.io.gfile.join(self.directory, name)

    def _epoch_file(self, epochs_done: int) -> str:
        return self._path(f"epoch-{epochs_done:04d}.weights.h5")

    def load_state(self) -> int:
        """Reads state.json if it belongs to this run; returns epochs already done."""
        path = self._path(STATE_FILE)
        if not tf.io.gfile.exists(path):
            return 0
        with tf.io.gfile.GFile(path) as handle:
            state = json.load(handle)
        if state.get("signature") != self.signature:
            _LOGGER.warning("checkpoint state in %s is from a different run; starting from scratch", self.directory)
            return 0
        self.epochs_done = int(state["epochs_done"])
        self.best_score = state["best_score"]
        self.best_epoch = int(state["best_epoch"])
        self.wait = int(state["wait"])
        self.phase = int(state["phase"])
        self.history = {k: list(v) for k, v in state[HISTORY_KEY].items()}
        return self.epochs_done

    def restore_latest(self, model: keras.Model) -> None:
        """Loads the weights and optimizer state of the last completed epoch."""
        model.load_weights(self._epoch_file(self.epochs_done))
        _LOGGER.info("resumed from %s after %d epochs", self.directory, self.epochs_done)

    def restore_best(self, model: keras.Model) -> None:
        """Sets the model to the best epoch's weights (no-op before any epoch)."""
        path = self._path(BEST_WEIGHTS_FILE)
        if not tf.io.gfile.exists(path):
            return
        with tf.io.gfile.GFile(path, "rb") as handle:
            arrays = np.load(io.BytesIO(handle.read()))
        model.set_weights([arrays[f"w{i}"] for i in range(len(arrays.files))])

    def start_phase(self, phase: int) -> None:
        """A new phase (fine-tuning) gets its own patience."""
        self.phase = phase
        self.wait = 0

    def patience_exhausted(self) -> bool:
        """Whether the current phase already early-stopped (seen when resuming)."""
        return bool(self.patience) and self.wait >= self.patience

    def _score(self, logs: dict[str, Any]) -> list[float]:
        """Larger is better. Accuracy ties (common on small validation sets) go to the lower loss."""
        if self.monitor == "val_loss":
            return [-float(logs["val_loss"])]
        return [float(logs[self.monitor]), -float(logs["val_loss"])]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        loss = float(logs.get("loss", 0.0))
        if not math.isfinite(loss) or loss > self.divergence_loss:
            # Nothing worth checkpointing; the trainer raises TrainingDiverged.
            self.diverged = (
                f"training loss {loss:.4g} at epoch {epoch + 1} is not finite or above {self.divergence_loss:.3g} "
                "(3x the loss of a uniform guess); lower the learning rate"
            )
            self.model.stop_training = True
            return
        self.epochs_done = epoch + 1
        tf.io.gfile.makedirs(self.directory)
        score = self._score(logs)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.wait = score, self.epochs_done, 0
            buffer = io.BytesIO()
            np.savez(buffer, **{f"w{i}": w for i, w in enumerate(self.model.get_weights())})
            with tf.io.gfile.GFile(self._path(BEST_WEIGHTS_FILE), "wb") as handle:
                handle.write(buffer.getvalue())
        else:
            self.wait += 1
        self.model.save_weights(self._epoch_file(self.epochs_done), overwrite=True)
        self._write_state()
        stale = self._epoch_file(self.epochs_done - _CHECKPOINTS_KEPT)
        if tf.io.gfile.exists(stale):
            tf.io.gfile.remove(stale)
        if self.patience and self.wait >= self.patience:
            _LOGGER.info("early stopping after epoch %d: %s did not improve for %d epochs",
                         self.epochs_done, self.monitor, self.wait)
            self.model.stop_training = True

    def _write_state(self) -> None:
        state = {
            "signature": self.signature,
            "epochs_done": self.epochs_done,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "phase": self.phase,
            HISTORY_KEY: self.history,
        }
        # Write then rename, so a kill mid-write never leaves a torn state file.
        temporary = self._path(STATE_FILE + ".tmp")
        with tf.io.gfile.GFile(temporary, "w") as handle:
            handle.write(json.dumps(state, sort_keys=True))
        tf.io.gfile.rename(temporary, self._path(STATE_FILE), overwrite=True)


def _signature(hparams: HParams, summary: input_pipeline.DatasetSummary) -> str:
    training = {k: v for k, v in hparams.to_dict().items() if k not in _SERVING_HPARAMS}
    return json.dumps({"hparams": training, "dataset": summary.fingerprint}, sort_keys=True)


def _build(hparams: HParams, summary: input_pipeline.DatasetSummary) -> keras.Model:
    try:
        return models.build_model(
            hparams.arch,
            input_shape=summary.input_shape,
            num_classes=len(summary.labels),
            embedding_dim=hparams.embedding_dim,
            dropout=hparams.dropout,
            weights=hparams.weights,
            filters=hparams.filters,
            augmentation=augmentation.build_augmentation(hparams.augmentation_config()),
        )
    except ValueError as error:
        raise InvalidHyperparameter(str(error)) from error


def _fit_phase(
    model: keras.Model,
    *,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    initial_epoch: int,
    end_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: int,
) -> None:
    if initial_epoch >= end_epoch:
        return
    model.fit(
        train, validation_data=validation, initial_epoch=initial_epoch, epochs=end_epoch,
        callbacks=callbacks, verbose=verbose, shuffle=False,  # The input pipeline shuffles.
    )


def _fit_all_phases(
    model: keras.Model,
    hparams: HParams,
    checkpoint: ResumableCheckpoint,
    *,
    initial_epoch: int,
    steps_per_epoch: int,
    fit: Callable[..., None],
) -> None:
    """Compiles and fits the training phase, then the fine-tuning phase, from wherever the checkpoint left off.

    Ends with the best epoch's weights in ``model``.
    """
    fine_tune = bool(hparams.fine_tune_layers and hparams.fine_tune_epochs)
    if checkpoint.phase == _FINE_TUNE_PHASE and not fine_tune:
        raise InvalidHyperparameter("the checkpoint is from a fine-tuning phase but fine-tuning is disabled")
    if checkpoint.phase == _FINE_TUNE_PHASE:
        # Killed while fine-tuning: rebuild the fine-tuning optimizer before loading its state.
        _start_fine_tuning(model, hparams, steps_per_epoch)
        checkpoint.restore_latest(model)
    else:
        _compile(model, hparams, _learning_rate(
            hparams.lr_schedule, hparams.learning_rate, steps_per_epoch, hparams.epochs))
        if initial_epoch:
            checkpoint.restore_latest(model)
        if not checkpoint.patience_exhausted():
            fit(model, initial_epoch=initial_epoch, end_epoch=hparams.epochs)
            _raise_if_diverged(checkpoint)
        if fine_tune:
            # Fine-tune from the best frozen-backbone weights, not the last epoch's.
            checkpoint.restore_best(model)
            _start_fine_tuning(model, hparams, steps_per_epoch)
            checkpoint.start_phase(_FINE_TUNE_PHASE)
    if fine_tune and not checkpoint.patience_exhausted():
        fit(model, initial_epoch=max(checkpoint.epochs_done, hparams.epochs), end_epoch=hparams.total_epochs)
        _raise_if_diverged(checkpoint)
    checkpoint.restore_best(model)


def train_and_export(
    dataset_dir: str,
    output_dir: str,
    hparams: HParams | Mapping[str, Any] | None = None,
    *,
    callbacks: list[keras.callbacks.Callback] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Trains, evaluates and exports one model; resumes if ``output_dir`` has a checkpoint.

    Args:
      dataset_dir: A create_dataset output directory (its published run is
        read; train and validation splits required, test optional).
      output_dir: Where checkpoints, logs and the exported model go.
      hparams: ``HParams`` or a dict of overrides of its defaults.
      callbacks: Extra Keras callbacks, run after the checkpointing one.
      strategy: The tf.distribute strategy; default ``choose_strategy()``.
      verbose: Keras fit verbosity.

    Returns:
      The ``TrainResult``.

    Raises:
      InvalidHyperparameter: a hyperparameter the model cannot be built with.
      TrainingDiverged: the loss became NaN/inf.
      FileNotFoundError: ``dataset_dir`` is not a dataset with train and validation splits.
    """
    if not isinstance(hparams, HParams):
        hparams = HParams.from_dict(dict(hparams or {}))
    dataset_dir = published_dir(dataset_dir)
    summary = input_pipeline.read_summary(dataset_dir)
    transform_output = input_pipeline.load_transform_output(dataset_dir)
    keras.utils.set_random_seed(hparams.seed)

    strategy = strategy or choose_strategy()
    global_batch = hparams.batch_size * strategy.num_replicas_in_sync
    _LOGGER.info("training %s on %s with %d replica(s), global batch %d",
                 hparams.arch, dataset_dir, strategy.num_replicas_in_sync, global_batch)
    transform = input_pipeline.make_transform(transform_output)
    replicas = strategy.num_replicas_in_sync
    multi_replica = replicas > 1
    train = input_pipeline.make_dataset(
        summary, summary.train_split, transform, training=True, seed=hparams.seed, drop_remainder=multi_replica,
        batch_size=replica_batch(summary.counts.get(summary.train_split, 0), global_batch, replicas),
    )
    # Fitting sees whole batches only with several replicas; the final evaluation sees every example.
    validation_fit = input_pipeline.make_dataset(
        summary, summary.validation_split, transform, training=False, drop_remainder=multi_replica,
        batch_size=replica_batch(summary.counts.get(summary.validation_split, 0), global_batch, replicas),
    )
    validation = input_pipeline.make_dataset(
        summary, summary.validation_split, transform, batch_size=global_batch, training=False
    )
    train_count = summary.counts.get(summary.train_split) or _count_examples(train)
    steps_per_epoch = max(1, math.ceil(train_count / global_batch))

    checkpoint = ResumableCheckpoint(
        tf.io.gfile.join(output_dir, CHECKPOINT_DIR),
        monitor=hparams.selection_metric,
        patience=hparams.early_stopping_patience,
        signature=_signature(hparams, summary),
        num_classes=len(summary.labels),
    )
    initial_epoch = checkpoint.load_state()
    all_callbacks = [
        checkpoint,
        EpochProgress(hparams.total_epochs),
        keras.callbacks.TensorBoard(tf.io.gfile.join(output_dir, TENSORBOARD_DIR), profile_batch=0),
        *(callbacks or []),
    ]

    started = time.monotonic()
    with strategy.scope():
        model = _build(hparams, summary)
        _fit_all_phases(model, hparams, checkpoint, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                        fit=functools.partial(_fit_phase, train=train, validation=validation_fit,
                                              callbacks=all_callbacks, verbose=verbose))
    train_seconds = time.monotonic() - started

    validation_metrics = evaluation.evaluate(model, validation, summary.labels)
    test_metrics = None
    if summary.test_split and summary.counts.get(summary.test_split, 0) > 0:  # No test images: no test metrics.
        test = input_pipeline.make_dataset(
            summary, summary.test_split, transform, batch_size=global_batch, training=False
        )
        test_metrics = evaluation.evaluate(model, test, summary.labels)

    info = export.export_model(
        model,
        model_dir=output_dir,
        transform_output=transform_output,
        labels=summary.labels,
        architecture=hparams.arch,
        image_size=summary.image_size,
        channels=summary.channels,
        dataset_fingerprint=summary.fingerprint,
        hyperparameters=hparams.to_dict(),
        serving_uri_prefix=hparams.serving_uri_prefix,
        serving_max_pixels=hparams.serving_max_pixels,
    )
    metrics = ModelMetrics(
        model_version=info.model_version,
        selection_metric=hparams.selection_metric,
        validation=validation_metrics,
        test=test_metrics,
        epochs_run=checkpoint.epochs_done,
        best_epoch=checkpoint.best_epoch,
        initial_epoch=initial_epoch,
        train_seconds=round(train_seconds, 3),
        replicas=strategy.num_replicas_in_sync,
        global_batch_size=global_batch,
        history=checkpoint.history,
    )
    metrics.write(output_dir)
    evaluation.plot_training_curves(checkpoint.history, tf.io.gfile.join(output_dir, evaluation.TRAINING_CURVES_PLOT))
    shown_split, shown = ("test", test_metrics) if test_metrics else ("validation", validation_metrics)
    evaluation.plot_confusion_matrix(
        shown.confusion_matrix, shown.labels, tf.io.gfile.join(output_dir, evaluation.CONFUSION_MATRIX_PLOT),
        title=f"{shown_split} split, accuracy {shown.accuracy:.3f}",
    )
    return TrainResult(
        model_dir=output_dir,
        model_info=info,
        metrics=metrics,
        initial_epoch=initial_epoch,
        epochs_run=checkpoint.epochs_done,
        best_epoch=checkpoint.best_epoch,
        train_seconds=train_seconds,
    )


def _start_fine_tuning(model: keras.Model, hparams: HParams, steps_per_epoch: int) -> None:
    models.unfreeze_top_layers(model, hparams.fine_tune_layers)
    _compile(model, hparams, _learning_rate(
        hparams.lr_schedule, hparams.fine_tune_learning_rate, steps_per_epoch, hparams.fine_tune_epochs))


def _add_one(total: tf.Tensor, *_: Any) -> tf.Tensor:
    return total + 1


def _count_examples(batches: tf.data.Dataset) -> int:
    """Counts examples when dataset_info.json has no count for the split."""
    return int(batches.unbatch().reduce(tf.constant(0, tf.int64), _add_one))


def _raise_if_diverged(checkpoint: ResumableCheckpoint) -> None:
    if checkpoint.diverged:
        raise TrainingDiverged(checkpoint.diverged)
