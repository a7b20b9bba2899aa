"""Stage and counter names that one module emits and another matches on, declared once.

A dead letter's ``stage`` and a Beam counter's name are strings written by one
step and read back elsewhere: ``dataset_summary`` tells rating rejections from
image rejections by stage, and every job balances its accounting
(``read == written + rejected``, or ``predicted``/``embedded`` for the
inference jobs) by counter name. A typo on either side would silently break
that match, so both sides import these constants.
"""

from __future__ import annotations

# Dead-letter stages (``DeadLetter.stage``).
READ_MANIFEST_STAGE = "read_manifest"
READ_RATINGS_STAGE = "read_ratings"
LOAD_IMAGE_STAGE = "load_image"

# Counters in ``transforms.dead_letters.METRICS_NAMESPACE``.
READ = "read"  # manifest data rows (create_dataset) or input images (inference jobs)
RATINGS_READ = "ratings_read"  # ratings rows; not images, so outside the accounting
WRITTEN = "written"  # dataset records written (create_dataset)
REJECTED = "rejected"  # dead letters of every stage
PREDICTED = "predicted"  # prediction rows (batch_predict)
EMBEDDED = "embedded"  # embedding rows (extract_embeddings)
