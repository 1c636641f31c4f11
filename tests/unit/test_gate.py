"""The evaluation gate: threshold, baselines to beat, direction of the score, and its human message."""

from __future__ import annotations

import pytest
from kubetune_trainer.evaluate.gate import evaluate_gate

from kubetune.api import GateSpec

pytestmark = pytest.mark.unit

TABLES = {
    "tuned": {"accuracy": 0.91, "macroF1": 0.9, "loss": 0.4},
    "zeroShot": {"accuracy": 0.08, "macroF1": 0.05, "loss": 2.5},
    "fewShot": {"accuracy": 0.33, "macroF1": 0.3, "loss": 0.3},
}


@pytest.mark.parametrize(
    ("gate", "passed", "message"),
    [
        (
            GateSpec(metric="accuracy", threshold=0.85, must_beat=["zeroShot", "fewShot"]),
            True,
            "accuracy 0.91 >= 0.85 and beats zeroShot (0.08) and fewShot (0.33)",
        ),
        (
            GateSpec(metric="accuracy", threshold=0.95, must_beat=["zeroShot", "fewShot"]),
            False,
            "accuracy 0.91 < 0.95; beats zeroShot (0.08) and fewShot (0.33)",
        ),
        (GateSpec(metric="accuracy", threshold=0.91), True, "accuracy 0.91 >= 0.91"),
        (GateSpec(metric="f1", must_beat=["zeroShot"]), True, "macroF1 0.9 and beats zeroShot (0.05)"),
        (
            GateSpec(metric="loss", threshold=0.5, must_beat=["zeroShot", "fewShot"]),
            False,
            "loss 0.4 <= 0.5; beats zeroShot (2.5); does not beat fewShot (0.3)",
        ),
        (GateSpec(metric="loss", threshold=0.3), False, "loss 0.4 > 0.3"),
        (
            GateSpec(metric="accuracy"),
            True,
            "accuracy 0.91 (no threshold or baseline set: the gate passes)",
        ),
        (
            GateSpec(metric="judge", threshold=70),
            False,
            "gate metric judge was not computed for the tuned model (computed: accuracy, loss, macroF1)",
        ),
    ],
    ids=[
        "passes-threshold-and-baselines",
        "misses-threshold",
        "threshold-is-inclusive",
        "f1-alias-beats-baseline",
        "loss-lower-is-better-fails-baseline",
        "loss-above-threshold",
        "nothing-to-check",
        "metric-not-computed",
    ],
)
def test_gate_outcomes(gate: GateSpec, passed: bool, message: str) -> None:
    outcome = evaluate_gate(gate, TABLES)
    assert (outcome.passed, outcome.message) == (passed, message)


def test_a_tie_with_a_baseline_does_not_beat_it() -> None:
    tables = {"tuned": {"accuracy": 0.5}, "fewShot": {"accuracy": 0.5}}
    outcome = evaluate_gate(GateSpec(metric="accuracy", must_beat=["fewShot"]), tables)
    assert not outcome.passed
    assert outcome.message == "accuracy 0.5; does not beat fewShot (0.5)"


def test_a_baseline_that_was_not_evaluated_fails_the_gate() -> None:
    tables = {"tuned": {"accuracy": 0.9}, "zeroShot": {"accuracy": 0.1}}
    outcome = evaluate_gate(GateSpec(metric="accuracy", threshold=0.5, must_beat=["zeroShot", "fewShot"]), tables)
    assert not outcome.passed
    assert outcome.message == "accuracy 0.9 >= 0.5; beats zeroShot (0.1); does not beat fewShot (not evaluated)"


def test_a_nan_score_is_not_computed() -> None:
    outcome = evaluate_gate(GateSpec(metric="accuracy", threshold=0.1), {"tuned": {"accuracy": float("nan")}})
    assert not outcome.passed
    assert outcome.message.startswith("gate metric accuracy was not computed")
