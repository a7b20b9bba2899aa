"""build_index end to end: real Beam pipelines reading real warehouses, real ScaNN shards, results checked by brute force."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import build_index
from benchmarks.vectors import clustered_unit_vectors
from retrieval.index_tuning import exact_neighbors, query_sample_keys, recall_at_k, search_without_self
from retrieval.searcher import ImageSearcher, ShardedIndex
from schemas.dead_letter import DeadLetter
from schemas.embedding import EMBEDDING_RECORD, EMBEDDINGS_TABLE
from schemas.index import IndexInfo
from schemas.publication import published_dir
from schemas.warehouse import parquet_table_dir, parse_warehouse_uri
from tests.fixtures import warehouses as wh
from transforms.dead_letters import read_dead_letters

CREATED_AT = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)


def write_parquet_warehouse(root: str, vectors: np.ndarray, model_version: str = "synthetic-v1") -> str:
    """A Parquet warehouse table of synthetic rows, written in the writer's layout and Arrow schema."""
    uri = f"parquet:{root}"
    table_dir = parquet_table_dir(parse_warehouse_uri(uri, EMBEDDINGS_TABLE.default_table))
    os.makedirs(table_dir, exist_ok=True)
    rows = [{"image_id": f"syn-{i:06d}", "uri": f"/synthetic/{i}.png", "label": str(i % 7), "split": "train",
             "embedding": vectors[i].tolist(), "model_version": model_version, "created_at": CREATED_AT}
            for i in range(len(vectors))]
    pq.write_table(pa.Table.from_pylist(rows, schema=EMBEDDING_RECORD.arrow_schema()),
                   os.path.join(table_dir, "part-synthetic.parquet"))
    return uri


def run_build(warehouse: str, output_dir: str, *extra: str) -> build_index.BuildIndexResult:
    return build_index.run(["--warehouse", warehouse, "--output_dir", output_dir, *extra])


def measured_recall(index_dir: str, k: int = 10) -> float:
    """recall@k of the published index's tuned search on its held-out queries, recomputed against brute force."""
    index = ShardedIndex.load(index_dir)
    vectors = index.all_vectors()
    keys = query_sample_keys(index.all_image_ids())
    exact = exact_neighbors(vectors, vectors[keys], k, exclude=keys)
    found = search_without_self(index, vectors[keys], keys, k, index.search_params)
    recall = recall_at_k(*found, *exact)
    assert abs(recall - IndexInfo.read(published_dir(index_dir)).recall_at_k) < 1e-6
    return recall


@pytest.fixture(scope="module")
def synthetic_warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    # The tree path at 100k is tested in-process (test_index_library).
    vectors = clustered_unit_vectors(30_000, 16, cluster_size=200, spread=0.35)
    return write_parquet_warehouse(str(tmp_path_factory.mktemp("synthetic")), vectors), vectors


def test_three_warehouses_build_identical_indexes(embedding_warehouses: wh.EmbeddingWarehouses, tmp_path) -> None:
    results = {}
    for kind, uri in embedding_warehouses.all().items():
        done = run_build(uri, str(tmp_path / kind), "--model_version", wh.V1)
        assert done.counts == {"read": wh.V1_IMAGES + len(wh.DUPLICATE_OF), "indexed": wh.V1_IMAGES + 3,
                               "rejected": 0}
        searcher = ImageSearcher.load(str(tmp_path / kind))
        assert searcher.info.model_version == wh.V1 and searcher.info.dimension == 16
        results[kind] = [[(h.image_id, round(h.score, 5)) for h in searcher.search(image_id, k=5)]
                         for image_id in searcher.index.all_image_ids()]
    assert results["duckdb"] == results["parquet"] == results["bigquery"]
    # A planted near-duplicate is its source's nearest neighbour.
    searcher = ImageSearcher.load(str(tmp_path / "duckdb"))
    for copy, source in wh.DUPLICATE_OF.items():
        assert searcher.search(copy, k=1)[0].image_id == source


def test_synthetic_sharded_and_single_index_agree_and_meet_the_target(synthetic_warehouse, tmp_path) -> None:
    uri, vectors = synthetic_warehouse
    single = run_build(uri, str(tmp_path / "one"), "--k", "10", "--target_recall", "0.95")
    sharded = run_build(uri, str(tmp_path / "three"), "--num_shards", "3")
    assert single.counts["indexed"] == sharded.counts["indexed"] == len(vectors)
    one, three = IndexInfo.read(single.index_dir), IndexInfo.read(sharded.index_dir)
    assert [s.params.algorithm for s in one.shards] == ["ah"]
    assert three.num_shards == 3 and sum(s.count for s in three.shards) == len(vectors)
    for index_dir in (single.index_dir, sharded.index_dir):
        assert measured_recall(index_dir) >= 0.95  # Recomputed, not read from index_info.json.
    # Same top-k up to ties and approximation: exact brute-force search through both indexes' own vectors.
    a, b = ShardedIndex.load(single.index_dir), ShardedIndex.load(sharded.index_dir)
    ids_a, ids_b = a.all_image_ids(), b.all_image_ids()
    queries = vectors[:50]
    exact_a = [[ids_a[k] for k in row] for row in exact_neighbors(a.all_vectors(), queries, 10)[0]]
    exact_b = [[ids_b[k] for k in row] for row in exact_neighbors(b.all_vectors(), queries, 10)[0]]
    assert exact_a == exact_b
    from schemas.index import SearchParams

    exhaustive = SearchParams(leaves_to_search=10_000, pre_reorder_num_neighbors=100_000)
    got_a = [[ids_a[k] for k in row] for row in a.search(queries, 10, exhaustive).keys]
    got_b = [[ids_b[k] for k in row] for row in b.search(queries, 10, exhaustive).keys]
    assert got_a == got_b == exact_a


def test_serialized_index_loads_identically_in_a_fresh_process(embedding_warehouses: wh.EmbeddingWarehouses,
                                                                tmp_path) -> None:
    output = str(tmp_path / "index")
    run_build(embedding_warehouses.parquet, output, "--model_version", wh.V1, "--num_shards", "2")
    searcher = ImageSearcher.load(output)
    here = {image_id: [[h.image_id, round(h.score, 6)] for h in searcher.search(image_id, k=5)]
            for image_id in searcher.index.all_image_ids()[:40]}
    script = ("import json, sys\nfrom retrieval.searcher import ImageSearcher\n"
              "s = ImageSearcher.load(sys.argv[1])\n"
              "ids = s.index.all_image_ids()[:40]\n"
              "print(json.dumps({i: [[h.image_id, round(h.score, 6)] for h in s.search(i, k=5)] for i in ids}))\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script, output], capture_output=True, text=True, cwd=root,
                         check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def _write_duckdb(path: str, rows: list[dict]) -> str:
    uri = f"duckdb:{path}"
    wh.write_rows(rows, uri)
    return uri


def test_bad_vectors_are_dead_letters_and_the_accounting_balances(tmp_path) -> None:
    rows = wh.digits_embedding_rows("m1", count=60, method="pca", created_at=CREATED_AT)
    rows[3]["embedding"] = [float("nan")] * 16
    rows[7]["embedding"] = [0.0] * 16
    rows[11]["embedding"] = rows[11]["embedding"][:5]
    uri = _write_duckdb(str(tmp_path / "w.duckdb"), rows)
    done = run_build(uri, str(tmp_path / "index"))
    assert done.counts == {"read": 60, "indexed": 57, "rejected": 3}
    letters = sorted(read_dead_letters(str(tmp_path / "index")), key=lambda d: d.input_ref)
    assert [(d.input_ref.split()[0], d.error_type) for d in letters] == [
        ("digit-0003", "non_finite_vector"), ("digit-0007", "zero_vector"), ("digit-0011", "wrong_dimension")]
    assert all(isinstance(d, DeadLetter) and d.stage == "build_index" for d in letters)
    assert IndexInfo.read(published_dir(str(tmp_path / "index"))).rejected == 3


def test_empty_table_and_unknown_version_exit_with_one_line(tmp_path, capsys) -> None:
    rows = wh.digits_embedding_rows("m1", count=20, method="pca", created_at=CREATED_AT)
    uri = _write_duckdb(str(tmp_path / "w.duckdb"), rows)
    assert build_index.main(["--warehouse", uri, "--output_dir", str(tmp_path / "a"), "--model_version", "m9"]) == 3
    assert "no rows of model_version 'm9'" in capsys.readouterr().err
    empty = tmp_path / "empty.duckdb"
    with duckdb.connect(str(empty)) as connection:
        connection.execute("CREATE TABLE embeddings (image_id VARCHAR, uri VARCHAR, label VARCHAR, split VARCHAR, "
                           "embedding FLOAT[], model_version VARCHAR, created_at TIMESTAMPTZ)")
    assert build_index.main(["--warehouse", f"duckdb:{empty}", "--output_dir", str(tmp_path / "b")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty" in err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    assert build_index.main(["--warehouse", uri, "--output_dir", str(tmp_path / "c"), "--num_shard", "2"]) == 2


def test_a_model_dir_of_another_version_is_refused_before_anything_runs(tmp_path, capsys) -> None:
    from schemas.model_artifacts import ModelInfo

    rows = wh.digits_embedding_rows("m1", count=20, method="pca", created_at=CREATED_AT)
    uri = _write_duckdb(str(tmp_path / "w.duckdb"), rows)
    model_dir = str(tmp_path / "model")
    ModelInfo(architecture="cnn", image_size=32, channels=1, labels=["0", "1"], embedding_dim=16,
              model_version="m2", dataset_fingerprint="f").write(model_dir)
    assert build_index.main(["--warehouse", uri, "--output_dir", str(tmp_path / "index"),
                             "--model_dir", model_dir]) == 3
    assert "model_version m2" in capsys.readouterr().err and not os.path.exists(tmp_path / "index")


def test_shards_built_by_separate_worker_processes_equal_an_in_process_build(tmp_path) -> None:
    uri = write_parquet_warehouse(str(tmp_path / "warehouse"), clustered_unit_vectors(9_000, 8, cluster_size=300, spread=0.35))
    workers = run_build(uri, str(tmp_path / "workers"), "--num_shards", "3",
                        "--direct_running_mode=multi_processing", "--direct_num_workers=3")
    local = run_build(uri, str(tmp_path / "local"), "--num_shards", "3")
    assert workers.counts == local.counts == {"read": 9_000, "indexed": 9_000, "rejected": 0}
    a, b = ImageSearcher.load(workers.index_dir), ImageSearcher.load(local.index_dir)
    assert [s.count for s in a.info.shards] == [s.count for s in b.info.shards]
    for image_id in a.index.all_image_ids()[::450]:
        assert a.search(image_id, k=10) == b.search(image_id, k=10)
