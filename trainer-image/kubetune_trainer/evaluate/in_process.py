"""Models answering in-process: batched greedy generation with the tuned adapter on or off, a classification head,
and the cross-entropy of the reference tokens, behind the predictor interface; and the local backend's evaluation.

Causal LM: batched greedy generation (left padding, KV cache) for the tuned model, then for the zero-shot and few-shot
baselines with the adapter disabled (`with model.disable_adapter():`), so the base weights are loaded once. Few-shot
shots come from TRAIN only, chosen once with the seed and shared by every sample, so the prompts of one model share a
long head (instruction, label list, shots): it is computed once per model and its KV cache reused by every batch.
Eval loss (and perplexity) is the token-weighted cross-entropy of the reference completion tokens only, for the tuned
model and for the zero-shot base.

Sequence classification: the tuned model's prediction is the argmax of its head. A head with its adapter disabled is
untrained (PEFT trains and saves the head with the adapter), so it is no baseline; prompting baselines need the base
causal LM, which the caller may pass as `baseline_model` (it costs a second copy of the base weights). Without one the
baselines are left out and the report says why. The head reads each example's `input_text`, as training does.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

from kubetune.api import EvaluationMetric, EvaluationSpec
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.contenders import ServingCost, percentile, token_cost
from kubetune_trainer.evaluate.judge import LlmJudge
from kubetune_trainer.evaluate.predictors import OnDone, Prediction, Predictor
from kubetune_trainer.evaluate.results import FEW_SHOT, RETRIEVAL_FEW_SHOT, TUNED, ZERO_SHOT, EvaluationResults
from kubetune_trainer.evaluate.runner import (
    NEW_TOKENS_CAP,
    NEW_TOKENS_MARGIN,
    ArmPlan,
    EvaluationInputError,
    ProgressCallback,
    evaluate_arms,
)
from kubetune_trainer.evaluate.scoring import InvalidReferenceError

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX_TOKENS = 16
"""Below this a shared prompt head is not worth a cache copy per batch."""
IGNORE_INDEX = -100
MAX_EXP_ARGUMENT = 700.0
"""math.exp overflows just above this; a larger loss reports no perplexity."""

AdapterState = Callable[[], AbstractContextManager[Any]]
"""Enters the state a model runs in for one arm: as it is (nullcontext) or with its adapter disabled."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as text, and whether the tokenizer should add its special tokens (chat templates already do)."""

    text: str
    add_special_tokens: bool


def render_prompt(tokenizer: Any, prompt: ChatMessages | str) -> RenderedPrompt:
    """Chat messages through the chat template with the generation prompt; template strings as they are."""
    if isinstance(prompt, str):
        return RenderedPrompt(prompt, add_special_tokens=True)
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return RenderedPrompt(text, add_special_tokens=False)


def prompt_token_ids(tokenizer: Any, prompt: ChatMessages | str) -> list[int]:
    """The prompt's token ids, ready for generation."""
    rendered = render_prompt(tokenizer, prompt)
    return list(tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"])


def completion_token_ids(tokenizer: Any, prompt: ChatMessages | str, completion: str) -> list[int]:
    """The reference's token ids as training sees them after the prompt.

    Chat: what the chat template adds after the generation prompt for an assistant turn holding the completion
    (so the end-of-turn token counts). Template strings: the completion followed by the EOS token.
    """
    if isinstance(prompt, list):
        prompt_text = render_prompt(tokenizer, prompt).text
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False)
        if full.startswith(prompt_text):
            return list(tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def default_max_new_tokens(tokenizer: Any, references: Sequence[str]) -> int:
    """The longest reference in tokens plus a margin, capped."""
    longest = max(
        (len(tokenizer(reference, add_special_tokens=False)["input_ids"]) for reference in references), default=0
    )
    return min(NEW_TOKENS_CAP, longest + NEW_TOKENS_MARGIN)


def model_device(model: Any) -> Any:
    """Where the model's inputs go."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The generation config's EOS ids plus the tokenizer's, so chat models stop at their end-of-turn token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    return list(dict.fromkeys(token for token in ids if token is not None))


def pad_id(tokenizer: Any) -> int:
    """The padding token id, falling back to EOS for tokenizers without one."""
    token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise EvaluationInputError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    return int(token)


def batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of `order`."""
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def longest_first(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Indices from the longest sequence to the shortest: less padding per batch, and an OOM shows up at once."""
    return sorted(range(len(sequences)), key=lambda index: -len(sequences[index]))


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """input_ids and attention_mask with padding on the left, as decoder-only generation needs."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each prompt at least one token of its own."""
    if len(prompts) < 2:
        return 0
    # Sequences sort lexicographically, so what the smallest and the largest share, all of them share.
    rows = [list(prompt) for prompt in prompts]
    first, last = min(rows), max(rows)
    limit = min(len(prompt) for prompt in prompts) - 1
    length = 0
    while length < limit and first[length] == last[length]:
        length += 1
    return length


def prefix_cache(model: Any, head: Any) -> Any:
    """The KV cache of one pass over the shared head ([1, length]), run in the entry's adapter state."""
    return model(input_ids=head.to(model_device(model)), use_cache=True).past_key_values


def batch_cache(cache: Any, rows: int) -> Any:
    """A copy of the prefix cache for a batch of `rows` (generation extends the cache it is given)."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


def generate_outputs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int], None] = lambda size: None,
) -> list[str]:
    """Greedy completions of tokenized prompts, in batches, with the KV cache; the new text only, stripped.

    Prompts built from one template share their head (the system prompt, the instruction and label list, the
    few-shot examples): those tokens go through the model once, and each batch continues from a copy of their cache.
    A batch is then [shared prefix | left padding | each prompt's own tokens]; the attention mask hides the padding
    and generation numbers positions from the mask, so every prompt sees the positions it has unpadded.
    """
    import torch
    from transformers import GenerationConfig

    pad = pad_id(tokenizer)
    # A fresh config: greedy and bounded, whatever sampling defaults the checkpoint ships with.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=stop_token_ids(model, tokenizer),
    )
    device = model_device(model)
    outputs = [""] * len(prompts)
    shared = shared_prefix_length(prompts)
    if shared < MIN_SHARED_PREFIX_TOKENS:
        shared = 0
    head = torch.tensor([list(prompts[0][:shared])], dtype=torch.long)
    cache = None
    if shared:
        with torch.inference_mode():
            cache = prefix_cache(model, head)
        log.info("generation reuses the KV cache of the %d prompt tokens every sample shares", shared)
    for batch in batches(longest_first(prompts), batch_size):
        ids, mask = left_padded([prompts[index][shared:] for index in batch], pad)
        if cache is not None:
            rows_head = head.expand(len(batch), -1)
            ids = torch.cat([rows_head, ids], dim=1)
            mask = torch.cat([torch.ones_like(rows_head), mask], dim=1)
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                past_key_values=None if cache is None else batch_cache(cache, len(batch)),
            )
        texts = tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
        for index, text in zip(batch, texts, strict=True):
            outputs[index] = text.strip()
        on_batch(len(batch))
    return outputs


def completion_loss(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad: int,
    on_batch: Callable[[int], None] = lambda size: None,
) -> tuple[float, int]:
    """Mean cross-entropy per completion token (prompt tokens masked out) and the number of tokens scored."""
    import torch
    from torch.nn.functional import cross_entropy

    full = [[*prompt, *completion] for prompt, completion in zip(prompts, completions, strict=True)]
    device = model_device(model)
    total = 0.0
    tokens = 0
    for batch in batches(longest_first(full), batch_size):
        width = max(len(full[index]) for index in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, index in enumerate(batch):
            length = len(full[index])
            ids[row, :length] = torch.tensor(full[index], dtype=torch.long)
            mask[row, :length] = 1
            labels[row, len(prompts[index]) : length] = torch.tensor(completions[index], dtype=torch.long)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # Position t predicts token t+1; sum (not mean) so that batches weigh by their token counts.
        shifted = labels[:, 1:].to(logits.device)
        total += float(
            cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        tokens += int((shifted != IGNORE_INDEX).sum())
        on_batch(len(batch))
    return (total / tokens if tokens else math.nan), tokens


def unwrapped_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sequence_classifier(model: Any) -> bool:
    """Whether the model ends in a classification head rather than a language-model head."""
    return type(unwrapped_model(model)).__name__.endswith("ForSequenceClassification")


def head_labels(model: Any, labels: Sequence[str] | None) -> list[str]:
    """The label of each output of a classification head, from its id2label, checked against the data's labels."""
    config = unwrapped_model(model).config
    names = [config.id2label[index] for index in range(config.num_labels)]
    if labels and set(names) != set(labels):
        raise EvaluationInputError(
            f"the classification head's labels ({', '.join(names[:10])}) differ from the data's labels "
            f"({', '.join(list(labels)[:10])})"
        )
    return names


def classify(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    references: Sequence[str],
    names: Sequence[str],
    batch_size: int,
    on_batch: Callable[[int], None] = lambda size: None,
) -> tuple[list[str], float]:
    """The head's argmax label for each text, and the mean cross-entropy against the reference labels."""
    import torch
    from torch.nn.functional import cross_entropy

    index_of = {name: index for index, name in enumerate(names)}
    for index, reference in enumerate(references):
        if reference not in index_of:
            raise InvalidReferenceError(index, f"label {reference!r} is not a label of the classification head")
    tokenized = [list(tokenizer(text)["input_ids"]) for text in texts]
    pad = pad_id(tokenizer)
    device = model_device(model)
    predictions = [""] * len(texts)
    total = 0.0
    for batch in batches(longest_first(tokenized), batch_size):
        # Llama-style heads read the last non-pad token, so the padding side does not matter; right is simplest.
        width = max(len(tokenized[index]) for index in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : len(tokenized[index])] = torch.tensor(tokenized[index], dtype=torch.long)
            mask[row, : len(tokenized[index])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = torch.tensor([index_of[references[index]] for index in batch], device=logits.device)
        total += float(cross_entropy(logits, targets, reduction="sum"))
        for index, choice in zip(batch, logits.argmax(dim=-1).tolist(), strict=True):
            predictions[index] = names[choice]
        on_batch(len(batch))
    return predictions, total / len(texts) if texts else math.nan


def loss_scores(loss: float) -> dict[str, float]:
    """Loss and perplexity as the report holds them: JSON and the API status hold no NaN or infinity."""
    scores: dict[str, float] = {}
    if math.isfinite(loss):
        scores["loss"] = loss
    if loss < MAX_EXP_ARGUMENT:
        scores["perplexity"] = math.exp(loss)
    return scores


def batch_latencies(timed: Sequence[tuple[int, float]]) -> list[float]:
    """Each row's latency: every row of a batch waits for the whole batch."""
    return [seconds for rows, seconds in timed for _ in range(rows)]


def in_process_cost(
    prompt_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    timed: Sequence[tuple[int, float]],
    price_per_hour: float | None,
) -> ServingCost:
    """What answers served in-process cost per request: tokens as the tokenizer counts them (the cost argument of a
    short tuned prompt against a few-shot one), the latency of the batch that answered each row, and with a price per
    hour, the cost of the hardware time each request took at the throughput measured here."""
    cost = token_cost(prompt_tokens, completion_tokens or [0] * len(prompt_tokens))
    latencies = batch_latencies(timed)
    if not latencies:
        return cost
    # The hardware time a request took is its share of its batch's time.
    seconds_per_request = sum(seconds for _, seconds in timed) / len(latencies)
    return replace(
        cost,
        latency_p50_seconds=percentile(latencies, 0.5),
        latency_p95_seconds=percentile(latencies, 0.95),
        cost_per_1k_requests=None if price_per_hour is None else price_per_hour * seconds_per_request / 3600 * 1000,
    )


@dataclass
class GeneratingPredictor:
    """A causal LM in-process, in one adapter state: greedy answers in batches, and the reference tokens' loss."""

    model: Any
    tokenizer: Any
    adapter_state: AdapterState
    batch_size: int
    max_new_tokens: int
    price_per_hour: float | None = None
    measures_loss: bool = True

    def units_per_row(self, *, text: bool, loss: bool) -> int:
        return int(text) + int(loss)

    def predict(
        self,
        prompts: Sequence[ChatMessages | str],
        examples: Sequence[Example],
        *,
        text: bool,
        loss: bool,
        on_done: OnDone,
    ) -> Prediction:
        prompt_ids = [prompt_token_ids(self.tokenizer, prompt) for prompt in prompts]
        timed: list[tuple[int, float]] = []
        outputs: list[str] | None = None
        scores: dict[str, float] = {}
        loss_seconds = 0.0
        with self.adapter_state():
            if text:
                outputs = self.generate(prompt_ids, timed, on_done)
            if loss:
                started = time.monotonic()
                completions = [
                    completion_token_ids(self.tokenizer, prompt, example.completion)
                    for prompt, example in zip(prompts, examples, strict=True)
                ]
                mean_loss, _ = completion_loss(
                    self.model,
                    prompt_ids,
                    completions,
                    batch_size=self.batch_size,
                    pad=pad_id(self.tokenizer),
                    on_batch=on_done,
                )
                scores = loss_scores(mean_loss)
                loss_seconds = time.monotonic() - started
        completion_tokens = [
            len(self.tokenizer(output, add_special_tokens=False)["input_ids"]) for output in outputs or []
        ]
        cost = in_process_cost([len(ids) for ids in prompt_ids], completion_tokens, timed, self.price_per_hour)
        return Prediction(outputs, cost, scores, loss_seconds)

    def generate(self, prompt_ids: list[list[int]], timed: list[tuple[int, float]], on_done: OnDone) -> list[str]:
        """Greedy answers, each batch's rows and seconds appended to `timed`."""
        last = time.monotonic()

        def batch_done(rows: int) -> None:
            nonlocal last
            now = time.monotonic()
            timed.append((rows, now - last))
            last = now
            on_done(rows)

        return generate_outputs(
            self.model,
            self.tokenizer,
            prompt_ids,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            on_batch=batch_done,
        )


@dataclass
class HeadPredictor:
    """A sequence-classification model in-process: the argmax of its head over each row's input text, whose
    cross-entropy against the reference labels is the loss, from the same pass."""

    model: Any
    tokenizer: Any
    labels: Sequence[str] | None
    batch_size: int
    measures_loss: bool = True

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
        texts = [example.input_text for example in examples]
        outputs, mean_loss = classify(
            self.model,
            self.tokenizer,
            texts,
            references=[example.completion for example in examples],
            names=head_labels(self.model, self.labels),
            batch_size=self.batch_size,
            on_batch=on_done,
        )
        # The head reads the row's text alone, never the label list or shots of a prompt.
        cost = token_cost([len(self.tokenizer(text)["input_ids"]) for text in texts], [0] * len(texts))
        return Prediction(outputs, cost, {"loss": mean_loss} if loss else {})


def baseline_runner(model: Any, baseline_model: Any | None) -> tuple[Any, AdapterState] | None:
    """The model and adapter state that give the base model's outputs, or None when there is none to be had."""
    if baseline_model is not None:
        return baseline_model, nullcontext
    if hasattr(model, "disable_adapter") and not is_sequence_classifier(model):
        return model, model.disable_adapter
    return None


def in_process_arms(
    model: Any,
    tokenizer: Any,
    spec: EvaluationSpec,
    metrics: Sequence[EvaluationMetric],
    references: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    baseline_model: Any | None = None,
) -> ArmPlan:
    """The tuned model and, with its adapter disabled (or the base model given), the spec's baselines; notes on any
    baseline that cannot run here."""
    max_new_tokens = spec.max_new_tokens or default_max_new_tokens(tokenizer, references)
    classifier = is_sequence_classifier(model)
    tuned: Predictor = (
        HeadPredictor(model, tokenizer, labels, spec.batch_size)
        if classifier
        else GeneratingPredictor(
            model, tokenizer, nullcontext, spec.batch_size, max_new_tokens, spec.self_served_price_per_hour
        )
    )
    predictors: dict[str, Predictor] = {TUNED: tuned}
    notes: list[str] = []
    base = baseline_runner(model, baseline_model)
    if base is None:
        if spec.baselines:
            reason = (
                "a classification head with its adapter disabled is untrained, and the base causal LM was not given"
                if classifier
                else "the model has no adapter to disable and no base model was given"
            )
            notes.append(f"baselines {', '.join(spec.baselines)} not evaluated: {reason}")
        return ArmPlan(predictors, notes, max_new_tokens)
    base_model, state = base
    loss = "loss" in metrics
    if loss and classifier:
        notes.append("loss is the classification head's cross-entropy; the baselines generate, so they have no loss")
    elif loss and spec.baselines:
        notes.append("loss is measured on the zero-shot prompts (tuned and zero-shot base), not on few-shot prompts")
    for name in (ZERO_SHOT, FEW_SHOT, RETRIEVAL_FEW_SHOT):
        if name in spec.baselines:
            predictors[name] = GeneratingPredictor(
                base_model,
                tokenizer,
                state,
                spec.batch_size,
                max_new_tokens,
                spec.self_served_price_per_hour,
                # Only the zero-shot prompts are the tuned model's: loss on few-shot prompts compares nothing.
                measures_loss=name == ZERO_SHOT and not classifier,
            )
    return ArmPlan(predictors, notes, max_new_tokens)


def run_evaluation(
    model: Any,
    tokenizer: Any,
    validation: Sequence[Example],
    train: Sequence[Example],
    spec: EvaluationSpec,
    *,
    dataset_format: str,
    labels: Sequence[str] | None = None,
    seed: int = 42,
    judge: LlmJudge | None = None,
    baseline_model: Any | None = None,
    progress: ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
) -> EvaluationResults:
    """Score the tuned model, the spec's baselines and its contenders on the first maxSamples validation examples.

    `model` is the trained PEFT model (causal LM or sequence classification); `train` supplies the few-shot shots;
    `labels` is the classification label set; `judge` is required when the metrics include judge;
    `progress(done, total)` is called as work finishes.
    """

    def plan(metrics: Sequence[EvaluationMetric], references: Sequence[str]) -> ArmPlan:
        return in_process_arms(
            model, tokenizer, spec, metrics, references, labels=labels, baseline_model=baseline_model
        )

    was_training = bool(getattr(model, "training", False))
    for each in (model, baseline_model):
        if each is not None:
            each.eval()
    try:
        return evaluate_arms(
            plan,
            validation,
            train,
            spec,
            dataset_format=dataset_format,
            labels=labels,
            seed=seed,
            judge=judge,
            progress=progress,
            environ=environ,
        )
    finally:
        if was_training:
            model.train()
