"""Stable ids and splits: pure functions of the id, with the configured proportions."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transforms.splitting import (
    SplitSpec,
    assign_split,
    image_id_for_content,
    image_id_for_uri,
    normalize_uri,
    split_for_content,
)


def test_uri_normalization_makes_equivalent_spellings_one_id(tmp_path):
    base = str(tmp_path)
    assert image_id_for_uri(f"{base}/a/../img.png") == image_id_for_uri(f"  {base}/img.png ")
    assert normalize_uri("img.png", base_dir=base) == f"{base}/img.png"
    assert normalize_uri("GS://bucket/x/./y.jpg") == "gs://bucket/x/y.jpg"
    assert image_id_for_uri("gs://b/1.jpg") != image_id_for_uri("gs://b/2.jpg")


@pytest.mark.parametrize("uri, expected", [
    ("b.jpg", "gs://bucket/data/b.jpg"),
    ("./imgs/../b.jpg", "gs://bucket/data/b.jpg"),
    ("../other/c.png", "gs://bucket/other/c.png"),
    ("gs://elsewhere/d.png", "gs://elsewhere/d.png"),
    ("/local/e.png", "/local/e.png"),
])
def test_relative_paths_resolve_against_a_remote_manifest_directory(uri, expected):
    assert normalize_uri(uri, base_dir="gs://bucket/data/") == expected
    assert normalize_uri(uri, base_dir="gs://bucket/data") == expected


def test_split_follows_content_and_keeps_the_content_id_splits():
    spec = SplitSpec.parse("80,10,10")
    sha = "ab" * 32
    assert split_for_content(sha, spec) == assign_split(image_id_for_content(sha), spec)


def test_nan_fractions_are_refused_by_the_spec_itself():
    with pytest.raises(ValueError, match="fractions"):
        SplitSpec(fractions=(float("nan"), 0.5, 0.5))


def test_split_proportions_follow_the_fractions():
    spec = SplitSpec.parse("80,10,10")
    counts = collections.Counter(assign_split(image_id_for_uri(f"gs://b/{i}.jpg"), spec) for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.02
    assert abs(counts["valid"] / 20000 - 0.1) < 0.02
    assert abs(counts["test"] / 20000 - 0.1) < 0.02


@given(st.text(min_size=1, max_size=40))
def test_split_is_a_pure_function_of_the_id(image_id):
    spec = SplitSpec.parse("70,20,10", "a,b,c")
    assert assign_split(image_id, spec) == assign_split(image_id, SplitSpec.parse("0.7,0.2,0.1", "a,b,c"))


def test_zero_fraction_split_gets_nothing():
    spec = SplitSpec.parse("1,0", "train,holdout")
    assert {assign_split(str(i), spec) for i in range(500)} == {"train"}


@pytest.mark.parametrize("text,names,message", [
    ("80,10", "train,valid,test", "2 fractions"),
    ("a,b,c", "train,valid,test", "split=a,b,c"),
    ("0,0,0", "train,valid,test", "positive total"),
    ("50,50", "x,x", "unique"),
    ("nan,1,1", "train,valid,test", "split=nan,1,1"),
    ("inf,1,1", "train,valid,test", "split=inf,1,1"),
    ("-10,60,50", "train,valid,test", "split=-10,60,50"),
])
def test_bad_split_flags_name_the_value(text, names, message):
    with pytest.raises(ValueError, match=message):
        SplitSpec.parse(text, names)
