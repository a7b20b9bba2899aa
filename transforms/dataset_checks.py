"""What a dataset must hold to be useful: create_dataset's warnings and train's preconditions.

Small first datasets (six photos, three images of one label) used to produce
an empty train split and a "successful" run, then a trial that died with
``StopIteration``. These checks say what is wrong in the user's terms and what
to do, from the counts in ``dataset_info.json`` alone (no Beam, no TensorFlow),
so create_dataset can warn and train can refuse before building a model.

The split stays a pure function of each image: the advice for a small dataset
is a different ``--split``, never a size-dependent assignment.
"""

from __future__ import annotations

import math
from typing import Sequence

from schemas import layout
from schemas.dataset_info import DatasetInfo, DatasetWarning, SplitCounts

# A label with fewer images than this cannot be both learned and measured.
MIN_IMAGES_PER_LABEL = 5
# Hash-based fractions are near the requested ones only when each split expects this many images.
MIN_EXPECTED_IMAGES_PER_SPLIT = 5
# The largest hold-out fraction the small-dataset advice suggests per non-train split.
MAX_SUGGESTED_HOLDOUT = 0.25


def dataset_warnings(
    counts: dict[str, SplitCounts],
    split_names: Sequence[str],
    split_fractions: Sequence[float],
    labels: Sequence[str],
    read: int,
) -> list[DatasetWarning]:
    """Everything about a finished dataset a user should hear before training on it.

    Args:
      counts: Records per split and label, as written.
      split_names: train first, then validation and test (``--split_names``).
      split_fractions: The requested fractions, in ``split_names`` order.
      labels: The vocabulary.
      read: Manifest rows read.
    """
    written = sum(split.total for split in counts.values())
    if written == 0:
        reason = ("the manifests hold no data rows" if read == 0
                  else f"all {read} manifest rows were rejected (reasons in rejected-*.jsonl)")
        return [DatasetWarning("no_images", f"the dataset has no images: {reason}")]
    warnings: list[DatasetWarning] = []
    for position, (name, fraction) in enumerate(zip(split_names, split_fractions)):
        # A split requested at 0% may stay empty, except train and validation: training needs both.
        if counts[name].total == 0 and (fraction > 0 or position < 2):
            warnings.append(DatasetWarning(
                "empty_split", f"split {name!r} has no images (requested {fraction:.0%} of {written})"))
    train = split_names[0]
    per_label = {label: sum(split.labels.get(label, 0) for split in counts.values()) for label in labels}
    missing = [label for label in labels if counts[train].total and counts[train].labels.get(label, 0) == 0]
    if missing:
        warnings.append(DatasetWarning(
            "label_missing_from_train",
            f"label(s) {', '.join(map(repr, missing))} have no images in the {train!r} split, "
            f"so a model cannot learn them"))
    few = [label for label in labels if per_label[label] < MIN_IMAGES_PER_LABEL]
    if few:
        listed = ", ".join(f"{label!r} ({per_label[label]})" for label in few)
        warnings.append(DatasetWarning(
            "few_images_for_label",
            f"label(s) with fewer than {MIN_IMAGES_PER_LABEL} images: {listed}; "
            f"give every label at least {MIN_IMAGES_PER_LABEL} so it can be learned and measured"))
    present = [label for label in labels if per_label[label] > 0]
    if len(present) < 2:
        warnings.append(DatasetWarning(
            "single_label", f"only {len(present)} label ({', '.join(map(repr, present))}) has images; "
                            f"a classifier needs at least 2"))
    advice = small_dataset_advice(written, split_names, split_fractions)
    if advice:
        warnings.append(DatasetWarning("small_dataset", advice))
    return warnings


def small_dataset_advice(written: int, split_names: Sequence[str], split_fractions: Sequence[float]) -> str | None:
    """Advice when a dataset is too small for its split fractions to come out near the requested ones.

    Each image lands in a split by a hash of its content, so a split of
    fraction f gets f * n images on average and may get none. None when every
    split with a non-zero fraction expects at least
    ``MIN_EXPECTED_IMAGES_PER_SPLIT`` images.
    """
    expected = {name: fraction * written for name, fraction in zip(split_names, split_fractions) if fraction > 0}
    if all(count >= MIN_EXPECTED_IMAGES_PER_SPLIT for count in expected.values()):
        return None
    holdouts = len(split_names) - 1
    holdout = min(MAX_SUGGESTED_HOLDOUT, math.ceil(100 * MIN_EXPECTED_IMAGES_PER_SPLIT / written) / 100)
    suggestion = ",".join([str(round(100 * (1 - holdouts * holdout)))] + [str(round(100 * holdout))] * holdouts)
    shortest = min(expected, key=expected.get)
    needed = math.ceil(MIN_EXPECTED_IMAGES_PER_SPLIT / (expected[shortest] / written))
    return (f"{written} images are too few for the requested split: {shortest!r} expects "
            f"{expected[shortest]:.1f} image(s) and may get none (splits are by content hash, not counted); "
            f"try --split {suggestion}, or add images (about {needed} for the current fractions)")


def trainability_problem(info: DatasetInfo, dataset_dir: str, has_transform_fn: bool) -> str | None:
    """Why ``train`` cannot use a dataset, in one line naming the fix; None when it can.

    Args:
      info: The dataset's summary.
      dataset_dir: The directory the user named (for the message).
      has_transform_fn: Whether the dataset holds tf.Transform's ``transform_fn/``.
    """
    names = info.split_names
    if len(names) < 2:
        return (f"dataset {dataset_dir} has only the split {names!r}; train needs a train and a validation split "
                f"(rerun create-dataset with --split_names train,valid,test)")
    train, validation = names[0], names[1]
    if sum(split.total for split in info.counts.values()) == 0:
        return (f"dataset {dataset_dir} has no images (create-dataset wrote none; "
                f"its warnings in {layout.DATASET_INFO_FILE} say why)")
    for name in (train, validation):
        if info.counts[name].total == 0:
            return (f"dataset {dataset_dir} has no images in its {name!r} split; "
                    f"rerun create-dataset with more images or other --split fractions "
                    f"(requested: {format_fractions(info)})")
    train_labels = [label for label, count in info.counts[train].labels.items() if count > 0]
    if len(train_labels) < 2:
        return (f"dataset {dataset_dir} has {len(train_labels)} label(s) in its {train!r} split "
                f"({', '.join(map(repr, train_labels)) or 'none'}); a classifier needs at least 2: "
                f"add images of other labels and rerun create-dataset")
    if not has_transform_fn:
        return (f"dataset {dataset_dir} has no {layout.TRANSFORM_FN_DIR}/ (it was created with --skip_analysis); "
                f"rerun create-dataset without --skip_analysis to write it")
    return None


def format_fractions(info: DatasetInfo) -> str:
    fractions = info.parameters.get("split_fractions") or []
    return ",".join(f"{name}={fraction:.0%}" for name, fraction in zip(info.split_names, fractions)) or "unknown"
