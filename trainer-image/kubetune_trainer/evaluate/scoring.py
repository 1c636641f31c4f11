"""Pure scoring of model outputs against references: labels, exact match, JSON fields, ROUGE-L, metric inference."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.api import METRIC_SCORES, EvaluationMetric
from kubetune_trainer.data.formats import FORMATS

UNPARSED = "<unparsed>"
"""Column of the confusion matrix for replies that named no label, or more than one."""

SampleScores = dict[str, float | str | None]
"""Per-sample scores of one output, e.g. {"prediction": "Sports", "correct": 1.0, "rougeL": 0.5}."""

# Spec metric names (EvaluationSpec.metrics) to the headline figure each one reports.
PRIMARY_SCORE: dict[str, str] = {metric: scores[0].name for metric, scores in METRIC_SCORES.items()}
LOWER_IS_BETTER: frozenset[str] = frozenset(
    score.name for scores in METRIC_SCORES.values() for score in scores if score.lower_is_better
)
SHORT_ANSWER_WORDS = 5
SHORT_ANSWER_SHARE = 0.9

_WORD = re.compile(r"[^\W_]+")
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_TRIPLE_KEYS = ("subject", "relation", "object")


class InvalidReferenceError(ValueError):
    """A reference that the requested metric cannot score, e.g. a label outside the label set or non-JSON."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"reference {index}: {message}")
        self.index = index


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of (reference label, predicted label); rows are `labels`, columns are `labels` plus UNPARSED."""

    labels: list[str]
    columns: list[str]
    matrix: list[list[int]]


@dataclass(frozen=True)
class FieldCounts:
    """True positives, false positives and false negatives of extracted fields."""

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    def __add__(self, other: FieldCounts) -> FieldCounts:
        return FieldCounts(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )


@dataclass
class OutputScores:
    """Aggregate scores of one model's outputs, the per-sample scores, and the confusion matrix if classifying."""

    scores: dict[str, float] = field(default_factory=dict)
    samples: list[SampleScores] = field(default_factory=list)
    confusion: ConfusionMatrix | None = None


def normalise_text(text: str) -> str:
    """Case-folded words joined by single spaces: punctuation, underscores and extra whitespace dropped."""
    return " ".join(_WORD.findall(text.casefold()))


def parse_label(output: str, labels: Sequence[str]) -> str | None:
    """The one label a reply names, or None when it names none or several.

    "Sports", " sports. " and "The answer is Sports." all give "Sports"; "World or Sports" gives None. A label
    contained in a longer matching label ("card" in "card arrival") yields to the longer one.
    """
    stripped = output.strip()
    if stripped in labels:
        return stripped
    reply = normalise_text(output)
    if not reply:
        return None
    keys = {label: normalise_text(label) for label in labels}
    exact = [label for label, key in keys.items() if key == reply]
    if len(exact) == 1:
        return exact[0]
    padded = f" {reply} "
    found = {label: key for label, key in keys.items() if key and f" {key} " in padded}
    longest = [
        label
        for label, key in found.items()
        if not any(other != key and f" {key} " in f" {other} " for other in found.values())
    ]
    return longest[0] if len(longest) == 1 else None


def label_set(references: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """The labels to score against: the given ones, or the sorted distinct references."""
    return list(labels) if labels else sorted(set(references))


def check_references_are_labels(references: Sequence[str], labels: Sequence[str]) -> None:
    """Refuse references outside the label set, naming the first one."""
    known = set(labels)
    for index, reference in enumerate(references):
        if reference not in known:
            raise InvalidReferenceError(index, f"label {reference!r} is not one of the {len(known)} labels")


def classification_scores(references: Sequence[str], predictions: Sequence[str | None]) -> dict[str, float]:
    """Accuracy, macro and weighted precision/recall/F1, and the unparsed share.

    Unparsed predictions count as wrong. Macro averages run over the labels that occur in the references or the
    predictions, so labels absent from a small sample do not drag the average down with zeros.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if not references:
        return {}
    predicted = [prediction if prediction is not None else UNPARSED for prediction in predictions]
    scored = sorted((set(references) | set(predicted)) - {UNPARSED})
    scores = {"accuracy": float(accuracy_score(references, predicted))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predicted, labels=scored, average=average, zero_division=0
        )
        scores[f"{average}Precision"] = float(precision)
        scores[f"{average}Recall"] = float(recall)
        scores[f"{average}F1"] = float(f1)
    scores["unparsed"] = predicted.count(UNPARSED) / len(predicted)
    return scores


def confusion_matrix(
    references: Sequence[str], predictions: Sequence[str | None], labels: Sequence[str]
) -> ConfusionMatrix:
    """Rows: reference labels; columns: predicted labels and UNPARSED."""
    from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

    columns = [*labels, UNPARSED]
    predicted = [prediction if prediction is not None else UNPARSED for prediction in predictions]
    square = sklearn_confusion_matrix(references, predicted, labels=columns)
    # The UNPARSED row is always empty: a reference is always a known label.
    return ConfusionMatrix(
        labels=list(labels), columns=columns, matrix=[[int(n) for n in row] for row in square[: len(labels)]]
    )


def exact_match(reference: str, output: str) -> bool:
    """Equal after normalise_text."""
    return normalise_text(reference) == normalise_text(output)


def parse_json_output(text: str) -> tuple[bool, Any]:
    """(True, value) when the text is JSON, or holds JSON inside a ``` or ```json fence; else (False, None)."""
    candidates = [text.strip(), *(match.strip() for match in _FENCE.findall(text))]
    for candidate in candidates:
        try:
            return True, json.loads(candidate)
        except ValueError:
            continue
    return False, None


def _canonical(value: Any) -> str:
    # Strings compare by case and whitespace only; other values by their compact JSON.
    if isinstance(value, str):
        return " ".join(value.casefold().split())
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _triple(item: Any) -> tuple[str, str, str] | None:
    if isinstance(item, list | tuple) and len(item) == 3:
        return (_canonical(item[0]), _canonical(item[1]), _canonical(item[2]))
    if isinstance(item, dict) and set(_TRIPLE_KEYS) <= set(item):
        return (_canonical(item["subject"]), _canonical(item["relation"]), _canonical(item["object"]))
    return None


def _leaf_fields(value: Any, path: str) -> list[tuple[str, ...]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _leaf_fields(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [pair for item in value for pair in _leaf_fields(item, path)]
    return [(path, _canonical(value))]


def json_fields(value: Any) -> Counter[tuple[str, ...]]:
    """The fields a JSON value asserts, as a multiset.

    A list whose every item is a triple ([s, r, o] or {subject, relation, object}) gives one field per triple;
    anything else gives (key path, value) pairs for every leaf, nested keys joined by dots, list items under their
    list's key.
    """
    if isinstance(value, list) and value:
        triples = [_triple(item) for item in value]
        if all(triple is not None for triple in triples):
            return Counter(triple for triple in triples if triple is not None)
    return Counter(_leaf_fields(value, ""))


def field_counts(reference: Counter[tuple[str, ...]], predicted: Counter[tuple[str, ...]]) -> FieldCounts:
    """Matches between two field multisets."""
    matched = sum((reference & predicted).values())
    return FieldCounts(matched, sum(predicted.values()) - matched, sum(reference.values()) - matched)


def precision_recall_f1(counts: FieldCounts) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts; 0 where undefined, except 1.0 throughout when both sides are empty."""
    tp, fp, fn = counts.true_positives, counts.false_positives, counts.false_negatives
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def json_sample_counts(reference: str, output: str, index: int) -> tuple[bool, FieldCounts]:
    """Whether the output is valid JSON and its field counts against the reference (which must be JSON)."""
    reference_ok, reference_value = parse_json_output(reference)
    if not reference_ok:
        raise InvalidReferenceError(index, f"metric json needs JSON references, got {reference[:80]!r}")
    output_ok, output_value = parse_json_output(output)
    predicted = json_fields(output_value) if output_ok else Counter()
    return output_ok, field_counts(json_fields(reference_value), predicted)


def json_scores(references: Sequence[str], outputs: Sequence[str]) -> tuple[dict[str, float], list[SampleScores]]:
    """Valid-JSON rate and field precision/recall/F1 pooled over all samples (micro average), plus per-sample F1."""
    total = FieldCounts()
    valid = 0
    samples: list[SampleScores] = []
    for index, (reference, output) in enumerate(zip(references, outputs, strict=True)):
        ok, counts = json_sample_counts(reference, output, index)
        valid += ok
        total += counts
        samples.append({"jsonValid": float(ok), "jsonF1": precision_recall_f1(counts)[2]})
    precision, recall, f1 = precision_recall_f1(total)
    scores = {"jsonValid": valid / len(references), "jsonPrecision": precision, "jsonRecall": recall, "jsonF1": f1}
    return (scores if references else {}), samples


def rouge_l(references: Sequence[str], outputs: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each output (rouge-score, Porter stemming; its tokenizer keeps ASCII letters and digits)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        float(scorer.score(reference, output)["rougeL"].fmeasure)
        for reference, output in zip(references, outputs, strict=True)
    ]


def classification_part(
    references: Sequence[str], outputs: Sequence[str], labels: Sequence[str] | None, keep: Callable[[str], bool]
) -> OutputScores:
    """Outputs read as labels: the scores `keep` selects, each sample's prediction, and the confusion matrix."""
    classes = label_set(references, labels)
    check_references_are_labels(references, classes)
    predictions = [parse_label(output, classes) for output in outputs]
    scores = classification_scores(references, predictions)
    return OutputScores(
        scores={name: value for name, value in scores.items() if keep(name)},
        samples=[
            {"prediction": prediction, "correct": float(prediction == reference)}
            for reference, prediction in zip(references, predictions, strict=True)
        ],
        confusion=confusion_matrix(references, predictions, classes),
    )


def accuracy_part(references: Sequence[str], outputs: Sequence[str], labels: Sequence[str] | None) -> OutputScores:
    return classification_part(references, outputs, labels, lambda name: name in {"accuracy", "unparsed"})


def f1_part(references: Sequence[str], outputs: Sequence[str], labels: Sequence[str] | None) -> OutputScores:
    return classification_part(references, outputs, labels, lambda name: name.startswith(("macro", "weighted")))


def per_sample_part(name: str, values: Sequence[float]) -> OutputScores:
    """A score that is the mean of one value per sample."""
    return OutputScores(scores={name: sum(values) / len(values)}, samples=[{name: value} for value in values])


def exact_match_part(references: Sequence[str], outputs: Sequence[str], _: Sequence[str] | None) -> OutputScores:
    matches = [float(exact_match(reference, output)) for reference, output in zip(references, outputs, strict=True)]
    return per_sample_part("exactMatch", matches)


def json_part(references: Sequence[str], outputs: Sequence[str], _: Sequence[str] | None) -> OutputScores:
    scores, samples = json_scores(references, outputs)
    return OutputScores(scores=scores, samples=samples)


def rouge_l_part(references: Sequence[str], outputs: Sequence[str], _: Sequence[str] | None) -> OutputScores:
    return per_sample_part("rougeL", rouge_l(references, outputs))


# How each metric that reads outputs as text scores them: a new metric is an entry here, its scores in
# kubetune.api.METRIC_SCORES, and its name in the spec's EvaluationMetric. Loss and the judge are scored elsewhere.
TEXT_SCORERS: dict[str, Callable[[Sequence[str], Sequence[str], Sequence[str] | None], OutputScores]] = {
    "accuracy": accuracy_part,
    "f1": f1_part,
    "exactMatch": exact_match_part,
    "json": json_part,
    "rougeL": rouge_l_part,
}
TEXT_METRICS: frozenset[str] = frozenset(TEXT_SCORERS)


def score_outputs(
    metrics: Sequence[EvaluationMetric],
    references: Sequence[str],
    outputs: Sequence[str],
    labels: Sequence[str] | None = None,
) -> OutputScores:
    """Every text metric in `metrics` for one model's outputs, merged: scores, per-sample scores, confusion."""
    if len(references) != len(outputs):
        raise ValueError(f"{len(references)} references but {len(outputs)} outputs")
    result = OutputScores(samples=[{} for _ in references])
    if not references:
        return result
    for metric in dict.fromkeys(metrics):
        if metric not in TEXT_SCORERS:
            continue
        part = TEXT_SCORERS[metric](references, outputs, labels)
        result.scores.update(part.scores)
        for sample, extra in zip(result.samples, part.samples, strict=True):
            sample.update(extra)
        result.confusion = part.confusion or result.confusion
    return result


def looks_like_json(reference: str) -> bool:
    """A JSON object or array (bare or fenced)."""
    ok, value = parse_json_output(reference)
    return ok and isinstance(value, dict | list)


def default_metrics(dataset_format: str, references: Sequence[str]) -> list[EvaluationMetric]:
    """The metrics an empty evaluation.metrics means: loss, plus what suits the references.

    classification → accuracy and F1; text (no prompt to answer) → loss only; every reference a JSON object/array →
    json; at least 90% of references of at most 5 words → exactMatch; otherwise rougeL.
    """
    traits = FORMATS.get(dataset_format)
    if traits is not None and not traits.prompted:
        return ["loss"]
    if traits is not None and traits.labelled:
        return ["loss", "accuracy", "f1"]
    if references and all(looks_like_json(reference) for reference in references):
        return ["loss", "json"]
    short = sum(len(reference.split()) <= SHORT_ANSWER_WORDS for reference in references)
    if references and short >= SHORT_ANSWER_SHARE * len(references):
        return ["loss", "exactMatch"]
    return ["loss", "rougeL"]


def headline_metric(metrics: Sequence[EvaluationMetric], gate_metric: str | None = None) -> str:
    """The score that sums up the evaluation: the gate's metric if any, else the first non-loss metric's score."""
    if gate_metric:
        return resolve_score_name(gate_metric)
    for metric in metrics:
        if metric != "loss":
            return PRIMARY_SCORE[metric]
    return "loss"


def resolve_score_name(name: str) -> str:
    """A score name as it appears in the metric tables: spec names (f1, json) map to their headline score."""
    return PRIMARY_SCORE.get(name, name)


def is_better(name: str, value: float, other: float) -> bool:
    """Whether value beats other on this score (strictly), given its direction."""
    return value < other if name in LOWER_IS_BETTER else value > other
