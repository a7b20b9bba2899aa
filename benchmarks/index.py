"""Benchmark: this project's tuned ScaNN index against brute force, FAISS and hnswlib, side by side.

One run, the same vectors and the same held-out queries for every method:

- ``scann-tuned``: the index ``build-index`` builds (``retrieval.local_build.build_index_in_process``:
  parameters from the data size, a tree's partitioning chosen from a small grid of training samples and
  ``min_partition_size``, search-time settings tuned to recall@10 >= 0.95), then swept over leaves
  searched and re-scoring depth around the tuned setting;
- ``scann-tuned-fixed-partitions``: the same without choosing the partitioning (100 training points per
  leaf, ``min_partition_size`` 10), to show what the partition grid buys;
- ``brute-force``: exact numpy (a BLAS matrix product per query batch), which is also the ground truth;
- ``faiss-ivf-flat``, ``faiss-hnsw``, ``faiss-ivf-pq-fs`` (``IVF{nlist},PQ{d/2}x4fsr`` fast-scan with exact
  re-ranking by ``IndexRefineFlat``), each swept over nprobe / efSearch / nprobe x k_factor;
- ``hnswlib``, swept over ef.

Every method is built and searched in its own forked process, so its peak resident memory
(``ru_maxrss`` of that process, the shared dataset pages it touched included) is its own. QPS is
measured on one thread (BLAS, OpenMP and the libraries' own pools limited to one) and on every core.
Recall@10 counts the exact 10 nearest by inner product of unit vectors (cosine) found.

Datasets: ``digits`` (scikit-learn's 1,797 handwritten digits, 64 pixels L2-normalized, 200 held out
as queries) and ``synthetic`` (``benchmarks.vectors.clustered_unit_vectors``: 128-d unit vectors in
clusters of 1,000, plus 1,000 held-out queries from the same clusters).

Run (bench extra: ``pip install -c constraints.txt -e ".[bench]"``):
  python -m benchmarks.index --dataset digits
  python -m benchmarks.index --dataset synthetic --rows 100000
  python -m benchmarks.index --dataset synthetic --rows 1000000
  python -m benchmarks.index --dataset synthetic --rows 200000 --methods scann-tuned,scann-tuned-fixed-partitions
Each run writes its section of docs/benchmarks.md, docs/index_<dataset>_<rows>.png and
WORK_DIR/index_<dataset>_<rows>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from benchmarks.machine import cpu_description
from benchmarks.report import BENCHMARKS_DOC, write_section
from benchmarks.vectors import clustered_unit_vectors

K = 10
TARGET_RECALL = 0.95
ALL_THREADS = os.cpu_count() or 1
_MIN_TIMED_SECONDS = 0.2
_ROUNDS = 3


def load_dataset(name: str, rows: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(base vectors [rows, d], queries [q, d]), float32 unit vectors; queries are not in the base."""
    if name == "digits":
        from sklearn.datasets import load_digits

        pixels = load_digits().data.astype(np.float64)
        vectors = (pixels / np.linalg.norm(pixels, axis=1, keepdims=True)).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(vectors))
        held_out = min(200, len(vectors) // 5)
        return vectors[order[held_out:]], vectors[order[:held_out]]
    vectors = clustered_unit_vectors(rows + queries, 128, seed=0)
    return vectors[:rows], vectors[rows:]


# --------------------------------------------------------------------------- measuring


def _limit_threads(threads: int) -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def _timed(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Ids found for every query and the queries per second: the best of _ROUNDS rounds, each timed over at
    least _MIN_TIMED_SECONDS (the best round is the one least disturbed by other work on the machine)."""
    search(queries[: min(len(queries), 50)])  # Warm-up: first-touch pages, lazy initialization.
    found, best = None, 0.0
    for _ in range(_ROUNDS):
        passes, started = 0, time.perf_counter()
        while True:
            found = search(queries)
            passes += 1
            elapsed = time.perf_counter() - started
            if elapsed >= _MIN_TIMED_SECONDS:
                break
        best = max(best, passes * len(queries) / elapsed)
    return found, best


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(f[:K].tolist()) & set(e[:K].tolist())) for f, e in zip(found, exact))
    return hits / (K * len(exact))


def _directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _sweep(search_at: Callable[[Any, int], Callable[[np.ndarray], np.ndarray]], settings: list[Any],
           queries: np.ndarray, exact: np.ndarray, describe: Callable[[Any], str]) -> list[dict[str, Any]]:
    points = []
    for setting in settings:
        found, qps_one = _timed(search_at(setting, 1), queries)
        _, qps_all = _timed(search_at(setting, ALL_THREADS), queries)
        points.append({"params": describe(setting), "recall": recall_at_k(found, exact), "qps_1": qps_one,
                       "qps_all": qps_all})
        print(f"  {describe(setting)}: recall@{K} {points[-1]['recall']:.4f}, {qps_one:,.0f} QPS (1 thread), "
              f"{qps_all:,.0f} QPS ({ALL_THREADS} threads)", flush=True)
    return points


# --------------------------------------------------------------------------- methods


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids by inner product, best first (numpy; 100 queries per matrix product)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 100):
        scores = queries[start:start + 100] @ base.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start:start + 100] = np.take_along_axis(part, order, axis=1)
    return out


def run_brute_force(base: np.ndarray, queries: np.ndarray, exact: np.ndarray | None, work: str) -> dict[str, Any]:
    def search_at(_: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        def search(q: np.ndarray) -> np.ndarray:
            with _limit_threads(threads):
                return exact_top_k(base, q)
        return search

    with _limit_threads(ALL_THREADS):
        truth = exact_top_k(base, queries)
    points = _sweep(search_at, [None], queries, truth, lambda _: "exact")
    return {"build_s": 0.0, "bytes": base.nbytes, "points": points, "exact": truth}


def run_scann_tuned(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, work: str, *,
                    sweep_partitions: bool = True) -> dict[str, Any]:
    from retrieval.index_build import IndexRow
    from retrieval.local_build import build_index_in_process
    from retrieval.searcher import ShardedIndex
    from schemas.index import SearchParams

    rows = [IndexRow(image_id=f"v{i:08d}", uri="", label=None, split=None, vector=base[i]) for i in range(len(base))]
    started = time.perf_counter()
    run_dir, info = build_index_in_process(os.path.join(work, "scann"), rows, model_version="bench",
                                           dimension=base.shape[1], k=K, target_recall=TARGET_RECALL,
                                           sweep_partitions=sweep_partitions)
    build_s = time.perf_counter() - started
    del rows
    index = ShardedIndex.load(run_dir)
    # Index keys are positions over the shards; map them back to base rows.
    key_to_row = np.asarray([int(image_id[1:]) for image_id in index.all_image_ids()], dtype=np.int64)
    tuned = info.search
    params = info.shards[0].params
    print(f"  built {params} in {build_s:.1f} s; tuned {tuned}: recall@{K} {info.recall_at_k:.4f} on "
          f"{info.query_sample_size} held-out rows", flush=True)
    for trial in info.shards[0].partition_trials:
        print(f"  partition trial {trial}", flush=True)
    settings = [tuned]
    if tuned.leaves_to_search:
        settings += [SearchParams(max(1, int(tuned.leaves_to_search * f)), tuned.pre_reorder_num_neighbors)
                     for f in (0.5, 0.75, 1.5, 2, 4)]
    if tuned.pre_reorder_num_neighbors:
        settings += [SearchParams(tuned.leaves_to_search, max(K, int(tuned.pre_reorder_num_neighbors * f)))
                     for f in (0.5, 2, 4)]
    settings = list(dict.fromkeys(settings))  # Small leaf counts round to the same setting.

    def search_at(setting: SearchParams, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        def one(q: np.ndarray) -> np.ndarray:
            return key_to_row[index.search(q, K, setting).keys]

        if threads == 1:
            return one
        pool = concurrent.futures.ThreadPoolExecutor(threads)

        def many(q: np.ndarray) -> np.ndarray:
            chunks = np.array_split(q, threads * 4)
            return np.concatenate(list(pool.map(one, chunks)), axis=0)
        return many

    def describe(setting: SearchParams) -> str:
        mark = " (tuned)" if setting == tuned else ""
        return f"leaves {setting.leaves_to_search}, reorder {setting.pre_reorder_num_neighbors}{mark}"

    points = _sweep(search_at, settings, queries, exact, describe)
    from schemas import index as index_schema

    scann_bytes = sum(_directory_bytes(index_schema.scann_dir(run_dir, s.name)) for s in info.shards)
    return {"build_s": build_s, "bytes": scann_bytes, "points": points,
            "notes": f"{params.algorithm}, {params.num_leaves or 0} leaves trained on "
                     f"{params.training_sample_size or 0:,} points, min_partition_size {params.min_partition_size}; "
                     f"tuned {tuned.leaves_to_search} leaves, {tuned.pre_reorder_num_neighbors} re-scored; "
                     f"build includes tuning ({info.tuning_seconds:.1f} s)"}


def run_scann_tuned_fixed_partitions(base: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                                     work: str) -> dict[str, Any]:
    return run_scann_tuned(base, queries, exact, work, sweep_partitions=False)


def _faiss_threads(threads: int) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)


def _nlist(count: int) -> int:
    return max(1, min(count // 39, int(round(4 * math.sqrt(count)))))


def _faiss_search_at(index: Any, configure: Callable[[Any], None]) -> Callable[[Any, int], Callable[[np.ndarray],
                                                                                               np.ndarray]]:
    def search_at(setting: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        def search(q: np.ndarray) -> np.ndarray:
            _faiss_threads(threads)
            configure(setting)
            return index.search(q, K)[1]
        return search
    return search_at


def _faiss_bytes(index: Any) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def run_faiss_ivf_flat(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, work: str) -> dict[str, Any]:
    import faiss

    _faiss_threads(ALL_THREADS)
    nlist = _nlist(len(base))
    started = time.perf_counter()
    index = faiss.index_factory(base.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add(base)
    build_s = time.perf_counter() - started

    def configure(nprobe: int) -> None:
        index.nprobe = nprobe

    settings = [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist]
    points = _sweep(_faiss_search_at(index, configure), settings, queries, exact, lambda p: f"nprobe {p}")
    return {"build_s": build_s, "bytes": _faiss_bytes(index), "points": points, "notes": f"IVF{nlist},Flat"}


def run_faiss_hnsw(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, work: str) -> dict[str, Any]:
    import faiss

    _faiss_threads(ALL_THREADS)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 100
    index.add(base)
    build_s = time.perf_counter() - started

    def configure(ef: int) -> None:
        index.hnsw.efSearch = ef

    points = _sweep(_faiss_search_at(index, configure), [16, 32, 64, 128, 256], queries, exact,
                    lambda ef: f"efSearch {ef}")
    return {"build_s": build_s, "bytes": _faiss_bytes(index), "points": points, "notes": "HNSW32, efConstruction 100"}


def run_faiss_ivf_pq_fs(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, work: str) -> dict[str, Any]:
    import faiss

    _faiss_threads(ALL_THREADS)
    nlist = _nlist(len(base))
    factory = f"IVF{nlist},PQ{base.shape[1] // 2}x4fsr"
    started = time.perf_counter()
    ivf = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(ivf)
    index.train(base)
    index.add(base)
    build_s = time.perf_counter() - started

    def configure(setting: tuple[int, int]) -> None:
        faiss.extract_index_ivf(ivf).nprobe = setting[0]
        index.k_factor = setting[1]

    settings = [(p, f) for p in (4, 8, 16, 32, 64) if p <= nlist for f in (4, 8, 16)]
    points = _sweep(_faiss_search_at(index, configure), settings, queries, exact,
                    lambda s: f"nprobe {s[0]}, k_factor {s[1]}")
    return {"build_s": build_s, "bytes": _faiss_bytes(index), "points": points,
            "notes": f"{factory} + IndexRefineFlat"}


def run_hnswlib(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, work: str) -> dict[str, Any]:
    import hnswlib

    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=16, ef_construction=200, random_seed=0)
    index.add_items(base, np.arange(len(base)), num_threads=ALL_THREADS)
    build_s = time.perf_counter() - started
    path = os.path.join(work, "hnswlib.bin")
    index.save_index(path)

    def search_at(ef: int, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        def search(q: np.ndarray) -> np.ndarray:
            index.set_ef(max(ef, K))
            return index.knn_query(q, k=K, num_threads=threads)[0].astype(np.int64)
        return search

    points = _sweep(search_at, [10, 20, 40, 80, 160, 320], queries, exact, lambda ef: f"ef {ef}")
    return {"build_s": build_s, "bytes": os.path.getsize(path), "points": points, "notes": "M 16, ef_construction 200"}


METHODS: dict[str, Callable[..., dict[str, Any]]] = {
    "brute-force": run_brute_force,
    "scann-tuned": run_scann_tuned,
    "scann-tuned-fixed-partitions": run_scann_tuned_fixed_partitions,
    "faiss-ivf-flat": run_faiss_ivf_flat,
    "faiss-hnsw": run_faiss_hnsw,
    "faiss-ivf-pq-fs": run_faiss_ivf_pq_fs,
    "hnswlib": run_hnswlib,
}


DEFAULT_METHODS = [method for method in METHODS if method != "scann-tuned-fixed-partitions"]
# The bench extra's libraries: a method whose library is missing is refused before anything runs, so a
# run never writes a table of import errors over the doc's figures.
_BENCH_MODULES = {"faiss-ivf-flat": "faiss", "faiss-hnsw": "faiss", "faiss-ivf-pq-fs": "faiss", "hnswlib": "hnswlib"}


def run_in_child(method: str, base: np.ndarray, queries: np.ndarray, exact: np.ndarray | None,
                 work: str) -> dict[str, Any]:
    """Runs one method in a forked process; returns its results with its peak RSS (``wait4``'s ru_maxrss)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # Child: run, send the pickled result, exit without running the parent's atexit handlers.
        os.close(read_end)
        code = 0
        try:
            payload = pickle.dumps(METHODS[method](base, queries, exact, work))
        except BaseException as error:  # Reported by the parent; the run goes on with the other methods.
            payload, code = pickle.dumps({"error": f"{type(error).__name__}: {error}"}), 1
        with os.fdopen(write_end, "wb") as handle:
            handle.write(payload)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        payload = handle.read()
    _, _, usage = os.wait4(pid, 0)
    result = pickle.loads(payload)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    return result


# --------------------------------------------------------------------------- reporting


def best_at_target(result: dict[str, Any], key: str = "qps_1") -> float | None:
    qps = [p[key] for p in result.get("points", []) if p["recall"] >= TARGET_RECALL]
    return max(qps) if qps else None


def plot(results: dict[str, dict[str, Any]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, key, label in ((axes[0], "qps_1", "1 thread"), (axes[1], "qps_all", f"{ALL_THREADS} threads")):
        for method, result in results.items():
            points = sorted(result.get("points", []), key=lambda p: p["recall"])
            if points:
                axis.plot([p["recall"] for p in points], [p[key] for p in points], marker="o", label=method)
        axis.axvline(TARGET_RECALL, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(f"recall@{K}")
        axis.set_yscale("log")
        axis.set_title(f"{title}, {label}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("queries per second")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(name: str, title: str, command: str, results: dict[str, dict[str, Any]], rows: int, dimension: int,
           queries: int, png: str, loaded: str) -> str:
    lines = [f"## index: {title}", "", f"`{command}`", "",
             f"{rows:,} x {dimension} base vectors, {queries:,} held-out queries, recall@{K} against exact brute "
             f"force. CPU: {cpu_description()}. {loaded}", "",
             "| method | build s | index MB | peak RSS MB | best QPS at recall >= 0.95 (1 thread) | "
             f"same ({ALL_THREADS} threads) | notes |", "|---|---:|---:|---:|---:|---:|---|"]
    for method, result in results.items():
        if "error" in result:
            lines.append(f"| {method} | | | | | | failed: {result['error']} |")
            continue
        one, many = best_at_target(result), best_at_target(result, "qps_all")
        lines.append(f"| {method} | {result['build_s']:.1f} | {result['bytes'] / 1e6:.1f} | "
                     f"{result['peak_rss_bytes'] / 1e6:.0f} | {f'{one:,.0f}' if one else 'not reached'} | "
                     f"{f'{many:,.0f}' if many else 'not reached'} | {result.get('notes', '')} |")
    lines += ["", f"![recall vs QPS]({os.path.basename(png)})", "", "<details><summary>every setting</summary>", "",
              f"| method | setting | recall@{K} | QPS 1 thread | QPS {ALL_THREADS} threads |", "|---|---|---:|---:|---:|"]
    for method, result in results.items():
        for point in result.get("points", []):
            lines.append(f"| {method} | {point['params']} | {point['recall']:.4f} | {point['qps_1']:,.0f} | "
                         f"{point['qps_all']:,.0f} |")
    lines += ["", "</details>", ""]
    scann = best_at_target(results.get("scann-tuned", {}))
    others = [q for m, r in results.items() if m.startswith(("faiss", "hnswlib")) for q in [best_at_target(r)] if q]
    brute = best_at_target(results.get("brute-force", {}))
    if scann and others and brute:
        lines.append(f"Target (1 thread, recall@{K} >= {TARGET_RECALL}): ScaNN {scann:,.0f} QPS = "
                     f"{scann / max(others):.2f}x the best of FAISS/hnswlib ({max(others):,.0f}; target 1.2x) and "
                     f"{scann / brute:.1f}x brute force ({brute:,.0f}; target 50x).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "synthetic"), required=True)
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic only: base vectors.")
    parser.add_argument("--queries", type=int, default=1_000, help="synthetic only: held-out queries.")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: all but scann-tuned-fixed-partitions).")
    parser.add_argument("--work_dir", default=None, help="Where indexes and the JSON go (default: a temp dir).")
    parser.add_argument("--loaded", default="", help="A sentence on the machine's load, for the doc.")
    parser.add_argument("--no_doc", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    missing = sorted({_BENCH_MODULES[m] for m in methods if m in _BENCH_MODULES
                      and importlib.util.find_spec(_BENCH_MODULES[m]) is None})
    if missing:
        parser.error(f"{', '.join(missing)} not installed: pip install -c constraints.txt -e \".[bench]\" "
                     "(or leave those methods out of --methods)")
    base, queries = load_dataset(args.dataset, args.rows, args.queries)
    name = f"{args.dataset}_{len(base)}"
    work = args.work_dir or tempfile.mkdtemp(prefix=f"bench_index_{name}_")
    os.makedirs(work, exist_ok=True)
    print(f"{name}: {base.shape} base, {queries.shape} queries; CPU {cpu_description()}; work dir {work}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    print("brute-force (ground truth)", flush=True)
    results["brute-force"] = run_in_child("brute-force", base, queries, None, work)
    exact = results["brute-force"].pop("exact")
    for method in methods:
        if method == "brute-force":
            continue
        print(method, flush=True)
        method_dir = os.path.join(work, method)
        os.makedirs(method_dir, exist_ok=True)
        results[method] = run_in_child(method, base, queries, exact, method_dir)
        shutil.rmtree(method_dir, ignore_errors=True)
        if "error" in results[method]:
            print(f"  failed: {results[method]['error']}", flush=True)
    with open(os.path.join(work, f"index_{name}.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    title = (f"digits ({len(base):,} x {base.shape[1]})" if args.dataset == "digits"
             else f"{len(base):,} synthetic clustered {base.shape[1]}-d unit vectors")
    command = f"python -m benchmarks.index --dataset {args.dataset}" + (
        f" --rows {args.rows}" if args.dataset == "synthetic" else "") + (
        f" --queries {args.queries}" if args.dataset == "synthetic" and args.queries != 1_000 else "") + (
        f" --methods {','.join(methods)}" if methods != list(DEFAULT_METHODS) else "")
    png = os.path.join(os.path.dirname(BENCHMARKS_DOC), f"index_{name}.png")
    text = report(name, title, command, results, len(base), base.shape[1], len(queries), png, args.loaded)
    print(text)
    if not args.no_doc:
        plot(results, title, png)
        write_section(f"index_{name}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
