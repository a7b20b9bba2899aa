"""Local helper processes (emulators, a Beam job service, a worker pool): ports, readiness, stopping.

Every such process is started in a session of its own, so stopping its
process group stops it and everything it spawned (a launcher script's JVM, a
worker pool's SDK workers): nothing is left holding a port after a failed
run. No Beam here: this module only manages local processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A localhost TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as handle:
        return handle.read()[-chars:]


def _wait(ready: Callable[[], bool], what: str, process: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; log:\n{log_tail(log_path)}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{process.args[0]} did not {what} within {timeout_s}s; log:\n{log_tail(log_path)}")


def wait_until_ready(url: str, process: subprocess.Popen, log_path: str,
                     timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Polls ``url`` until a local HTTP server answers (any status), failing fast if its process died.

    Raises:
      RuntimeError: The process exited, or nothing answered within ``timeout_s``; the message ends with
        the end of its log.
    """
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # It answered; the status code does not matter for liveness.
        except OSError:
            return False

    _wait(answers, f"answer {url}", process, log_path, timeout_s)


def wait_until_listening(port: int, process: subprocess.Popen, log_path: str,
                         timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Waits until ``localhost:port`` accepts TCP connections (a gRPC service gives no HTTP answer).

    Raises:
      RuntimeError: As ``wait_until_ready``.
    """
    def listens() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=2):
            return True
        return False

    _wait(listens, f"listen on {port}", process, log_path, timeout_s)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stops the process's whole group (it was started in a session of its own): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue
