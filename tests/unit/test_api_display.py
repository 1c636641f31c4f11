"""What the API's display helpers make of model references and scores."""

from __future__ import annotations

import math

import pytest

from kubetune.api import ModelSpec, significant


@pytest.mark.parametrize(
    ("model", "short"),
    [
        (ModelSpec(name="HuggingFaceTB/SmolLM2-135M-Instruct"), "SmolLM2-135M-Instruct"),
        (ModelSpec(name="gpt-4o-mini-2024-07-18"), "gpt-4o-mini-2024-07-18"),
        (ModelSpec(uri="s3://models/smollm2-135m/"), "smollm2-135m"),
        (ModelSpec(uri="/models/llama-3-8b"), "llama-3-8b"),
    ],
)
def test_a_model_is_called_by_its_last_part(model: ModelSpec, short: str) -> None:
    assert model.short_name == short


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.23025472164154054, 0.2303),
        (12.3456789, 12.35),
        (0.000123456, 0.0001235),
        (1.0, 1.0),
        (0.0, 0.0),
        (-0.0123456, -0.01235),
        (None, None),
    ],
)
def test_scores_are_shown_to_four_significant_digits(value: float | None, shown: float | None) -> None:
    assert significant(value) == shown


def test_a_value_that_is_not_finite_is_left_as_it_is() -> None:
    assert math.isinf(significant(math.inf))
