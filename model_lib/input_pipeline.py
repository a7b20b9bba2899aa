"""Training and evaluation input: create_dataset's TFRecords through the tf.Transform graph.

Records are read with ``model_lib.dataset_io.read_dataset`` (parallel reads,
vectorized parsing), transformed in batches by
``TFTransformOutput.transform_features_layer()`` (the same graph the exported
serving signature runs), cached after the transform when they fit in memory,
then shuffled, batched and prefetched. Targets are the record's
``label_index``, the position in the dataset's labels.txt.
"""

from __future__ import annotations

import dataclasses
import logging

import tensorflow as tf
import tensorflow_transform as tft

from model_lib import dataset_io, preprocessing
from schemas import dataset, layout
from schemas.dataset_info import DatasetInfo
from schemas.publication import published_dir

_LOGGER = logging.getLogger(__name__)

# create_dataset's --split_names order: training, validation, then test.
DEFAULT_SPLIT_NAMES = ("train", "valid", "test")
_PARSE_BATCH = 256
# Transformed float32 pixels are cached in memory below this size; larger
# datasets are re-read and re-transformed every epoch.
_MAX_CACHE_BYTES = 2 * 1024**3


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """What training needs to know about a create_dataset output directory.

    Attributes:
      dataset_dir: The directory.
      image_size: Side of the stored (and model input) images.
      channels: 1 or 3.
      resize_method: How other-sized images are fitted (``model_lib.image_ops``).
      labels: labels.txt in order: ``label_index`` i is ``labels[i]``.
      fingerprint: create_dataset's fingerprint of the dataset contents.
      counts: Records per split.
      split_names: create_dataset's ``--split_names``: train, validation[, test].
    """

    dataset_dir: str
    image_size: int
    channels: int
    resize_method: str
    labels: list[str]
    fingerprint: str
    counts: dict[str, int]
    split_names: tuple[str, ...] = DEFAULT_SPLIT_NAMES

    @property
    def train_split(self) -> str:
        return self.split_names[0]

    @property
    def validation_split(self) -> str:
        if len(self.split_names) < 2:
            raise ValueError(f"training needs a validation split; the dataset has splits {self.split_names}")
        return self.split_names[1]

    @property
    def test_split(self) -> str | None:
        return self.split_names[2] if len(self.split_names) > 2 else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


def read_summary(dataset_dir: str) -> DatasetSummary:
    """Reads dataset_info.json (``schemas.dataset_info.DatasetInfo``) and labels.txt of a create_dataset output.

    ``dataset_dir`` is resolved to its published run, which the summary names.

    Raises:
      FileNotFoundError: when ``dataset_dir`` is not a create_dataset output.
    """
    dataset_dir = published_dir(dataset_dir)
    info_path = layout.join(dataset_dir, layout.DATASET_INFO_FILE)
    labels_path = layout.join(dataset_dir, layout.LABELS_FILE)
    for path in (info_path, labels_path):
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{path} not found: is {dataset_dir!r} a create_dataset output directory?")
    info = DatasetInfo.read(dataset_dir)
    with tf.io.gfile.GFile(labels_path) as handle:
        labels = [line.strip() for line in handle if line.strip()]
    return DatasetSummary(
        dataset_dir=dataset_dir,
        image_size=info.image_size,
        channels=info.channels,
        resize_method=info.resize_method,
        labels=labels,
        fingerprint=info.fingerprint,
        counts={split: counts.total for split, counts in info.counts.items()},
        split_names=tuple(info.split_names),
    )


def load_transform_output(dataset_dir: str) -> tft.TFTransformOutput:
    """The tf.Transform output (``transform_fn/``, ``transformed_metadata/``) of a dataset's published run."""
    return tft.TFTransformOutput(published_dir(dataset_dir))


class _Transform:
    """Maps a parsed record batch to (pixels, label_index) through the tf.Transform layer.

    A class rather than a closure so the Keras layer is created once and
    shared by every split's pipeline.
    """

    def __init__(self, transform_output: tft.TFTransformOutput):
        self._layer = transform_output.transform_features_layer()

    def __call__(self, records: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        transformed = self._layer({dataset.IMAGE: records[dataset.IMAGE]})
        return transformed[preprocessing.PIXELS], records[dataset.LABEL_INDEX]


def _fits_in_memory(summary: DatasetSummary, split: str) -> bool:
    count = summary.counts.get(split, 0)
    size = count * summary.image_size * summary.image_size * summary.channels * 4
    return 0 < size <= _MAX_CACHE_BYTES


def make_dataset(
    summary: DatasetSummary,
    split: str,
    transform: "_Transform",
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Builds the ``(pixels, label_index)`` input for one split.

    Args:
      summary: The dataset's summary (its dir, counts and shape).
      split: A split name, e.g. ``summary.train_split``.
      transform: A ``make_transform`` result, shared across splits.
      batch_size: Global batch size.
      training: Shuffle (reshuffled every epoch) when True; keep file order otherwise.
      seed: Shuffle seed.
      drop_remainder: Drop the last partial batch (ignored when the split has
        fewer examples than one batch). Needed under MirroredStrategy, where a
        short last batch can leave a replica with an empty batch.

    Returns:
      Batches of float32 ``[B, S, S, C]`` pixels and int64 ``[B]`` label indices.
    """
    files = dataset_io.split_files(summary.dataset_dir, split)
    records = dataset_io.read_dataset(files, batch_size=_PARSE_BATCH)
    examples = records.map(transform, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    count = summary.counts.get(split)
    if count:
        # Known epoch length: Keras shows progress and never warns of running out of data.
        examples = examples.apply(tf.data.experimental.assert_cardinality(count))
    if _fits_in_memory(summary, split):
        examples = examples.cache()
    else:
        _LOGGER.info("split %s is too large to cache in memory; it is re-read every epoch", split)
    if training:
        buffer = min(max(summary.counts.get(split, 0), 1), 10_000)
        examples = examples.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    # One host reads everything; replicas split batches, not files.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    drop = drop_remainder and summary.counts.get(split, 0) >= batch_size
    return examples.batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE).with_options(options)


def make_transform(transform_output: tft.TFTransformOutput) -> _Transform:
    """The record-batch -> (pixels, label_index) map used by ``make_dataset``."""
    return _Transform(transform_output)
