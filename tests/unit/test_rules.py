"""The CRD's CEL rules evaluated offline: the same verdicts and fields as the API server (tests/invalid_manifests.py
holds the cases both must refuse)."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.evaluate.scoring import classification_scores, json_scores
from pydantic import BaseModel, ConfigDict

from kubetune.api import METRIC_SCORES, FineTuneJobSpec
from kubetune.rules import RuleViolation, rule_violations


class Window(BaseModel):
    """A model with a rule, a messageExpression, a transition rule and a rule that cannot evaluate."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.low <= self.high",
                    "message": "low must not exceed high",
                    "messageExpression": "'low ' + string(self.low) + ' exceeds high ' + string(self.high)",
                    "fieldPath": ".low",
                },
                {"rule": "self == oldSelf", "message": "immutable"},
                {"rule": "self.missing > 0", "message": "needs missing"},
            ]
        }
    )

    low: int
    high: int


class Holder(BaseModel):
    windows: list[Window]


def test_each_broken_rule_is_named_at_its_field_with_the_message_the_api_server_would_give() -> None:
    violations = rule_violations(Holder(windows=[Window(low=1, high=2), Window(low=5, high=3)]))

    # The transition rule needs the stored object and is left to the API server; a rule that cannot evaluate
    # refuses the object, as the API server's does.
    assert [violation.path for violation in violations] == [("windows", 0), ("windows", 1, "low"), ("windows", 1)]
    assert violations[1] == RuleViolation(("windows", 1, "low"), "low 5 exceeds high 3")
    assert str(violations[1]) == "windows.1.low: low 5 exceeds high 3"
    assert violations[0].message.startswith("needs missing (the rule could not be evaluated")


def test_a_valid_spec_breaks_no_rule() -> None:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "classification"},
            "output": {"uri": "s3://out/run"},
            "evaluation": {"gate": {"metric": "weightedF1", "threshold": 0.8, "mustBeat": ["fewShot"]}},
        }
    )
    assert rule_violations(spec) == []


def scores_named(scores: dict[str, Any]) -> set[str]:
    return set(scores)


def test_the_metric_registry_names_every_score_the_scoring_code_reports() -> None:
    # The gate's rules read METRIC_SCORES; a score the scoring code adds must be registered or gates on it are refused.
    accuracy_and_f1 = scores_named(classification_scores(["a", "b"], ["a", None]))
    registered = {score.name for metric in ("accuracy", "f1") for score in METRIC_SCORES[metric]}
    assert accuracy_and_f1 == registered
    json_names = scores_named(json_scores(['{"a": 1}'], ['{"a": 1}'])[0])
    assert json_names == {score.name for score in METRIC_SCORES["json"]}
