"""A batch job launched the way a Dataflow Flex Template launches it publishes its output with no help.

A Flex Template launch runs the job's code to build the pipeline, submits it
and returns; nothing after ``pipeline.run()`` runs in the launcher. Each
job's ``start`` is exactly that part of ``run``. Here it submits to Beam's
PortableRunner with an embedded job service (``--job_endpoint embed``),
whose ``run()`` returns while the job is still running, as Dataflow's does;
the test then waits for the job itself and finds the output published
(``CURRENT`` names a complete run with ``_SUCCESS``), since the pipeline
published it. A failed in-pipeline check (create_dataset ``--strict``) fails
the job, publishes nothing and leaves the previous output current; the
waiting launcher (``run``/``main``) still turns the portable runner's error
back into the job's own exception and exit status.
"""

from __future__ import annotations

import csv
import os

import duckdb
import numpy as np
import pytest

from beam_jobs import batch_predict, build_index, create_dataset, extract_embeddings
from model_lib import sample_data
from retrieval.index_tuning import TargetRecallNotMet
from schemas import layout, prediction, publication
from schemas.dataset_info import DatasetInfo
from schemas.embedding import EMBEDDINGS_TABLE
from schemas.index import IndexInfo
from schemas.publication import published_dir, read_pointer
from schemas.warehouse import parse_warehouse_uri
from tests.beam_jobs.test_build_index import write_parquet_warehouse
from tests.fixtures import warehouses as wh
from transforms.index_building import UnbalancedAccountingError, check_accounting
from transforms.publishing import Launch

pytestmark = pytest.mark.timeout(600)

# What Dataflow's runner does, in this process: run() submits and returns a running job.
FLEX_LIKE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
IMAGE_FLAGS = ["--image_size", "16", "--channels", "1", "--image_format", "png"]
TERMINAL = ("DONE", "FAILED", "CANCELLED")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("flex_digits")), limit=60)


def assert_published_by_the_pipeline(started: Launch) -> None:
    """Waits for the job as the test (not the launcher) and checks each run is current and complete."""
    assert str(started.result.state) not in TERMINAL  # start returned while the job was still running.
    assert started.result.wait_until_finish() == "DONE"
    for run in started.runs:
        assert read_pointer(run.output_dir) == run.run_name
        assert os.path.exists(os.path.join(run.run_dir, publication.SUCCESS_FILE))


def test_create_dataset_publishes_itself_and_removes_its_scratch_space(digits, tmp_path):
    out, temp = str(tmp_path / "dataset"), tmp_path / "temp"
    started = create_dataset.start(["--manifest", digits.manifest, "--output_dir", out, *IMAGE_FLAGS,
                                    f"--temp_location={temp}", *FLEX_LIKE])
    assert_published_by_the_pipeline(started)
    run_dir = published_dir(out)
    for name in (layout.DATASET_INFO_FILE, layout.LABELS_FILE, layout.SCHEMA_FILE, layout.TRANSFORM_FN_DIR):
        assert os.path.exists(os.path.join(run_dir, name)), name
    info = DatasetInfo.read(run_dir)
    assert info.accounting.balanced and info.accounting.read == 60
    assert os.listdir(temp / create_dataset.TFT_TEMP_DIR) == []  # tf.Transform's scratch went before publishing.


def test_a_strict_dataset_with_warnings_publishes_nothing_and_keeps_the_previous_one(digits, tmp_path, capsys):
    rows = list(csv.reader(open(digits.manifest)))
    small = tmp_path / "six.csv"
    small.write_text("".join(f"{uri},{label}\n" for uri, label in [r for r in rows if r[1] in "01"][:6]))
    out = str(tmp_path / "dataset")
    create_dataset.run(["--manifest", digits.manifest, "--output_dir", out, *IMAGE_FLAGS, "--skip_analysis"])
    previous = read_pointer(out)
    strict = ["--manifest", str(small), "--output_dir", out, *IMAGE_FLAGS, "--skip_analysis", "--strict",
              "--overwrite", *FLEX_LIKE]

    started = create_dataset.start(strict)
    with pytest.raises(RuntimeError, match="DatasetWarningsError"):  # What the job's own failure looks like.
        started.result.wait_until_finish()
    assert read_pointer(out) == previous
    assert not os.path.exists(os.path.join(started.runs[0].run_dir, publication.SUCCESS_FILE))

    # The launcher that waits turns the runner's error back into the job's exit status and warnings.
    assert create_dataset.main(strict) == 1
    err = capsys.readouterr().err
    assert "with --strict; nothing was published" in err and "warning [few_images_for_label]" in err
    assert read_pointer(out) == previous


def test_build_index_publishes_itself_after_its_accounting_check(tmp_path):
    uri = f"duckdb:{tmp_path / 'w.duckdb'}"
    rows = wh.v1_rows()
    wh.write_rows(rows, uri)
    out = str(tmp_path / "index")
    started = build_index.start(["--warehouse", uri, "--output_dir", out, "--num_shards", "2", *FLEX_LIKE])
    assert_published_by_the_pipeline(started)
    info = IndexInfo.read(published_dir(out))
    assert info.count + info.rejected == len(rows)
    assert any(name.startswith(layout.REJECTED_PREFIX) for name in os.listdir(published_dir(out)))
    # The check the publishing step ran, on this index: a row more read than accounted for refuses it.
    check_accounting(read=[len(rows)], index_info=[info])
    with pytest.raises(UnbalancedAccountingError) as unbalanced:
        check_accounting(read=[len(rows) + 1], index_info=[info])
    remote = RuntimeError(f"Pipeline failed in state FAILED: ...\ntransforms.index_building.UnbalancedAccountingError: "
                          f"{unbalanced.value} [while running 'PublishIndex/PublishRuns']\n")
    with pytest.raises(UnbalancedAccountingError, match=rf"^read {len(rows) + 1} != indexed {info.count} \+ rejected "
                                                        rf"{info.rejected}; the index was not published$"):
        build_index.explain_failure(remote)


def test_build_index_that_misses_its_recall_target_publishes_nothing(tmp_path):
    """60,000 uniform directions in 32-d do not cluster: the bounded sweep cannot reach the target (~1 min)."""
    out = str(tmp_path / "index")
    small = f"duckdb:{tmp_path / 'w.duckdb'}"
    wh.write_rows(wh.v1_rows(), small)
    assert build_index.main(["--warehouse", small, "--output_dir", out]) == 0
    previous = read_pointer(out)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((60_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    uniform = write_parquet_warehouse(str(tmp_path / "uniform"), vectors)

    started = build_index.start(["--warehouse", uniform, "--output_dir", out, "--overwrite", *FLEX_LIKE])
    with pytest.raises(RuntimeError, match="TargetRecallNotMet") as failed:
        started.result.wait_until_finish()
    assert read_pointer(out) == previous
    assert not os.path.exists(os.path.join(started.runs[0].run_dir, publication.SUCCESS_FILE))
    # What the waiting launcher raises (and main turns into exit status 1) from the runner's error.
    with pytest.raises(TargetRecallNotMet, match=r"^no search setting reached recall@10 >= 0.95 .*Lower --target_recall"):
        build_index.explain_failure(failed.value)


def test_batch_predict_and_extract_embeddings_publish_themselves(trained_digits_model, digits, tmp_path):
    out = str(tmp_path / "predictions")
    started = batch_predict.start(["--model_dir", trained_digits_model, "--input", digits.manifest, "--output", out,
                                   *FLEX_LIKE])
    assert_published_by_the_pipeline(started)
    run_dir = published_dir(out)
    assert os.path.exists(os.path.join(run_dir, prediction.EVAL_FILE))
    lines = [line for name in os.listdir(run_dir) if name.startswith(prediction.PREDICTIONS_PREFIX)
             for line in open(os.path.join(run_dir, name)).read().splitlines()]
    assert len(lines) == 60

    warehouse = str(tmp_path / "embeddings.duckdb")
    started = extract_embeddings.start(["--model_dir", trained_digits_model, "--input", digits.manifest,
                                        "--warehouse", f"duckdb:{warehouse}", *FLEX_LIKE])
    assert_published_by_the_pipeline(started)
    assert table_size(f"duckdb:{warehouse}") == 60  # The artifacts run was published after the table load.


def table_size(uri: str) -> int:
    warehouse = parse_warehouse_uri(uri, EMBEDDINGS_TABLE.default_table)
    with duckdb.connect(warehouse.location, read_only=True) as connection:
        return connection.execute(f'SELECT COUNT(*) FROM "{warehouse.table}"').fetchall()[0][0]
