"""Live training progress: throughput and ETA from the trainer's state, sent to a ProgressSink at a bounded rate."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubetune.api import ProgressStatus, utc_now

DEFAULT_PROGRESS_INTERVAL_SECONDS = 10.0
STAGE_TRAIN = "train"


class ProgressSink(Protocol):
    """Where progress goes (status.progress patches, metrics, a test's list); called on rank 0 only."""

    def __call__(self, progress: ProgressStatus, /) -> None: ...


@dataclass(frozen=True)
class TrainingStep:
    """One finished optimizer step as the trainer's state has it."""

    step: int
    total_steps: int
    trained_tokens: int
    loss: float | None
    learning_rate: float | None


# Every optimizer step, for cheap consumers (gauges, a terminal bar); rank 0 only.
StepSink = Callable[[TrainingStep], None]


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    """Throughput over an interval; None before any time has passed."""
    if seconds <= 0:
        return None
    return round(tokens / seconds, 1)


def eta_seconds(steps_done: int, seconds: float, steps_left: int) -> int | None:
    """Seconds to go at this session's average step time; None before the first step of the session."""
    if steps_done <= 0 or seconds <= 0:
        return None
    return max(0, math.ceil(seconds / steps_done * steps_left))


def percent_done(step: int, total_steps: int) -> float | None:
    """0-100, rounded to a tenth; None when the total is unknown."""
    if total_steps <= 0:
        return None
    return round(min(100.0, 100.0 * step / total_steps), 1)


def finite_or_none(value: Any) -> float | None:
    """A float for JSON and the status; NaN and inf become None (the divergence guard reports those)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class RateLimit:
    """Lets an event through at most once per min_interval seconds, except forced ones."""

    min_interval: float
    last: float | None = None

    def allow(self, now: float, force: bool = False) -> bool:
        """Whether to emit now; records the emission when it is allowed."""
        if force or self.last is None or now - self.last >= self.min_interval:
            self.last = now
            return True
        return False


@dataclass
class SessionStart:
    """Where this train() call began, so that a resumed run measures only its own steps and tokens."""

    time: float
    step: int
    tokens: int


@dataclass
class ProgressTracker:
    """Follows one training run from the trainer's state: every step goes to `on_step`, and a ProgressStatus with
    throughput and ETA to `sink` at most once per min_interval (the first step and the final state always).

    Only the world-rank-0 process reports; ProgressCallback (training_callbacks) feeds it. It writes nothing itself:
    the sinks (kubetune_trainer.progress.reporter.Reporter in a run) log, patch the status and draw the bar.
    """

    sink: ProgressSink | None = None
    on_step: StepSink | None = None
    min_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS
    clock: Callable[[], float] = time.monotonic
    limit: RateLimit = field(init=False)
    start: SessionStart | None = field(default=None, init=False)
    loss: float | None = field(default=None, init=False)
    learning_rate: float | None = field(default=None, init=False)
    last_reported: ProgressStatus | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.limit = RateLimit(self.min_interval)

    def begin(self, state: Any) -> None:
        """Mark the start of this train() call (a resumed run starts past step 0 with tokens already counted)."""
        self.start = SessionStart(self.clock(), state.global_step, int(state.num_input_tokens_seen or 0))

    def observe_logs(self, logs: dict[str, Any]) -> None:
        """Keep the latest logged loss (averaged over training.loggingSteps by the trainer)."""
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "learning_rate" in logs:
            self.learning_rate = float(logs["learning_rate"])

    def step(self, state: Any, learning_rate: float | None) -> None:
        """After each optimizer step: the step to `on_step`, and a report when min_interval has passed."""
        if learning_rate is not None:
            self.learning_rate = learning_rate
        if not state.is_world_process_zero:
            return
        if self.on_step is not None:
            self.on_step(
                TrainingStep(
                    step=int(state.global_step),
                    total_steps=int(state.max_steps or 0),
                    trained_tokens=int(state.num_input_tokens_seen or 0),
                    loss=self.loss,
                    learning_rate=self.learning_rate,
                )
            )
        self.report(state, force=False)

    def end(self, state: Any) -> None:
        """The final state, always reported."""
        if state.is_world_process_zero:
            self.report(state, force=True)

    def status(self, state: Any) -> ProgressStatus:
        """The progress at this point of training."""
        start = self.start or SessionStart(self.clock(), 0, 0)
        elapsed = self.clock() - start.time
        tokens = int(state.num_input_tokens_seen or 0) - start.tokens
        total = int(state.max_steps or 0)
        return ProgressStatus(
            stage=STAGE_TRAIN,
            step=state.global_step,
            total_steps=total or None,
            epoch=round(float(state.epoch), 4) if state.epoch is not None else None,
            percent=percent_done(state.global_step, total),
            loss=finite_or_none(self.loss),
            learning_rate=finite_or_none(self.learning_rate),
            tokens_per_second=tokens_per_second(tokens, elapsed),
            eta_seconds=eta_seconds(state.global_step - start.step, elapsed, max(0, total - state.global_step)),
            updated_at=utc_now(),
        )

    def report(self, state: Any, force: bool) -> None:
        """Send the current status to the sink, unless one went out less than min_interval ago."""
        if not self.limit.allow(self.clock(), force=force):
            return
        progress = self.status(state)
        self.last_reported = progress
        if self.sink is not None:
            self.sink(progress)
