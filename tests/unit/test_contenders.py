"""What a contender's answers cost, and the prompts each prompting style gives."""

from __future__ import annotations

import pytest
from kubetune_trainer.data.formats import few_shot_prompt
from kubetune_trainer.data.rows import Example
from kubetune_trainer.evaluate.contenders import RequestRecord, contender_key, percentile, prompts_for, serving_cost

from kubetune.api import ContenderSpec, SecretKeyRef
from kubetune.contract import contender_api_key_env

pytestmark = pytest.mark.unit


def contender(**prices: float) -> ContenderSpec:
    return ContenderSpec(name="big", model="gpt-4o", **prices)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(value) for value in range(1, 21)]
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile([], 0.5)) == (10.0, 19.0, 0.0)


def test_cost_per_1000_requests_comes_from_the_mean_tokens_and_the_prices() -> None:
    records = [RequestRecord(1000, 10, 0.5), RequestRecord(3000, 30, 1.5), RequestRecord(0, 0, 30.0, "timeout")]
    cost = serving_cost(records, contender(price_per_million_input_tokens=2.5, price_per_million_output_tokens=10))

    # Answered requests: 2000 prompt and 20 completion tokens on average -> (2000 * 2.5 + 20 * 10) / 1e6 per request.
    assert (cost.requests, cost.failed, cost.first_error) == (3, 1, "timeout")
    assert (cost.prompt_tokens_mean, cost.completion_tokens_mean) == (2000.0, 20.0)
    assert cost.cost_per_1k_requests == pytest.approx(5.2)
    # The failed request's wait counts for latency.
    assert (cost.latency_p50_seconds, cost.latency_p95_seconds) == (1.5, 30.0)


def test_no_price_no_cost() -> None:
    assert serving_cost([RequestRecord(10, 1, 0.1)], contender()).cost_per_1k_requests is None


def example(text: str, label: str, line: int) -> Example:
    return Example(prompt=[{"role": "user", "content": text}], completion=label, input_text=text, line=line)


def test_each_prompting_style_gives_its_prompts() -> None:
    train = [example("the cup final", "Sports", 1), example("bank rates rise", "Business", 2)]
    rows = [example("who won the cup final", "Sports", 9)]
    assert prompts_for("zeroShot", rows, train, [], 1) == [rows[0].prompt]
    assert prompts_for("fewShot", rows, train, [train[1]], 1) == [few_shot_prompt(rows[0], [train[1]])]
    assert prompts_for("retrievalFewShot", rows, train, [], 1) == [few_shot_prompt(rows[0], [train[0]])]


def test_a_contender_with_a_secret_needs_its_key_and_names_the_secret() -> None:
    keyed = ContenderSpec(name="big", model="m", api_key_secret_ref=SecretKeyRef(name="openai", key="api-key"))
    assert contender_key(0, keyed, {contender_api_key_env(0): "sk-1"}) == "sk-1"
    with pytest.raises(ValueError, match="secret 'openai', key 'api-key'"):
        contender_key(0, keyed, {})
    assert contender_key(1, contender(), {}) == ""
