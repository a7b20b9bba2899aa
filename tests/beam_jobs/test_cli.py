"""The ``vision-pipelines`` command: help answers, cached job help, and what a job imports.

Timings are not asserted here (they depend on the machine); they are in
docs/benchmarks.md. These tests pin behaviour: help works, cached help is the
job's own text, a changed source file invalidates it, and the create_dataset
job module stays free of TensorFlow and Keras until a step needs them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from beam_jobs import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], cache_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": cache_dir}
    return subprocess.run([sys.executable, "-m", "beam_jobs.cli", *args], capture_output=True, text=True,
                          cwd=_ROOT, env=env, timeout=300)


def test_top_level_help_lists_every_command(tmp_path):
    completed = _run(["--help"], str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    for command in cli.COMMANDS:
        assert command in completed.stdout


def test_create_dataset_help_lists_its_flags_and_is_cached(tmp_path):
    first = _run(["create-dataset", "--help"], str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "--manifest" in first.stdout and "--num_shards" in first.stdout
    cached = list((tmp_path / "vision-pipelines" / "help").glob("create-dataset-*.txt"))
    assert len(cached) == 1 and cached[0].read_text() == first.stdout
    second = _run(["create-dataset", "--help"], str(tmp_path))
    assert second.returncode == 0 and second.stdout == first.stdout


def test_cached_help_is_what_gets_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cli, "code_fingerprint", lambda: "fixed")  # Other edits to the tree must not move it.
    path = cli.help_cache_path("sql", "fixed")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        handle.write("cached help text\n")
    with pytest.raises(SystemExit) as finished:
        cli.main(["sql", "--help"])
    assert finished.value.code == 0
    assert capsys.readouterr().out == "cached help text\n"


def test_a_changed_source_file_changes_the_fingerprint(tmp_path):
    package = tmp_path / "beam_jobs"
    package.mkdir()
    source = package / "job.py"
    source.write_text("FLAG = 1\n")
    before = cli.code_fingerprint(str(tmp_path), ("beam_jobs",))
    source.write_text("FLAG = 22\n")
    assert cli.code_fingerprint(str(tmp_path), ("beam_jobs",)) != before


def test_importing_create_dataset_imports_neither_tensorflow_nor_keras():
    probe = ("import sys, beam_jobs.create_dataset; "
             "print(sorted(m for m in ('tensorflow', 'keras', 'tensorflow_transform', 'model_lib.models') "
             "if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=_ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
