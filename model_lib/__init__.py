"""Keras models, tf.Transform preprocessing, input pipelines, training and export."""
