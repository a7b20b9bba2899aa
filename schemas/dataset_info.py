"""The ``dataset_info.json`` contract: create_dataset writes it, training and users read it.

``transforms.dataset_summary`` builds a ``DatasetInfo`` from the pipeline's
counts and writes it whole; ``model_lib.input_pipeline`` and
``beam_jobs.create_dataset``'s summary read it back through ``DatasetInfo.read``,
never by literal keys.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from schemas import artifact_files, layout


@dataclasses.dataclass(frozen=True)
class SplitCounts:
    """Records written to one split: in total and per label."""

    total: int
    labels: dict[str, int]

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "split counts") -> "SplitCounts":
        values = artifact_files.field_values(cls, content, source)
        return cls(total=int(values["total"]), labels={str(k): int(v) for k, v in values["labels"].items()})


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Where every manifest data row went: ``read == written + rejected`` when nothing was lost.

    Attributes:
      read: Manifest data rows read (well-formed or not).
      written: Dataset records written, all splits together.
      rejected: Dead letters about images (rating-row rejections are not
        images and are counted in ``DatasetInfo.rejected_ratings`` instead).
    """

    read: int
    written: int
    rejected: int

    @property
    def balanced(self) -> bool:
        return self.read == self.written + self.rejected

    def mismatch(self) -> str | None:
        """None when balanced; otherwise which numbers disagree and by how much."""
        if self.balanced:
            return None
        accounted = self.written + self.rejected
        difference = self.read - accounted
        what = f"{difference} row(s) unaccounted for" if difference > 0 else f"{-difference} row(s) too many"
        return (f"read {self.read} != written {self.written} + rejected {self.rejected} "
                f"(= {accounted}): {what}")

    def to_dict(self) -> dict[str, Any]:
        # ``balanced`` is derived; it is written for people reading the file.
        return {"read": self.read, "written": self.written, "rejected": self.rejected, "balanced": self.balanced}

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "accounting") -> "Accounting":
        return cls(**{k: int(v) for k, v in artifact_files.field_values(cls, content, source).items()})


@dataclasses.dataclass(frozen=True)
class DatasetWarning:
    """Something about a dataset that lets the job finish but that a user must hear about.

    Attributes:
      code: Stable identifier scripts can match (``empty_split``,
        ``label_missing_from_train``, ``few_images_for_label``, ``single_label``,
        ``small_dataset``, ``no_images``).
      message: One line in the user's terms, saying what to do.
    """

    code: str
    message: str

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "warning") -> "DatasetWarning":
        values = artifact_files.field_values(cls, content, source)
        return cls(code=str(values["code"]), message=str(values["message"]))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Summary of one create_dataset output directory.

    Attributes:
      counts: Per split (every name of ``split_names``, empty ones too).
      split_names: create_dataset's ``--split_names`` in order: train,
        validation, then test (the order training relies on).
      labels: The vocabulary, in ``label_index`` order (as labels.txt).
      rejected: Image dead letters per reason code.
      rejected_ratings: Ratings-row dead letters per reason code.
      accounting: See ``Accounting``.
      fingerprint: Order-independent hash of the records (ids, contents,
        labels, splits): equal for two runs that wrote the same dataset.
      image_size: Side of the stored square images.
      channels: 1 or 3.
      resize_method: stretch, pad or crop.
      image_format: jpeg or png.
      parameters: Every setting of the run, for the record.
      created_at: ISO-8601 UTC time the summary was built.
      warnings: What create_dataset found wrong but not fatal (empty
        splits, labels missing from train, ...); ``--strict`` refuses to
        publish a dataset that has any. Absent in files written before
        warnings existed, hence the default.
    """

    counts: dict[str, SplitCounts]
    split_names: list[str]
    labels: list[str]
    rejected: dict[str, int]
    rejected_ratings: dict[str, int]
    accounting: Accounting
    fingerprint: str
    image_size: int
    channels: int
    resize_method: str
    image_format: str
    parameters: dict[str, Any]
    created_at: str
    warnings: list[DatasetWarning] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        content = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        content["counts"] = {name: dataclasses.asdict(split) for name, split in self.counts.items()}
        content["accounting"] = self.accounting.to_dict()
        content["warnings"] = [dataclasses.asdict(warning) for warning in self.warnings]
        return content

    def to_json(self) -> str:
        return artifact_files.to_json_text(self.to_dict())

    @classmethod
    def from_json(cls, text: str, source: str = layout.DATASET_INFO_FILE) -> "DatasetInfo":
        return cls.from_dict(json.loads(text), source)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = layout.DATASET_INFO_FILE) -> "DatasetInfo":
        values = artifact_files.field_values(cls, content, source)
        return cls(
            counts={
                str(name): SplitCounts.from_dict(split, f"{source} counts.{name}")
                for name, split in values["counts"].items()
            },
            split_names=[str(name) for name in values["split_names"]],
            labels=[str(label) for label in values["labels"]],
            rejected={str(k): int(v) for k, v in values["rejected"].items()},
            rejected_ratings={str(k): int(v) for k, v in values["rejected_ratings"].items()},
            accounting=Accounting.from_dict(values["accounting"], f"{source} accounting"),
            fingerprint=str(values["fingerprint"]),
            image_size=int(values["image_size"]),
            channels=int(values["channels"]),
            resize_method=str(values["resize_method"]),
            image_format=str(values["image_format"]),
            parameters=dict(values["parameters"]),
            created_at=str(values["created_at"]),
            warnings=[DatasetWarning.from_dict(w, f"{source} warnings") for w in values.get("warnings", [])],
        )

    @classmethod
    def read(cls, dataset_dir: str) -> "DatasetInfo":
        """Reads ``dataset_dir/dataset_info.json`` (local or gs://).

        Raises:
          FileNotFoundError: ``dataset_dir`` holds no dataset_info.json.
          ValueError: the file lacks a field of the contract.
        """
        path = layout.join(dataset_dir, layout.DATASET_INFO_FILE)
        return cls.from_dict(artifact_files.read_json(path), path)

    def write(self, dataset_dir: str) -> str:
        """Writes ``dataset_dir/dataset_info.json`` whole or not at all; returns its path."""
        path = layout.join(dataset_dir, layout.DATASET_INFO_FILE)
        artifact_files.write_json(path, self.to_dict())
        return path
