"""The predictor interface every evaluated arm answers through, and the predictors behind OpenAI-compatible APIs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kubetune.api import ContenderSpec
from kubetune_trainer.chat_endpoint import ChatEndpoint, first_failure
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.contenders import ServingCost, contender_key, serving_cost

log = logging.getLogger(__name__)

OnDone = Callable[[int], None]
"""Called with the number of rows a predictor has just finished (answered, or scored for loss)."""


class RowFailedError(Exception):
    """A row the predictor could not answer, where an unanswered row would make the arm's scores lie."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


@dataclass
class Prediction:
    """One arm's answers to the rows (None when no metric needs them), what they cost, and the scores that need the
    model's probabilities (loss, perplexity) where the predictor can give them."""

    outputs: list[str] | None
    cost: ServingCost
    scores: dict[str, float] = field(default_factory=dict)
    loss_seconds: float = 0.0


class Predictor(Protocol):
    """One way of answering the evaluation's rows: a model in-process (its adapter on or off, generating or through a
    classification head) or a model behind an OpenAI-compatible endpoint. The runner gives every predictor the same
    rows and scores every answer with the same code."""

    @property
    def measures_loss(self) -> bool:
        """Whether this predictor can score the reference tokens' cross-entropy."""
        ...

    def units_per_row(self, *, text: bool, loss: bool) -> int:
        """Progress units one row costs: an answer, a loss pass, as asked."""
        ...

    def predict(
        self,
        prompts: Sequence[ChatMessages | str],
        examples: Sequence[Example],
        *,
        text: bool,
        loss: bool,
        on_done: OnDone,
    ) -> Prediction:
        """Answer `prompts` (one per example) when `text`; score the references' loss when `loss`."""
        ...


@dataclass(frozen=True)
class EndpointPredictor:
    """A model behind an OpenAI-compatible endpoint, greedy. A chat completion gives no probabilities of the reference
    tokens, so there is no loss. With `fail_on_error` (the job's own models) a request that still fails after the SDK's
    retries fails the arm and no more rows are sent; without (contenders) it is an empty answer counted in the cost."""

    endpoint: ChatEndpoint
    model: str
    fail_on_error: bool = True
    prices: ContenderSpec | None = None  # a contender's token prices, for its cost per request

    @property
    def measures_loss(self) -> bool:
        return False

    def units_per_row(self, *, text: bool, loss: bool) -> int:
        return 1

    def predict(
        self,
        prompts: Sequence[ChatMessages | str],
        examples: Sequence[Example],
        *,
        text: bool,
        loss: bool,
        on_done: OnDone,
    ) -> Prediction:
        outputs, records = self.endpoint.answer_all(self.model, prompts, on_done, stop_on_failure=self.fail_on_error)
        failure = first_failure(records) if self.fail_on_error else None
        if failure is not None:
            index, why = failure
            raise RowFailedError(index, f"model {self.model}: {why}")
        failed = [record.error for record in records if record.error]
        if failed:
            log.warning("model %s: %d of %d requests failed: %s", self.model, len(failed), len(records), failed[0])
        return Prediction(outputs, serving_cost(records, self.prices))


@dataclass(frozen=True)
class ContenderPredictor:
    """A contender: its own endpoint, key and prices, connected for its turn and closed after it. A failed request is
    an empty answer (scored as wrong) and counted in its cost, never the end of the evaluation."""

    index: int
    contender: ContenderSpec
    max_tokens: int
    seed: int
    environ: Mapping[str, str] | None = None

    @property
    def measures_loss(self) -> bool:
        return False

    def units_per_row(self, *, text: bool, loss: bool) -> int:
        return 1

    def predict(
        self,
        prompts: Sequence[ChatMessages | str],
        examples: Sequence[Example],
        *,
        text: bool,
        loss: bool,
        on_done: OnDone,
    ) -> Prediction:
        contender = self.contender
        endpoint = ChatEndpoint.connect(
            contender.base_url,
            contender_key(self.index, contender, self.environ),
            max_retries=contender.max_retries,
            concurrency=contender.concurrency,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )
        try:
            answering = EndpointPredictor(endpoint, contender.model, fail_on_error=False, prices=contender)
            return answering.predict(prompts, examples, text=text, loss=loss, on_done=on_done)
        finally:
            endpoint.close()
