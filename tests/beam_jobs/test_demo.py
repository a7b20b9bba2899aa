"""The demo command, run once for real (a subprocess, as a user types it) on 200 digits.

Checks what a person sees: one progress line per stage and no library noise
on the terminal, numbers that match the artifacts the jobs wrote (read
through their contracts), and a report.html that is self-contained and
renders in a real headless browser. Where the Cloud SDK's Pub/Sub emulator is
installed the same run adds ``--streaming`` (a short stream of test images),
so the streaming stage costs only its own time.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from beam_jobs import demo, sql
from model_lib import report_html
from schemas import layout, prediction
from schemas.classification_metrics import EvalReport, ModelMetrics
from schemas.dataset_info import DatasetInfo
from schemas.index import IndexInfo
from schemas.publication import published_dir
from transforms import pubsub_emulator

LIMIT = 200
EPOCHS = 2
STREAM_MESSAGES = 40  # Twice the test split or so: the split repeats under new image ids.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE_LINE = re.compile(r"^\[(\d)/(\d)\] (\S+)\s+(.*)  \((\d+\.\d) s\)$")
STREAM_LINE = re.compile(r"^(\d+) images in, (\d+) predictions out, (\d+) dead letters \(\+(\d+) wake-ups\); "
                         r"latency p50 ([\d.]+) s, p95 ([\d.]+) s; windowed accuracy ([\d.]+) over (\d+) windows "
                         r"\((\d+) labeled\)$")
NOISE = re.compile(r"\bINFO\b|\bWARNING\b|tensorflow|absl|I0000|W0000|oneDNN|cuda|Traceback", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class DemoRun:
    workdir: str
    stdout: str
    stderr: str
    stages: dict[str, str]  # Stage name -> its progress line's result text.
    streaming: bool


needs_streaming = pytest.mark.skipif(pubsub_emulator.emulator_launcher() is None, reason=pubsub_emulator.MISSING)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    workdir = str(tmp_path_factory.mktemp("demo") / "work")
    streaming = pubsub_emulator.emulator_launcher() is not None
    done = subprocess.run(
        [sys.executable, "-m", "beam_jobs.cli", "demo", "--workdir", workdir, "--limit", str(LIMIT),
         "--epochs", str(EPOCHS)] + (["--streaming", "--stream_messages", str(STREAM_MESSAGES)] if streaming else []),
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    stages = {}
    for line in done.stdout.splitlines():
        match = STAGE_LINE.match(line)
        if match:
            stages[match.group(3)] = match.group(4)
    return DemoRun(workdir, done.stdout, done.stderr, stages, streaming)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in {text!r}"
    return float(match.group(1))


def test_one_progress_line_per_stage_and_no_library_noise(demo_run: DemoRun) -> None:
    want = demo.STAGES + ((demo.STREAMING_STAGE,) if demo_run.streaming else ())
    assert list(demo_run.stages) == [name for name, _ in want]
    assert not NOISE.search(demo_run.stdout), demo_run.stdout
    assert demo_run.stderr == ""
    assert "report: " in demo_run.stdout and "== train ==" in demo_run.stdout  # Summaries at the end.
    # The libraries did log: into demo.log, not onto the terminal.
    with open(os.path.join(demo_run.workdir, "demo.log")) as handle:
        assert "INFO" in handle.read()


def test_summary_numbers_match_the_artifacts(demo_run: DemoRun) -> None:
    work = demo_run.workdir
    info = DatasetInfo.read(published_dir(os.path.join(work, "dataset")))
    line = demo_run.stages["create-dataset"]
    assert info.accounting.balanced and info.accounting.read == LIMIT + len(demo.BAD_ROWS)
    assert _number(r"read (\d+)", line) == info.accounting.read
    assert _number(r"written (\d+)", line) == info.accounting.written == LIMIT
    assert _number(r"rejected (\d+)", line) == info.accounting.rejected == len(demo.BAD_ROWS)
    assert set(info.rejected) == {"missing_file", "not_an_image", "corrupt_image"}
    for split in info.split_names:
        assert _number(rf"{split} (\d+)", line) == info.counts[split].total

    metrics = ModelMetrics.read(published_dir(os.path.join(work, "model", "best")))
    line = demo_run.stages["train"]
    assert metrics.epochs_run == EPOCHS and f"{EPOCHS} epochs" in line
    assert _number(r"val accuracy ([\d.]+)", line) == pytest.approx(metrics.validation.accuracy, abs=1e-4)
    assert _number(r"test accuracy ([\d.]+)", line) == pytest.approx(metrics.test.accuracy, abs=1e-4)

    evaluation = EvalReport.read(layout.join(published_dir(os.path.join(work, "predictions")), prediction.EVAL_FILE))
    line = demo_run.stages["batch-predict"]
    assert _number(r"(\d+) predicted", line) == evaluation.count == info.counts["test"].total
    assert _number(r"accuracy ([\d.]+)", line) == pytest.approx(evaluation.accuracy, abs=1e-4)
    wrong = evaluation.count - sum(evaluation.confusion_matrix[i][i] for i in range(len(evaluation.labels)))
    assert _number(r"(\d+) wrong", line) == wrong

    count = sql.run(["--warehouse", f"duckdb:{work}/warehouse.duckdb", "--sql", "SELECT COUNT(*) AS n FROM {table}"])
    assert _number(r"(\d+) images", demo_run.stages["extract-embeddings"]) == count.rows[0][0] == LIMIT

    index = IndexInfo.read(published_dir(os.path.join(work, "index")))
    line = demo_run.stages["build-index"]
    assert _number(r"(\d+) indexed", line) == index.count == LIMIT
    assert _number(rf"recall@{index.k} ([\d.]+)", line) == pytest.approx(index.recall_at_k, abs=1e-4)
    assert f"{demo.SEARCH_QUERIES} test images" in demo_run.stages["search"]
    assert f"neighbors {demo.NEIGHBORS_K} rows" in demo_run.stages["sql"]


def _report(demo_run: DemoRun) -> str:
    with open(os.path.join(demo_run.workdir, "report.html"), encoding="utf-8") as handle:
        return handle.read()


def test_report_is_self_contained_with_every_section(demo_run: DemoRun) -> None:
    page = _report(demo_run)
    for section in report_html.SECTION_IDS:
        assert f'<section id="{section}">' in page
    assert (f'<section id="{report_html.STREAMING_SECTION_ID}">' in page) == demo_run.streaming
    for text in ("Rejections by reason", "missing_file", "Confusion matrix", "Per-class metrics", "Right (",
                 "Wrong (", "recall@", "queries/s", "label_outliers", "near_duplicates", "neighbors", "<svg"):
        assert text in page, text
    # Nothing is fetched from anywhere: no URL, no linked stylesheet or script, every image inlined.
    assert not re.search(r"https?://|<link|<script|url\(|file:", page)
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    search_hits = demo.SEARCH_QUERIES * (demo.SEARCH_K + 1)  # Queries and their hits.
    assert len(sources) >= search_hits + demo.NEIGHBORS_K
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.size == (64, 64)
    rows = sum(1 for name in os.listdir(published_dir(os.path.join(demo_run.workdir, "predictions")))
               if name.startswith(prediction.PREDICTIONS_PREFIX))
    assert rows >= 1
    assert page.count('<figure class="wrong">') == min(demo.PREDICTION_EXAMPLES, _wrong_predictions(demo_run))


def _wrong_predictions(demo_run: DemoRun) -> int:
    evaluation = EvalReport.read(layout.join(published_dir(os.path.join(demo_run.workdir, "predictions")),
                                             prediction.EVAL_FILE))
    return evaluation.count - sum(evaluation.confusion_matrix[i][i] for i in range(len(evaluation.labels)))


def _stream_line(demo_run: DemoRun) -> re.Match:
    match = STREAM_LINE.match(demo_run.stages["stream-predict"])
    assert match, demo_run.stages["stream-predict"]
    return match


@needs_streaming
def test_streaming_predicts_every_image_once_and_scores_the_late_labels_in_windows(demo_run: DemoRun) -> None:
    images, predictions, letters, wake_ups, p50, p95, accuracy, windows, labeled = _stream_line(demo_run).groups()
    assert int(images) == int(predictions) == int(labeled) == STREAM_MESSAGES
    assert int(letters) == 0 and int(wake_ups) >= 1
    assert 0 < float(p50) <= float(p95) < demo.STREAM_COLLECT_TIMEOUT_S
    assert int(windows) >= 1
    # The same model on the same test images as batch-predict: the windows' accuracy is batch-predict's
    # on the streamed selection (the split repeated), give or take an image decoded on another path.
    rows = demo.stream_selection(_prediction_rows(demo_run), STREAM_MESSAGES)
    batch = sum(row[prediction.LABEL] == row[prediction.TRUE_LABEL] for row in rows) / len(rows)
    assert float(accuracy) == pytest.approx(batch, abs=2 / STREAM_MESSAGES)
    page = _report(demo_run)
    section = page[page.index(f'<section id="{report_html.STREAMING_SECTION_ID}">'):]
    assert section.count("<tr><td>") == 1 + 4 + int(windows)  # Counts, latency percentiles + max, windows.
    assert f"<td>{STREAM_MESSAGES}</td>" in section and "End-to-end latency" in section


def _prediction_rows(demo_run: DemoRun) -> list[dict]:
    rows = []
    run_dir = published_dir(os.path.join(demo_run.workdir, "predictions"))
    for path in sorted(glob.glob(prediction.jsonl_predictions_pattern(run_dir))):
        with open(path) as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return sorted(rows, key=lambda row: row[prediction.URI])


def test_streaming_without_the_pubsub_emulator_fails_in_one_line_before_running_anything(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # No gcloud there.
    workdir = tmp_path / "work"
    assert demo.main(["--workdir", str(workdir), "--streaming"]) == 3
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--streaming" in error and "gcloud" in error
    assert not workdir.exists()


def test_a_non_empty_workdir_needs_overwrite(demo_run: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--workdir", demo_run.workdir]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--overwrite" in error


def test_a_failing_stage_ends_the_demo_in_one_error_and_the_log_keeps_the_traceback(
        tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "digits").write_text("a file where make-sample-data needs a directory\n")
    assert demo.main(["--workdir", str(tmp_path), "--overwrite"]) == 1
    out, err = capfd.readouterr()
    assert out.splitlines()[-1].startswith("[1/8] make-sample-data") and out.endswith("FAILED\n")
    assert err.startswith("vision-pipelines demo: error: ") and "Traceback" not in err
    assert "Traceback" in (tmp_path / "demo.log").read_text()
    assert not (tmp_path / "report.html").exists()


def test_a_misspelled_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--workdir", "x", "--verbos"])
    assert exit_info.value.code == 2
    assert "--verbos" in capsys.readouterr().err


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_report_renders_in_headless_chromium(demo_run: DemoRun, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser, driver_path = _chromium()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1300,2000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get("file://" + os.path.join(demo_run.workdir, "report.html"))
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= demo.SEARCH_QUERIES * (demo.SEARCH_K + 1)
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
        assert broken == 0
        headings = [element.text for element in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings[:3] == ["Stages", "Dataset", "Training"] and "Search results" in headings
        assert ("Streaming" in headings) == demo_run.streaming
        if demo_run.streaming:
            windows = driver.find_elements(By.CSS_SELECTOR, "#streaming table.windows tbody tr")
            assert len(windows) == int(_stream_line(demo_run).group(8))
            assert driver.find_element(By.CSS_SELECTOR, "#streaming svg.chart").size["width"] > 0
        assert driver.find_element(By.CSS_SELECTOR, "svg.chart").size["width"] > 0
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1300, min(height + 50, 8000))
        screenshot = tmp_path / "report.png"
        assert driver.save_screenshot(str(screenshot))
        with Image.open(screenshot) as image:
            assert image.width >= 1000 and image.height >= 1000
    finally:
        driver.quit()
