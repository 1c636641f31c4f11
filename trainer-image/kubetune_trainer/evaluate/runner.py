"""The evaluation runner: every arm (the tuned model, the prompting baselines of its base, the contenders) answers the
same held-out rows through a predictor, and the same code scores every answer, judges it and prices it.

A backend supplies the predictors (in_process for a model in this process, predictors.EndpointPredictor for a model
behind an OpenAI-compatible endpoint); the rows, the prompts of each prompting style, the metrics, the scoring, the
judge and the results are the runner's alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kubetune.api import EvaluationMetric, EvaluationSpec
from kubetune_trainer.data.formats import select_shots
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.contenders import ServingCost, prompts_for
from kubetune_trainer.evaluate.judge import JudgeCase, LlmJudge
from kubetune_trainer.evaluate.predictors import ContenderPredictor, Predictor, RowFailedError
from kubetune_trainer.evaluate.results import (
    BASELINES,
    FEW_SHOT,
    MIN_JUDGED_SHARE,
    RETRIEVAL_FEW_SHOT,
    TUNED,
    ZERO_SHOT,
    EvalSample,
    EvaluationResults,
    JudgeCost,
    ModelResult,
)
from kubetune_trainer.evaluate.scoring import (
    TEXT_METRICS,
    TEXT_SCORERS,
    InvalidReferenceError,
    SampleScores,
    default_metrics,
    headline_metric,
    score_outputs,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (done, total) units of work: one unit per sample generated, scored for loss, or judged, per model.
While the judge runs it is called from the judge's worker threads, one call at a time."""

NEW_TOKENS_MARGIN = 16
"""Tokens allowed beyond the longest reference, so a baseline that wraps its answer in a sentence still finishes it."""
NEW_TOKENS_CAP = 512
PROBABILITY_METRICS: frozenset[str] = frozenset({"loss", "perplexity"})
"""Scores that need the model's probabilities of the reference tokens."""
NO_LOSS_NOTE = (
    "loss not computed: a model answering through chat completions gives no probabilities of the reference tokens"
)


class EvaluationInputError(ValueError):
    """The evaluation cannot run on these inputs; the message names the validation line or the setting at fault."""


@dataclass(frozen=True)
class ArmPlan:
    """What a backend can run: a predictor for the tuned arm and for each baseline it can serve, notes on the rest, and
    the reply length cap (contenders get the same)."""

    predictors: Mapping[str, Predictor]
    notes: list[str]
    max_new_tokens: int


PlanArms = Callable[[Sequence[EvaluationMetric], Sequence[str]], ArmPlan]
"""The backend's plan, given the evaluation's metrics and the references."""


@dataclass(frozen=True)
class Arm:
    """One entry of the report: who answers, on which prompts, and whether its loss is scored."""

    name: str
    predictor: Predictor
    prompts: list[ChatMessages | str]
    loss: bool


class Progress:
    """Counts finished units of work and reports them through the callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self._callback = callback

    def advance(self, units: int) -> None:
        """Add finished units and report."""
        self.done += units
        if self._callback is not None:
            self._callback(self.done, self.total)


def check_shots_available(spec: EvaluationSpec, train: Sequence[Example]) -> None:
    """The few-shot baselines take their shots from train: refuse them when there is none."""
    wanting = [name for name in (FEW_SHOT, RETRIEVAL_FEW_SHOT) if name in spec.baselines]
    if wanting and not train:
        raise EvaluationInputError(
            f"the {' and '.join(wanting)} baseline needs train examples for its shots, and there are none"
        )


def judge_outputs(
    judge: LlmJudge, samples: Sequence[EvalSample], outputs: Sequence[str], cost: JudgeCost, progress: Progress
) -> tuple[dict[str, float], list[SampleScores]]:
    """The judge's mean score over the judged cases and the unjudged share, plus per-sample scores; cost updated."""
    cases = [
        JudgeCase(sample.input_text, sample.reference, output) for sample, output in zip(samples, outputs, strict=True)
    ]
    # The judge reports each finished case once, serially, so each report is one more unit done.
    run = judge.judge_cases(cases, progress=lambda done, total: progress.advance(1))
    judged = [verdict.score for verdict in run.verdicts if verdict.score is not None]
    cost.prompt_tokens += run.usage.prompt_tokens
    cost.completion_tokens += run.usage.completion_tokens
    cost.requests += run.usage.requests
    cost.judged += len(judged)
    cost.unjudged += len(cases) - len(judged)
    cost.response_format = run.response_format
    cost.first_error = cost.first_error or next((v.error for v in run.verdicts if v.error), None)
    scores = {"judgeUnjudged": (len(cases) - len(judged)) / len(cases)} if cases else {}
    # A mean over a few judged cases would stand for all of them: too few and there is no judge score (the gate on it
    # fails, and the job says why).
    if judged and len(judged) >= MIN_JUDGED_SHARE * len(cases):
        scores["judge"] = sum(judged) / len(judged)
    per_sample: list[SampleScores] = [
        {"judge": verdict.score, "judgeReasoning": verdict.reasoning or verdict.error} for verdict in run.verdicts
    ]
    return scores, per_sample


def generates_text(metrics: Sequence[EvaluationMetric]) -> bool:
    """Whether any metric needs generated outputs (loss alone does not)."""
    return any(metric in TEXT_METRICS or metric == "judge" for metric in metrics)


def evaluation_metrics(spec: EvaluationSpec, dataset_format: str, references: Sequence[str]) -> list[EvaluationMetric]:
    """The spec's metrics, or those the data suggests when it lists none."""
    return list(spec.metrics) or default_metrics(dataset_format, references)


def add_text_scores(
    result: ModelResult,
    samples: Sequence[EvalSample],
    metrics: Sequence[EvaluationMetric],
    labels: Sequence[str] | None,
) -> None:
    """The text metrics of result's outputs, aggregated and per sample, into result: the one scoring of every arm,
    in-process or behind an endpoint."""
    try:
        scored = score_outputs(metrics, [sample.reference for sample in samples], result.outputs, labels)
    except InvalidReferenceError as error:
        raise EvaluationInputError(f"validation line {samples[error.index].line}: {error}") from error
    result.metrics.update(scored.scores)
    result.sample_scores = scored.samples
    result.confusion = scored.confusion


def add_judge_scores(
    judge: LlmJudge, results: dict[str, ModelResult], samples: Sequence[EvalSample], progress: Progress
) -> JudgeCost:
    """Grade every model's outputs with the judge; its scores join each model's metrics and per-sample scores."""
    cost = JudgeCost(model=judge.spec.model)
    for name, result in results.items():
        scores, per_sample = judge_outputs(judge, samples, result.outputs, cost, progress)
        result.metrics.update(scores)
        earlier = result.sample_scores or [{} for _ in samples]
        result.sample_scores = [{**before, **after} for before, after in zip(earlier, per_sample, strict=True)]
        log.info("judged %s: %s", name, scores)
    return cost


def styled_prompts(
    style: str, examples: Sequence[Example], train: Sequence[Example], spec: EvaluationSpec, seed: int
) -> list[ChatMessages | str]:
    """The prompts a prompting style gives the rows; random shots are drawn with the seed, so the fewShot baseline
    and a fewShot contender see the same prompts."""
    shots = select_shots(train, spec.few_shot_k, seed) if style == FEW_SHOT else []
    return prompts_for(style, examples, train, shots, spec.few_shot_k)


def planned_arms(
    plan: ArmPlan,
    examples: Sequence[Example],
    train: Sequence[Example],
    spec: EvaluationSpec,
    metrics: Sequence[EvaluationMetric],
    *,
    seed: int,
    environ: Mapping[str, str] | None,
) -> list[Arm]:
    """The tuned arm (zero-shot prompts), the spec's baselines the backend can serve, then the contenders, each
    prompted its way."""
    prompts: dict[str, list[ChatMessages | str]] = {}

    def of_style(style: str) -> list[ChatMessages | str]:
        if style not in prompts:
            prompts[style] = styled_prompts(style, examples, train, spec, seed)
        return prompts[style]

    loss = "loss" in metrics
    arms = [Arm(TUNED, plan.predictors[TUNED], of_style(ZERO_SHOT), loss)]
    for name in BASELINES:
        if name in spec.baselines and name in plan.predictors:
            predictor = plan.predictors[name]
            arms.append(Arm(name, predictor, of_style(name), loss and predictor.measures_loss))
    for index, contender in enumerate(spec.contenders):
        predictor = ContenderPredictor(index, contender, plan.max_new_tokens, seed, environ)
        arms.append(Arm(contender.name, predictor, of_style(contender.prompting), False))
    return arms


def scorable_metrics(metrics: Sequence[EvaluationMetric], tuned: Predictor) -> tuple[list[EvaluationMetric], list[str]]:
    """The metrics this evaluation computes (less loss and perplexity when the tuned model's predictor cannot measure
    them) and a note on what was left out."""
    if tuned.measures_loss:
        return list(metrics), []
    kept = [metric for metric in metrics if metric not in PROBABILITY_METRICS]
    if not kept:
        scorable = [*TEXT_SCORERS, "judge"]
        raise EvaluationInputError(
            f"no metric a model answering through chat completions can be scored on: set evaluation.metrics to "
            f"{', '.join(scorable[:-1])} or {scorable[-1]}"
        )
    return kept, [NO_LOSS_NOTE] if len(kept) < len(metrics) else []


@dataclass
class EvalRun:
    """What every arm is scored with: the rows, the metrics, and the shared progress and timings."""

    examples: list[Example]
    samples: list[EvalSample]
    metrics: list[EvaluationMetric]
    labels: Sequence[str] | None
    progress: Progress
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> bool:
        """Whether the arms must answer (loss alone needs no answers)."""
        return generates_text(self.metrics)

    def line_of(self, index: int) -> int | None:
        """The validation line of the row at `index`."""
        return self.samples[index].line


def score_arm(arm: Arm, run: EvalRun) -> tuple[ModelResult, ServingCost]:
    """One arm's answers, scored like every other arm's, and what they cost; timed."""
    started = time.monotonic()
    try:
        prediction = arm.predictor.predict(
            arm.prompts, run.examples, text=run.text, loss=arm.loss, on_done=run.progress.advance
        )
    except RowFailedError as error:
        raise EvaluationInputError(
            f"{arm.name} {error.message}, on validation line {run.line_of(error.index)}"
        ) from error
    except InvalidReferenceError as error:
        raise EvaluationInputError(f"validation line {run.line_of(error.index)}: {error}") from error
    run.seconds[arm.name] = time.monotonic() - started - prediction.loss_seconds
    if prediction.loss_seconds:
        run.seconds["loss"] = run.seconds.get("loss", 0.0) + prediction.loss_seconds
    result = ModelResult(outputs=prediction.outputs if prediction.outputs is not None else [""] * len(run.samples))
    result.metrics.update(prediction.scores)
    if prediction.outputs is not None:
        add_text_scores(result, run.samples, run.metrics, run.labels)
    return result, prediction.cost


def evaluate_arms(
    plan_arms: PlanArms,
    validation: Sequence[Example],
    train: Sequence[Example],
    spec: EvaluationSpec,
    *,
    dataset_format: str,
    labels: Sequence[str] | None = None,
    seed: int = 42,
    judge: LlmJudge | None = None,
    progress: ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
) -> EvaluationResults:
    """Score the tuned model, the spec's baselines and its contenders on the first maxSamples validation examples,
    each through the predictor the backend's plan gives it."""
    started = time.monotonic()
    examples = list(validation[: spec.max_samples])
    if not examples:
        raise EvaluationInputError("there are no validation examples to evaluate")
    samples = [EvalSample(example.input_text, example.completion, example.line) for example in examples]
    references = [sample.reference for sample in samples]
    wanted = evaluation_metrics(spec, dataset_format, references)
    plan = plan_arms(wanted, references)
    metrics, dropped = scorable_metrics(wanted, plan.predictors[TUNED])
    if "judge" in metrics and judge is None:
        raise EvaluationInputError("evaluation.metrics has judge but no judge was configured (evaluation.judge)")
    check_shots_available(spec, train)
    arms = planned_arms(plan, examples, train, spec, metrics, seed=seed, environ=environ)
    judged = judge is not None and "judge" in metrics
    text = generates_text(metrics)
    units = sum(arm.predictor.units_per_row(text=text, loss=arm.loss) + int(judged) for arm in arms)
    run = EvalRun(examples, samples, metrics, labels, Progress(len(examples) * units, progress))
    results: dict[str, ModelResult] = {}
    serving: dict[str, ServingCost] = {}
    for arm in arms:
        log.info("evaluating %s on %d samples", arm.name, len(examples))
        results[arm.name], serving[arm.name] = score_arm(arm, run)
    cost = None
    if judge is not None and judged:
        judging = time.monotonic()
        cost = add_judge_scores(judge, results, samples, run.progress)
        run.seconds["judge"] = time.monotonic() - judging
    run.seconds["total"] = time.monotonic() - started
    return EvaluationResults(
        headline_metric=headline_metric(metrics, spec.gate.metric if spec.gate else None),
        samples=samples,
        models=results,
        seconds=run.seconds,
        judge_cost=cost,
        notes=[*plan.notes, *dropped],
        serving=serving,
    )
