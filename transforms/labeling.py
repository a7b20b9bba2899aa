"""Labels from several sources: manifest labels and raters' votes, joined per image.

Every manifest row and every rating is one vote for its image. The winning
label needs a strict plurality and at least ``min_agreement`` of the votes;
ties and low agreement are rejected with the reason, unless the policy keeps
the top vote (ties then broken by label order, so the result is deterministic).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Literal, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import counters
from schemas.dead_letter import DeadLetter
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput, ToDeadLetters
from transforms.manifests import ManifestRow, Rating

VotePolicyName = Literal["reject", "keep_top"]

NO_LABEL = "no_label"
UNKNOWN_LABEL = "unknown_label"
TIED_VOTE = "tied_vote"
LOW_AGREEMENT = "low_agreement"
DUPLICATE_URI = "duplicate_uri"
RATING_FOR_UNKNOWN_IMAGE = "rating_for_unknown_image"
STAGE = "resolve_labels"
RATINGS_STAGE = counters.READ_RATINGS_STAGE


@dataclasses.dataclass(frozen=True)
class VotePolicy:
    """How votes become a label.

    Attributes:
      min_agreement: Fraction of votes the winner needs (0..1).
      on_disagreement: ``reject`` sends ties and low agreement to the dead
        letter; ``keep_top`` keeps the top vote instead.
    """

    min_agreement: float = 0.5
    on_disagreement: VotePolicyName = "reject"

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1]. Received `min_agreement={self.min_agreement}`")
        if self.on_disagreement not in ("reject", "keep_top"):
            raise ValueError(
                f"on_disagreement must be reject or keep_top. Received `on_disagreement={self.on_disagreement}`"
            )


def majority_vote(votes: Sequence[str], policy: VotePolicy) -> str:
    """The label the votes agree on.

    Args:
      votes: One label per vote; empty strings are not votes.
      policy: Agreement threshold and what to do on disagreement.

    Returns:
      The winning label.

    Raises:
      RejectedInput: ``no_label`` without votes; ``tied_vote`` or
        ``low_agreement`` when the policy is ``reject``.
    """
    return majority_of_counts(collections.Counter(v for v in votes if v), policy)


def majority_of_counts(counts: collections.Counter, policy: VotePolicy) -> str:
    """``majority_vote`` over votes already counted per label (what the ratings join streams into).

    Raises:
      RejectedInput: as ``majority_vote``.
    """
    if not counts:
        raise RejectedInput(NO_LABEL, "no label in the manifest and no ratings")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    top_label, top_count = ranked[0]
    total = sum(counts.values())
    if policy.on_disagreement == "keep_top":
        return top_label
    if len(ranked) > 1 and ranked[1][1] == top_count:
        tied = sorted(label for label, count in ranked if count == top_count)
        raise RejectedInput(TIED_VOTE, f"tie between {tied} with {top_count} of {total} votes each")
    if top_count / total < policy.min_agreement:
        raise RejectedInput(
            LOW_AGREEMENT,
            f"{top_label!r} has {top_count} of {total} votes, below --min_agreement={policy.min_agreement}",
        )
    return top_label


@dataclasses.dataclass(frozen=True)
class LabeledImage:
    """An image with its resolved label; ``input_ref`` is its first manifest row.

    ``label_index`` is None until ``AssignLabelIndices`` sets it.
    """

    uri: str
    label: str
    input_ref: str
    votes: int
    label_index: int | None = None


class _ResolveLabelFn(beam.DoFn):
    """Turns one image's manifest rows and ratings into a LabeledImage or dead letters."""

    DEAD_LETTERS = "dead_letters"

    def __init__(self, policy: VotePolicy):
        self._policy = policy
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicate_uri_rows")

    def process(
        self, element: tuple[str, dict[str, list]]
    ) -> Iterable[LabeledImage | beam.pvalue.TaggedOutput]:
        uri, grouped = element
        rows: list[ManifestRow] = sorted(grouped["rows"], key=lambda r: r.input_ref)
        # Ratings are streamed once, never listed or sorted: one image may hold millions of them (a hot key),
        # and the runner pages a large group in lazily, so memory stays one counter per label.
        ratings: Iterable[Rating] = grouped["ratings"]
        if not rows:
            for rating in ratings:
                yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, DeadLetter(
                    rating.input_ref, RATINGS_STAGE, RATING_FOR_UNKNOWN_IMAGE, f"{uri} is in no manifest"))
            return
        primary = rows[0]
        for duplicate in rows[1:]:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, DeadLetter(
                duplicate.input_ref, STAGE, DUPLICATE_URI,
                f"same image as {primary.input_ref}; its label counted as one vote there"))
        counts = collections.Counter(r.label for r in rows if r.label)
        counts.update(r.label for r in ratings if r.label)
        try:
            label = majority_of_counts(counts, self._policy)
        except RejectedInput as rejection:
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, DeadLetter(
                primary.input_ref, STAGE, rejection.error_type, str(rejection)))
            return
        yield LabeledImage(uri=uri, label=label, input_ref=primary.input_ref, votes=sum(counts.values()))


def key_by_uri(item: ManifestRow | Rating) -> tuple[str, ManifestRow | Rating]:
    return item.uri, item


class ResolveLabels(beam.PTransform):
    """Joins manifest rows with ratings by image URI and votes on the label.

    Input: a dict ``{"rows": PCollection[ManifestRow], "ratings": PCollection[Rating]}``.
    Output: ``(PCollection[LabeledImage], PCollection[DeadLetter])``.
    """

    def __init__(self, policy: VotePolicy):
        super().__init__()
        self._policy = policy

    def expand(self, inputs: dict[str, beam.PCollection]):
        grouped = {
            "rows": inputs["rows"] | "KeyRowsByUri" >> beam.Map(key_by_uri),
            "ratings": inputs["ratings"] | "KeyRatingsByUri" >> beam.Map(key_by_uri),
        } | "JoinRowsAndRatings" >> beam.CoGroupByKey()
        results = grouped | "VoteOnLabels" >> beam.ParDo(_ResolveLabelFn(self._policy)).with_outputs(
            _ResolveLabelFn.DEAD_LETTERS, main="labeled"
        )
        return results.labeled, results[_ResolveLabelFn.DEAD_LETTERS]


def image_label(image: LabeledImage) -> str:
    return image.label


class SortedLabelsFn(beam.CombineFn):
    """Distinct labels in sorted order: the derived vocabulary."""

    def create_accumulator(self) -> set[str]:
        return set()

    def add_input(self, accumulator: set[str], label: str) -> set[str]:
        accumulator.add(label)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[set[str]]) -> set[str]:
        return set().union(*accumulators)

    def extract_output(self, accumulator: set[str]) -> list[str]:
        return sorted(accumulator)


class DeriveVocabulary(beam.PTransform):
    """The sorted distinct labels, as a one-element PCollection holding a list.

    It is derived from the labeled image references, before any image is
    read, so the step that assigns label indices never waits on (and a local
    runner never buffers) the decoded images.
    """

    def expand(self, images: beam.PCollection[LabeledImage]) -> beam.PCollection[list[str]]:
        return (
            images
            | "ExtractLabels" >> beam.Map(image_label)
            | "SortDistinctLabels" >> beam.CombineGlobally(SortedLabelsFn())
        )


class AssignLabelIndexFn(beam.DoFn):
    """Sets ``label_index`` from the vocabulary; unknown labels raise ``RejectedInput``."""

    def process(self, image: LabeledImage, labels: list[str]) -> Iterable[LabeledImage]:
        try:
            index = labels.index(image.label)
        except ValueError:
            raise RejectedInput(UNKNOWN_LABEL, f"label {image.label!r} is not in the labels file") from None
        yield dataclasses.replace(image, label_index=index)


class AssignLabelIndices(beam.PTransform):
    """LabeledImage -> (LabeledImage with label_index, DeadLetter).

    Indices are assigned before images are read: the vocabulary side input
    then holds back only these small references, never decoded images, and
    images with unknown labels are rejected without reading their files.
    """

    def __init__(self, vocabulary: beam.PCollection[list[str]]):
        super().__init__()
        self._vocabulary = vocabulary

    def expand(self, labeled: beam.PCollection[LabeledImage]):
        indexed, failed = labeled | "LookUpLabelIndex" >> beam.ParDo(
            AssignLabelIndexFn(), labels=beam.pvalue.AsSingleton(self._vocabulary)
        ).with_exception_handling()
        return indexed, failed | "UnknownLabelsToDeadLetters" >> ToDeadLetters(STAGE)
