"""An SDK worker that dies under ``--direct_running_mode multi_processing`` fails the job, quickly and by name.

Beam 2.77's local FnApiRunner would wait for the dead worker forever; the
runner policy's ``transforms.worker_watchdog.WatchedFnApiRunner`` fails the
run instead. Two views of it:

- in-process: a pipeline built through ``make_pipeline_options`` whose DoFn
  kills (or exits) its own worker process; ``pipeline.run()`` raises
  ``WorkerDiedError`` naming that process and how it ended;
- a real job: ``python -m beam_jobs.create_dataset`` on 2 worker processes,
  one of them SIGKILLed from outside while it runs bundles; the job exits
  non-zero within ``FAIL_WITHIN_S`` of the kill, says which worker died, and
  publishes nothing (no ``CURRENT``). ``timeout`` only bounds a regression.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from model_lib import sample_data
from schemas.publication import read_pointer
from transforms.runner_policy import make_pipeline_options
from transforms.worker_watchdog import WorkerDiedError

_MULTI_PROCESS = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
_WORKER_MODULE = b"apache_beam.runners.worker.sdk_worker_main"
_DATASET_FLAGS = ("--image_size", "16", "--channels", "1", "--image_format", "png", "--skip_analysis")
JOB_TIMEOUT_S = 300  # Safety net for a regression (a hang); the job must end long before.
# From the kill to the job's exit: measured 5 s idle (about 1 s to notice, up to 5 s for Beam's gRPC
# shutdown), 10 s at load 7 on 2 cores.
FAIL_WITHIN_S = 45
DYING_ELEMENT = 7


class _EndOwnProcess(beam.DoFn):
    """Ends the worker process that gets ``DYING_ELEMENT`` (its pid written to ``pid_file`` first)."""

    def __init__(self, pid_file: str, how: str) -> None:
        self._pid_file, self._how = pid_file, how

    def process(self, element: int):
        if element == DYING_ELEMENT:
            with open(self._pid_file, "w") as handle:
                handle.write(str(os.getpid()))
            if self._how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        yield element


@pytest.mark.parametrize("how, ending", [("sigkill", "signal 9 (SIGKILL)"), ("exit", "status 3")])
def test_a_worker_that_dies_mid_bundle_makes_run_raise_naming_it(tmp_path, how, ending):
    pid_file = str(tmp_path / "pid")
    pipeline = beam.Pipeline(options=make_pipeline_options(_MULTI_PROCESS, job_options=PipelineOptions))
    _ = (pipeline | beam.Create(range(20)) | beam.Reshuffle()
         | beam.ParDo(_EndOwnProcess(pid_file, how)) | beam.combiners.Count.Globally())
    started = time.monotonic()
    with pytest.raises(WorkerDiedError) as raised:
        pipeline.run()
    with open(pid_file) as handle:
        pid = int(handle.read())
    assert f"SDK worker pid {pid} exited with {ending} while the pipeline ran" in str(raised.value)
    assert time.monotonic() - started < JOB_TIMEOUT_S


def _sdk_workers(group: int) -> list[int]:
    """PIDs of Beam SDK worker processes in process group ``group``."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            if _WORKER_MODULE in argv and os.getpgid(int(entry)) == group:
                pids.append(int(entry))
        except OSError:  # Gone since it was listed.
            continue
    return pids


def test_create_dataset_with_a_sigkilled_worker_fails_quickly_naming_it_and_publishes_nothing(tmp_path):
    source = sample_data.write_digits(str(tmp_path / "digits"), size=16, limit=60)
    output_dir = str(tmp_path / "dataset")
    job = subprocess.Popen(
        ["timeout", "--kill-after=5", str(JOB_TIMEOUT_S), sys.executable, "-m", "beam_jobs.create_dataset",
         "--manifest", source.manifest, "--output_dir", output_dir, *_DATASET_FLAGS, *_MULTI_PROCESS],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    killed = seen = None
    try:
        while job.poll() is None and killed is None:
            ours = _sdk_workers(job.pid)  # Its own session: other jobs' workers are not ours to kill.
            seen = seen or (time.monotonic() if ours else None)
            if len(ours) == 2 and time.monotonic() - seen > 1.0:  # Connected and running bundles by now.
                os.kill(ours[0], signal.SIGKILL)
                killed = (ours[0], time.monotonic())
            time.sleep(0.05)
        _, stderr = job.communicate(timeout=JOB_TIMEOUT_S + 10)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # Anything a regression left behind.
        except ProcessLookupError:
            pass
        job.wait()
    assert killed is not None, f"the job ended (status {job.returncode}) before a worker could be killed"
    pid, at = killed
    assert job.returncode not in (0, 124, 137), stderr[-3000:]  # Failed by itself, not stopped by timeout.
    assert time.monotonic() - at < FAIL_WITHIN_S
    assert f"WorkerDiedError: SDK worker pid {pid} exited with signal 9 (SIGKILL) while the pipeline ran" in stderr
    assert read_pointer(output_dir) is None
