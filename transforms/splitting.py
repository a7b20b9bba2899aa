"""Stable image ids and deterministic train/valid/test assignment.

An image's id is a hash of its normalized URI (or of its content); its split
is a pure function of its content hash and the split fractions. The split
never depends on where the file lives, so the same image lands in the same
split on every run, with any shard count, on any runner, independently of
which other images are in the dataset, and after the dataset is copied to
another directory or bucket; byte-identical copies share one split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import posixpath

_ID_HEX_CHARS = 32  # 128 bits: collisions are out of reach for any dataset.


def normalize_uri(uri: str, base_dir: str | None = None) -> str:
    """Canonical form of an image location.

    Remote URIs (``scheme://...``) keep their scheme (lower-cased) and get
    ``.``/``..`` segments collapsed. A relative path is resolved against
    ``base_dir`` (the manifest's directory), local or remote: ``b.jpg`` in
    ``gs://bucket/data/all_data.csv`` is ``gs://bucket/data/b.jpg``. Local paths
    become absolute.
    """
    uri = uri.strip()
    if "://" not in uri and base_dir is not None and not os.path.isabs(uri):
        if "://" in base_dir:
            uri = f"{base_dir.rstrip('/')}/{uri}"
        else:
            uri = os.path.join(base_dir, uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme.lower()}://{posixpath.normpath(rest)}"
    return os.path.abspath(os.path.normpath(uri))


def image_id_for_uri(uri: str) -> str:
    """The id of an image identified by its location (``--dedupe uri``)."""
    return hashlib.sha256(normalize_uri(uri).encode("utf-8")).hexdigest()[:_ID_HEX_CHARS]


def image_id_for_content(sha256_hex: str) -> str:
    """The id of an image identified by its bytes (``--dedupe content``)."""
    return sha256_hex[:_ID_HEX_CHARS]


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Named splits and their fractions (normalized to sum to 1)."""

    names: tuple[str, ...] = ("train", "valid", "test")
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.fractions):
            raise ValueError(f"{len(self.names)} split names but {len(self.fractions)} fractions: "
                             f"Received `names={self.names}`, `fractions={self.fractions}`")
        if len(set(self.names)) != len(self.names) or not all(self.names):
            raise ValueError(f"split names must be unique and non-empty. Received `names={self.names}`")
        if not all(math.isfinite(f) and f >= 0 for f in self.fractions) or not abs(sum(self.fractions) - 1.0) <= 1e-9:
            raise ValueError(f"split fractions must be >= 0 and sum to 1. Received `fractions={self.fractions}`")

    @classmethod
    def parse(cls, fractions: str, names: str = "train,valid,test") -> "SplitSpec":
        """Parses ``--split 80,10,10`` (percentages or fractions) and ``--split_names``."""
        try:
            values = [float(v) for v in fractions.split(",")]
        except ValueError as error:
            raise ValueError(f"--split must be comma-separated numbers. Received `split={fractions}`") from error
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"--split values must be finite and >= 0. Received `split={fractions}`")
        total = sum(values)
        if total <= 0:
            raise ValueError(f"--split must have a positive total. Received `split={fractions}`")
        return cls(
            names=tuple(n.strip() for n in names.split(",")),
            fractions=tuple(v / total for v in values),
        )


def split_point(image_id: str) -> float:
    """A uniform value in [0, 1) derived from the id alone."""
    digest = hashlib.sha256(f"split:{image_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(image_id: str, spec: SplitSpec) -> str:
    """The split of a key (an id or a content hash): a pure function of the key and the spec."""
    point = split_point(image_id)
    cumulative = 0.0
    for name, fraction in zip(spec.names, spec.fractions):
        cumulative += fraction
        if point < cumulative:
            return name
    return next(name for name, fraction in reversed(list(zip(spec.names, spec.fractions))) if fraction > 0)


def split_for_content(sha256_hex: str, spec: SplitSpec) -> str:
    """The split of an image, from its bytes alone (never its location).

    It keys the split on the content id, so with ``--dedupe content`` the
    split is what it always was.
    """
    return assign_split(image_id_for_content(sha256_hex), spec)
