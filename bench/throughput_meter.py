"""A trainer callback that counts the real (non-pad) tokens the model is fed and times a window of optimizer steps.

It imports transformers at the top because it subclasses TrainerCallback; only the benchmark's child processes import
it. The same meter goes into our trainer and the plain TRL script, so both are counted the same way: a forward
pre-hook on the model sums the attention mask; a packed batch has none, and counts every token but a row's pad tail
(TRL's padding-free row has no tail; our trainer's [rows, longest row] batches on the CPU have one per shorter row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback


@dataclass(frozen=True)
class WindowMeasure:
    """Real tokens fed, all token slots fed (padding included) and seconds spent over the measured steps."""

    steps: int
    tokens: int
    fed_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def fed_tokens(inputs: dict[str, Any]) -> int:
    """Every token slot of one forward's inputs, padding included."""
    ids = inputs.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def pad_tail_tokens(position_ids: Any, input_ids: Any, pad_token_id: int | None) -> int:
    """Pad-tail tokens of packed rows: a row's last attention block (from its last position 0 on) when it is pad
    tokens only. (Its labels cannot tell: a packed example cut at maxLength before its completion trains no token
    either.)"""
    if pad_token_id is None:
        return 0
    tail = 0
    for positions, ids in zip(position_ids.tolist(), input_ids.tolist(), strict=True):
        start = len(positions) - 1 - positions[::-1].index(0)
        if start > 0 and all(token == pad_token_id for token in ids[start:]):
            tail += len(positions) - start
    return tail


def real_tokens(inputs: dict[str, Any], pad_token_id: int | None = None) -> int:
    """Non-pad tokens of one forward's inputs: the attention mask's ones, or a packed batch's tokens but pad tails."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum().item())
    position_ids, input_ids = inputs.get("position_ids"), inputs.get("input_ids")
    if position_ids is None or input_ids is None:
        return fed_tokens(inputs)
    return fed_tokens(inputs) - pad_tail_tokens(position_ids, input_ids, pad_token_id)


class ThroughputMeter(TrainerCallback):
    """Counts real tokens from the first forward on; the window runs from the end of step `warmup_steps` to the end
    of step `warmup_steps + measured_steps` (the warm-up steps pay for allocator growth and lazy initialisation)."""

    def __init__(self, warmup_steps: int, measured_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.measured_steps = measured_steps
        self.tokens = 0
        self.fed = 0
        self.window_start: tuple[float, int, int] | None = None
        self.result: WindowMeasure | None = None
        self.pad_token_id: int | None = None
        self._hook: Any = None

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            self.tokens += real_tokens(kwargs, self.pad_token_id)
            self.fed += fed_tokens(kwargs)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tokenizer = kwargs.get("processing_class")
        if tokenizer is not None:
            # What TRL pads with: the tokenizer's pad token, else its EOS.
            self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup_steps:
            self.window_start = (time.perf_counter(), self.tokens, self.fed)
        elif state.global_step == self.warmup_steps + self.measured_steps and self.window_start is not None:
            began, tokens, fed = self.window_start
            self.result = WindowMeasure(
                self.measured_steps, self.tokens - tokens, self.fed - fed, time.perf_counter() - began
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
