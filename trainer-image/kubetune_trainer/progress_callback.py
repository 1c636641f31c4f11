"""A trainer callback feeding every optimizer step to the Reporter (gauges and the terminal bar need each step).

It subclasses transformers' TrainerCallback, so it is imported only inside the training stage.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from kubetune_trainer.progress import Reporter, TrainingStep


class StepReportCallback(TrainerCallback):
    """After each step on the main process: step, planned steps, tokens seen, latest loss and learning rate."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.loss: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        scheduler = kwargs.get("lr_scheduler")
        self.reporter.report_step(
            TrainingStep(
                step=int(state.global_step),
                total_steps=int(state.max_steps or 0),
                trained_tokens=int(state.num_input_tokens_seen or 0),
                loss=self.loss,
                learning_rate=float(scheduler.get_last_lr()[0]) if scheduler is not None else None,
            )
        )
