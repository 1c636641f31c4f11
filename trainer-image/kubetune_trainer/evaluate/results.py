"""What an evaluation produced: each model's outputs and scores on the same samples, timings and judge cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune_trainer.evaluate.contenders import ServingCost
from kubetune_trainer.evaluate.scoring import ConfusionMatrix, SampleScores

TUNED = "tuned"
ZERO_SHOT = "zeroShot"
FEW_SHOT = "fewShot"
RETRIEVAL_FEW_SHOT = "retrievalFewShot"
MODEL_ORDER = (ZERO_SHOT, FEW_SHOT, RETRIEVAL_FEW_SHOT, TUNED)
"""How the models are listed in reports: the baselines first, then the fine-tuned adapter."""
BASELINES = (ZERO_SHOT, FEW_SHOT, RETRIEVAL_FEW_SHOT)
"""The prompting baselines of the base model, each named for its prompting style."""
MIN_JUDGED_SHARE = 0.5
"""The share of outputs the judge must grade for its mean to stand as the model's judge score."""


@dataclass(frozen=True)
class EvalSample:
    """One held-out case: what the model saw (as text), the reference answer, and where it came from."""

    input_text: str
    reference: str
    line: int | None = None


@dataclass
class ModelResult:
    """One model's outputs and scores: `metrics` aggregates, `sample_scores` one entry per sample."""

    outputs: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    sample_scores: list[SampleScores] = field(default_factory=list)
    confusion: ConfusionMatrix | None = None


@dataclass
class JudgeCost:
    """Tokens the LLM judge consumed (every attempt counts) and how many cases it graded."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    judged: int = 0
    unjudged: int = 0
    response_format: str | None = None  # what the judge endpoint took (json_schema, json_object, text)
    first_error: str | None = None  # why the first unjudged case was left unjudged

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class EvaluationResults:
    """Tuned adapter and baselines scored on the same samples."""

    headline_metric: str
    samples: list[EvalSample]
    models: dict[str, ModelResult]
    seconds: dict[str, float] = field(default_factory=dict)
    judge_cost: JudgeCost | None = None
    notes: list[str] = field(default_factory=list)
    serving: dict[str, ServingCost] = field(default_factory=dict)  # per model: tokens, latency, price per request

    def metric_tables(self) -> dict[str, dict[str, float]]:
        """Each model's aggregate scores, keyed by model name (tuned, zeroShot, fewShot)."""
        return {name: dict(result.metrics) for name, result in self.models.items()}
