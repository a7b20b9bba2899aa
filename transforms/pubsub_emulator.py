"""Google's Pub/Sub emulator on localhost: find it, start it, wait for it, stop it.

The demo's ``--streaming`` stage, the streaming benchmarks and the test
fixture all run the emulator from the Cloud SDK (``gcloud info``'s SDK root,
``platform/pubsub-emulator/bin/cloud-pubsub-emulator``). That launcher execs
the Java server, and it is started in a session of its own, so stopping its
process group stops the server and anything it spawned: no orphaned JVM holds
the port after a failed run. On Linux the server also gets SIGTERM when the
process that started it dies (``PR_SET_PDEATHSIG``), so even a caller killed
with SIGKILL (a test's timeout) leaves no emulator behind; start it from the
thread that lives as long as it should (the signal follows the starting
thread). Clients find the emulator through
``PUBSUB_EMULATOR_HOST`` (google-cloud-pubsub, and so Beam's
ReadFromPubSub/WriteToPubSub, connect there with no credentials).
Ports, readiness and stopping are ``transforms.local_services``'.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Callable, Iterator

from transforms.local_services import free_port, stop_process_group, wait_until_ready

_LOGGER = logging.getLogger(__name__)

EMULATOR_HOST_ENV = "PUBSUB_EMULATOR_HOST"
LAUNCHER = os.path.join("platform", "pubsub-emulator", "bin", "cloud-pubsub-emulator")
MISSING = ("the Pub/Sub emulator is not installed: it needs the Google Cloud SDK's gcloud on PATH and its "
           "pubsub-emulator component (gcloud components install pubsub-emulator)")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when its parent dies (Linux; None elsewhere).

    libc is loaded here, before the fork: the child only makes one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_death_signal


def cloud_sdk_root() -> str | None:
    """The Cloud SDK's root directory (``gcloud info``), or None without gcloud on PATH."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    found = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                           capture_output=True, text=True, timeout=60, check=False)
    return found.stdout.strip() or None


def emulator_launcher() -> str | None:
    """The emulator's own launcher under the SDK root, or None when the SDK or its component is missing."""
    root = cloud_sdk_root()
    launcher = os.path.join(root, LAUNCHER) if root else ""
    return launcher if os.path.isfile(launcher) else None


def start_emulator(log_path: str) -> tuple[subprocess.Popen, str]:
    """Starts the emulator on a free port, logging to ``log_path``; returns its process and ``host:port``.

    Raises:
      RuntimeError: The emulator is not installed (``MISSING``) or did not start.
    """
    launcher = emulator_launcher()
    if launcher is None:
        raise RuntimeError(MISSING)
    host = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([launcher, "--host=127.0.0.1", f"--port={host.rsplit(':', 1)[1]}"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_dies_with_parent())
    try:
        wait_until_ready(f"http://{host}/", process, log_path)
    except BaseException:
        stop_process_group(process)
        raise
    _LOGGER.info("Pub/Sub emulator (pid %s) on %s, log %s", process.pid, host, log_path)
    return process, host


@contextlib.contextmanager
def running_emulator(log_path: str) -> Iterator[str]:
    """The emulator for the duration of the block (stopped however the block ends); yields ``host:port``."""
    process, host = start_emulator(log_path)
    try:
        yield host
    finally:
        stop_process_group(process)


@contextlib.contextmanager
def clients_pointed_at(host: str) -> Iterator[None]:
    """Sets ``PUBSUB_EMULATOR_HOST`` for the block, then restores what was there."""
    previous = os.environ.get(EMULATOR_HOST_ENV)
    os.environ[EMULATOR_HOST_ENV] = host
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(EMULATOR_HOST_ENV, None)
        else:
            os.environ[EMULATOR_HOST_ENV] = previous
