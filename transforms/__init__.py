"""Reusable PTransforms and DoFns shared by the jobs."""
