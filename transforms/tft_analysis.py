"""tf.Transform analysis of the train split, written beside the dataset.

Only the train split is analyzed, so valid/test statistics never leak into
preprocessing; training and every serving signature later apply the written
``transform_fn/`` through ``TFTransformOutput.transform_features_layer()``.
"""

from __future__ import annotations

from typing import Callable

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio

from model_lib.preprocessing import raw_feature_spec


class AnalyzeAndWriteTransform(beam.PTransform):
    """Serialized train tf.Examples -> ``OUTPUT/transform_fn`` and ``transformed_metadata``."""

    def __init__(self, output_dir: str, temp_dir: str, preprocessing_fn: Callable):
        super().__init__()
        self._output_dir = output_dir
        self._temp_dir = temp_dir
        self._preprocessing_fn = preprocessing_fn

    def expand(self, serialized_train: beam.PCollection[bytes]) -> beam.pvalue.PDone:
        source = tfxio.TFExampleBeamRecord(
            physical_format="inmem",
            telemetry_descriptors=["vision_pipelines", "create_dataset"],
            schema=schema_utils.schema_from_feature_spec(raw_feature_spec()),
        )
        record_batches = serialized_train | "DecodeTrainExamples" >> source.BeamSource()
        with tft_beam.Context(temp_dir=self._temp_dir):
            transform_fn = (record_batches, source.TensorAdapterConfig()) | "AnalyzeTrainSplit" >> (
                tft_beam.AnalyzeDataset(self._preprocessing_fn)
            )
            return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._output_dir)
