"""Every job builds its Dataflow job offline: ``--runner DataflowRunner --dry_run=True``.

Each case runs the job's ``main`` with the exact dry-run flags of the README on
small local inputs. DataflowRunner builds the whole job (portable graph,
Docker environment, the setup.py sdist staged as ``workflow.tar.gz``) and
submits nothing; the job must then touch no gs:// location (``gs://b/tmp``
is unreachable here: a contact shows as minutes of retries, so every case has
a time limit well under Beam's 120 s retry deadline), publish nothing, write
nothing, and say in one line that the job was built. The job Beam built is
read from the real runner (a spy records what ``run_pipeline`` returned).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Any, Callable

import pytest
from apache_beam.options.pipeline_options import SetupOptions
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
from apache_beam.runners.dataflow.internal import apiclient

from model_lib import sample_data
from schemas.publication import POINTER_FILE
from tests.fixtures import warehouses as wh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATAFLOW_FLAGS = [
    "--runner", "DataflowRunner", "--dry_run=True", "--project", "p", "--region", "r",
    "--temp_location", "gs://b/tmp", "--no_auth", "--setup_file", "setup.py",
]
DRY_RUN_LINE = "Dataflow job built (dry run)"
# Beam retries an unreachable GCS call for 120 s; building a job here takes ~5-25 s.
MAX_SECONDS = 90
WAREHOUSE_ROWS = 40
CREATED_AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Case:
    """One job's dry run: its argv, where it would write, and steps its Dataflow job must hold."""

    argv: list[str]
    outputs: list[str]
    steps: list[str]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> sample_data.SampleData:
    return sample_data.write_digits(str(tmp_path_factory.mktemp("dry_run_digits")), size=32, limit=40)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"duckdb:{tmp_path_factory.mktemp('dry_run_warehouse')}/embeddings.duckdb"
    wh.write_rows(wh.digits_embedding_rows("m1", count=WAREHOUSE_ROWS, method="pixels", created_at=CREATED_AT), uri)
    return uri


@pytest.fixture(scope="module")
def index_dir(warehouse: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real published index (local runner) for near_duplicates to read."""
    from beam_jobs import build_index

    out = str(tmp_path_factory.mktemp("dry_run_index") / "index")
    assert build_index.main(["--warehouse", warehouse, "--output_dir", out, "--num_shards", "1"]) == 0
    return out


def create_dataset_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    digits = request.getfixturevalue("digits")
    out = f"{tmp}/dataset"
    return Case(
        ["--manifest", digits.manifest, "--labels_file", digits.labels_file, "--output_dir", out,
         "--image_size", "32", "--channels", "1", "--image_format", "png"],
        [out],
        ["CreateDataset/ReadManifests", "CreateDataset/LoadImages", "CreateDataset/WriteSplits",
         "CreateDataset/AnalyzeTrainSplit", "CreateDataset/WriteDatasetInfo"],
    )


def train_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    dataset = request.getfixturevalue("digits_dataset")
    out = f"{tmp}/model"
    return Case(["--dataset_dir", dataset.dataset_dir, "--output_dir", out, "--epochs", "1"], [out],
                ["CreateTrials", "Train/RunTrials", "Train/PublishBestTrial", "WriteDeadLetters"])


def batch_predict_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    model, digits = request.getfixturevalue("trained_digits_model"), request.getfixturevalue("digits")
    out, artifacts = f"{tmp}/predictions", f"{tmp}/artifacts"
    return Case(["--model_dir", model, "--input", digits.manifest, "--output", out, "--artifacts_dir", artifacts],
                [out, artifacts], ["ReadInputs", "BatchPredict/PredictImages", "Evaluate", "WriteDeadLetters"])


def extract_embeddings_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    model, digits = request.getfixturevalue("trained_digits_model"), request.getfixturevalue("digits")
    warehouse, artifacts = f"{tmp}/warehouse", f"{tmp}/artifacts"
    return Case(["--model_dir", model, "--input", digits.manifest, "--warehouse", f"duckdb:{warehouse}/e.duckdb",
                 "--artifacts_dir", artifacts],
                [warehouse, artifacts], ["ReadInputs", "ExtractEmbeddings", "WriteEmbeddings", "WriteDeadLetters"])


def build_index_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    out = f"{tmp}/index"
    return Case(["--warehouse", request.getfixturevalue("warehouse"), "--output_dir", out], [out],
                ["ReadEmbeddings", "BuildIndex", "WriteDeadLetters"])


def near_duplicates_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    pairs = f"{tmp}/pairs"
    return Case(["--index_dir", request.getfixturevalue("index_dir"), "--warehouse", f"parquet:{pairs}"], [pairs],
                ["FindNearDuplicates", "WritePairs"])


def stream_predict_case(request: pytest.FixtureRequest, tmp: str) -> Case:
    return Case(["--model_dir", request.getfixturevalue("trained_digits_model"),
                 "--input_subscription", "projects/proj-p/subscriptions/images",
                 "--output_topic", "projects/proj-p/topics/predictions",
                 "--dead_letter_topic", "projects/proj-p/topics/predictions-dlq"],
                [], ["ReadImageMessages", "StreamPredict/PredictImages", "PublishPredictions", "PublishDeadLetters"])


JOBS: dict[str, Callable[[pytest.FixtureRequest, str], Case]] = {
    "create_dataset": create_dataset_case,
    "train": train_case,
    "batch_predict": batch_predict_case,
    "extract_embeddings": extract_embeddings_case,
    "build_index": build_index_case,
    "near_duplicates": near_duplicates_case,
    "stream_predict": stream_predict_case,
}


@pytest.fixture
def built_jobs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the real DataflowRunner returned from each ``run_pipeline`` call in the test."""
    results: list[Any] = []
    real = DataflowRunner.run_pipeline

    def recording(self: DataflowRunner, pipeline: Any, options: Any) -> Any:
        result = real(self, pipeline, options)
        results.append(result)
        return result

    monkeypatch.setattr(DataflowRunner, "run_pipeline", recording)
    return results


def files_under(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


@pytest.mark.parametrize("job", list(JOBS))
def test_dry_run_builds_the_dataflow_job_and_writes_nothing(
    job: str, request: pytest.FixtureRequest, tmp_path: Any, built_jobs: list[Any], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib

    module = importlib.import_module(f"beam_jobs.{job}")
    case = JOBS[job](request, str(tmp_path))
    capsys.readouterr()
    monkeypatch.chdir(ROOT)  # --setup_file setup.py, as the README's command gives it.
    started = time.monotonic()
    code = module.main(case.argv + DATAFLOW_FLAGS)
    seconds = time.monotonic() - started
    out = capsys.readouterr().out

    assert code == 0
    assert seconds < MAX_SECONDS, f"{job} took {seconds:.0f}s: it tried to reach gs://b/tmp or the service"
    dry_lines = [line for line in out.splitlines() if DRY_RUN_LINE in line]
    assert len(dry_lines) == 1 and "project p, region r" in dry_lines[0]
    for output in case.outputs:
        assert not os.path.exists(os.path.join(output, POINTER_FILE))
        assert files_under(output) == [], f"{job} wrote into {output}"

    [result] = built_jobs
    job_built = result.job
    assert isinstance(job_built, apiclient.Job)
    transforms = {t.unique_name for t in job_built.proto_pipeline.components.transforms.values()}
    missing = [step for step in case.steps if step not in transforms]
    assert not missing, f"{job}: steps {missing} not in the Dataflow job ({sorted(transforms)[:30]} ...)"
    assert job_built.options.view_as(SetupOptions).setup_file == os.path.join(ROOT, "setup.py")
    environments = list(job_built.proto_pipeline.components.environments.values())
    assert environments and all(env.urn == "beam:env:docker:v1" for env in environments)
    staged = {dep.role_payload for env in environments for dep in env.dependencies}
    assert any(b"workflow.tar.gz" in payload for payload in staged), "the setup.py sdist is not staged"
    assert job_built.google_cloud_options.temp_location.startswith("gs://b/tmp/")  # Beam adds the job name.
    assert job_built.proto.type_.name == ("JOB_TYPE_STREAMING" if job == "stream_predict" else "JOB_TYPE_BATCH")


@pytest.mark.parametrize("flags, fragment", [
    (["--runner", "DataflowRunner", "--dry_run=False"], "Beam reads every value as true"),
    (["--dry_run=True"], "only applies to --runner DataflowRunner"),
])
def test_a_dry_run_flag_that_would_not_mean_what_it_says_is_a_usage_error(
    flags: list[str], fragment: str, warehouse: str, tmp_path: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    from beam_jobs import build_index

    out = str(tmp_path / "index")
    assert build_index.main(["--warehouse", warehouse, "--output_dir", out, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err
    assert not os.path.exists(out)
