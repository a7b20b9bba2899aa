"""Makes a local multi-process run fail, instead of hang, when an SDK worker process dies.

Works around Beam 2.77's FnApiRunner under ``--direct_running_mode
multi_processing``: each SDK worker is a subprocess that
``local_job_service.SubprocessSdkWorker.run`` waits for in a thread of its own.
When that process dies (OOM killer, SIGKILL) the thread only raises "Worker
subprocess exited with return code 137" into the thread's log; nothing tells
the runner, whose bundle threads wait for the dead worker's data and
instruction responses forever (``_GrpcDataChannel.input_elements`` polls its
queue every second until its channel closes or has an exception, and gRPC
does not always notice the lost stream), so the job hangs with no error.

``WatchedFnApiRunner`` is that runner with one difference: its SDK workers run
under ``WatchedSubprocessSdkWorkerHandler``, which notices its subprocess
exiting before the runner shut it down and fails the worker's in-flight and
later work: it aborts the pending control futures and sets the exception its
data channel raises (``_GrpcDataChannel._exception``, the attribute Beam uses
for a broken data stream). The bundle fails within about a second, and
``pipeline.run()`` raises ``WorkerDiedError`` ("SDK worker pid N exited with
signal 9 while the pipeline ran"). A normal run is unchanged: same workers,
same gRPC channels, one extra thread per worker that waits on its process.

The worker runs as ``exec COMMAND`` under Beam's shell, so the process the
runner waits for (and kills at shutdown) is the SDK worker itself, not a
shell whose child could outlive it; the pid and signal in the error are the
worker's.

Nothing in Beam is patched: the runner gives the subprocess environment a URN
of its own and registers this handler for that URN (``WorkerHandler``'s
documented extension point) when it first runs. A worker that hangs without
exiting is not detected (nothing distinguishes it from a slow bundle).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading

import grpc
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_fn_api_pb2_grpc, endpoints_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner, worker_handlers
from apache_beam.utils import thread_pool_executor
from google.protobuf import json_format, text_format

_LOGGER = logging.getLogger(__name__)

# The subprocess SDK environment, as run by this module's handler.
WATCHED_SUBPROCESS_URN = "vision_pipelines:env:watched_harness_subprocess_python:v1"
_FAIL_LATER_WORK_EVERY_S = 0.2


class WorkerDiedError(RuntimeError):
    """An SDK worker process exited while the pipeline still ran on it."""


def describe_exit(pid: int, returncode: int) -> str:
    """``SDK worker pid 123 exited with signal 9 (SIGKILL) while the pipeline ran``, or ``with status 1``."""
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        how = f"signal {-returncode}{name}"
    else:
        how = f"status {returncode}"
    return f"SDK worker pid {pid} exited with {how} while the pipeline ran"


class _WatchedSubprocessSdkWorker(local_job_service.SubprocessSdkWorker):
    """Beam 2.77's ``SubprocessSdkWorker.run`` that keeps its process and runs the command with ``exec``.

    The body is Beam's (logging server, environment, Popen under Beam's lock,
    wait, kill at the end); the differences are ``self.process`` (set before
    ``started`` is) and the ``exec``, which makes ``process`` the worker.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process: subprocess.Popen | None = None
        self.started = threading.Event()

    def run(self) -> None:
        options = [("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)]
        logging_server = grpc.server(thread_pool_executor.shared_unbounded_instance(), options=options)
        logging_port = logging_server.add_insecure_port("[::]:0")
        logging_server.start()
        beam_fn_api_pb2_grpc.add_BeamFnLoggingServicer_to_server(
            local_job_service.BeamFnLoggingServicer(), logging_server)
        env = dict(
            os.environ,
            CONTROL_API_SERVICE_DESCRIPTOR=text_format.MessageToString(
                endpoints_pb2.ApiServiceDescriptor(url=self._control_address)),
            LOGGING_API_SERVICE_DESCRIPTOR=text_format.MessageToString(
                endpoints_pb2.ApiServiceDescriptor(url=f"localhost:{logging_port}")),
            PIPELINE_OPTIONS=json_format.MessageToJson(self._provision_info.provision_info.pipeline_options),
        )
        if self._worker_id:
            env["WORKER_ID"] = self._worker_id
        try:
            with worker_handlers.SUBPROCESS_LOCK:
                self.process = subprocess.Popen(f"exec {self._worker_command_line}", shell=True, env=env)
            self.started.set()
            self.process.wait()
        finally:
            self.started.set()
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
            logging_server.stop(0)


class WatchedSubprocessSdkWorkerHandler(worker_handlers.SubprocessSdkWorkerHandler):
    """A subprocess SDK worker whose unexpected exit fails the work the runner gave it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.death: WorkerDiedError | None = None
        self._run_deaths: list[WorkerDiedError] | None = getattr(_current_run, "deaths", None)

    def start_worker(self) -> None:
        self.worker = _WatchedSubprocessSdkWorker(
            self._worker_command_line, self.control_address, self.provision_info, self.worker_id)
        self.worker_thread = threading.Thread(name="run_worker", target=self.worker.run)
        self.worker_thread.start()
        threading.Thread(name=f"watch_{self.worker_id}", target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.worker.started.wait()
        if self.worker.process is None:  # Popen itself failed; Beam's thread reports it.
            return
        self.worker.process.wait()
        self._note_death()
        # Work the runner gives the dead worker later must fail too, until the runner closes it.
        while self.death is not None and not self._closing.wait(_FAIL_LATER_WORK_EVERY_S):
            self._fail_work()

    def _note_death(self) -> None:
        """Fails the worker's work if its process exited before ``close``."""
        process = self.worker.process
        with self._lock:
            if self._closing.is_set() or self.death is not None or process is None or process.poll() is None:
                return
            self.death = WorkerDiedError(f"{describe_exit(process.pid, process.returncode)} ({self.worker_id})")
            if self._run_deaths is not None:
                self._run_deaths.append(self.death)
        _LOGGER.error("%s; failing its bundles", self.death)
        self.data_conn._exception = self.death  # Raised by input_elements (waiting for outputs) within a second.
        self._fail_work()

    def _fail_work(self) -> None:
        """Aborts the pending instructions and discards the data queued for the dead worker.

        An aborted instruction raises the death in the runner thread waiting
        for it; the discarded data keeps a runner thread sending a bundle's
        inputs from blocking on the dead worker's full send queue.
        """
        for future in list(self.control_conn._futures_by_id.values()):
            future.abort(self.death)
        try:
            while True:
                self.data_conn._to_send.get_nowait()
        except queue.Empty:
            pass

    def close(self) -> None:
        self._note_death()  # A process already gone when the runner closes it died on its own.
        with self._lock:
            self._closing.set()
        if self.death is None:
            super().close()
            return
        # Beam's close would re-raise the death from the data channel and log it as a close error.
        self.control_conn.close()
        self.worker_thread.join()


# The deaths of the workers of the pipeline this thread runs (WatchedFnApiRunner.run_via_runner_api).
_current_run = threading.local()


class WatchedFnApiRunner(fn_runner.FnApiRunner):
    """Beam 2.77's FnApiRunner whose subprocess SDK workers fail the job when they die (module docstring)."""

    def run_via_runner_api(self, pipeline_proto, options):
        """Runs the pipeline; raises ``WorkerDiedError`` (from Beam's error) if it failed after a worker died."""
        worker_handlers.WorkerHandler.register_environment(WATCHED_SUBPROCESS_URN, bytes)(
            WatchedSubprocessSdkWorkerHandler)
        for environment in pipeline_proto.components.environments.values():
            if environment.urn == python_urns.SUBPROCESS_SDK:
                environment.urn = WATCHED_SUBPROCESS_URN
        _current_run.deaths = deaths = []
        try:
            return super().run_via_runner_api(pipeline_proto, options)
        except Exception as error:
            if not deaths or isinstance(error, WorkerDiedError):
                raise
            raise WorkerDiedError("; ".join(map(str, deaths))) from error
        finally:
            del _current_run.deaths
