"""Model refresh costs no second model: a streaming job loads its model once per process.

The pointer check (``WatchModelPointerFn``) runs before ``PredictImages`` and
used to load the model itself through a Beam ``Shared`` token of its own;
Beam keeps only the last token acquired alive between bundles, so on the
BundleBasedDirectRunner (a fresh DoFn copy per bundle) RunInference then
loaded the model a second time. The job's own composite runs here on the
streaming local runner, over many bundles.
"""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.stream_predict import StreamPredict
from model_lib import sample_data
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.image_inputs import keyed_image
from transforms.model_handler import MODEL_LOADS_COUNTER
from transforms.model_refresh import RefreshingImageModelHandler
from transforms.runner_policy import LOCAL_STREAMING_RUNNER

MAX_PIXELS = 10**6


def test_the_streaming_composite_loads_its_model_once(trained_digits_model, tmp_path):
    written = sample_data.write_digits(str(tmp_path), limit=40)
    with open(written.manifest) as handle:
        uris = [line.split(",")[0] for line in handle.read().splitlines()]
    images = []
    for i, uri in enumerate(uris):
        with open(uri, "rb") as image:
            images.append(keyed_image(f"img-{i}", uri, image.read(), MAX_PIXELS, message_id=f"msg-{i}",
                                      message_digest=f"sha256:{i:032x}",
                                      event_time=time.time()))
    handler = RefreshingImageModelHandler(trained_digits_model, refresh_secs=60, max_batch_size=4)
    options = PipelineOptions(["--runner", LOCAL_STREAMING_RUNNER, "--streaming"])
    pipeline = beam.Pipeline(options=options)
    rows, letters, alerts = (pipeline | beam.Create(images) | beam.Reshuffle()
                             | StreamPredict(handler, top_k=1))
    assert_that(rows | "RowIds" >> beam.Map(lambda row: row["image_id"]), equal_to([f"img-{i}" for i in range(40)]))
    assert_that((letters, alerts) | beam.Flatten(), equal_to([]), label="NoDeadLettersOrAlerts")
    result = pipeline.run()
    result.wait_until_finish()

    loads = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(MODEL_LOADS_COUNTER))
    assert sum(c.committed for c in loads["counters"]) == 1
