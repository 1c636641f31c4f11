"""The evaluation gate: does the tuned adapter reach the threshold and beat the baselines it must beat?

The result becomes the EvalPassed condition and `status.evaluation.gate`, with a message written for
`kubectl describe`. A failed gate fails the job only when `evaluation.gate.failJob` is true; the adapter, checkpoints
and report are published either way, so a failed run can still be inspected (and its adapter used).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kubetune.api import GateSpec, scores_of
from kubetune_trainer.evaluate.results import TUNED
from kubetune_trainer.evaluate.scoring import LOWER_IS_BETTER, is_better, resolve_score_name


@dataclass(frozen=True)
class GateOutcome:
    """Whether the gate passed and why, in one human sentence."""

    passed: bool
    message: str


def format_score(value: float) -> str:
    """A score as a person reads it: four significant digits, no trailing zeros."""
    return f"{value:.4g}"


def threshold_clause(name: str, tuned: float, threshold: float) -> tuple[bool, str]:
    """Whether the tuned score reaches the threshold (<= for lower-is-better scores), and the clause saying so."""
    lower = name in LOWER_IS_BETTER
    reached = tuned <= threshold if lower else tuned >= threshold
    sign = {(True, True): "<=", (True, False): ">=", (False, True): ">", (False, False): "<"}[(reached, lower)]
    return reached, f"{name} {format_score(tuned)} {sign} {format_score(threshold)}"


def baseline_clauses(
    name: str, tuned: float, tables: Mapping[str, Mapping[str, float]], must_beat: list[str]
) -> tuple[list[str], list[str]]:
    """The baselines beaten and those not (missing or unscored ones count as not beaten), as clauses."""
    beaten: list[str] = []
    not_beaten: list[str] = []
    for baseline in must_beat:
        score = tables.get(baseline, {}).get(name)
        if score is None or math.isnan(score):
            not_beaten.append(f"{baseline} (not evaluated)")
        elif is_better(name, tuned, score):
            beaten.append(f"{baseline} ({format_score(score)})")
        else:
            not_beaten.append(f"{baseline} ({format_score(score)})")
    return beaten, not_beaten


def evaluate_gate(gate: GateSpec, tables: Mapping[str, Mapping[str, float]]) -> GateOutcome:
    """Judge the tuned model's metric table ("tuned") against the threshold and the baselines' tables.

    Beating a baseline means strictly better (lower for loss-like scores); a baseline that was not evaluated is not
    beaten. Example messages: "accuracy 0.91 >= 0.85 and beats zeroShot (0.08) and fewShot (0.33)";
    "accuracy 0.71 < 0.85; beats zeroShot (0.08); does not beat fewShot (0.75)".
    """
    name = resolve_score_name(gate.metric)
    tuned_table = tables.get(TUNED, {})
    tuned = tuned_table.get(name)
    if tuned is None or math.isnan(tuned):
        available = ", ".join(sorted(tuned_table)) or "none"
        return GateOutcome(False, f"gate metric {name} was not computed for the tuned model (computed: {available})")
    passed = True
    clauses: list[str] = []
    if gate.threshold is not None:
        reached, clause = threshold_clause(name, tuned, gate.threshold)
        passed = reached
        clauses.append(clause)
    else:
        clauses.append(f"{name} {format_score(tuned)}")
    beaten, not_beaten = baseline_clauses(name, tuned, tables, list(gate.must_beat))
    passed = passed and not not_beaten
    if passed:
        message = clauses[0] + (f" and beats {' and '.join(beaten)}" if beaten else "")
        if gate.threshold is None and not gate.must_beat:
            message += " (no threshold or baseline set: the gate passes)"
        return GateOutcome(True, message)
    parts = [clauses[0]]
    if beaten:
        parts.append(f"beats {' and '.join(beaten)}")
    if not_beaten:
        parts.append(f"does not beat {' and '.join(not_beaten)}")
    return GateOutcome(False, "; ".join(parts))


def uncomputed_gate_metric(gate: GateSpec, metrics: list[str], dataset_format: str) -> str | None:
    """Why the gate's metric is one the evaluation will not compute (the metrics inferred from the data), or None."""
    if any(gate.metric in scores_of(metric) for metric in metrics):
        return None
    return (
        f"evaluation.gate.metric {gate.metric} is not computed: with evaluation.metrics empty, the evaluation of this "
        f"{dataset_format} data computes {', '.join(metrics)}; list the gate's metric in evaluation.metrics"
    )
