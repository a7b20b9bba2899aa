"""Fixtures of the search tests: the digits embeddings, extracted by the real job and indexed by build_index."""

from __future__ import annotations

import pytest

from beam_jobs import build_index, extract_embeddings
from tests.fixtures.datasets import BuiltDataset


@pytest.fixture(scope="session")
def digits_index(trained_digits_model: str, digits_dataset: BuiltDataset,
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    """A published 2-shard index of every digit's embedding, built with the model recorded (for query images)."""
    root = tmp_path_factory.mktemp("digits_index")
    warehouse = f"duckdb:{root / 'warehouse.duckdb'}"
    assert extract_embeddings.main(["--model_dir", trained_digits_model, "--input", digits_dataset.dataset_dir,
                                    "--warehouse", warehouse]) == 0
    index_dir = str(root / "index")
    done = build_index.run(["--warehouse", warehouse, "--output_dir", index_dir, "--model_dir", trained_digits_model,
                            "--num_shards", "2", "--k", "10", "--target_recall", "0.95"])
    assert done.counts["read"] == done.counts["indexed"] + done.counts["rejected"]
    assert done.counts["indexed"] >= 1700
    return index_dir
