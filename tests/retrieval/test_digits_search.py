"""Image search on the digits: a trained model's embeddings, extracted by the real job, indexed by build_index.

The query path is checked end to end: a test image's neighbours share its
digit (precision@5 by label), a query image file is embedded through the
exported model exactly as extract_embeddings embedded it (its own indexed
copy comes back with similarity ~1), a model of another model_version is
refused, and the CLI prints the same neighbours in each format.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from beam_jobs import search
from retrieval.index_tuning import exact_neighbors, query_sample_keys, recall_at_k, search_without_self
from retrieval.searcher import ImageSearcher, ModelVersionMismatch, ShardedIndex, UnknownImageId
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from tests.fixtures.datasets import BuiltDataset


def _first_image(dataset: BuiltDataset) -> tuple[str, str]:
    with open(dataset.source.manifest, newline="") as handle:
        uri, label = next(csv.reader(handle))[:2]
    path = uri if os.path.isabs(uri) else os.path.join(os.path.dirname(dataset.source.manifest), uri)
    return path, label


def test_recall_recomputed_and_precision_at_5_by_label(digits_index: str) -> None:
    index = ShardedIndex.load(digits_index)
    vectors = index.all_vectors()
    keys = query_sample_keys(index.all_image_ids())  # The tuning's held-out queries; its figure is recomputed.
    found = search_without_self(index, vectors[keys], keys, 10, index.search_params)
    recall = recall_at_k(*found, *exact_neighbors(vectors, vectors[keys], 10, exclude=keys))
    assert recall >= 0.95 and abs(recall - index.info.recall_at_k) < 1e-6
    searcher = ImageSearcher.load(digits_index)
    tests = [index.entry(key) for key in range(index.count) if index.entry(key)["split"] == "test"]
    assert len(tests) > 100
    same = [hit.label == entry["label"] for entry in tests for hit in searcher.search(entry["image_id"], k=5)]
    assert np.mean(same) >= 0.9


def test_query_image_is_embedded_like_extract_embeddings(digits_index: str, digits_dataset: BuiltDataset) -> None:
    path, label = _first_image(digits_dataset)
    searcher = ImageSearcher.load(digits_index)
    with open(path, "rb") as handle:
        hits = searcher.search(handle.read(), k=5)
    assert hits[0].score > 0.999 and hits[0].label == label  # Its own indexed copy.
    assert sum(hit.label == label for hit in hits) >= 4
    with pytest.raises(ValueError, match="dimension"):
        searcher.search([0.5] * 3, k=5)
    with pytest.raises(ValueError):
        searcher.search(b"definitely not an image", k=5)
    with pytest.raises(UnknownImageId):
        searcher.search("no-such-id", k=5)


def test_a_model_of_another_version_is_refused(digits_index: str, trained_digits_model: str, tmp_path) -> None:
    other = str(tmp_path / "other_model")
    shutil.copytree(published_dir(trained_digits_model), other)
    info = ModelInfo.read(other)
    ModelInfo(**{**info.__dict__, "model_version": "retrained-elsewhere"}).write(other)
    with pytest.raises(ModelVersionMismatch, match="retrained-elsewhere"):
        ImageSearcher.load(digits_index, model_dir=other)


def test_search_cli_formats(digits_index: str, digits_dataset: BuiltDataset, capsys, tmp_path) -> None:
    path, label = _first_image(digits_dataset)
    assert search.main(["--index_dir", digits_index, "--image", path, "--k", "3", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["label"] == label and hits[0]["score"] > 0.999
    assert search.main(["--index_dir", digits_index, "--image_id", hits[0]["image_id"], "--format", "csv"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0] == list(search.COLUMNS) and len(rows) == 11 and hits[0]["image_id"] not in [r[1] for r in rows]
    assert search.main(["--index_dir", digits_index, "--image_id", hits[0]["image_id"], "--k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == list(search.COLUMNS) and len(table) == 4
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    for argv in (["--image", str(not_image)], ["--image_id", "no-such-id"], ["--image", str(tmp_path / "missing.png")]):
        assert search.main(["--index_dir", digits_index, *argv]) == 3
        err = capsys.readouterr().err
        assert err.startswith("vision-pipelines search: error:") and err.count("\n") == 1
    assert search.main(["--index_dir", str(tmp_path / "nothing"), "--image_id", "x"]) == 3
    assert search.main(["--index_dir", digits_index, "--image_id", "x", "--k", "0"]) == 2
    with pytest.raises(SystemExit):
        search.main(["--index_dir", digits_index, "--image_i", "x"])  # No abbreviations.
