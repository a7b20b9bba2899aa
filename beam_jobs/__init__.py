"""Beam jobs: one module per job, each thin (options, composition, run)."""
