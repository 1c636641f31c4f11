"""Metrics on hand-computed cases: label parsing, classification, exact match, JSON fields, ROUGE-L, inference."""

from __future__ import annotations

from collections import Counter

import pytest
from kubetune_trainer.evaluate.scoring import (
    UNPARSED,
    InvalidReferenceError,
    classification_scores,
    confusion_matrix,
    default_metrics,
    exact_match,
    headline_metric,
    is_better,
    json_fields,
    json_scores,
    normalise_text,
    parse_json_output,
    parse_label,
    rouge_l,
    score_outputs,
)

pytestmark = pytest.mark.unit

NEWS = ["Business", "Sci/Tech", "Sports", "World"]


def test_normalise_text_drops_case_punctuation_underscores_and_extra_whitespace() -> None:
    assert normalise_text("  The  Answer:\tSci/Tech! ") == "the answer sci tech"
    assert normalise_text("lost_or_stolen_phone") == "lost or stolen phone"
    assert normalise_text("...") == ""


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Sports", "Sports"),
        ("  sports. ", "Sports"),
        ("SCI/TECH", "Sci/Tech"),
        ("sci tech", "Sci/Tech"),
        ("The answer is Sports.", "Sports"),
        ("Label: World\n", "World"),
        ("World or Sports?", None),
        ("Banana", None),
        ("", None),
        ("Sportswear", None),
    ],
)
def test_parse_label_finds_the_one_label_a_reply_names(reply: str, expected: str | None) -> None:
    assert parse_label(reply, NEWS) == expected


def test_parse_label_prefers_the_longer_label_that_contains_a_shorter_one() -> None:
    labels = ["card", "card arrival", "lost_or_stolen_phone"]
    assert parse_label("It is about card arrival.", labels) == "card arrival"
    assert parse_label("my card", labels) == "card"
    assert parse_label("lost or stolen phone", labels) == "lost_or_stolen_phone"


def test_classification_scores_match_a_hand_computed_case() -> None:
    references = ["A", "A", "B", "B", "C"]
    predictions: list[str | None] = ["A", "B", "B", None, "C"]
    # Per label: A P=1/1 R=1/2 F1=2/3; B P=1/2 R=1/2 F1=1/2; C P=1 R=1 F1=1. Supports 2, 2, 1.
    scores = classification_scores(references, predictions)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macroPrecision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert scores["macroRecall"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert scores["macroF1"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert scores["weightedPrecision"] == pytest.approx((2 * 1 + 2 * 0.5 + 1 * 1) / 5)
    assert scores["weightedRecall"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 1 * 1) / 5)
    assert scores["weightedF1"] == pytest.approx((2 * 2 / 3 + 2 * 0.5 + 1 * 1) / 5)
    assert scores["unparsed"] == pytest.approx(1 / 5)


def test_macro_averages_skip_labels_absent_from_references_and_predictions() -> None:
    scores = classification_scores(["A", "A"], ["A", "B"])
    # A: P=1 R=1/2 F1=2/3; B: P=0 R=0 F1=0 (predicted, never a reference); C is never seen and not averaged.
    assert scores["macroF1"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["accuracy"] == pytest.approx(0.5)


def test_confusion_matrix_has_an_unparsed_column() -> None:
    matrix = confusion_matrix(["A", "A", "B", "B", "C"], ["A", "B", "B", None, "C"], ["A", "B", "C"])
    assert matrix.labels == ["A", "B", "C"]
    assert matrix.columns == ["A", "B", "C", UNPARSED]
    assert matrix.matrix == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_score_outputs_classification_parses_replies_and_scores_per_sample() -> None:
    references = ["Sports", "World", "Business", "Sci/Tech"]
    outputs = ["The answer is Sports.", "world", "I am not sure", "Sports"]
    result = score_outputs(["accuracy", "f1"], references, outputs, NEWS)
    assert result.scores["accuracy"] == pytest.approx(2 / 4)
    assert result.scores["unparsed"] == pytest.approx(1 / 4)
    # Sports: P=1/2 R=1 F1=2/3; World: 1; Business: 0 (unparsed); Sci/Tech: 0 -> macro F1 = (2/3 + 1) / 4.
    assert result.scores["macroF1"] == pytest.approx((2 / 3 + 1) / 4)
    assert [sample["prediction"] for sample in result.samples] == ["Sports", "World", None, "Sports"]
    assert [sample["correct"] for sample in result.samples] == [1.0, 1.0, 0.0, 0.0]
    assert result.confusion is not None and result.confusion.matrix[0] == [0, 0, 0, 0, 1]


def test_accuracy_alone_leaves_out_the_f1_family() -> None:
    result = score_outputs(["accuracy"], ["Sports"], ["Sports"], NEWS)
    assert result.scores == {"accuracy": 1.0, "unparsed": 0.0}


def test_a_reference_outside_the_label_set_is_refused_with_its_index() -> None:
    with pytest.raises(
        InvalidReferenceError, match=r"reference 1: label 'Weather' is not one of the 4 labels"
    ) as error:
        score_outputs(["accuracy"], ["Sports", "Weather"], ["Sports", "Sports"], NEWS)
    assert error.value.index == 1


def test_exact_match_ignores_case_whitespace_and_punctuation() -> None:
    assert exact_match("Paris", " paris. ")
    assert exact_match("New  York", "new york")
    assert not exact_match("Paris", "The answer is Paris")
    result = score_outputs(["exactMatch"], ["Paris", "4", "blue"], ["paris!", "four", "Blue"])
    assert result.scores["exactMatch"] == pytest.approx(2 / 3)
    assert [sample["exactMatch"] for sample in result.samples] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', (True, {"a": 1})),
        ('```json\n{"a": 1}\n```', (True, {"a": 1})),
        ("Here you go:\n```\n[1, 2]\n```\nDone.", (True, [1, 2])),
        ("42", (True, 42)),
        ('{"a": 1', (False, None)),
        ("Sports", (False, None)),
    ],
)
def test_parse_json_output_accepts_bare_and_fenced_json(text: str, expected: tuple[bool, object]) -> None:
    assert parse_json_output(text) == expected


def test_json_fields_flattens_objects_and_reads_triples_as_lists_or_objects() -> None:
    assert json_fields({"name": "Ada  Lovelace", "born": {"year": 1815}, "tags": ["math", "poetry"]}) == Counter(
        {("name", "ada lovelace"): 1, ("born.year", "1815"): 1, ("tags", "math"): 1, ("tags", "poetry"): 1}
    )
    as_lists = json_fields([["Ada", "born_in", "London"]])
    as_objects = json_fields([{"subject": "ada", "relation": "born_in", "object": "London"}])
    assert as_lists == as_objects == Counter({("ada", "born_in", "london"): 1})


def test_json_scores_pool_field_counts_over_samples() -> None:
    references = [
        '{"name": "Ada", "age": 36}',
        '[["Ada", "born_in", "London"], ["Ada", "field", "math"]]',
        '{"a": 1}',
    ]
    outputs = [
        '```json\n{"name": "ada", "age": 37}\n```',  # tp 1 (name), fp 1 (age 37), fn 1 (age 36)
        '[{"subject": "Ada", "relation": "born_in", "object": "London"}]',  # tp 1, fn 1
        "no JSON here",  # invalid: fn 1
    ]
    scores, samples = json_scores(references, outputs)
    # Pooled: tp 2, fp 1, fn 3 -> P = 2/3, R = 2/5, F1 = 2PR / (P + R) = 0.5.
    assert scores["jsonValid"] == pytest.approx(2 / 3)
    assert scores["jsonPrecision"] == pytest.approx(2 / 3)
    assert scores["jsonRecall"] == pytest.approx(2 / 5)
    assert scores["jsonF1"] == pytest.approx(0.5)
    assert [sample["jsonValid"] for sample in samples] == [1.0, 1.0, 0.0]
    assert [sample["jsonF1"] for sample in samples] == pytest.approx([0.5, 2 / 3, 0.0])


def test_json_metric_refuses_a_reference_that_is_not_json() -> None:
    with pytest.raises(InvalidReferenceError, match=r"reference 1: metric json needs JSON references"):
        json_scores(['{"a": 1}', "plain words"], ['{"a": 1}', "{}"])


def test_rouge_l_is_the_lcs_f_measure() -> None:
    # LCS of "the cat sat on the mat" and "the cat on mat" is 4 tokens: P = 4/4, R = 4/6, F = 0.8.
    assert rouge_l(["the cat sat on the mat", "abc"], ["the cat on mat", "xyz"]) == pytest.approx([0.8, 0.0])
    result = score_outputs(["rougeL"], ["the cat sat on the mat", "abc"], ["the cat on mat", "abc"])
    assert result.scores["rougeL"] == pytest.approx((0.8 + 1.0) / 2)


def test_score_outputs_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 references but 1 outputs"):
        score_outputs(["exactMatch"], ["a", "b"], ["a"])


@pytest.mark.parametrize(
    ("data_format", "references", "expected"),
    [
        ("classification", ["Sports", "World"], ["loss", "accuracy", "f1"]),
        ("text", ["a long document"], ["loss"]),
        ("prompt-completion", ['{"a": 1}', '```json\n[["s", "r", "o"]]\n```'], ["loss", "json"]),
        ("question-answer", ["Paris", "George Washington", "1945"], ["loss", "exactMatch"]),
        ("instruction", ["A much longer answer that explains the reasoning in several words."], ["loss", "rougeL"]),
        ("prompt-completion", ['{"a": 1}', "42"], ["loss", "exactMatch"]),
    ],
)
def test_default_metrics_follow_the_format_and_the_references(
    data_format: str, references: list[str], expected: list[str]
) -> None:
    assert default_metrics(data_format, references) == expected


def test_headline_metric_is_the_gate_metric_or_the_first_non_loss_score() -> None:
    assert headline_metric(["loss", "accuracy", "f1"]) == "accuracy"
    assert headline_metric(["loss", "f1"]) == "macroF1"
    assert headline_metric(["loss", "json"]) == "jsonF1"
    assert headline_metric(["loss"]) == "loss"
    assert headline_metric(["loss", "accuracy"], gate_metric="f1") == "macroF1"
    assert headline_metric(["judge"], gate_metric="judge") == "judge"


def test_is_better_respects_the_direction_of_each_score() -> None:
    assert is_better("accuracy", 0.9, 0.8)
    assert not is_better("accuracy", 0.8, 0.8)
    assert is_better("loss", 1.2, 1.5)
    assert not is_better("loss", 1.5, 1.2)


def test_every_metric_of_the_spec_is_scored_somewhere_and_reports_only_the_scores_it_declares() -> None:
    from typing import get_args

    from kubetune_trainer.evaluate.scoring import TEXT_SCORERS

    from kubetune.api import METRIC_SCORES, EvaluationMetric, scores_of

    spec_metrics = set(get_args(EvaluationMetric))
    assert spec_metrics == set(METRIC_SCORES)
    assert spec_metrics == {*TEXT_SCORERS, "loss", "judge"}
    labels = ["Sports", "World", "Business"]
    rows = {  # (references, outputs) each kind of metric reads
        "labels": (["Sports", "World", "World"], ["Sports", "Business news", "nothing"]),
        "json": (['{"name": "Ada"}', '{"name": "Bo"}', "[1]"], ['{"name": "Ada"}', "no json", "[1, 2]"]),
    }
    for metric, scorer in TEXT_SCORERS.items():
        references, outputs = rows["json" if metric == "json" else "labels"]
        part = scorer(references, outputs, labels)
        assert set(part.scores) <= set(scores_of(metric)), metric
        assert len(part.samples) == len(references), metric


@pytest.mark.parametrize(
    "references",
    [['{"a": 1}', "[2]"], ["Sports", "World news"], ["a long answer with many more words than a label has"] * 2],
    ids=["json", "short", "long"],
)
def test_every_dataset_format_infers_only_metrics_the_spec_allows_for_it(references: list[str]) -> None:
    from typing import get_args

    from kubetune_trainer.data.formats import FORMATS
    from kubetune_trainer.evaluate.scoring import default_metrics

    from kubetune.api import INFERABLE_METRICS, DatasetFormat

    assert set(get_args(DatasetFormat)) == {"auto", *FORMATS}
    for name in FORMATS:
        assert set(default_metrics(name, references)) <= set(INFERABLE_METRICS[name]), name
