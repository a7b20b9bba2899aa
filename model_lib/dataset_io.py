"""Reading create_dataset's TFRecords back as a parsed ``tf.data.Dataset``."""

from __future__ import annotations

import tensorflow as tf

from schemas import dataset, layout
from schemas.publication import published_dir


def split_files(dataset_dir: str, split: str) -> list[str]:
    """The sorted shard files of one split of a dataset's published run (empty list when the split is empty)."""
    return sorted(tf.io.gfile.glob(layout.split_pattern(published_dir(dataset_dir), split)))


def read_dataset(
    pattern: str | list[str],
    *,
    batch_size: int | None = None,
    shuffle_buffer: int = 0,
    seed: int | None = None,
    repeat: bool = False,
    num_parallel_reads: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
    """Reads dataset shards and parses them with the schema from ``schemas.dataset``.

    Args:
      pattern: A glob (local or gs://) or a list of files, e.g.
        ``layout.split_pattern(dataset_dir, "train")``.
      batch_size: Batch the parsed examples when given (parsing is then
        vectorized, which is much faster than per-example parsing).
      shuffle_buffer: Shuffle file order and examples with this buffer when > 0.
      seed: Seed for shuffling, for reproducible runs.
      repeat: Repeat indefinitely (for step-based training).
      num_parallel_reads: Files read in parallel.

    Returns:
      A dataset of dicts keyed by the dataset record's field names; ``image``
      holds the encoded bytes, decoded by the model's preprocessing.

    Raises:
      FileNotFoundError: when the pattern matches no file.
    """
    files = sorted(pattern) if isinstance(pattern, list) else sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no dataset shards match {pattern!r}")
    spec = dataset.DATASET_RECORD.feature_spec()
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_buffer:
        files_ds = files_ds.shuffle(len(files), seed=seed)
    records = files_ds.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=min(len(files), 8),
        num_parallel_calls=num_parallel_reads,
        deterministic=not shuffle_buffer,
    )
    if shuffle_buffer:
        records = records.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        records = records.repeat()
    if batch_size:
        records = records.batch(batch_size)
        parsed = records.map(lambda r: tf.io.parse_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        parsed = records.map(lambda r: tf.io.parse_single_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE)
    return parsed.prefetch(tf.data.AUTOTUNE)
