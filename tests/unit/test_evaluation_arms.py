"""The evaluation runner over the predictor interface: every arm is given the same rows and scored by the same code,
whoever answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.contenders import token_cost
from kubetune_trainer.evaluate.predictors import OnDone, Prediction, Predictor, RowFailedError
from kubetune_trainer.evaluate.results import EvaluationResults
from kubetune_trainer.evaluate.runner import (
    NO_LOSS_NOTE,
    ArmPlan,
    EvaluationInputError,
    evaluate_arms,
    styled_prompts,
)

from kubetune.api import EvaluationMetric, EvaluationSpec

pytestmark = pytest.mark.unit

LABELS = ["Business", "Sports"]
ROWS = [
    Example(f"Classify: {text}", label, text, line)
    for line, (text, label) in enumerate(
        [("Shares fell.", "Business"), ("The striker scored.", "Sports"), ("Oil rose.", "Business")], start=7
    )
]
TRAIN = [
    Example("Classify: Banks merged.", "Business", "Banks merged.", 1),
    Example("Classify: The keeper saved.", "Sports", "The keeper saved.", 2),
]


@dataclass
class ScriptedPredictor:
    """Answers from a table (row text to answer), keeping the prompts it was given; a stand-in for a model, so
    that what the runner does with any predictor's answers is what is under test."""

    answers: dict[str, str]
    measures_loss: bool = False
    loss: float | None = None
    fail_at: int | None = None
    seen: list[list[ChatMessages | str]] = field(default_factory=list)

    def units_per_row(self, *, text: bool, loss: bool) -> int:
        return int(text) + int(loss)

    def predict(
        self,
        prompts: Sequence[ChatMessages | str],
        examples: Sequence[Example],
        *,
        text: bool,
        loss: bool,
        on_done: OnDone,
    ) -> Prediction:
        self.seen.append(list(prompts))
        if self.fail_at is not None:
            raise RowFailedError(self.fail_at, "model scripted: HTTP 503")
        outputs = [self.answers[example.input_text] for example in examples] if text else None
        on_done(len(examples) * self.units_per_row(text=text, loss=loss))
        scores = {"loss": self.loss} if loss and self.loss is not None else {}
        return Prediction(outputs, token_cost([len(str(prompt)) for prompt in prompts], [1] * len(prompts)), scores)


def plan_of(**predictors: Predictor) -> ArmPlan:
    return ArmPlan(predictors, [], max_new_tokens=8)


def right() -> ScriptedPredictor:
    return ScriptedPredictor({example.input_text: example.completion for example in ROWS})


def always(label: str) -> ScriptedPredictor:
    return ScriptedPredictor({example.input_text: label for example in ROWS})


def run(plan: ArmPlan, spec: EvaluationSpec, progress: list[tuple[int, int]] | None = None) -> EvaluationResults:
    return evaluate_arms(
        lambda metrics, references: plan,
        ROWS,
        TRAIN,
        spec,
        dataset_format="classification",
        labels=LABELS,
        seed=3,
        progress=None if progress is None else (lambda done, total: progress.append((done, total))),
    )


def test_every_arm_is_scored_by_the_same_code_on_the_same_rows() -> None:
    tuned, zero, few = right(), always("Business"), always("Sports")
    spec = EvaluationSpec(metrics=["accuracy"], baselines=["zeroShot", "fewShot"], few_shot_k=1)
    progress: list[tuple[int, int]] = []

    results = run(plan_of(tuned=tuned, zeroShot=zero, fewShot=few), spec, progress)

    assert list(results.models) == ["tuned", "zeroShot", "fewShot"]
    accuracy = {name: result.metrics["accuracy"] for name, result in results.models.items()}
    assert accuracy == {"tuned": 1.0, "zeroShot": pytest.approx(2 / 3), "fewShot": pytest.approx(1 / 3)}
    assert all("unparsed" in result.metrics for result in results.models.values())
    # The tuned arm and the zero-shot base read the rows' own prompts; few-shot prompts carry the seeded shot.
    assert tuned.seen == zero.seen == [[example.prompt for example in ROWS]]
    assert few.seen == [styled_prompts("fewShot", ROWS, TRAIN, spec, seed=3)]
    assert all(shot != row for shot, row in zip(few.seen[0], tuned.seen[0], strict=True))
    assert results.serving["tuned"].requests == 3
    assert progress[-1] == (9, 9)


def test_a_baseline_the_backend_cannot_serve_is_left_out_and_the_plan_says_why() -> None:
    spec = EvaluationSpec(metrics=["accuracy"], baselines=["zeroShot", "fewShot"], few_shot_k=1)
    plan = ArmPlan({"tuned": right()}, ["baselines zeroShot, fewShot not evaluated: no base model"], 8)

    results = run(plan, spec)

    assert list(results.models) == ["tuned"]
    assert results.notes == ["baselines zeroShot, fewShot not evaluated: no base model"]


def test_loss_is_asked_only_of_predictors_that_can_measure_it() -> None:
    tuned = ScriptedPredictor(right().answers, measures_loss=True, loss=0.25)
    zero = ScriptedPredictor(always("Sports").answers, measures_loss=True, loss=1.5)
    few = ScriptedPredictor(always("Sports").answers, measures_loss=False)
    spec = EvaluationSpec(metrics=["loss", "accuracy"], baselines=["zeroShot", "fewShot"], few_shot_k=1)

    results = run(plan_of(tuned=tuned, zeroShot=zero, fewShot=few), spec)

    assert results.models["tuned"].metrics["loss"] == 0.25
    assert results.models["zeroShot"].metrics["loss"] == 1.5
    assert "loss" not in results.models["fewShot"].metrics
    assert results.notes == []


def test_without_the_tuned_model_s_probabilities_loss_is_dropped_with_a_note() -> None:
    spec = EvaluationSpec(metrics=["loss", "accuracy"], baselines=[])

    results = run(plan_of(tuned=right()), spec)

    assert "loss" not in results.models["tuned"].metrics and results.models["tuned"].metrics["accuracy"] == 1.0
    assert results.notes == [NO_LOSS_NOTE]


def test_loss_alone_on_a_predictor_without_probabilities_is_refused_naming_the_metrics_to_use() -> None:
    metrics: list[EvaluationMetric] = ["loss"]
    with pytest.raises(EvaluationInputError, match=r"set evaluation.metrics to .*accuracy.* or judge"):
        run(plan_of(tuned=right()), EvaluationSpec(metrics=metrics, baselines=[]))


def test_a_row_the_tuned_model_could_not_answer_fails_the_evaluation_naming_its_validation_line() -> None:
    failing = ScriptedPredictor({}, fail_at=1)

    with pytest.raises(EvaluationInputError) as refused:
        run(plan_of(tuned=failing), EvaluationSpec(metrics=["accuracy"], baselines=[]))

    assert str(refused.value) == "tuned model scripted: HTTP 503, on validation line 8"


def test_a_reference_outside_the_label_set_names_its_line() -> None:
    rows = [*ROWS[:2], Example("Classify: Rain.", "Weather", "Rain.", 12)]
    predictor = ScriptedPredictor({example.input_text: "Sports" for example in rows})

    with pytest.raises(EvaluationInputError, match=r"^validation line 12: "):
        evaluate_arms(
            lambda metrics, references: plan_of(tuned=predictor),
            rows,
            TRAIN,
            EvaluationSpec(metrics=["accuracy"], baselines=[]),
            dataset_format="classification",
            labels=LABELS,
        )
