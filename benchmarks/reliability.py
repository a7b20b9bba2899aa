"""Regenerates the bad-input and fault-injection figures of docs/reliability.md.

The corpus and the judging are the test suite's own (``tests/fixtures/image_corpus.py``:
``build_bad_input_corpus``, ``run_<job>``, ``job_figures``), so the report counts
exactly what ``tests/reliability/test_bad_inputs.py`` asserts: every input
offered, written, dead-lettered by reason, lost (must be 0) and misjudged (an
outcome other than the expected one; must be none), next to each job's own
read / written / rejected. The faults are the fault-injection suite's own
scenarios (``tests/reliability/test_fault_injection.py``: transient read
errors, a killed SDK worker, training killed mid-epoch), each reporting items
in, items out, duplicates and lost. The streaming figures come from
``benchmarks.streaming_load`` (its own section).

Run:
  python -m benchmarks.reliability --model_dir MODEL --work_dir /tmp/reliability
MODEL is any exported 1-channel model (the docs use the default CNN trained on the digits sample).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Callable

from benchmarks.machine import cpu_description
from benchmarks.report import RELIABILITY_DOC, write_section
from model_lib import sample_data
from tests.fixtures import image_corpus
from tests.fixtures.datasets import SMALL_DIGITS_LIMIT, build_digits_dataset
from tests.fixtures.image_corpus import BadInputCorpus, JobRun
from tests.reliability import test_fault_injection as faults


def runs(model_dir: str) -> dict[str, Callable[[BadInputCorpus, str], JobRun]]:
    """Job name -> how it runs on the corpus in a work directory."""
    return {
        "create_dataset": image_corpus.run_create_dataset,
        "batch_predict": lambda corpus, work: image_corpus.run_batch_predict(corpus, model_dir, work),
        "extract_embeddings": lambda corpus, work: image_corpus.run_extract_embeddings(corpus, model_dir, work),
    }


def report(corpus: BadInputCorpus, results: dict[str, JobRun], command: str) -> str:
    """The bad-input section; ``command`` is the Markdown of the command line (and which model it used)."""
    lines = [
        "## Bad inputs: the corpus through every batch job", "",
        f"Command: {command}", f"Machine: {cpu_description()}.", "",
        f"Corpus (`build_bad_input_corpus`, also `python -m tests.testdata.make_bad_inputs DIR`): "
        f"{len(corpus.files)} files and {len(corpus.rows)} bad manifest rows; what each one is and the reason "
        "each job must give it are listed in `tests/fixtures/image_corpus.py`.", "",
        "| job | exit | inputs | written | dead-lettered, by reason | lost | misjudged | job's own read = written "
        "+ rejected |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for job, run in results.items():
        figures, counts = run.figures, run.counts
        reasons = ", ".join(f"{reason} {count}" for reason, count in figures.rejected.items())
        own = f"{counts.get('read')} = {counts.get('written')} + {counts.get('rejected')}"
        lines.append(f"| {job} | {run.exit_code} | {figures.tried} | {figures.written} | {reasons} | "
                     f"{figures.lost} | {len(figures.misjudged)} | {own} |")
    lines += ["", "stream_predict takes the same files as messages (`json_uri`, `raw_bytes`) in "
              "`tests/reliability/test_bad_inputs.py`, on the Pub/Sub emulator; its load figures are below."]
    return "\n".join(lines)


def fault_figures(work_dir: str) -> list[tuple[faults.FaultFigures, bool]]:
    """Each fault scenario's figures and whether its final output equals a fault-free run's."""
    source = sample_data.write_digits(os.path.join(work_dir, "digits"), size=16, limit=faults.DIGITS)
    for name in ("transient", "killed_worker", "killed_training"):
        os.makedirs(os.path.join(work_dir, name))
    transient, transient_diff = faults.transient_read_faults(source, os.path.join(work_dir, "transient"))
    killed, killed_diff, killed_ok = faults.killed_worker(source, os.path.join(work_dir, "killed_worker"))
    small = build_digits_dataset(os.path.join(work_dir, "small_digits"), limit=SMALL_DIGITS_LIMIT)
    resumed, same_weights = faults.killed_training(small.dataset_dir, os.path.join(work_dir, "killed_training"))
    return [(transient, not transient_diff), (killed, killed_ok and not killed_diff), (resumed, same_weights)]


def fault_report(results: list[tuple[faults.FaultFigures, bool]], command: str) -> str:
    lines = [
        "## Faults injected", "",
        f"Command: {command}", f"Machine: {cpu_description()}.", "",
        "| scenario | items in | items out | duplicates | lost | final output equals a fault-free run | "
        "what happened |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for figures, equal in results:
        lines.append(f"| {figures.scenario} | {figures.items_in} | {figures.items_out} | {figures.duplicates} | "
                     f"{figures.lost} | {'yes' if equal else '**no**'} | {figures.detail} |")
    lines += ["", "A killed SDK worker fails the job by itself: the runner policy's `WatchedFnApiRunner` "
              "(`transforms/worker_watchdog.py`) notices the worker process exited and raises `WorkerDiedError` "
              "naming its pid and signal (Beam 2.77's plain local runner waits forever). Nothing of the killed run "
              "is published, and the rerun with `--overwrite` gives the fault-free dataset."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--work_dir", default="/tmp/reliability")
    parser.add_argument("--no_report", action="store_true", help="Print only; leave docs/ alone.")
    parser.add_argument("--skip_faults", action="store_true", help="Only the bad-input corpus.")
    parser.add_argument("--model_note", default="", help="A sentence on which model MODEL was, for the doc.")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    corpus = image_corpus.build_bad_input_corpus(os.path.join(args.work_dir, "corpus"))
    results = {}
    for job, run in runs(args.model_dir).items():
        work = os.path.join(args.work_dir, job)
        os.makedirs(work)
        results[job] = run(corpus, work)
        print(job, results[job].exit_code, results[job].counts, results[job].figures, flush=True)
    command = (f"`python -m benchmarks.reliability --model_dir MODEL --work_dir {args.work_dir}"
               f"{' --skip_faults' if args.skip_faults else ''}`{' ' + args.model_note if args.model_note else ''}")
    body = report(corpus, results, command)
    print(body)
    if not args.no_report:
        write_section("bad_inputs", body, RELIABILITY_DOC)
    bad = [job for job, run in results.items() if run.figures.lost or run.figures.misjudged or run.exit_code]
    if not args.skip_faults:
        injected = fault_figures(os.path.join(args.work_dir, "faults"))
        body = fault_report(injected, command)
        print(body)
        if not args.no_report:
            write_section("faults", body, RELIABILITY_DOC)
        bad += [figures.scenario for figures, equal in injected if figures.lost or figures.duplicates or not equal]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
