"""The ``vision-pipelines`` command: help answers, committed job help, and what a job imports.

Timings are not asserted here (they depend on the machine); they are in
docs/benchmarks.md. These tests pin behaviour: help works, each committed help
text is exactly what the job's parser prints (so it is never stale), printing
it imports neither Beam nor TensorFlow, and the create_dataset job module stays
free of TensorFlow and Keras until a step needs them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from beam_jobs import cli, help_texts

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beam_jobs.cli", *args], capture_output=True, text=True,
                          cwd=_ROOT, timeout=300)


def test_top_level_help_lists_every_command():
    completed = _run(["--help"])
    assert completed.returncode == 0, completed.stderr
    for command in cli.COMMANDS:
        assert command in completed.stdout


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_the_committed_help_is_what_the_jobs_parser_prints(command):
    with open(help_texts.help_path(command)) as handle:
        committed = handle.read()
    assert committed == help_texts.render(command), (
        f"beam_jobs/help/{command}.txt is stale: run `python -m beam_jobs.help_texts`")
    assert committed.startswith(f"usage: vision-pipelines {command} ")


def test_job_help_prints_the_committed_text_without_importing_beam():
    probe = ("import sys\nfrom beam_jobs import cli\ntry:\n    cli.main(['create-dataset', '--help'])\n"
             "except SystemExit as finished:\n    assert finished.code == 0\n"
             "print('IMPORTED', sorted(m for m in ('apache_beam', 'tensorflow') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=_ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    printed, imported = completed.stdout.rsplit("IMPORTED", 1)
    assert "--manifest" in printed and "--num_shards" in printed
    with open(help_texts.help_path("create-dataset")) as handle:
        assert printed == handle.read()
    assert imported.strip() == "[]"


def test_importing_create_dataset_imports_neither_tensorflow_nor_keras():
    probe = ("import sys, beam_jobs.create_dataset; "
             "print(sorted(m for m in ('tensorflow', 'keras', 'tensorflow_transform', 'model_lib.models') "
             "if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=_ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_a_skip_analysis_run_never_imports_tensorflow(tmp_path):
    """Records, schema.pbtxt and the summary of a --skip_analysis run need no TF op, so no TF import (~6 s)."""
    probe = ("import sys; from beam_jobs import create_dataset; from model_lib import sample_data; "
             f"written = sample_data.write_digits({str(tmp_path / 'data')!r}, limit=30); "
             f"rc = create_dataset.main(['--manifest', written.manifest, '--output_dir', {str(tmp_path / 'out')!r}, "
             "'--skip_analysis']); "
             "print('RC', rc, sorted(m for m in ('tensorflow', 'keras', 'tensorflow_transform') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=_ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "RC 0 []"
    assert os.listdir(tmp_path / "out")
