"""Every batch job gives the default runner's outputs over the portability protocol.

Flink and Spark run Python through the Beam portability protocol: a job
service receives the pipeline and SDK workers from an external pool run its
bundles. ``portable_runner_flags`` starts exactly that (a separate job
service and a worker pool, see ``tests.fixtures.portable_runners``). It
exposes what the in-process FnApiRunner hides: DoFns that do not pickle,
state in module globals, side effects on the launching process, paths
relative to the client's working directory.

The multi-process local runner (``--direct_num_workers 2
--direct_running_mode multi_processing``) is checked against the in-process
runner in each job's own tests, so it is not run again here:
test_create_dataset.py::test_multi_processing_runner_gives_the_same_records,
test_batch_predict.py::test_runs_on_two_worker_processes,
test_extract_embeddings.py (the accounting test runs on two processes),
test_build_index.py::test_shards_built_by_separate_worker_processes_equal_an_in_process_build,
test_train.py (two trials on two worker processes).

The default runner runs the whole chain once in this process (create_dataset
-> train -> batch_predict, extract_embeddings -> build_index); under each
other runner every job reads the *default* run's upstream artifact, so each
comparison is about one job and the jobs run two at a time. Those runs are
subprocesses (``python -m beam_jobs.<job>``) under a timeout, killed by
process group: a dead portable worker makes the client wait forever without
an error.

Training: one trial, one epoch, seed 0, on 60 images. It is compared
exactly (same best trial, same model_version, which hashes the weights, and
equal metrics): TensorFlow on CPU with a fixed seed and no inter-op
nondeterminism in this small CNN gives bit-identical weights in another
process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from typing import Any

import duckdb
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from beam_jobs import batch_predict, build_index, create_dataset, extract_embeddings, train
from model_lib import sample_data
from model_lib.dataset_io import read_dataset, split_files
from retrieval.searcher import ImageSearcher
from schemas import dataset, layout, prediction
from schemas.dataset_info import DatasetInfo
from schemas.leaderboard import Leaderboard
from schemas.model_artifacts import ModelInfo
from schemas.publication import published_dir
from transforms.runner_policy import LOCAL_MULTI_PROCESS_RUNNER, make_pipeline_options

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MULTI_PROCESS_FLAGS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
IMAGE_SIZE = 16
IMAGES = 60
# One job on 60 images takes 7-30 s here; a hung worker shows as this limit, not as a stuck suite.
JOB_TIMEOUT_S = 240
TRANSFORMED_RECORDS = 8
QUERIES = 5
STOP_TIMEOUT_S = 15
# The portable runs are independent (each reads the default run's artifacts): two at a time share one job
# service and worker pool, as a cluster's jobs do, and overlap one job's imports with another's work.
PARALLEL_JOBS = 2


def job_argv(job: str, sample: sample_data.SampleData, upstream: dict[str, str], out: str) -> list[str]:
    """The command line of ``job`` reading the default run's artifacts (``upstream``) and writing under ``out``."""
    if job == "create_dataset":
        return ["--manifest", sample.manifest, "--labels_file", sample.labels_file, "--output_dir", out,
                "--image_size", str(IMAGE_SIZE), "--channels", "1", "--image_format", "png"]
    if job == "train":
        return ["--dataset_dir", upstream["create_dataset"], "--output_dir", out, "--epochs", "1", "--seed", "0"]
    best = os.path.join(upstream["train"], "best")
    if job == "batch_predict":
        return ["--model_dir", best, "--input", sample.manifest, "--output", out,
                "--artifacts_dir", f"{out}-artifacts"]
    if job == "extract_embeddings":
        return ["--model_dir", best, "--input", sample.manifest, "--warehouse", f"duckdb:{out}/e.duckdb",
                "--artifacts_dir", f"{out}-artifacts"]
    return ["--warehouse", f"duckdb:{upstream['extract_embeddings']}/e.duckdb", "--output_dir", out,
            "--num_shards", "1"]


JOBS = {"create_dataset": create_dataset, "train": train, "batch_predict": batch_predict,
        "extract_embeddings": extract_embeddings, "build_index": build_index}


def run_job_in_subprocess(job: str, argv: list[str], tmp: str) -> None:
    """Runs ``python -m beam_jobs.<job>`` in its own process group, killed as a group at the time limit."""
    log_path = os.path.join(tmp, f"{job}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", f"beam_jobs.{job}", *argv], cwd=tmp, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
        code = None
    if code != 0:
        with open(log_path, errors="replace") as handle:
            tail = handle.read()[-6000:]
        raise AssertionError(f"{job} {'timed out' if code is None else f'exited with {code}'}:\n{tail}")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("portable_digits")), size=IMAGE_SIZE, limit=IMAGES)


@pytest.fixture(scope="module")
def default_run(sample: sample_data.SampleData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each job's output directory from the default runner, the chain run in this process."""
    base = tmp_path_factory.mktemp("default_run")
    outputs: dict[str, str] = {}
    for job, module in JOBS.items():
        outputs[job] = str(base / job)
        assert module.main(job_argv(job, sample, outputs, outputs[job])) == 0, job
    return outputs


@pytest.fixture(scope="module")
def other_run(sample: sample_data.SampleData, default_run: dict[str, str], portable_runner_flags: list[str],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each job's output directory on the portable runner, every job reading the default run's upstream output."""
    base = tmp_path_factory.mktemp("portable_run")
    outputs = {job: str(base / job) for job in JOBS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_JOBS) as pool:
        runs = [pool.submit(run_job_in_subprocess, job,
                            job_argv(job, sample, default_run, outputs[job]) + portable_runner_flags, str(base))
                for job in JOBS]
        for run in runs:
            run.result()
    return outputs


def test_runner_policy_keeps_the_fn_api_runner_for_multi_processing() -> None:
    options = make_pipeline_options(MULTI_PROCESS_FLAGS, job_options=PipelineOptions)
    assert options.view_as(StandardOptions).runner == LOCAL_MULTI_PROCESS_RUNNER  # The FnApiRunner that fails on a dead worker.
    direct = options.view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (2, "multi_processing")


def parsed_examples(dataset_dir: str, split: str) -> list[dict[str, list[Any]]]:
    """Every example of a split as feature -> values, sorted by image id."""
    examples = []
    for record in tf.data.TFRecordDataset(split_files(dataset_dir, split), compression_type="GZIP"):
        features = tf.train.Example.FromString(record.numpy()).features.feature
        examples.append({name: list(getattr(value, value.WhichOneof("kind")).value)
                         for name, value in features.items()})
    return sorted(examples, key=lambda example: example[dataset.IMAGE_ID])


def transformed(dataset_dir: str, records: dict[str, tf.Tensor]) -> np.ndarray:
    layer = tft.TFTransformOutput(published_dir(dataset_dir)).transform_features_layer()
    return next(iter(layer({dataset.IMAGE: records[dataset.IMAGE]}).values())).numpy()


def test_create_dataset(default_run: dict[str, str], other_run: dict[str, str]) -> None:
    want, got = default_run["create_dataset"], other_run["create_dataset"]
    info = DatasetInfo.read(published_dir(want))
    for split in info.split_names:
        assert parsed_examples(got, split) == parsed_examples(want, split), split
    label_files = [open(os.path.join(published_dir(d), layout.LABELS_FILE)).read() for d in (want, got)]
    assert label_files[0] == label_files[1]
    other = DatasetInfo.read(published_dir(got))
    assert (other.counts, other.accounting, other.fingerprint) == (info.counts, info.accounting, info.fingerprint)
    records = next(iter(read_dataset(split_files(want, "train"), batch_size=TRANSFORMED_RECORDS)))
    np.testing.assert_array_equal(transformed(got, records), transformed(want, records))


def test_train(default_run: dict[str, str], other_run: dict[str, str]) -> None:
    want, got = Leaderboard.read(default_run["train"]), Leaderboard.read(other_run["train"])
    assert got.best_trial == want.best_trial and not got.failed and not want.failed
    [want_trial], [got_trial] = want.trials, got.trials
    assert got_trial.hparams == want_trial.hparams
    assert got_trial.model_version == want_trial.model_version  # A hash of the trained weights.
    assert (got_trial.validation, got_trial.test) == (want_trial.validation, want_trial.test)
    best = [ModelInfo.read(published_dir(os.path.join(d, "best"))) for d in (default_run["train"], other_run["train"])]
    assert best[0].model_version == best[1].model_version


def prediction_rows(output_dir: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(tf.io.gfile.glob(prediction.jsonl_predictions_pattern(published_dir(output_dir)))):
        with open(path) as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return sorted(rows, key=lambda row: row["image_id"])


def test_batch_predict(default_run: dict[str, str], other_run: dict[str, str]) -> None:
    """Same rows; probabilities to 1e-5: RunInference batches differ per runner, and oneDNN rounds by batch shape."""
    want, got = prediction_rows(default_run["batch_predict"]), prediction_rows(other_run["batch_predict"])
    assert len(want) == IMAGES
    floats = ("score", "top_k_probabilities")
    assert [{k: v for k, v in row.items() if k not in floats} for row in got] == \
        [{k: v for k, v in row.items() if k not in floats} for row in want]
    for field in floats:
        np.testing.assert_allclose([row[field] for row in got], [row[field] for row in want], atol=1e-5)


def embeddings(output_dir: str) -> tuple[list[str], np.ndarray]:
    with duckdb.connect(os.path.join(output_dir, "e.duckdb"), read_only=True) as connection:
        rows = connection.execute("SELECT image_id, embedding FROM embeddings ORDER BY image_id").fetchall()
    return [row[0] for row in rows], np.array([row[1] for row in rows], dtype=np.float32)


def test_extract_embeddings(default_run: dict[str, str], other_run: dict[str, str]) -> None:
    want_ids, want = embeddings(default_run["extract_embeddings"])
    got_ids, got = embeddings(other_run["extract_embeddings"])
    assert got_ids == want_ids and len(want_ids) == IMAGES
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def search_results(index_dir: str, queries: list[str]) -> list[list[tuple[str, float]]]:
    searcher = ImageSearcher.load(index_dir)
    return [[(hit.image_id, round(hit.score, 5)) for hit in searcher.search(query, k=5)] for query in queries]


def test_build_index(default_run: dict[str, str], other_run: dict[str, str]) -> None:
    want, got = ImageSearcher.load(default_run["build_index"]), ImageSearcher.load(other_run["build_index"])
    assert got.index.all_image_ids() == want.index.all_image_ids()
    assert got.info.count == want.info.count == IMAGES
    queries = want.index.all_image_ids()[:QUERIES]
    assert search_results(other_run["build_index"], queries) == search_results(default_run["build_index"], queries)
