"""Evaluation of a hosted fine-tuned model: local jobs' samples, shots, metrics, judge and report, with predictions
from chat completions of an OpenAI-compatible endpoint instead of local generation.

The tuned model is the hosted fine-tuned model; the zero-shot and few-shot baselines are the hosted base model on the
same held-out samples (few-shot shots from train, chosen with the seed exactly as for local jobs). Template prompts go
as one user message. Replies are greedy (temperature 0, the job's seed) and capped in length. Loss needs the model's
probabilities of the reference tokens, which a chat completion does not give, so a hosted evaluation has no loss
(the report notes it). Requests run `evaluation.batchSize` at a time (at most MAX_CONCURRENCY); 429/5xx/timeouts are
retried by the SDK, and a request that still fails ends the evaluation with the sample's validation line.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune.api import EvaluationMetric, EvaluationSpec
from kubetune_trainer.chat_endpoint import ChatEndpoint, first_failure
from kubetune_trainer.data.formats import few_shot_prompt
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.contenders import ServingCost, ask_contender, serving_cost
from kubetune_trainer.evaluate.judge import LlmJudge
from kubetune_trainer.evaluate.results import (
    FEW_SHOT,
    RETRIEVAL_FEW_SHOT,
    TUNED,
    ZERO_SHOT,
    EvalSample,
    EvaluationResults,
    ModelResult,
)
from kubetune_trainer.evaluate.retrieval import retrieved_shots
from kubetune_trainer.evaluate.runner import (
    NEW_TOKENS_CAP,
    NEW_TOKENS_MARGIN,
    EvaluationInputError,
    Progress,
    ProgressCallback,
    add_judge_scores,
    add_text_scores,
    check_shots_available,
    evaluation_metrics,
    select_shots,
)
from kubetune_trainer.evaluate.scoring import TEXT_SCORERS, headline_metric

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 16
BYTES_PER_TOKEN = 4
# Scores that need the probabilities of the reference tokens.
UNSCORED_METRICS: frozenset[str] = frozenset({"loss", "perplexity"})
NO_LOSS_NOTE = "loss not computed: a hosted model's chat completions give no probabilities of the reference tokens"


@dataclass(frozen=True)
class HostedModels:
    """The endpoint's names for the fine-tuned model and its base."""

    tuned: str
    base: str


def reply_token_cap(spec: EvaluationSpec, references: Sequence[str]) -> int:
    """evaluation.maxNewTokens, or the longest reference in approximate tokens (4 bytes each) plus a margin, capped."""
    if spec.max_new_tokens is not None:
        return spec.max_new_tokens
    longest = max((math.ceil(len(reference.encode()) / BYTES_PER_TOKEN) for reference in references), default=0)
    return min(NEW_TOKENS_CAP, longest + NEW_TOKENS_MARGIN)


def scorable_metrics(
    spec: EvaluationSpec, dataset_format: str, references: Sequence[str]
) -> tuple[list[EvaluationMetric], list[str]]:
    """The metrics a hosted evaluation computes (the spec's or the inferred ones, less loss) and notes on the rest."""
    metrics = evaluation_metrics(spec, dataset_format, references)
    kept = [metric for metric in metrics if metric not in UNSCORED_METRICS]
    notes = [NO_LOSS_NOTE] if len(kept) < len(metrics) else []
    if not kept:
        scorable = [*TEXT_SCORERS, "judge"]
        raise EvaluationInputError(
            f"no metric a hosted model can be scored on: set evaluation.metrics to {', '.join(scorable[:-1])} "
            f"or {scorable[-1]}"
        )
    return kept, notes


def planned_prompts(
    examples: Sequence[Example], train: Sequence[Example], spec: EvaluationSpec, seed: int, models: HostedModels
) -> dict[str, tuple[str, list[ChatMessages | str]]]:
    """{report entry: (endpoint model, prompts)}: tuned, then the spec's baselines on the base model."""
    prompts = [example.prompt for example in examples]
    plan: dict[str, tuple[str, list[ChatMessages | str]]] = {TUNED: (models.tuned, prompts)}
    if ZERO_SHOT in spec.baselines:
        plan[ZERO_SHOT] = (models.base, prompts)
    check_shots_available(spec, train)
    if FEW_SHOT in spec.baselines:
        shots = select_shots(train, spec.few_shot_k, seed)
        plan[FEW_SHOT] = (models.base, [few_shot_prompt(example, shots) for example in examples])
    if RETRIEVAL_FEW_SHOT in spec.baselines:
        nearest = retrieved_shots(train, examples, spec.few_shot_k)
        plan[RETRIEVAL_FEW_SHOT] = (
            models.base,
            [few_shot_prompt(example, own) for example, own in zip(examples, nearest, strict=True)],
        )
    return plan


def run_hosted_evaluation(
    endpoint: ChatEndpoint,
    models: HostedModels,
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
    """Score the hosted fine-tuned model, the spec's baselines and its contenders on the first maxSamples validation
    examples."""
    started = time.monotonic()
    examples = list(validation[: spec.max_samples])
    if not examples:
        raise EvaluationInputError("there are no validation examples to evaluate")
    samples = [EvalSample(example.input_text, example.completion, example.line) for example in examples]
    metrics, notes = scorable_metrics(spec, dataset_format, [sample.reference for sample in samples])
    if "judge" in metrics and judge is None:
        raise EvaluationInputError("evaluation.metrics has judge but no judge was configured (evaluation.judge)")
    plan = planned_prompts(examples, train, spec, seed, models)
    judged = "judge" in metrics and judge is not None
    units = len(examples) * (len(plan) + len(spec.contenders)) * (2 if judged else 1)
    counter = Progress(units, progress)
    seconds: dict[str, float] = {}
    results: dict[str, ModelResult] = {}
    serving: dict[str, ServingCost] = {}
    for name, (model, prompts) in plan.items():
        log.info("evaluating %s (%s) on %d samples", name, model, len(examples))
        began = time.monotonic()
        # Unlike a contender's, a failed request of the job's own models fails the evaluation: its scores would lie.
        outputs, records = endpoint.answer_all(model, prompts, counter.advance, stop_on_failure=True)
        failure = first_failure(records)
        if failure is not None:
            index, why = failure
            raise EvaluationInputError(f"{name} model {model}: {why}, on validation line {samples[index].line}")
        seconds[name] = time.monotonic() - began
        results[name] = ModelResult(outputs=outputs)
        add_text_scores(results[name], samples, metrics, labels)
        serving[name] = serving_cost(records)
    for index, contender in enumerate(spec.contenders):
        log.info("asking contender %s (%s) on %d samples", contender.name, contender.model, len(examples))
        began = time.monotonic()
        outputs, records = ask_contender(
            index,
            contender,
            examples,
            train,
            spec,
            max_tokens=endpoint.max_tokens,
            seed=seed,
            environ=environ,
            on_done=counter.advance,
        )
        seconds[contender.name] = time.monotonic() - began
        results[contender.name] = ModelResult(outputs=outputs)
        add_text_scores(results[contender.name], samples, metrics, labels)
        serving[contender.name] = serving_cost(records, contender)
    cost = None
    if judged and judge is not None:
        began = time.monotonic()
        cost = add_judge_scores(judge, results, samples, counter)
        seconds["judge"] = time.monotonic() - began
    seconds["total"] = time.monotonic() - started
    return EvaluationResults(
        headline_metric=headline_metric(metrics, spec.gate.metric if spec.gate else None),
        samples=samples,
        models=results,
        seconds=seconds,
        judge_cost=cost,
        notes=notes,
        serving=serving,
    )
