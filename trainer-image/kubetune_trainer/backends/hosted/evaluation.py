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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kubetune.api import EvaluationMetric, EvaluationSpec
from kubetune_trainer.chat_endpoint import ChatEndpoint
from kubetune_trainer.data.rows import Example
from kubetune_trainer.evaluate.judge import LlmJudge
from kubetune_trainer.evaluate.predictors import EndpointPredictor, Predictor
from kubetune_trainer.evaluate.results import BASELINES, TUNED, EvaluationResults
from kubetune_trainer.evaluate.runner import (
    NEW_TOKENS_CAP,
    NEW_TOKENS_MARGIN,
    ArmPlan,
    ProgressCallback,
    evaluate_arms,
)

MAX_CONCURRENCY = 16
BYTES_PER_TOKEN = 4


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


def endpoint_arms(endpoint: ChatEndpoint, models: HostedModels, spec: EvaluationSpec) -> ArmPlan:
    """The hosted fine-tuned model, and its base for every baseline, answering through the endpoint."""
    predictors: dict[str, Predictor] = {TUNED: EndpointPredictor(endpoint, models.tuned)}
    for name in BASELINES:
        predictors[name] = EndpointPredictor(endpoint, models.base)
    return ArmPlan(predictors, [], endpoint.max_tokens)


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

    def plan(metrics: Sequence[EvaluationMetric], references: Sequence[str]) -> ArmPlan:
        return endpoint_arms(endpoint, models, spec)

    return evaluate_arms(
        plan,
        validation,
        train,
        spec,
        dataset_format=dataset_format,
        labels=labels,
        seed=seed,
        judge=judge,
        progress=progress,
        environ=environ,
    )
