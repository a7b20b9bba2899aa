"""WriteToWarehouse / WriteEmbeddings: real Beam pipelines into DuckDB, Parquet and the BigQuery emulator."""

from __future__ import annotations

import contextlib
import datetime
import glob
import logging
import os
import re
import subprocess
import sys
from typing import Iterator

import apache_beam as beam
import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from schemas.embedding import EMBEDDING_RECORD, EMBEDDINGS_TABLE
from schemas.warehouse import duckdb_staging_dir, parquet_table_glob, parse_warehouse_uri
from tests.fixtures import warehouses as wh
from transforms.warehouse import WriteEmbeddings, check_row, to_bigquery_row

MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _duckdb_rows(uri: str) -> list[dict]:
    warehouse = parse_warehouse_uri(uri, "embeddings")
    with duckdb.connect(warehouse.location, read_only=True) as connection:
        cursor = connection.execute(f'SELECT * FROM "{warehouse.table}" ORDER BY model_version, image_id')
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]


def _parquet_rows(uri: str) -> list[dict]:
    warehouse = parse_warehouse_uri(uri, "embeddings")
    files = sorted(glob.glob(parquet_table_glob(warehouse)))
    rows = [row for f in files for row in pq.read_table(f, schema=EMBEDDING_RECORD.arrow_schema()).to_pylist()]
    return sorted(rows, key=lambda r: (r["model_version"], r["image_id"]))


def _as_stored(rows: list[dict]) -> list[dict]:
    """What a row reads back as: float32 embedding values, UTC timestamps, sorted like the readers."""
    stored = [
        {**r, "embedding": [float(v) for v in np.asarray(r["embedding"], dtype=np.float32)],
         "created_at": r["created_at"].astimezone(datetime.timezone.utc)}
        for r in rows
    ]
    return sorted(stored, key=lambda r: (r["model_version"], r["image_id"]))


def _utc(rows: list[dict]) -> list[dict]:
    return [{**r, "created_at": r["created_at"].astimezone(datetime.timezone.utc)} for r in rows]


@pytest.mark.parametrize(
    "uri,kind,location,table",
    [
        ("bigquery:my-project.vision.embeddings", "bigquery", "my-project.vision.embeddings", "embeddings"),
        ("duckdb:/tmp/w.duckdb", "duckdb", "/tmp/w.duckdb", "embeddings"),
        ("duckdb:w.duckdb#emb_v2", "duckdb", "w.duckdb", "emb_v2"),
        ("parquet:gs://bucket/warehouse", "parquet", "gs://bucket/warehouse", "embeddings"),
    ],
)
def test_parse_warehouse_uri(uri: str, kind: str, location: str, table: str) -> None:
    warehouse = parse_warehouse_uri(uri, EMBEDDINGS_TABLE.default_table)
    assert (warehouse.kind, warehouse.location, warehouse.table) == (kind, location, table)


@pytest.mark.parametrize(
    "uri",
    ["bq:p.d.t", "bigquery:p.d", "bigquery:my-project.d.t;DROP", "duckdb:", "duckdb:x.db#t;DROP TABLE x", "w.duckdb"],
)
def test_parse_warehouse_uri_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(ValueError, match="Received"):
        parse_warehouse_uri(uri, "embeddings")


def test_check_row_rejects_rows_that_do_not_match_the_record() -> None:
    good = wh.v2_rows()[0]
    assert check_row(dict(good), EMBEDDING_RECORD) == good
    with pytest.raises(ValueError, match="keys"):
        check_row({k: v for k, v in good.items() if k != "uri"}, EMBEDDING_RECORD)
    with pytest.raises(ValueError, match="required"):
        check_row({**good, "model_version": None}, EMBEDDING_RECORD)
    with pytest.raises(ValueError, match="timezone-aware"):
        check_row({**good, "created_at": datetime.datetime(2024, 1, 1)}, EMBEDDING_RECORD)
    assert check_row({**good, "label": None, "split": None}, EMBEDDING_RECORD)["label"] is None


def test_bigquery_rows_are_json_ready() -> None:
    row = to_bigquery_row(wh.v1_rows()[0], EMBEDDING_RECORD)
    assert row["created_at"] == "2024-01-01 12:00:00.000000 UTC"
    assert all(isinstance(v, float) for v in row["embedding"])


def test_duckdb_and_parquet_hold_exactly_the_rows_written(embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    expected = _as_stored(embedding_warehouses.rows[wh.V1] + embedding_warehouses.rows[wh.V2])
    assert _utc(_duckdb_rows(embedding_warehouses.duckdb)) == expected
    assert _utc(_parquet_rows(embedding_warehouses.parquet)) == expected
    # The DuckDB writer's staged shards are gone once loaded.
    staging = duckdb_staging_dir(parse_warehouse_uri(embedding_warehouses.duckdb, "embeddings"))
    assert not [f for _, _, files in os.walk(staging) for f in files]


def test_bigquery_table_has_the_record_schema_partitioning_and_rows(
    embedding_warehouses: wh.EmbeddingWarehouses, bigquery_emulator
) -> None:
    client = bigquery_emulator.client()
    table_id = embedding_warehouses.bigquery.removeprefix("bigquery:")
    table = client.get_table(table_id)
    assert [(f.name, f.field_type, f.mode) for f in table.schema] == [
        (f["name"], f["type"], f["mode"]) for f in EMBEDDING_RECORD.bigquery_schema()["fields"]
    ]
    rows = [dict(r) for r in client.query(f"SELECT * FROM `{table_id}` ORDER BY model_version, image_id").result()]
    expected = _as_stored(embedding_warehouses.rows[wh.V1] + embedding_warehouses.rows[wh.V2])
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in expected]
    np.testing.assert_array_equal(
        np.concatenate([r["embedding"] for r in rows]), np.concatenate([r["embedding"] for r in expected])
    )
    assert [r["created_at"] for r in rows] == [r["created_at"] for r in expected]
    # The emulator ignores a load job's partitioning, so check what was asked of BigQuery.
    loads = [job for job in client.list_jobs() if job.job_type == "load"
             and job.destination is not None and job.destination.table_id == table.table_id]
    assert loads
    for job in loads:
        assert job.time_partitioning.type_ == "DAY" and job.time_partitioning.field == "created_at"
        assert job.clustering_fields == ["model_version", "label"]
        assert job.create_disposition == "CREATE_IF_NEEDED"


def test_truncate_replaces_the_table_in_every_warehouse(tmp_path, bigquery_emulator) -> None:
    bucket = bigquery_emulator.gcs.create_bucket()
    uris = {
        "duckdb": f"duckdb:{tmp_path / 'w.duckdb'}",
        "parquet": f"parquet:{tmp_path / 'parquet'}",
        "bigquery": f"bigquery:{bigquery_emulator.create_dataset()}.embeddings",
    }
    bigquery_args = [f"--temp_location=gs://{bucket}/tmp", f"--project={bigquery_emulator.project}"]
    first, second = wh.v2_rows()[:20], wh.v1_rows()[:7]
    for kind, uri in uris.items():
        args = bigquery_args if kind == "bigquery" else []
        wh.write_rows(first, uri, args)
        wh.write_rows(first, uri, args, write_disposition="append")
        wh.write_rows(second, uri, args, write_disposition="truncate")
    expected_ids = sorted(r["image_id"] for r in second)
    assert sorted(r["image_id"] for r in _duckdb_rows(uris["duckdb"])) == expected_ids
    assert sorted(r["image_id"] for r in _parquet_rows(uris["parquet"])) == expected_ids
    table_id = uris["bigquery"].removeprefix("bigquery:")
    got = [r["image_id"] for r in bigquery_emulator.client().query(f"SELECT image_id FROM `{table_id}`").result()]
    assert sorted(got) == expected_ids


def test_append_without_rows_creates_an_empty_table(tmp_path) -> None:
    uri = f"duckdb:{tmp_path / 'empty.duckdb'}"
    wh.write_rows([], uri)
    assert _duckdb_rows(uri) == []


@pytest.mark.parametrize("kind", ["duckdb", "parquet"])
def test_parallel_writers_produce_a_complete_table(tmp_path, kind: str) -> None:
    rows = wh.digits_embedding_rows("parallel", count=600, method="pca",
                                    created_at=datetime.datetime.now(datetime.timezone.utc))
    uri = f"duckdb:{tmp_path / 'w.duckdb'}" if kind == "duckdb" else f"parquet:{tmp_path / 'parquet'}"
    wh.write_rows(rows, uri, MULTI_PROCESSING)
    written = _duckdb_rows(uri) if kind == "duckdb" else _parquet_rows(uri)
    assert len(written) == len(rows)
    assert sorted(r["image_id"] for r in written) == sorted(r["image_id"] for r in rows)
    if kind == "parquet":  # Shards come from more than one writer.
        assert len(glob.glob(parquet_table_glob(parse_warehouse_uri(uri, "embeddings")))) > 1


def test_write_embeddings_rejects_unknown_dispositions() -> None:
    with pytest.raises(ValueError, match="write_disposition"):
        WriteEmbeddings("duckdb:x.duckdb", write_disposition="overwrite")  # type: ignore[arg-type]


def _keys(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted((r["model_version"], r["image_id"]) for r in rows)


def test_parquet_truncate_keeps_files_a_concurrent_writer_added(tmp_path) -> None:
    uri = f"parquet:{tmp_path / 'parquet'}"
    old, new, concurrent = wh.v2_rows()[:10], wh.v1_rows()[:7], wh.v2_rows()[20:25]
    wh.write_rows(old, uri)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        _ = pipeline | beam.Create(new) | WriteEmbeddings(uri, write_disposition="truncate")
        # Built (the table's files snapshotted), not yet run: another job appends meanwhile.
        wh.write_rows(concurrent, uri)
    assert _keys(_parquet_rows(uri)) == _keys(new + concurrent)


_HOLD_DUCKDB = """
import sys, time
import duckdb
connection = duckdb.connect(sys.argv[1], read_only=True)  # What an open `sql` session holds.
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def _duckdb_held_by_another_process(path: str, seconds: float) -> Iterator[subprocess.Popen]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_DUCKDB, path, str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def _staged_files(uri: str) -> list[str]:
    staging = duckdb_staging_dir(parse_warehouse_uri(uri, "embeddings"))
    return [os.path.join(d, f) for d, _, files in os.walk(staging) for f in files]


def test_duckdb_load_waits_for_a_reader_to_release_the_file(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"duckdb:{tmp_path / 'w.duckdb'}"
    first, second = wh.v2_rows()[:10], wh.v1_rows()[:7]
    wh.write_rows(first, uri)
    caplog.set_level(logging.INFO, logger="transforms.warehouse")
    with _duckdb_held_by_another_process(str(tmp_path / "w.duckdb"), seconds=6) as holder:
        wh.write_rows(second, uri)  # Default wait (120 s): the reader exits after 6 s.
        assert holder.poll() is not None
    assert "is locked; retrying" in caplog.text
    assert _keys(_duckdb_rows(uri)) == _keys(first + second)
    assert _staged_files(uri) == []


def test_duckdb_load_that_never_gets_the_lock_fails_clearly_and_leaves_no_shards(tmp_path) -> None:
    uri = f"duckdb:{tmp_path / 'w.duckdb'}"
    first = wh.v2_rows()[:10]
    wh.write_rows(first, uri)
    with _duckdb_held_by_another_process(str(tmp_path / "w.duckdb"), seconds=300):
        with pytest.raises(Exception, match="was locked by another process") as failed:
            wh.write_rows(wh.v1_rows()[:7], uri, duckdb_lock_timeout_s=1.5)
        assert re.search(r"waited \d+\.\d s \(limit 1\.5 s\)", str(failed.value)), str(failed.value)
        assert _staged_files(uri) == []
    assert _keys(_duckdb_rows(uri)) == _keys(first)


def test_duckdb_lock_timeout_is_checked() -> None:
    with pytest.raises(ValueError, match="Received `duckdb_lock_timeout_s=-1`"):
        WriteEmbeddings("duckdb:x.duckdb", duckdb_lock_timeout_s=-1)
