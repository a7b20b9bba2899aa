"""The Beam-free index library: ScaNN beside TensorFlow, size-based parameters, tuning, the contract, gs:// staging."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks.vectors import clustered_unit_vectors
from retrieval import index_build, index_tuning, scann_compat
from retrieval.index_tuning import TargetRecallNotMet, exact_neighbors, query_sample_keys, recall_at_k, search_without_self
from retrieval.local_build import build_index_in_process
from retrieval.searcher import ImageSearcher, ShardedIndex
from schemas.index import INDEX_INFO_FILE, IndexInfo, ScannParams, SearchParams, SweepBounds
from schemas.publication import OutputExistsError, published_dir


def _rows(vectors: np.ndarray, prefix: str = "v") -> list[index_build.IndexRow]:
    return [index_build.IndexRow(f"{prefix}-{i:06d}", f"/images/{i}.png", str(i % 5), None, vectors[i])
            for i in range(len(vectors))]


def test_scann_runs_in_a_process_that_also_runs_tensorflow() -> None:
    import tensorflow as tf

    vectors = clustered_unit_vectors(500, 8, cluster_size=100, spread=0.35)
    searcher = scann_compat.build(vectors, ScannParams("brute_force"), k=3)
    rows, scores = searcher.search(vectors[:2], 3)
    assert rows[:, 0].tolist() == [0, 1] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert float(tf.reduce_sum(tf.constant([1.0, 2.0]))) == 3.0
    assert scann_compat.scann_version() == "1.4.2"


def test_parameters_follow_the_data_size() -> None:
    assert index_build.choose_params(5_000, 64).algorithm == "brute_force"
    assert index_build.choose_params(40_000, 64).algorithm == "ah"
    large = index_build.choose_params(1_000_000, 128)
    assert large.algorithm == "tree_ah" and large.num_leaves == 1000 and large.min_partition_size == 10
    assert large.training_sample_size == 100_000
    with pytest.raises(ValueError):
        index_build.choose_params(0, 8)


def test_vector_checks_name_the_reason() -> None:
    for vector, reason in (([1.0, float("nan")], "non_finite_vector"), ([0.0, 0.0], "zero_vector"),
                           ([1.0], "wrong_dimension"), ([1.0, float("inf")], "non_finite_vector")):
        with pytest.raises(index_build.InvalidVector) as caught:
            index_build.checked_unit_vector(vector, 2, "x")
        assert caught.value.reason == reason
    assert np.allclose(index_build.checked_unit_vector([3.0, 4.0], 2), [0.6, 0.8])


def test_100k_clustered_vectors_meet_the_recall_target(tmp_path) -> None:
    vectors = clustered_unit_vectors(100_000, 16, cluster_size=333, spread=0.35, seed=1)
    run_dir, info = build_index_in_process(str(tmp_path / "index"), _rows(vectors), model_version="m", dimension=16,
                                           k=10, target_recall=0.95)
    params = info.shards[0].params
    assert params.algorithm == "tree_ah" and params.num_leaves == 316
    # The tuned search stays inside the recorded bounds: a tenth of the leaves, 5% of the rows re-scored.
    assert info.sweep_bounds == SweepBounds(0.1, 100, 0.05, 32, 5_000)
    assert info.search.leaves_to_search <= 32 and info.search.pre_reorder_num_neighbors <= 5_000
    # Every partitioning of the grid was probed; kept: one reaching the target at the fewest leaves, the
    # default unless another at as few leaves was clearly faster.
    trials = info.shards[0].partition_trials
    assert [(t.training_sample_size, t.min_partition_size) for t in trials] == [
        (31_600, 10), (31_600, 50), (100_000, 10), (100_000, 50)]
    kept = next(t for t in trials if (t.training_sample_size, t.min_partition_size) == (
        params.training_sample_size, params.min_partition_size))
    assert kept.met_target and kept.leaves_to_search == min(t.leaves_to_search for t in trials if t.met_target)
    default = trials[0]
    assert kept == default or default.leaves_to_search > kept.leaves_to_search or not default.met_target or (
        kept.qps > index_tuning.PROBE_QPS_MARGIN * default.qps)
    assert info.shards[0].build_seconds >= sum(t.build_seconds for t in trials)
    index = ShardedIndex.load(str(tmp_path / "index"))
    ids = index.all_image_ids()
    tuning = query_sample_keys(ids)  # The tuning's own held-out queries: its figure, recomputed here.
    found = search_without_self(index, vectors[tuning], tuning, 10, index.search_params)
    recall = recall_at_k(*found, *exact_neighbors(vectors, vectors[tuning], 10, exclude=tuning))
    assert recall >= 0.95 and abs(recall - info.recall_at_k) < 1e-6 and len(tuning) == info.query_sample_size
    others = np.setdiff1d(query_sample_keys(ids, 1000), tuning)  # 500 queries the tuning never saw.
    found = search_without_self(index, vectors[others], others, 10, index.search_params)
    assert recall_at_k(*found, *exact_neighbors(vectors, vectors[others], 10, exclude=others)) >= 0.945
    assert info.qps > 0
    with pytest.raises(OutputExistsError):
        build_index_in_process(str(tmp_path / "index"), _rows(vectors[:100]), model_version="m", dimension=16)


def test_partition_candidates_and_sweep_bounds_follow_the_data_size() -> None:
    large = index_build.choose_params(1_000_000, 128)
    assert index_tuning.partition_candidates(1_000_000, large) == [
        (100_000, 10), (100_000, 50), (400_000, 10), (400_000, 50)]
    # A sample of 60 points per leaf keeps leaves of at least 10 and at most 30 (half the mean).
    crowded = ScannParams("tree_ah", num_leaves=1_000, training_sample_size=60_000, min_partition_size=10)
    assert index_tuning.partition_candidates(60_000, crowded) == [(60_000, 10), (60_000, 30)]
    assert index_tuning.sweep_bounds(10, 1_000, 1_000_000) == SweepBounds(0.1, 100, 0.05, 100, 50_000)
    assert index_tuning.sweep_bounds(10, 5, 100_000).max_leaves_to_search == 1
    # 100 x k re-scored when that is more than 5% of the rows, never more than the rows.
    assert index_tuning.sweep_bounds(10, None, 12_000) == SweepBounds(0.1, 100, 0.05, None, 1_000)
    assert index_tuning.sweep_bounds(10, None, 500).max_pre_reorder_num_neighbors == 500
    assert index_tuning.sweep_bounds(10, None, None) == SweepBounds(0.1, 100, 0.05, None, None)


def _assert_nothing_published(output) -> None:
    assert not (output / "CURRENT").exists() and list(output.rglob(INDEX_INFO_FILE)) == []
    assert not any(output.glob("run-*"))
    with pytest.raises(FileNotFoundError, match="holds no published index"):
        ShardedIndex.load(str(output))


def _recall_at(searcher: scann_compat.Searcher, vectors: np.ndarray, search: SearchParams) -> float:
    keys = query_sample_keys([f"v-{i:06d}" for i in range(len(vectors))])
    found = search_without_self(index_tuning.OneSearcher(searcher), vectors[keys], keys, 10, search)
    return recall_at_k(*found, *exact_neighbors(vectors, vectors[keys], 10, exclude=keys))


def test_a_tree_over_vectors_that_do_not_cluster_misses_the_target_and_publishes_nothing(tmp_path) -> None:
    # Uniform directions: a query's neighbours scatter over many leaves.
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((51_000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with pytest.raises(TargetRecallNotMet, match=r"23 leaves searched \(10% of the leaves\) and 2550 re-scored"):
        build_index_in_process(str(tmp_path / "index"), _rows(vectors), model_version="m", dimension=16)
    _assert_nothing_published(tmp_path / "index")
    # Every leaf would meet it: the bounds, not the data, stop the sweep short of brute force. (A probe: the
    # tree over exact scoring, so what a number of leaves misses is the partitioning's alone.)
    params = index_build.choose_params(len(vectors), 16)
    probe = scann_compat.build_partition_probe(vectors, params, 10)
    assert _recall_at(probe, vectors, SearchParams(params.num_leaves)) >= 0.999
    assert _recall_at(probe, vectors, SearchParams(23)) < 0.95


def test_clusters_of_near_duplicates_beyond_the_rescoring_depth_miss_the_target(tmp_path) -> None:
    # Clusters of 3,000 at cosine ~0.997: AH cannot order a cluster, and 1,000 re-scored candidates are too few.
    vectors = clustered_unit_vectors(12_000, 16, cluster_size=3_000, spread=0.05, seed=1)
    with pytest.raises(TargetRecallNotMet, match=r"the best was 0\.[0-8].* 1000 re-scored candidates"):
        build_index_in_process(str(tmp_path / "index"), _rows(vectors), model_version="m", dimension=16)
    _assert_nothing_published(tmp_path / "index")
    searcher = scann_compat.build(vectors, index_build.choose_params(len(vectors), 16), 10)
    assert _recall_at(searcher, vectors, SearchParams(None, len(vectors))) >= 0.99


def test_index_info_round_trips_and_refuses_a_partial_file(tmp_path) -> None:
    vectors = clustered_unit_vectors(300, 8, cluster_size=75, spread=0.35)
    run_dir, info = build_index_in_process(str(tmp_path / "index"), _rows(vectors), model_version="m", dimension=8,
                                           num_shards=3)
    assert IndexInfo.read(run_dir) == info and info.num_shards == 3 and info.count == 300
    assert {s.name for s in info.shards} == {f"shard-{i:05d}-of-00003" for i in range(3)}
    content = json.loads(open(os.path.join(run_dir, INDEX_INFO_FILE)).read())
    assert content["sweep_bounds"]["max_reorder_per_k"] == 100
    # A file written before the sweep was bounded and partitionings were swept still reads.
    del content["sweep_bounds"]
    for shard in content["shards"]:
        del shard["partition_trials"]
    old = IndexInfo.from_dict(content)
    assert old.sweep_bounds is None and all(s.partition_trials == [] for s in old.shards)
    del content["recall_at_k"]
    with pytest.raises(ValueError, match="missing recall_at_k"):
        IndexInfo.from_dict(content)
    with pytest.raises(FileNotFoundError):
        ImageSearcher.load(str(tmp_path / "no_index"))


def test_more_shards_than_rows_leaves_empty_shards_that_search_skips(tmp_path) -> None:
    vectors = clustered_unit_vectors(6, 4, cluster_size=3, spread=0.35)
    run_dir, info = build_index_in_process(str(tmp_path / "index"), _rows(vectors), model_version="m", dimension=4,
                                           num_shards=8)
    assert sum(1 for s in info.shards if s.count == 0) >= 2 and info.count == 6
    hits = ImageSearcher.load(run_dir).search("v-000000", k=10)
    assert len(hits) == 5 and "v-000000" not in [h.image_id for h in hits]


def test_a_gs_index_is_staged_to_a_local_cache(gcs_emulator, tmp_path) -> None:
    bucket = gcs_emulator.create_bucket()
    # Above brute-force size: real ScaNN files to stage.
    vectors = clustered_unit_vectors(12_000, 8, cluster_size=600, spread=0.35)
    output = f"gs://{bucket}/index"
    run_dir, info = build_index_in_process(output, _rows(vectors), model_version="m", dimension=8, num_shards=1)
    assert published_dir(output) == run_dir and info.shards[0].params.algorithm == "ah"
    cache = tmp_path / "cache"
    remote = ImageSearcher.load(output, cache_dir=str(cache))
    assert any(name.endswith("scann_assets.pbtxt") for _, _, names in os.walk(cache) for name in names)
    local_copy = ImageSearcher.load(output, cache_dir=str(cache))  # Second load: from the cache.
    for image_id in ("v-000003", "v-000777"):
        assert remote.search(image_id, k=5) == local_copy.search(image_id, k=5)
        assert len(remote.search(image_id, k=5)) == 5
