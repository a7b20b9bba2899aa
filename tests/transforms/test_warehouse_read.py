"""ReadFromWarehouse on real DuckDB, Parquet and BigQuery-emulator warehouses filled by WriteEmbeddings."""

from __future__ import annotations

import datetime
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.fixtures import warehouses as wh
from transforms import warehouse_read
from transforms.warehouse_read import ReadFromWarehouse, WarehouseReadError, describe_embeddings


def _comparable(row: dict) -> tuple:
    return (row["image_id"], row["uri"], row["label"], row["split"], tuple(round(v, 5) for v in row["embedding"]),
            row["model_version"], row["created_at"].astimezone(datetime.timezone.utc))


@pytest.mark.parametrize("kind", ["duckdb", "parquet", "bigquery"])
def test_reads_one_model_version_like_the_writer_wrote_it(embedding_warehouses: wh.EmbeddingWarehouses,
                                                          kind: str) -> None:
    uri = embedding_warehouses.all()[kind]
    expected = [_comparable(row) for row in embedding_warehouses.rows[wh.V1]]
    with TestPipeline(runner="FnApiRunner") as pipeline:
        rows = pipeline | "Read" >> ReadFromWarehouse(uri, model_version=wh.V1, rows=150)  # 2 partitions
        assert_that(rows | "Comparable" >> beam.Map(_comparable), equal_to(expected))


def test_default_is_the_newest_model_version(embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    summary = describe_embeddings(embedding_warehouses.duckdb)
    assert (summary.model_version, summary.rows, summary.dimension) == (wh.V2, wh.V2_IMAGES, 64)
    assert ReadFromWarehouse(embedding_warehouses.duckdb).model_version == wh.V2


def test_reads_the_deduplicated_rows_of_an_appended_rerun(tmp_path) -> None:
    uri = f"duckdb:{os.path.join(tmp_path, 'w.duckdb')}"
    first = wh.digits_embedding_rows("m1", count=20, method="pca", created_at=wh.V1_CREATED_AT)
    later = datetime.datetime(2024, 3, 1, tzinfo=datetime.timezone.utc)
    rerun = [{**row, "created_at": later, "label": "relabeled"} for row in first[:5]]
    wh.write_rows(first, uri)
    wh.write_rows(rerun, uri)
    expected = [_comparable(row) for row in rerun + first[5:]]
    with TestPipeline(runner="FnApiRunner") as pipeline:
        rows = pipeline | "Read" >> ReadFromWarehouse(uri, model_version="m1")
        assert_that(rows | "Comparable" >> beam.Map(_comparable), equal_to(expected))


def test_unknown_model_version_and_missing_table_are_one_clear_error(embedding_warehouses: wh.EmbeddingWarehouses,
                                                                     tmp_path) -> None:
    with pytest.raises(WarehouseReadError, match=r"no rows of model_version 'nope'.*pca-v1"):
        describe_embeddings(embedding_warehouses.parquet, "nope")
    with pytest.raises(WarehouseReadError):
        describe_embeddings(f"parquet:{tmp_path}/empty")
    assert warehouse_read.ROWS_PER_PARTITION >= 1000
