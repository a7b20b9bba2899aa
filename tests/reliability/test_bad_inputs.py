"""Every job on the bad-input corpus: no crash, every bad input dead-lettered with its reason, every good one written.

The corpus, its expected outcomes and the job runs are in ``tests.fixtures.image_corpus``
(``build_bad_input_corpus``, ``run_<job>``, ``job_figures``), so a report script measures exactly
what these tests assert. Each test also checks the job's own accounting (read = written + rejected).

Covered elsewhere, not repeated here: the transform-level reasons of the small corpus
(``tests/transforms/test_images.py``, ``test_inference_inputs.py``); json_base64 messages with bad
JSON, no image_id, bad base64, a non-image and an oversized image
(``tests/beam_jobs/test_stream_predict.py::test_every_message_gives_one_prediction_equal_to_the_saved_model_and_bad_ones_dead_letter``);
NaN, zero and wrong-dimension vectors in build_index
(``tests/beam_jobs/test_build_index.py::test_bad_vectors_are_dead_letters_and_the_accounting_balances``).
"""

from __future__ import annotations

import datetime

import pytest

from retrieval.searcher import ShardedIndex
from schemas.dataset_info import DatasetInfo
from schemas.publication import published_dir
from tests.beam_jobs.test_stream_predict import MAX_PIXELS, collect, letters_of, publish, rows_of, running_job, topics
from tests.fixtures import image_corpus
from tests.fixtures import warehouses as wh
from tests.fixtures.image_corpus import BadInputCorpus, JobFigures, JobRun, corpus_messages, job_figures
from transforms import pubsub_io
from transforms.dead_letters import read_dead_letters
from transforms.image_inputs import message_ref


def assert_judged_right(figures: JobFigures) -> None:
    assert figures.misjudged == {}, figures.misjudged
    assert figures.lost == 0
    assert figures.written + sum(figures.rejected.values()) == figures.tried


def assert_run_right(run: JobRun) -> None:
    assert run.exit_code == 0
    assert_judged_right(run.figures)
    assert run.counts == {"read": run.figures.tried, "written": run.figures.written,
                          "rejected": sum(run.figures.rejected.values())}


def test_reasons_repeated_in_the_corpus_module_are_the_jobs() -> None:
    assert image_corpus.MALFORMED_MESSAGE == pubsub_io.MALFORMED_MESSAGE
    assert MAX_PIXELS == image_corpus.CORPUS_MAX_PIXELS  # stream_predict's runs use the stream tests' limit.


def test_create_dataset(bad_input_corpus: BadInputCorpus, tmp_path, capsys) -> None:
    run = image_corpus.run_create_dataset(bad_input_corpus, str(tmp_path))
    assert run.exit_code == 0, capsys.readouterr().err
    assert_run_right(run)
    assert DatasetInfo.read(published_dir(str(tmp_path / "dataset"))).rejected == run.figures.rejected


def test_batch_predict(bad_input_corpus: BadInputCorpus, trained_digits_model: str, tmp_path) -> None:
    assert_run_right(image_corpus.run_batch_predict(bad_input_corpus, trained_digits_model, str(tmp_path)))


def test_extract_embeddings(bad_input_corpus: BadInputCorpus, trained_digits_model: str, tmp_path) -> None:
    assert_run_right(image_corpus.run_extract_embeddings(bad_input_corpus, trained_digits_model, str(tmp_path)))


@pytest.mark.parametrize("message_format", image_corpus.MESSAGE_FORMATS)
def test_stream_predict(bad_input_corpus: BadInputCorpus, trained_digits_model: str, pubsub_emulator,
                        message_format: str) -> None:
    messages = corpus_messages(bad_input_corpus, message_format)
    bad = sum(1 for _, _, reason in messages if reason is not None)
    with topics(pubsub_emulator) as paths:
        with running_job(pubsub_emulator, paths, trained_digits_model, "--message_format", message_format,
                         "--max_batch_size", "4"):
            ids = publish(pubsub_emulator, paths["input"], [(data, attributes) for data, attributes, _ in messages])
            rows = rows_of(collect(pubsub_emulator, paths["output_sub"], len(messages) - bad))
            letters = letters_of(collect(pubsub_emulator, paths["dead_sub"], bad))
    expected = {message_ref(message_id): reason for message_id, (_, _, reason) in zip(ids, messages)}
    figures = job_figures("stream_predict", expected, [message_ref(row["message_id"]) for row in rows],
                          [(letter.input_ref, letter.error_type) for letter in letters])
    # The accounting is the topics': every message published is on the output or the dead-letter topic,
    # once. The job's own counters cannot be checked here: read from the local runner while the job
    # runs, they stay at the first bundles' figures.
    assert_judged_right(figures)


def test_build_index_reads_one_row_per_duplicate_image_id(tmp_path) -> None:
    # A duplicate image_id in a warehouse is a rerun's append, not a bad row: the reader's deduplicated
    # view (retrieval.sql_queries.latest_rows_sql) keeps the newest row, which is read, indexed and
    # counted once. (build_index's own duplicate_image_id dead letter guards readers without that view.)
    from beam_jobs import build_index

    created_at = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)
    rows = wh.digits_embedding_rows("m1", count=40, method="pca", created_at=created_at)
    newer = [{**rows[n], "uri": rows[n]["uri"].replace(".png", "_rerun.png"),
              "created_at": created_at + datetime.timedelta(days=1)} for n in (4, 9)]
    uri = f"duckdb:{tmp_path / 'w.duckdb'}"
    wh.write_rows(rows + newer, uri)
    done = build_index.run(["--warehouse", uri, "--output_dir", str(tmp_path / "index")])
    assert done.counts == {"read": 40, "indexed": 40, "rejected": 0}
    assert read_dead_letters(str(tmp_path / "index")) == []
    index = ShardedIndex.load(str(tmp_path / "index"))
    indexed = {index.entry(key)["image_id"]: index.entry(key)["uri"] for key in range(index.count)}
    assert {image_id: indexed[image_id] for image_id in ("digit-0004", "digit-0009")} == {
        row["image_id"]: row["uri"] for row in newer}
