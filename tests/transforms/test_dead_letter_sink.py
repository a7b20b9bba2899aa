"""The dead-letter sink scales with the workers: no single-shard funnel, and an empty run still leaves a file."""

from __future__ import annotations

import glob
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from schemas.dead_letter import DeadLetter
from schemas.publication import OutputRun
from transforms.dead_letters import WriteDeadLetters, read_dead_letters


def make_letter(index: int) -> DeadLetter:
    return DeadLetter(f"file-{index:05d}", "load_image", "corrupt_image", "truncated")


def _write(output_dir: str, count: int, workers: int) -> list[str]:
    run = OutputRun.start(output_dir, overwrite=False)
    options = PipelineOptions(runner="FnApiRunner", direct_num_workers=workers, direct_running_mode="multi_threading")
    with beam.Pipeline(options=options) as p:
        letters = (p | "Indices" >> beam.Create(list(range(count))) | "Spread" >> beam.Reshuffle()
                   | "ToLetters" >> beam.Map(make_letter))
        _ = letters | WriteDeadLetters(run.run_dir)
    run.publish()
    return glob.glob(os.path.join(run.run_dir, "rejected-*.jsonl"))


def test_no_dead_letters_still_write_one_empty_shard(tmp_path):
    shards = _write(str(tmp_path / "out"), 0, workers=1)
    assert len(shards) == 1 and os.path.getsize(shards[0]) == 0
    assert read_dead_letters(str(tmp_path / "out")) == []


def test_dead_letters_from_parallel_bundles_are_all_written_each_by_its_own_worker(tmp_path):
    shards = _write(str(tmp_path / "out"), 5_000, workers=2)
    # The shard count follows the bundles (2 here), not a fixed 1 that would make one worker write all of them.
    assert len(shards) >= 1
    letters = read_dead_letters(str(tmp_path / "out"))
    assert sorted(letter.input_ref for letter in letters) == [f"file-{i:05d}" for i in range(5_000)]
