"""The quiet console: descriptor 2 moved to a log file and back; library loggers at WARNING."""

from __future__ import annotations

import logging
import os

import pytest

from beam_jobs import console


def test_quiet_stderr_sends_descriptor_2_to_the_log_and_restores_it(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.log"
    # An earlier CLI test may have run configure_logging, which sets library loggers to WARNING.
    library = logging.getLogger("apache_beam")
    previous = library.level
    library.setLevel(logging.NOTSET)
    try:
        _check_quiet_stderr(log, capfd)
    finally:
        library.setLevel(previous)


def _check_quiet_stderr(log, capfd: pytest.CaptureFixture[str]) -> None:
    with console.quiet_stderr(str(log)) as terminal:
        os.write(2, b"I0000 a C++ log line\n")  # What TensorFlow's C++ logging does, past sys.stderr.
        os.write(2, b"W0000 another\n")
        terminal.write("for the person\n")
        logging.getLogger("apache_beam.demo_test").info("a library record")
    os.write(2, b"after\n")
    assert log.read_text() == "I0000 a C++ log line\nW0000 another\nINFO apache_beam.demo_test: a library record\n"
    assert capfd.readouterr().err == "for the person\nafter\n"
    assert console.tail(str(log), 2) == "W0000 another\nINFO apache_beam.demo_test: a library record"


def test_configure_logging_keeps_the_projects_info_and_the_libraries_warnings(monkeypatch) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    try:
        assert console.configure_logging() is False
        assert not logging.getLogger("apache_beam.runners").isEnabledFor(logging.INFO)
        assert logging.getLogger("apache_beam").isEnabledFor(logging.WARNING)
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
        assert console.configure_logging() is True
        assert logging.getLogger("apache_beam").level == logging.NOTSET
        assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ  # Only the value it set itself is taken back.
    finally:
        for name in console.LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
