"""Fault injection: transient storage errors, a worker killed mid-run, training killed mid-epoch.

Each scenario is a function returning its ``FaultFigures`` (items in, out,
duplicates, lost), so a reliability report can regenerate the figures the
tests assert on:

- ``transient_read_faults``: create_dataset reads its images through
  ``flakytest://`` (``tests.transforms.test_file_reads.FlakyFileSystem``, a
  real Beam FileSystem) whose first open of every 10th image fails with EIO.
  ``transforms.file_reads`` retries the read (FnApiRunner never retries a
  failed bundle, so the retry must be the step's own), counts it in
  ``storage_retries``, and the dataset equals a fault-free run's.
- ``killed_worker``: create_dataset under ``--direct_running_mode
  multi_processing`` with 2 workers; one SDK worker process gets SIGKILL
  while it runs bundles. The runner policy's ``WatchedFnApiRunner``
  (``transforms.worker_watchdog``) fails the job: it must exit by itself,
  non-zero, within ``KILLED_WORKER_GRACE_S`` of the kill (Beam 2.77's plain
  local runner waits forever; ``timeout`` only bounds a job that never ends,
  and a job still running after the grace counts as hung). Nothing is
  published (the output rule, ``schemas.publication``), and a rerun with
  ``--overwrite`` equals a fault-free run. ``tests/beam_jobs/test_output_rule.py`` covers a killed
  *driver*; this is a killed *worker*.
- ``killed_training``: a training process gets SIGKILL in the middle of its
  second epoch; the rerun resumes from the epoch-1 checkpoint and ends with
  exactly the weights (same ``model_version``, a hash of the weights) of an
  uninterrupted run. ``tests/model_lib/test_training.py`` stops training
  in-process between epochs and checks the resumed start weights only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from beam_jobs import create_dataset
from model_lib import dataset_io, sample_data, training
from schemas import dataset, model_artifacts
from schemas.publication import published_dir, read_pointer
from tests.fixtures.datasets import BuiltDataset
from tests.transforms.test_file_reads import FAILURES, OPENS, SCHEME
from transforms.dead_letters import counter_total, read_dead_letters
from transforms.file_reads import STORAGE_RETRIES

DIGITS = 60
FLAKY_EVERY = 10  # Every 10th image's first open fails.
_FLAGS = ("--image_size", "16", "--channels", "1", "--image_format", "png", "--skip_analysis")
_WORKER_MODULE = "apache_beam.runners.worker.sdk_worker_main"
JOB_TIMEOUT_S = 300
KILLED_WORKER_GRACE_S = 45  # Kill to failure took 5 s idle, about 10 s at load 7 on 2 cores.
# Tiny CNN, 320 training images in 3 batches per epoch: "mid-epoch" is after the first batch of epoch 2.
TRAINING_HPARAMS = {"filters": [8, 16], "embedding_dim": 16, "batch_size": 128, "epochs": 3,
                    "early_stopping_patience": 0}
KILLED_EPOCH, KILLED_AFTER_BATCH = 1, 0

# Trains with a callback that, mid-epoch, says so through a marker file and waits to be killed.
_TRAIN_UNTIL_KILLED = """
import json, sys, time
import keras
from model_lib import training

class WaitToBeKilled(keras.callbacks.Callback):
    epoch = 0
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (int(sys.argv[4]), int(sys.argv[5])):
            open(sys.argv[3], "w").close()
            time.sleep(600)

training.train_and_export(sys.argv[1], sys.argv[2], json.loads(sys.argv[6]), callbacks=[WaitToBeKilled()])
"""


@dataclasses.dataclass(frozen=True)
class FaultFigures:
    """What one fault scenario did to the job's output.

    Attributes:
      scenario: What was injected.
      items_in: Inputs given to the job (manifest rows, or training epochs).
      items_out: Distinct items in the final output.
      duplicates: Output items beyond the first copy of each.
      lost: Inputs neither in the output nor dead-lettered (must be 0).
      detail: How the job behaved (retries, exit status, resumed epoch).
    """

    scenario: str
    items_in: int
    items_out: int
    duplicates: int
    lost: int
    detail: str


def _create(manifest: str, output_dir: str, *extra: str):
    return create_dataset.run(["--manifest", manifest, "--output_dir", output_dir, *_FLAGS, *extra])


def _records(output_dir: str) -> list[tuple]:
    """(image_id, split, label, sha256) of every record of the published dataset, duplicates kept."""
    files = [path for split in ("train", "valid", "test") for path in dataset_io.split_files(output_dir, split)]
    return sorted(
        (r["image_id"], r["split"], r["label"], r["sha256"])
        for r in (dataset.DATASET_RECORD.from_tf_example(raw.numpy())
                  for raw in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    )


def _figures(scenario: str, items_in: int, output_dir: str, detail: str) -> FaultFigures:
    records = _records(output_dir)
    rejected = len(read_dead_letters(published_dir(output_dir)))
    distinct = len(set(records))
    return FaultFigures(scenario, items_in, distinct, len(records) - distinct, items_in - distinct - rejected, detail)


def _manifest_rows(manifest: str) -> list[list[str]]:
    with open(manifest, newline="") as handle:
        rows = list(csv.reader(handle))
    base = os.path.dirname(manifest)
    return [[os.path.join(base, uri), label] for uri, label in rows]


def transient_read_faults(source: sample_data.SampleData, workdir: str) -> tuple[FaultFigures, list[tuple]]:
    """create_dataset with the first read of every ``FLAKY_EVERY``-th image failing, and a fault-free run.

    Returns:
      The figures of the faulty run, and whether (as records) both runs wrote the same dataset:
      the faulty run's records minus the fault-free run's, plus the reverse.
    """
    rows = _manifest_rows(source.manifest)
    manifest = os.path.join(workdir, "flaky.csv")
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([f"{SCHEME}://{path}", label] for path, label in rows)
    FAILURES.clear()
    OPENS.clear()
    flaky = [path for index, (path, _) in enumerate(rows) if index % FLAKY_EVERY == 0]
    FAILURES.update({path: 1 for path in flaky})
    try:
        result = _create(manifest, os.path.join(workdir, "faulty"))
        opens = sum(OPENS[path] for path in flaky)
        left = sum(FAILURES.values())
    finally:
        FAILURES.clear()
    _create(manifest, os.path.join(workdir, "clean"))
    faulty, clean = _records(os.path.join(workdir, "faulty")), _records(os.path.join(workdir, "clean"))
    difference = sorted(set(faulty) ^ set(clean))
    detail = (f"{len(flaky)} first reads failed with EIO, {counter_total(result, STORAGE_RETRIES)} retries counted, "
              f"{opens} opens of those files, {left} failures left unconsumed, "
              f"{len(difference)} records differ from a fault-free run")
    return _figures("transient read errors (first read of 1 image in 10 fails)", len(rows),
                    os.path.join(workdir, "faulty"), detail), difference


def _sdk_workers(group: int) -> list[int]:
    """PIDs of Beam SDK worker processes (``python -m ...sdk_worker_main``) in process group ``group``."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            if _WORKER_MODULE.encode() in argv and os.getpgid(int(entry)) == group:
                pids.append(int(entry))
        except OSError:  # Gone since it was listed.
            continue
    return pids


def _run_and_kill_a_worker(manifest: str, output_dir: str) -> tuple[int, float, bool, bool]:
    """Runs create_dataset on 2 worker processes under ``timeout``, SIGKILLs one worker once it runs.

    A job still running ``KILLED_WORKER_GRACE_S`` after the kill has hung (the
    watchdog did not fail it); ``timeout`` is then told to stop it
    now rather than at ``JOB_TIMEOUT_S``, which only bounds a job that never started.

    Returns:
      The job's exit status, seconds it ran, whether a worker was killed, whether the job then hung.
    """
    started = time.monotonic()
    job = subprocess.Popen(
        ["timeout", "--kill-after=5", str(JOB_TIMEOUT_S), sys.executable, "-m", "beam_jobs.create_dataset",
         "--manifest", manifest, "--output_dir", output_dir, *_FLAGS,
         "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    seen = killed = None
    try:
        while job.poll() is None and killed is None:
            ours = _sdk_workers(job.pid)  # Its own session: other jobs' workers are not ours to kill.
            seen = seen or (time.monotonic() if ours else None)
            if ours and time.monotonic() - seen > 1.0:  # Connected and running bundles by now.
                os.kill(ours[0], signal.SIGKILL)
                killed = time.monotonic()
            time.sleep(0.05)
        try:
            job.wait(timeout=KILLED_WORKER_GRACE_S)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            job.terminate()  # ``timeout`` passes SIGTERM on to the job and exits non-zero.
            job.wait(timeout=30)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # Workers the job left behind.
        except ProcessLookupError:
            pass
        job.wait()
    return job.returncode, time.monotonic() - started, killed is not None, hung


def killed_worker(source: sample_data.SampleData, workdir: str) -> tuple[FaultFigures, list[tuple], bool]:
    """Kills a worker of a multi-process create_dataset, then reruns it with ``--overwrite``.

    Returns:
      The rerun's figures; the records in which the rerun and a fault-free run differ; and
      whether the killed run left the output unpublished or published the right dataset.
    """
    output_dir = os.path.join(workdir, "killed")
    status, seconds, killed, hung = _run_and_kill_a_worker(source.manifest, output_dir)
    _create(source.manifest, os.path.join(workdir, "clean"))
    clean = _records(os.path.join(workdir, "clean"))
    unpublished = read_pointer(output_dir) is None
    failed_by_itself = not hung and status not in (0, 124, 137)  # 124/137: stopped by ``timeout``.
    sound = killed and ((status == 0 and _records(output_dir) == clean) or (failed_by_itself and unpublished))
    _create(source.manifest, output_dir, "--overwrite")
    difference = sorted(set(_records(output_dir)) ^ set(clean))
    ending = f"hung for {KILLED_WORKER_GRACE_S} s after the kill, stopped by timeout" if hung else "ended by itself"
    detail = (f"{'a worker was SIGKILLed' if killed else 'no worker was killed'}; the job {ending}: "
              f"exit status {status} after {seconds:.0f} s, "
              f"{'nothing published' if unpublished else 'published'}; rerun with --overwrite: "
              f"{len(difference)} records differ from a fault-free run")
    figures = _figures("SDK worker SIGKILLed under multi_processing (2 workers)", DIGITS, output_dir, detail)
    return figures, difference, sound


def _weights(model_dir: str) -> list[np.ndarray]:
    return keras.models.load_model(os.path.join(published_dir(model_dir), model_artifacts.KERAS_MODEL_FILE),
                                   compile=False).get_weights()


def killed_training(dataset_dir: str, workdir: str) -> tuple[FaultFigures, bool]:
    """Trains once uninterrupted and once SIGKILLed mid-epoch then resumed; compares the final weights.

    Returns:
      The figures (items are epochs) and whether the resumed model's weights equal the uninterrupted one's.
    """
    uninterrupted = training.train_and_export(dataset_dir, os.path.join(workdir, "uninterrupted"), TRAINING_HPARAMS)
    resumed_dir, marker = os.path.join(workdir, "killed"), os.path.join(workdir, "mid-epoch")
    child = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_UNTIL_KILLED, dataset_dir, resumed_dir, marker, str(KILLED_EPOCH),
         str(KILLED_AFTER_BATCH), json.dumps(TRAINING_HPARAMS)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(marker):
            assert child.poll() is None, f"training ended (status {child.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "training never reached the middle of its second epoch"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    with open(os.path.join(resumed_dir, training.CHECKPOINT_DIR, training.STATE_FILE)) as handle:
        epochs_checkpointed = json.load(handle)["epochs_done"]
    resumed = training.train_and_export(dataset_dir, resumed_dir, TRAINING_HPARAMS)
    difference = max(float(np.max(np.abs(a - b)))
                     for a, b in zip(_weights(uninterrupted.model_dir), _weights(resumed.model_dir)))
    same = resumed.model_info.model_version == uninterrupted.model_info.model_version and difference == 0.0
    detail = (f"killed (exit {child.returncode}) after batch {KILLED_AFTER_BATCH + 1} of epoch {KILLED_EPOCH + 1}; "
              f"checkpoint had {epochs_checkpointed} epoch(s); resumed at epoch {resumed.initial_epoch + 1}; "
              f"largest weight difference from an uninterrupted run {difference}")
    epochs = TRAINING_HPARAMS["epochs"]
    done = len(resumed.metrics.history["loss"])
    return FaultFigures("training SIGKILLed mid-epoch, then resumed", epochs, done, 0, epochs - done, detail), same


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("digits")), size=16, limit=DIGITS)


def test_transient_read_errors_are_retried_and_the_output_equals_a_fault_free_run(digits, tmp_path):
    figures, difference = transient_read_faults(digits, str(tmp_path))
    assert difference == []
    assert (figures.items_out, figures.duplicates, figures.lost) == (DIGITS, 0, 0)
    retried = -(-DIGITS // FLAKY_EVERY)
    assert f"{retried} retries counted, {2 * retried} opens of those files, 0 failures left" in figures.detail


def test_a_killed_worker_fails_the_job_loudly_and_a_rerun_equals_a_fault_free_run(digits, tmp_path):
    figures, difference, sound = killed_worker(digits, str(tmp_path))
    assert sound, figures.detail  # Completed correctly, or failed with nothing published.
    assert difference == []
    assert (figures.items_out, figures.duplicates, figures.lost) == (DIGITS, 0, 0)


def test_training_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
        small_digits_dataset: BuiltDataset, tmp_path):
    figures, same = killed_training(small_digits_dataset.dataset_dir, str(tmp_path))
    assert same, figures.detail
    assert "checkpoint had 1 epoch(s); resumed at epoch 2" in figures.detail
    assert figures.lost == 0
