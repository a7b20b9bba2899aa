"""File names inside the artifact directories, so jobs never spell paths ad hoc."""

from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

# create_dataset output directory.
LABELS_FILE = "labels.txt"
SCHEMA_FILE = "schema.pbtxt"
DATASET_INFO_FILE = "dataset_info.json"
TFRECORD_SUFFIX = ".tfrecord.gz"
REJECTED_PREFIX = "rejected"
REJECTED_SUFFIX = ".jsonl"
# Written by tf.Transform's WriteTransformFn (tft.TFTransformOutput.TRANSFORM_FN_DIR).
TRANSFORM_FN_DIR = "transform_fn"


def join(directory: str, *parts: str) -> str:
    """Joins paths for local directories and gs:// alike."""
    return FileSystems.join(directory, *parts)


def split_prefix(output_dir: str, split: str) -> str:
    """Shard prefix for a split: shards are ``{split}-SSSSS-of-NNNNN.tfrecord.gz``."""
    return join(output_dir, split)


def split_pattern(dataset_dir: str, split: str) -> str:
    """Glob matching every shard of one split."""
    return join(dataset_dir, f"{split}-*-of-*{TFRECORD_SUFFIX}")


def rejected_prefix(output_dir: str) -> str:
    return join(output_dir, REJECTED_PREFIX)


def rejected_pattern(output_dir: str) -> str:
    return join(output_dir, f"{REJECTED_PREFIX}-*{REJECTED_SUFFIX}")
