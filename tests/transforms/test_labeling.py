"""Majority vote rules (property tests) and the ratings join in a real pipeline."""

from __future__ import annotations

import collections

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given
from hypothesis import strategies as st

from transforms.dead_letters import RejectedInput
from transforms.labeling import (
    DUPLICATE_URI,
    LOW_AGREEMENT,
    NO_LABEL,
    RATING_FOR_UNKNOWN_IMAGE,
    TIED_VOTE,
    AssignLabelIndices,
    DeriveVocabulary,
    LabeledImage,
    ResolveLabels,
    VotePolicy,
    majority_vote,
)
from transforms.manifests import ManifestRow, Rating

labels = st.sampled_from(["cat", "dog", "owl", "fox"])
vote_lists = st.lists(labels, min_size=1, max_size=12)
agreements = st.floats(min_value=0.0, max_value=1.0)


@given(votes=vote_lists, min_agreement=agreements)
def test_winner_is_a_strict_plurality_with_enough_agreement(votes, min_agreement):
    counts = collections.Counter(votes)
    top = max(counts.values())
    leaders = [label for label, count in counts.items() if count == top]
    try:
        winner = majority_vote(votes, VotePolicy(min_agreement=min_agreement))
    except RejectedInput as rejection:
        if len(leaders) > 1:
            assert rejection.error_type == TIED_VOTE
        else:
            assert rejection.error_type == LOW_AGREEMENT
            assert top / len(votes) < min_agreement
        return
    assert leaders == [winner]
    assert counts[winner] / len(votes) >= min_agreement


@given(votes=vote_lists, min_agreement=agreements)
def test_keep_top_always_returns_the_smallest_leading_label(votes, min_agreement):
    counts = collections.Counter(votes)
    top = max(counts.values())
    winner = majority_vote(votes, VotePolicy(min_agreement=min_agreement, on_disagreement="keep_top"))
    assert winner == min(label for label, count in counts.items() if count == top)


@given(votes=vote_lists)
def test_vote_does_not_depend_on_vote_order(votes):
    policy = VotePolicy(min_agreement=0.0, on_disagreement="keep_top")
    assert majority_vote(votes, policy) == majority_vote(list(reversed(votes)), policy)


def test_empty_votes_are_no_label_even_when_keeping_top():
    with pytest.raises(RejectedInput) as raised:
        majority_vote(["", ""], VotePolicy(on_disagreement="keep_top"))
    assert raised.value.error_type == NO_LABEL


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_vote_policy_names_the_bad_agreement(bad):
    with pytest.raises(ValueError, match=f"min_agreement={bad}"):
        VotePolicy(min_agreement=bad)


def _error_types(letters):
    return letters | beam.Map(lambda letter: (letter.input_ref, letter.error_type))


def test_ratings_join_resolves_conflicts_and_rejects_with_reasons():
    rows = [
        ManifestRow("/img/a.png", "cat", "m.csv:1"),   # cat + cat,cat,dog -> cat (3/4)
        ManifestRow("/img/b.png", "", "m.csv:2"),      # dog,cat -> tie
        ManifestRow("/img/c.png", "", "m.csv:3"),      # no votes at all
        ManifestRow("/img/d.png", "owl", "m.csv:4"),   # owl,owl,fox,dog,cat -> low agreement (2/5 < 0.5)
        ManifestRow("/img/e.png", "fox", "m.csv:5"),   # fox from two rows -> duplicate row
        ManifestRow("/img/e.png", "fox", "m.csv:6"),
    ]
    ratings = [
        Rating("/img/a.png", "r1", "cat", "r.csv:1"),
        Rating("/img/a.png", "r2", "cat", "r.csv:2"),
        Rating("/img/a.png", "r3", "dog", "r.csv:3"),
        Rating("/img/b.png", "r1", "dog", "r.csv:4"),
        Rating("/img/b.png", "r2", "cat", "r.csv:5"),
        Rating("/img/d.png", "r1", "owl", "r.csv:6"),
        Rating("/img/d.png", "r2", "fox", "r.csv:7"),
        Rating("/img/d.png", "r3", "dog", "r.csv:8"),
        Rating("/img/d.png", "r4", "cat", "r.csv:9"),
        Rating("/img/zzz.png", "r1", "cat", "r.csv:11"),
    ]
    with TestPipeline(runner="FnApiRunner") as p:
        labeled, letters = {
            "rows": p | "Rows" >> beam.Create(rows),
            "ratings": p | "Ratings" >> beam.Create(ratings),
        } | ResolveLabels(VotePolicy(min_agreement=0.5))
        assert_that(labeled, equal_to([
            LabeledImage("/img/a.png", "cat", "m.csv:1", 4),
            LabeledImage("/img/e.png", "fox", "m.csv:5", 2),
        ]), label="CheckLabeled")
        assert_that(_error_types(letters), equal_to([
            ("m.csv:2", TIED_VOTE),
            ("m.csv:3", NO_LABEL),
            ("m.csv:4", LOW_AGREEMENT),
            ("m.csv:6", DUPLICATE_URI),
            ("r.csv:11", RATING_FOR_UNKNOWN_IMAGE),
        ]), label="CheckDeadLetters")


def _count(pcoll, label):
    return pcoll | f"Count{label}" >> beam.combiners.Count.Globally()


def test_one_image_with_ten_thousand_ratings_is_one_hot_key_resolved_in_one_pass():
    """A hot key: 10,000 ratings for one image (and 10,000 for an image in no manifest)."""
    ratings = [Rating("/img/hot.png", f"r{i}", "cat" if i % 5 < 3 else "dog", f"r.csv:{i}") for i in range(10_000)]
    ratings += [Rating("/img/unknown.png", f"r{i}", "cat", f"u.csv:{i}") for i in range(10_000)]
    with TestPipeline(runner="FnApiRunner") as p:
        labeled, letters = {
            "rows": p | "Rows" >> beam.Create([ManifestRow("/img/hot.png", "", "m.csv:1")]),
            "ratings": p | "Ratings" >> beam.Create(ratings),
        } | ResolveLabels(VotePolicy(min_agreement=0.5))
        assert_that(labeled, equal_to([LabeledImage("/img/hot.png", "cat", "m.csv:1", 10_000)]),
                    label="CheckHotImage")
        reasons = letters | "Reason" >> beam.Map(lambda letter: letter.error_type)
        assert_that(reasons | "CountPerReason" >> beam.combiners.Count.PerElement(),
                    equal_to([(RATING_FOR_UNKNOWN_IMAGE, 10_000)]), label="CheckUnknownRatings")


def test_one_label_holding_most_images_keeps_every_image_and_a_small_vocabulary():
    """A hot label: 95% of 2,000 images are `cat`; no step keys on the label, so nothing funnels to one worker."""
    rows = [ManifestRow(f"/img/{i:05d}.png", "cat" if i % 20 else ["dog", "owl"][i % 40 // 20], f"m.csv:{i}")
            for i in range(2_000)]
    with TestPipeline(runner="FnApiRunner") as p:
        labeled, letters = {
            "rows": p | "Rows" >> beam.Create(rows),
            "ratings": p | "Ratings" >> beam.Create([]),
        } | ResolveLabels(VotePolicy())
        vocabulary = labeled | DeriveVocabulary()
        indexed, index_letters = labeled | AssignLabelIndices(vocabulary)
        assert_that(vocabulary, equal_to([["cat", "dog", "owl"]]), label="CheckVocabulary")
        per_index = indexed | "Index" >> beam.Map(lambda image: image.label_index)
        assert_that(per_index | "CountPerIndex" >> beam.combiners.Count.PerElement(),
                    equal_to([(0, 1_900), (1, 50), (2, 50)]), label="CheckCounts")
        assert_that(_count(letters, "Letters"), equal_to([0]), label="CheckNoLetters")
        assert_that(_count(index_letters, "IndexLetters"), equal_to([0]), label="CheckNoIndexLetters")
