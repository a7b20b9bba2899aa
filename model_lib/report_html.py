"""The demo's ``report.html``: one self-contained page a person can open from disk.

Everything the page shows is passed in as the typed contracts the jobs wrote
(``DatasetInfo``, ``Leaderboard``, ``ModelMetrics``, ``EvalReport``,
``IndexInfo``, search hits, SQL ``QueryResult``s); this module only lays them
out. Images are inlined as ``data:`` URIs and the styling is inline, so the
file opens without a server or a network (no external URL anywhere), and
charts are inline SVG drawn here from the numbers, not PNG files to copy.
No Beam and no TensorFlow: rendering needs the standard library and Pillow.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from schemas.classification_metrics import ClassificationMetrics, EvalReport, ModelMetrics
from schemas.dataset_info import DatasetInfo
from schemas.index import IndexInfo
from schemas.leaderboard import Leaderboard

if TYPE_CHECKING:
    from retrieval.searcher import SearchHit
    from retrieval.sql_queries import QueryResult

THUMBNAIL_SIDE = 64  # Pixels a thumbnail is stored at; digits (32 px) are shown 2x, pixelated.
SECTION_IDS = ("stages", "dataset", "training", "evaluation", "predictions", "index", "search", "sql")
STREAMING_SECTION_ID = "streaming"  # Only when the demo ran with --streaming.
LATENCY_PERCENTILES = (50, 95, 99)
HISTOGRAM_BINS = 12


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One stage of the demo: what ran, the command a user would type, how long it took."""

    name: str
    command: str
    seconds: float
    detail: str


@dataclasses.dataclass(frozen=True)
class PredictionExample:
    """A predicted image with its true label (from a batch-predict row)."""

    uri: str
    true_label: str | None
    label: str
    score: float

    @property
    def correct(self) -> bool:
        return self.true_label == self.label


@dataclasses.dataclass(frozen=True)
class SearchExample:
    """A query image and the hits the search command returned for it."""

    query_uri: str
    query_image_id: str
    query_label: str | None
    hits: Sequence["SearchHit"]


@dataclasses.dataclass(frozen=True)
class SqlSection:
    """A named query's answer, with the command that produced it."""

    title: str
    command: str
    result: "QueryResult"
    explanation: str


@dataclasses.dataclass(frozen=True)
class StreamingWindow:
    """One evaluation report of stream_predict: the late-labeled predictions scored in one pane."""

    count: int
    accuracy: float


@dataclasses.dataclass(frozen=True)
class StreamingRecord:
    """What the demo's streaming stage pushed through stream_predict and read back.

    Attributes:
      messages_in: Image messages published.
      predictions_out: Prediction messages read back (one per image when nothing is lost or duplicated).
      dead_letters: Dead letters of the published images (0 for good images).
      wake_ups: Malformed wake-up messages the local runner needed (each dead-lettered, not counted above).
      latencies_s: End-to-end latency of every prediction, seconds.
      windows: Windowed accuracy, in the order the job reported it.
      command: The stream-predict command that ran.
    """

    messages_in: int
    predictions_out: int
    dead_letters: int
    wake_ups: int
    latencies_s: Sequence[float]
    windows: Sequence[StreamingWindow]
    command: str


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, as numpy's default) of non-empty ``values``."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """Everything ``render`` lays out.

    Attributes:
      thumbnails: ``data:`` URI per image URI, for every URI the page shows
        (see ``thumbnail_data_uri``); a URI without one is shown as text.
    """

    stages: Sequence[StageRecord]
    dataset: DatasetInfo
    leaderboard: Leaderboard
    model_metrics: ModelMetrics
    evaluation: EvalReport
    predictions: Sequence[PredictionExample]
    index: IndexInfo | None
    searches: Sequence[SearchExample]
    sql: Sequence[SqlSection]
    thumbnails: dict[str, str]
    total_seconds: float
    streaming: StreamingRecord | None = None


def thumbnail_data_uri(image_bytes: bytes, side: int = THUMBNAIL_SIDE) -> str:
    """A PNG ``data:`` URI of the image scaled to fit ``side`` pixels (small images are enlarged, pixelated).

    Re-encoding through Pillow bounds the page size whatever the source format
    and size, and the browser then never decodes a user's original file.
    """
    with Image.open(io.BytesIO(image_bytes)) as image:
        image = image.convert("RGB" if image.mode not in ("L", "LA") else "L")
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
        buffer = io.BytesIO()
        image.resize(size, resample).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    """Cells are HTML already (escape values with ``_e``)."""
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _thumb(report: DemoReport, uri: str, caption: str = "", css_class: str = "") -> str:
    data = report.thumbnails.get(uri)
    image = (f'<img class="thumb" src="{data}" alt="{_e(uri)}" title="{_e(uri)}">' if data
             else f'<span class="missing">{_e(uri)}</span>')
    return f'<figure class="{css_class}">{image}<figcaption>{caption}</figcaption></figure>'


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


def _stages(report: DemoReport) -> str:
    rows = [[_e(stage.name), _e(stage.detail), f"{stage.seconds:.1f} s", f"<code>{_e(stage.command)}</code>"]
            for stage in report.stages]
    return _section("stages", "Stages", _table(["stage", "result", "time", "command"], rows)
                    + f"<p>Total {report.total_seconds:.1f} s.</p>")


def _dataset(report: DemoReport) -> str:
    info = report.dataset
    accounting = info.accounting
    balance = "balanced" if accounting.balanced else "NOT balanced"
    parts = [f"<p>read {accounting.read} = written {accounting.written} + rejected {accounting.rejected} "
             f"({balance}); {len(info.labels)} labels; images {info.image_size}x{info.image_size}, "
             f"{info.channels} channel(s), stored as {_e(info.image_format)}; fingerprint "
             f"<code>{_e(info.fingerprint[:16])}</code></p>"]
    header = ["split", "images", *info.labels]
    rows = [[_e(split), _e(info.counts[split].total),
             *(_e(info.counts[split].labels.get(label, 0)) for label in info.labels)] for split in info.split_names]
    parts.append(_table(header, rows))
    parts.append("<h3>Rejections by reason</h3>")
    if info.rejected or info.rejected_ratings:
        reasons = [[_e(reason), _e(count)] for reason, count in sorted(info.rejected.items())]
        reasons += [[_e(f"rating rows: {reason}"), _e(count)] for reason, count in sorted(info.rejected_ratings.items())]
        parts.append(_table(["reason", "count"], reasons, "rejections"))
    else:
        parts.append("<p>None.</p>")
    if info.warnings:
        parts.append("<h3>Warnings</h3><ul>" + "".join(
            f"<li><code>{_e(w.code)}</code> {_e(w.message)}</li>" for w in info.warnings) + "</ul>")
    return _section("dataset", "Dataset", "".join(parts))


def _line_chart(title: str, series: dict[str, list[float]], width: int = 360, height: int = 200) -> str:
    """An inline SVG line chart of one value per epoch per series."""
    values = [v for points in series.values() for v in points]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    epochs = max(len(points) for points in series.values())
    left, right, top, bottom = 48, 10, 24, 28
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (plot_w * i / (epochs - 1) if epochs > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - low) / span)

    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    lines, legend = [], []
    for n, (name, points) in enumerate(sorted(series.items())):
        color = colors[n % len(colors)]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(points))
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        legend.append(f'<text x="{left + 8 + 110 * n}" y="14" fill="{color}" font-size="12">{_e(name)}</text>')
    axes = (f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#888"/>'
            f'<text x="4" y="{top + 10}" font-size="11">{high:.3g}</text>'
            f'<text x="4" y="{top + plot_h}" font-size="11">{low:.3g}</text>'
            f'<text x="{left}" y="{height - 8}" font-size="11">epoch 1</text>'
            f'<text x="{left + plot_w - 50}" y="{height - 8}" font-size="11">epoch {epochs}</text>')
    return (f'<svg class="chart" role="img" aria-label="{_e(title)}" width="{width}" height="{height}" '
            f'><title>{_e(title)}</title>{axes}{"".join(lines)}'
            f'{"".join(legend)}</svg>')


def _training(report: DemoReport) -> str:
    board, metrics = report.leaderboard, report.model_metrics
    history = metrics.history
    charts = []
    for name in sorted(key for key in history if not key.startswith("val_") and key != "learning_rate"):
        series = {f"train {name}": history[name]}
        if f"val_{name}" in history:
            series[f"validation {name}"] = history[f"val_{name}"]
        charts.append(_line_chart(name, series))
    rows = []
    for rank, trial in enumerate(board.trials, start=1):
        test = (f"{trial.test['accuracy']:.4f}" if trial.test else "no test split")
        rows.append([_e(rank), _e(trial.trial_id), _e(trial.hparams.get("arch", "")),
                     _number(trial.validation["accuracy"]), test, _e(trial.epochs_run), f"{trial.train_seconds:.0f} s"])
    decision = board.publication
    published = (f"<p>Best trial {_e(board.best_trial)} {'published to best/' if decision.published else 'not published'}"
                 f" ({_e(decision.reason)}); best/ holds model_version <code>{_e(decision.model_version or '')}</code>.</p>"
                 ) if decision else ""
    test = metrics.test
    test_line = (f"test accuracy {test.accuracy:.4f}, macro F1 {test.macro_f1:.4f} on {test.count} images"
                 if test else "no test split")
    body = (f"<p>{metrics.epochs_run} epochs (best epoch {metrics.best_epoch}), {metrics.train_seconds:.0f} s; "
            f"validation accuracy {metrics.validation.accuracy:.4f}; {test_line}.</p>"
            f'<div class="charts">{"".join(charts)}</div>'
            + _table(["rank", "trial", "arch", "val accuracy", "test accuracy", "epochs", "time"], rows) + published)
    return _section("training", "Training", body)


def _confusion_matrix(metrics: ClassificationMetrics) -> str:
    peak = max((n for row in metrics.confusion_matrix for n in row), default=0) or 1
    header = "".join(f"<th>{_e(label)}</th>" for label in metrics.labels)
    rows = []
    for label, row in zip(metrics.labels, metrics.confusion_matrix):
        cells = []
        for n, (predicted, count) in enumerate(zip(metrics.labels, row)):
            shade = 0.1 + 0.9 * count / peak if count else 0
            color = "30,120,200" if predicted == label else "220,60,40"
            cells.append(f'<td style="background: rgba({color},{shade:.2f})" title="true {_e(label)}, predicted '
                         f'{_e(predicted)}">{count}</td>')
        rows.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}</tr>")
    return (f'<table class="confusion"><caption>rows: true label, columns: predicted</caption>'
            f"<thead><tr><th></th>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _evaluation(report: DemoReport) -> str:
    evaluation = report.evaluation
    summary = (f"<p>batch-predict on {evaluation.count} images: accuracy {evaluation.accuracy:.4f}, macro "
               f"precision {evaluation.macro_precision:.4f}, macro recall {evaluation.macro_recall:.4f}, macro F1 "
               f"{evaluation.macro_f1:.4f} (model_version <code>{_e(evaluation.model_version)}</code>).</p>")
    rows = [[_e(label), _number(m.precision), _number(m.recall), _number(m.f1), _e(m.support)]
            for label, m in evaluation.per_class.items()]
    body = (summary + '<div class="side">' + "<div><h3>Confusion matrix</h3>" + _confusion_matrix(evaluation)
            + "</div><div><h3>Per-class metrics</h3>"
            + _table(["label", "precision", "recall", "F1", "support"], rows, "per-class") + "</div></div>")
    return _section("evaluation", "Evaluation", body)


def _predictions(report: DemoReport) -> str:
    right = [p for p in report.predictions if p.correct]
    wrong = [p for p in report.predictions if not p.correct]

    def gallery(examples: Sequence[PredictionExample], css_class: str) -> str:
        if not examples:
            return "<p>None.</p>"
        return '<div class="gallery">' + "".join(
            _thumb(report, p.uri, f"true {_e(p.true_label)} &rarr; {_e(p.label)} ({p.score:.2f})", css_class)
            for p in examples) + "</div>"

    body = (f"<h3>Right ({len(right)} shown)</h3>{gallery(right, 'right')}"
            f"<h3>Wrong ({len(wrong)} shown)</h3>{gallery(wrong, 'wrong')}")
    return _section("predictions", "Sample predictions", body)


def _index(report: DemoReport) -> str:
    info = report.index
    if info is None:
        return _section("index", "Index", "<p>No index was built.</p>")
    body = (f'<p class="index-point">recall@{info.k} <b>{info.recall_at_k:.4f}</b> (target {info.target_recall}) at '
            f"<b>{info.qps:.0f}</b> queries/s, measured on {info.query_sample_size} held-out queries.</p>"
            f"<p>{info.count} vectors of dimension {info.dimension} in {info.num_shards} shard(s), "
            f"{info.rejected} rejected; search settings {_e(info.search.to_dict())}; built in "
            f"{info.build_seconds:.1f} s, tuned in {info.tuning_seconds:.1f} s; model_version "
            f"<code>{_e(info.model_version)}</code>; ScaNN {_e(info.scann_version)}.</p>")
    return _section("index", "Index", body)


def _search(report: DemoReport) -> str:
    if not report.searches:
        return _section("search", "Search", "<p>No search was run.</p>")
    parts = []
    for example in report.searches:
        hits = "".join(
            _thumb(report, hit.uri, f"{_e(hit.label)} &middot; {hit.score:.3f}"
                   + (" (the query)" if hit.image_id == example.query_image_id else ""),
                   "hit same" if hit.label == example.query_label else "hit other")
            for hit in example.hits)
        parts.append('<div class="search-row">' + _thumb(report, example.query_uri,
                                                          f"query, label {_e(example.query_label)}", "query")
                     + f'<div class="gallery">{hits}</div></div>')
    return _section("search", "Search results", "".join(parts))


def _cell(report: DemoReport, column: str, value: Any) -> str:
    if column == "uri" or column.startswith("uri_"):
        return _thumb(report, str(value), _e(str(value).rsplit("/", 1)[-1]))
    if column == "image_id" or column.startswith("image_id_"):
        return f'<code title="{_e(value)}">{_e(str(value)[:12])}</code>'
    if column == "embedding" or isinstance(value, (list, tuple)):
        return _e(f"[{len(value)} values]")
    return _number(value)


def _sql(report: DemoReport) -> str:
    parts = []
    for section in report.sql:
        result = section.result
        rows = [[_cell(report, column, value) for column, value in zip(result.columns, row)] for row in result.rows]
        table = _table(result.columns, rows, "sql") if rows else "<p>No rows.</p>"
        parts.append(f"<h3>{_e(section.title)}</h3><p>{_e(section.explanation)}</p>"
                     f"<p><code>{_e(section.command)}</code></p>{table}")
    return _section("sql", "SQL over the embeddings", "".join(parts))


def _histogram(title: str, values: Sequence[float], bins: int = HISTOGRAM_BINS, width: int = 420,
               height: int = 200) -> str:
    """An inline SVG histogram of ``values`` (seconds) in ``bins`` equal-width bins."""
    low, high = min(values), max(values)
    step = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / step), bins - 1)] += 1
    left, right, top, bottom = 40, 10, 24, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w, tallest = plot_w / bins, max(counts)
    bars = "".join(
        f'<rect x="{left + i * bar_w + 1:.1f}" y="{top + plot_h * (1 - count / tallest):.1f}" '
        f'width="{bar_w - 2:.1f}" height="{plot_h * count / tallest:.1f}" fill="#1f77b4">'
        f"<title>{low + i * step:.3f}-{low + (i + 1) * step:.3f} s: {count}</title></rect>"
        for i, count in enumerate(counts))
    axes = (f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>'
            f'<text x="4" y="{top + 10}" font-size="11">{tallest}</text>'
            f'<text x="{left}" y="{height - 8}" font-size="11">{low:.2f} s</text>'
            f'<text x="{left + plot_w - 50}" y="{height - 8}" font-size="11">{high:.2f} s</text>'
            f'<text x="{left}" y="14" font-size="12">{_e(title)}</text>')
    return (f'<svg class="chart" role="img" aria-label="{_e(title)}" width="{width}" height="{height}">'
            f"<title>{_e(title)}</title>{axes}{bars}</svg>")


def _streaming(stream: StreamingRecord) -> str:
    latencies = list(stream.latencies_s)
    counts = _table(["images in", "predictions out", "dead letters", "wake-up messages"],
                    [[str(stream.messages_in), str(stream.predictions_out), str(stream.dead_letters),
                      str(stream.wake_ups)]])
    parts = [f"<p>Images published to the Pub/Sub emulator, predicted by <code>{_e(stream.command)}</code>, "
             "then their labels published late and joined to the predictions (windowed accuracy). "
             "Latency: an output's publish time minus its input's publish time. Wake-up messages are "
             "malformed on purpose (the local runner keeps reading, and fires its timers, only while messages "
             "arrive on each source) and are "
             "dead-lettered apart from the images.</p>", counts]
    if latencies:
        rows = [[f"p{q}", f"{percentile(latencies, q):.3f} s"] for q in LATENCY_PERCENTILES]
        rows.append(["max", f"{max(latencies):.3f} s"])
        parts.append("<div class='side'><div><h3>Latency</h3>" + _table(["percentile", "latency"], rows)
                     + f"</div><div>{_histogram('End-to-end latency', latencies)}</div></div>")
    windows = [[str(n), str(window.count), f"{window.accuracy:.4f}"]
               for n, window in enumerate(stream.windows, start=1)]
    parts.append("<h3>Windowed accuracy</h3>" + (_table(["window", "labeled predictions", "accuracy"], windows,
                                                        "windows") if windows else "<p>No window was reported.</p>"))
    return _section(STREAMING_SECTION_ID, "Streaming", "".join(parts))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: middle; }
td code { font-size: 11px; white-space: pre-wrap; text-align: left; display: block; } caption { font-size: 12px; color: #666; }
.thumb { width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #ccc; display: block; }
figure { display: inline-block; margin: 4px; text-align: center; font-size: 11px; }
figure.wrong .thumb, figure.other .thumb { border: 3px solid #d62728; }
figure.right .thumb, figure.same .thumb { border: 3px solid #2ca02c; }
figure.query .thumb { border: 3px solid #1f77b4; }
.gallery { display: inline-flex; flex-wrap: wrap; } .search-row { display: flex; align-items: flex-start; }
.side { display: flex; gap: 3em; flex-wrap: wrap; } .charts svg { margin-right: 1em; }
.index-point { font-size: 18px; }
"""


def render(report: DemoReport) -> str:
    """The whole page as one HTML string."""
    body = "".join((_stages(report), _dataset(report), _training(report), _evaluation(report), _predictions(report),
                    _index(report), _search(report), _sql(report),
                    _streaming(report.streaming) if report.streaming else ""))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<title>vision-pipelines demo report</title>"
            f"<style>{_STYLE}</style></head><body><h1>vision-pipelines demo report</h1>"
            "<p>The embedded handwritten digits, through every job of the chain.</p>"
            f"{body}</body></html>\n")
