"""What the judge accepts as a verdict: a JSON object with a 0-100 score, also in a fence or as a numeric string."""

from __future__ import annotations

import pytest
from kubetune_trainer.evaluate.judge import MalformedVerdictError, parse_verdict

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"reasoning": "ok", "score": 75}', (75.0, "ok")),
        ('```json\n{"reasoning": "ok", "score": "75"}\n```', (75.0, "ok")),
        ('{"score": 0}', (0.0, "")),
        ('{"reasoning": 3, "score": 100.0}', (100.0, "")),
    ],
    ids=["plain", "fenced-numeric-string", "zero-without-reasoning", "reasoning-not-text"],
)
def test_a_verdict_is_read(content: str, expected: tuple[float, str]) -> None:
    assert parse_verdict(content) == expected


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "empty reply"),
        ("   ", "empty reply"),
        ("I would give it a solid eight", "not a JSON object"),
        ("[1, 2, 3]", "not a JSON object"),
        ('{"reasoning": "no score"}', "score missing or not a number"),
        ('{"score": true}', "score missing or not a number"),
        ('{"score": "eight"}', "score is not a number"),
        ('{"score": 140}', "outside 0-100"),
        ('{"score": "NaN"}', "outside 0-100"),
    ],
)
def test_anything_else_is_malformed_with_the_reason(content: str | None, why: str) -> None:
    with pytest.raises(MalformedVerdictError, match=why):
        parse_verdict(content)
