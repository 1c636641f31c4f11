"""What every arm's answers cost (tokens, latency, price per request), the prompts each prompting style gives the rows,
and a contender's API key."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from kubetune.api import ContenderSpec
from kubetune.contract import contender_api_key_env
from kubetune_trainer.chat_endpoint import RequestRecord
from kubetune_trainer.data.formats import few_shot_prompt
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.retrieval import retrieved_shots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingCost:
    """What one arm's answers cost per request: tokens (mean, p95), latency (p50, p95), price per 1,000 requests."""

    requests: int
    failed: int
    prompt_tokens_mean: float
    prompt_tokens_p95: float
    completion_tokens_mean: float
    completion_tokens_p95: float
    latency_p50_seconds: float | None = None
    latency_p95_seconds: float | None = None
    cost_per_1k_requests: float | None = None
    first_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As report.json holds it (camelCase)."""
        names = {
            "prompt_tokens_mean": "promptTokensMean",
            "prompt_tokens_p95": "promptTokensP95",
            "completion_tokens_mean": "completionTokensMean",
            "completion_tokens_p95": "completionTokensP95",
            "latency_p50_seconds": "latencyP50Seconds",
            "latency_p95_seconds": "latencyP95Seconds",
            "cost_per_1k_requests": "costPer1kRequests",
            "first_error": "firstError",
        }
        return {names.get(key, key): value for key, value in asdict(self).items()}


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (share in 0-1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(share * len(ordered)) - 1)])


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def token_cost(
    prompt_tokens: Sequence[int], completion_tokens: Sequence[int], failed: int = 0, first_error: str | None = None
) -> ServingCost:
    """Token figures per request (an arm served in-process has no per-request latency or price here)."""
    return ServingCost(
        requests=len(prompt_tokens),
        failed=failed,
        prompt_tokens_mean=mean(prompt_tokens),
        prompt_tokens_p95=percentile(prompt_tokens, 0.95),
        completion_tokens_mean=mean(completion_tokens),
        completion_tokens_p95=percentile(completion_tokens, 0.95),
        first_error=first_error,
    )


def serving_cost(records: Sequence[RequestRecord], spec: ContenderSpec | None = None) -> ServingCost:
    """An endpoint's figures from its requests (failed ones count for latency, not for tokens), priced by the
    contender's token prices when it has any."""
    answered = [record for record in records if record.error is None]
    base = token_cost(
        [record.prompt_tokens for record in answered],
        [record.completion_tokens for record in answered],
        failed=len(records) - len(answered),
        first_error=next((record.error for record in records if record.error), None),
    )
    price: float | None = None
    if spec is not None and (
        spec.price_per_million_input_tokens is not None or spec.price_per_million_output_tokens is not None
    ):
        per_request = (
            base.prompt_tokens_mean * (spec.price_per_million_input_tokens or 0.0)
            + base.completion_tokens_mean * (spec.price_per_million_output_tokens or 0.0)
        ) / 1_000_000
        price = per_request * 1000
    latencies = [record.seconds for record in records]
    return replace(
        base,
        requests=len(records),
        latency_p50_seconds=percentile(latencies, 0.5),
        latency_p95_seconds=percentile(latencies, 0.95),
        cost_per_1k_requests=price,
    )


def prompts_for(
    prompting: str, examples: Sequence[Example], train: Sequence[Example], shots: Sequence[Example], k: int
) -> list[ChatMessages | str]:
    """The prompts one prompting style gives the rows: bare, with the shared random shots, or with each row's
    nearest train rows."""
    if prompting == "zeroShot":
        return [example.prompt for example in examples]
    if prompting == "fewShot":
        return [few_shot_prompt(example, list(shots)) for example in examples]
    nearest = retrieved_shots(train, examples, k)
    return [few_shot_prompt(example, own) for example, own in zip(examples, nearest, strict=True)]


def contender_key(index: int, spec: ContenderSpec, environ: Mapping[str, str] | None = None) -> str:
    """The contender's API key from the variable the operator fills from its apiKeySecretRef ('' without one)."""
    env = os.environ if environ is None else environ
    variable = contender_api_key_env(index)
    key = env.get(variable, "")
    if spec.api_key_secret_ref is not None and not key:
        ref = spec.api_key_secret_ref
        raise ValueError(
            f"evaluation.contenders[{index}] ({spec.name}) has an apiKeySecretRef but {variable} is empty: the "
            f"operator fills it from secret {ref.name!r}, key {ref.key!r}"
        )
    return key
