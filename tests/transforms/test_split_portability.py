"""A moved dataset keeps its splits: two local directories and the GCS emulator agree image by image.

The same digits files are read from each place through the composites
create_dataset is built from (ReadCsvRows, ResolveLabels, AssignLabelIndices,
LoadImages, BuildRecords); split membership is compared by the path relative
to the dataset root, which is all the three locations share.
"""

from __future__ import annotations

import collections
import json
import os

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline

from model_lib.sample_data import write_digits
from schemas import dataset
from transforms.dataset_records import BuildRecords, LoadImages
from transforms.images import ImageSpec
from transforms.labeling import AssignLabelIndices, ResolveLabels, VotePolicy
from transforms.manifests import ReadCsvRows
from transforms.splitting import SplitSpec, image_id_for_uri

DIGITS = 40
LABELS = [str(d) for d in range(10)]


def membership(record: dict, root: str) -> str:
    """One record as JSON: its path below ``root``, id, content hash and split."""
    return json.dumps({
        "path": record[dataset.URI][len(root):].lstrip("/"),
        "image_id": record[dataset.IMAGE_ID],
        "sha256": record[dataset.SHA256],
        "split": record[dataset.SPLIT],
    })


def read_records(manifest: str, root: str, out_dir: str) -> dict[str, dict]:
    """Builds the dataset records of ``manifest``; returns them by path relative to ``root``."""
    with TestPipeline(runner="FnApiRunner") as p:
        rows, _ = p | "ReadManifest" >> ReadCsvRows([manifest], "manifest")
        ratings = p | "NoRatings" >> beam.Create([])
        labeled, _ = {"rows": rows, "ratings": ratings} | ResolveLabels(VotePolicy())
        vocabulary = p | "Vocabulary" >> beam.Create([LABELS])
        indexed, _ = labeled | AssignLabelIndices(vocabulary)
        loaded, _ = indexed | LoadImages(ImageSpec(image_size=8, channels=1, image_format="png"))
        records, _ = loaded | BuildRecords(SplitSpec.parse("80,10,10"), "uri")
        _ = (
            records
            | beam.Map(membership, root=root)
            | beam.io.WriteToText(os.path.join(out_dir, "records"), num_shards=1, shard_name_template="")
        )
    with open(os.path.join(out_dir, "records")) as handle:
        rows = [json.loads(line) for line in handle]
    return {row["path"]: row for row in rows}


def upload_tree(gcs_emulator, local_root: str, bucket: str, prefix: str) -> None:
    storage = gcs_emulator.client().bucket(bucket)
    for directory, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(directory, name)
            storage.blob(f"{prefix}/{os.path.relpath(path, local_root)}").upload_from_filename(path)


def test_splits_follow_content_not_location(tmp_path, gcs_emulator):
    first, second = tmp_path / "first", tmp_path / "second" / "nested"
    digits = write_digits(str(first), size=8, limit=DIGITS)
    write_digits(str(second), size=8, limit=DIGITS)

    # On gs:// the manifest lists paths relative to itself, as a moved dataset's would.
    bucket = gcs_emulator.create_bucket()
    gcs_root = f"gs://{bucket}/moved/digits"
    upload_tree(gcs_emulator, digits.image_dir, bucket, "moved/digits/images")
    with open(digits.manifest) as handle:
        relative = "".join(line.replace(f"{first}/", "", 1) for line in handle)
    assert "images/" in relative and str(first) not in relative
    with FileSystems.create(f"{gcs_root}/all_data.csv") as handle:
        handle.write(relative.encode("utf-8"))

    by_place = {
        "first": read_records(digits.manifest, str(first), str(tmp_path / "out_first")),
        "second": read_records(os.path.join(second, "all_data.csv"), str(second), str(tmp_path / "out_second")),
        "gcs": read_records(f"{gcs_root}/all_data.csv", gcs_root, str(tmp_path / "out_gcs")),
    }

    for place, records in by_place.items():
        assert len(records) == DIGITS, place
    splits = {place: {path: r["split"] for path, r in records.items()} for place, records in by_place.items()}
    assert splits["first"] == splits["second"] == splits["gcs"]
    counts = collections.Counter(splits["first"].values())
    assert set(counts) == {"train", "valid", "test"}, counts
    # Ids stay location-derived (--dedupe uri), hence unique per copy.
    ids = {place: {r["image_id"] for r in records.values()} for place, records in by_place.items()}
    assert not ids["first"] & ids["second"] and not ids["first"] & ids["gcs"]
    gcs_record = by_place["gcs"]["images/0/digit_0000.png"]
    assert gcs_record["image_id"] == image_id_for_uri(f"{gcs_root}/images/0/digit_0000.png")
