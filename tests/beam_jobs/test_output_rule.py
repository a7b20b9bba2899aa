"""Reruns, overwrites and killed runs of the jobs that write directories (the output rule).

Each test reproduces a failure that mixed or lost outputs before the rule: a
rerun with another shard count left the old shards matching ``*-of-*``, a
rerun with ``--skip_analysis`` or without labels left a stale
``transform_fn/`` or ``eval.json``, a shared ``--temp_location`` was deleted
by whichever job finished first, and a killed run had half-written files where
readers look.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from beam_jobs import batch_predict, cli, create_dataset, extract_embeddings
from model_lib import sample_data
from schemas import dataset, layout, prediction, publication
from schemas.publication import OutputExistsError, published_dir
from schemas.warehouse import RUNS_SUFFIX
from transforms.dead_letters import read_dead_letters

DIGITS = 120
_FLAGS = ("--image_size", "16", "--channels", "1", "--image_format", "png")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("digits")), limit=DIGITS)


def _create(manifest: str, output_dir: str, *extra: str) -> None:
    create_dataset.run(["--manifest", manifest, "--output_dir", output_dir, *_FLAGS, *extra])


def _shards(output_dir: str, split: str) -> list[str]:
    return sorted(tf.io.gfile.glob(layout.split_pattern(published_dir(output_dir), split)))


def _records(output_dir: str) -> set[tuple]:
    files = [path for split in ("train", "valid", "test") for path in _shards(output_dir, split)]
    records = (dataset.DATASET_RECORD.from_tf_example(raw.numpy())
               for raw in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    return {(r["image_id"], r["split"], r["label"], r["sha256"]) for r in records}


def test_a_rerun_is_refused_and_an_overwrite_equals_a_fresh_run(digits, tmp_path, capsys):
    out, temp = str(tmp_path / "ds"), tmp_path / "temp"
    other_job = temp / create_dataset.TFT_TEMP_DIR / "another-job"  # A concurrent job's scratch files.
    other_job.mkdir(parents=True)
    (other_job / "keep.txt").write_text("still needed")
    _create(digits.manifest, out, "--num_shards", "3", f"--temp_location={temp}")
    first = published_dir(out)
    assert len(_shards(out, "train")) == 3
    assert os.path.isdir(os.path.join(first, "transform_fn"))
    assert (other_job / "keep.txt").read_text() == "still needed"
    assert os.listdir(temp / create_dataset.TFT_TEMP_DIR) == ["another-job"]  # Its own scratch is gone.
    before = _records(out)

    with pytest.raises(OutputExistsError, match="--overwrite"):
        _create(digits.manifest, out, "--num_shards", "2", "--skip_analysis")
    status = cli.main(["create-dataset", "--manifest", digits.manifest, "--output_dir", out, *_FLAGS])
    assert status == 2 and "--overwrite" in capsys.readouterr().err
    assert published_dir(out) == first

    _create(digits.manifest, out, "--num_shards", "2", "--skip_analysis", "--overwrite")
    second = published_dir(out)
    assert second != first
    assert len(_shards(out, "train")) == 2  # No stale shard of the 3-shard run.
    assert not os.path.exists(os.path.join(second, "transform_fn"))  # No stale transform graph.
    fresh = str(tmp_path / "fresh")
    _create(digits.manifest, fresh, "--num_shards", "2", "--skip_analysis")
    assert _records(out) == _records(fresh) == before
    assert os.listdir(second) and sorted(os.listdir(second)) == sorted(os.listdir(published_dir(fresh)))


def test_a_killed_run_leaves_the_previous_dataset_current_and_readable(digits, tmp_path):
    out = str(tmp_path / "ds")
    _create(digits.manifest, out, "--skip_analysis")
    before, published = _records(out), published_dir(out)
    runs_before = set(os.listdir(out))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    job = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.create_dataset", "--manifest", digits.manifest, "--output_dir", out,
         *_FLAGS, "--skip_analysis", "--overwrite", "--num_shards", "4"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while not set(os.listdir(out)) - runs_before:  # Its run directory exists: it has started writing.
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job never started its run"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL
    assert published_dir(out) == published
    assert _records(out) == before
    assert len(_shards(out, "train")) == 1  # The killed run's 4 shards are not where readers look.

    _create(digits.manifest, out, "--skip_analysis", "--overwrite")  # The next run still publishes.
    assert published_dir(out) != published and _records(out) == before


def test_batch_predict_rerun_without_labels_leaves_no_stale_eval(trained_digits_model, digits, tmp_path):
    out = str(tmp_path / "predictions")
    common = ["--model_dir", trained_digits_model, "--output", out, "--max_batch_size", "16"]
    batch_predict.run([*common, "--input", digits.manifest])
    first = published_dir(out)
    assert os.path.exists(os.path.join(first, prediction.EVAL_FILE))

    with pytest.raises(OutputExistsError, match="--output"):
        batch_predict.run([*common, "--input", digits.manifest])
    images = sorted(glob.glob(os.path.join(os.path.dirname(digits.manifest), "**", "*.png"), recursive=True))[:10]
    unlabeled = os.path.join(os.path.dirname(images[0]), "*.png")
    batch_predict.run([*common, "--input", unlabeled, "--overwrite"])
    second = published_dir(out)
    assert second != first
    assert not os.path.exists(os.path.join(second, prediction.EVAL_FILE))
    rows = [line for path in glob.glob(prediction.jsonl_predictions_pattern(second))
            for line in open(path) if line.strip()]
    assert len(rows) == len(glob.glob(unlabeled))


def test_two_embedding_runs_keep_their_dead_letters_apart(trained_digits_model, digits, tmp_path):
    database = tmp_path / "warehouse.duckdb"
    manifest = tmp_path / "manifest.csv"
    lines = open(digits.manifest).read().splitlines()[:8]
    manifest.write_text("\n".join([*lines, f"{tmp_path / 'missing.png'},3"]) + "\n")
    argv = ["--model_dir", trained_digits_model, "--input", str(manifest), "--warehouse", f"duckdb:{database}"]
    assert extract_embeddings.main(argv) == 0
    runs_root = f"{database}{RUNS_SUFFIX}"
    first = published_dir(runs_root)
    assert extract_embeddings.main(argv) == 0
    second = published_dir(runs_root)
    assert first != second
    for run_dir in (first, second):
        assert [letter.error_type for letter in read_dead_letters(run_dir)] == ["missing_file"]
        assert os.path.exists(os.path.join(run_dir, publication.SUCCESS_FILE))
