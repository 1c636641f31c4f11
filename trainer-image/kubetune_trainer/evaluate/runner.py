"""The evaluation runner: the tuned adapter and prompting baselines of the same base model, on the same samples.

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
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune.api import BaselineName, ContenderSpec, EvaluationMetric, EvaluationSpec
from kubetune_trainer.data.formats import few_shot_prompt, select_shots
from kubetune_trainer.data.rows import ChatMessages, Example
from kubetune_trainer.evaluate.contenders import ServingCost, ask_contender, percentile, serving_cost, token_cost
from kubetune_trainer.evaluate.judge import JudgeCase, LlmJudge
from kubetune_trainer.evaluate.results import (
    FEW_SHOT,
    MIN_JUDGED_SHARE,
    RETRIEVAL_FEW_SHOT,
    TUNED,
    ZERO_SHOT,
    EvalSample,
    EvaluationResults,
    JudgeCost,
    ModelResult,
)
from kubetune_trainer.evaluate.retrieval import retrieved_shots
from kubetune_trainer.evaluate.scoring import (
    TEXT_METRICS,
    InvalidReferenceError,
    SampleScores,
    default_metrics,
    headline_metric,
    score_outputs,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (done, total) units of work: one unit per sample generated, scored for loss, or judged, per model.
While the judge runs it is called from the judge's worker threads, one call at a time."""

NEW_TOKENS_MARGIN = 16
"""Tokens allowed beyond the longest reference, so a baseline that wraps its answer in a sentence still finishes it."""
NEW_TOKENS_CAP = 512
MIN_SHARED_PREFIX_TOKENS = 16
"""Below this a shared prompt head is not worth a cache copy per batch."""
IGNORE_INDEX = -100
MAX_EXP_ARGUMENT = 700.0
"""math.exp overflows just above this; a larger loss reports no perplexity."""


AdapterState = Callable[[], AbstractContextManager[Any]]
"""Enters the state a model runs in for one report entry: as it is (nullcontext) or with its adapter disabled."""


class EvaluationInputError(ValueError):
    """The evaluation cannot run on these inputs; the message names the validation line or the setting at fault."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as text, and whether the tokenizer should add its special tokens (chat templates already do)."""

    text: str
    add_special_tokens: bool


@dataclass(frozen=True)
class ScoredModel:
    """How to run one entry of the report: which model, in which adapter state, on which prompts."""

    name: str
    model: Any
    adapter_state: AdapterState
    prompts: list[ChatMessages | str]
    loss: bool


class Progress:
    """Counts finished units of work and reports them through the callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self._callback = callback

    def advance(self, units: int) -> None:
        """Add finished units and report."""
        self.done += units
        if self._callback is not None:
            self._callback(self.done, self.total)


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


def check_shots_available(spec: EvaluationSpec, train: Sequence[Example]) -> None:
    """The few-shot baselines take their shots from train: refuse them when there is none."""
    wanting = [name for name in (FEW_SHOT, RETRIEVAL_FEW_SHOT) if name in spec.baselines]
    if wanting and not train:
        raise EvaluationInputError(
            f"the {' and '.join(wanting)} baseline needs train examples for its shots, and there are none"
        )


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


def judge_outputs(
    judge: LlmJudge, samples: Sequence[EvalSample], outputs: Sequence[str], cost: JudgeCost, progress: Progress
) -> tuple[dict[str, float], list[SampleScores]]:
    """The judge's mean score over the judged cases and the unjudged share, plus per-sample scores; cost updated."""
    cases = [
        JudgeCase(sample.input_text, sample.reference, output) for sample, output in zip(samples, outputs, strict=True)
    ]
    # The judge reports each finished case once, serially, so each report is one more unit done.
    run = judge.judge_cases(cases, progress=lambda done, total: progress.advance(1))
    judged = [verdict.score for verdict in run.verdicts if verdict.score is not None]
    cost.prompt_tokens += run.usage.prompt_tokens
    cost.completion_tokens += run.usage.completion_tokens
    cost.requests += run.usage.requests
    cost.judged += len(judged)
    cost.unjudged += len(cases) - len(judged)
    cost.response_format = run.response_format
    cost.first_error = cost.first_error or next((v.error for v in run.verdicts if v.error), None)
    scores = {"judgeUnjudged": (len(cases) - len(judged)) / len(cases)} if cases else {}
    # A mean over a few judged cases would stand for all of them: too few and there is no judge score (the gate on it
    # fails, and the job says why).
    if judged and len(judged) >= MIN_JUDGED_SHARE * len(cases):
        scores["judge"] = sum(judged) / len(judged)
    per_sample: list[SampleScores] = [
        {"judge": verdict.score, "judgeReasoning": verdict.reasoning or verdict.error} for verdict in run.verdicts
    ]
    return scores, per_sample


def baseline_runner(model: Any, baseline_model: Any | None) -> tuple[Any, AdapterState] | None:
    """The model and adapter state that give the base model's outputs, or None when there is none to be had."""
    if baseline_model is not None:
        return baseline_model, nullcontext
    if hasattr(model, "disable_adapter") and not is_sequence_classifier(model):
        return model, model.disable_adapter
    return None


def plan_models(
    model: Any,
    baseline_model: Any | None,
    examples: Sequence[Example],
    *,
    shots: Sequence[Example],
    baselines: Sequence[BaselineName],
    loss: bool,
    retrieved: Sequence[Sequence[Example]] = (),
) -> tuple[list[ScoredModel], list[str]]:
    """Which models run on which prompts, and notes on any baseline that cannot run."""
    prompts = [example.prompt for example in examples]
    classifier = is_sequence_classifier(model)
    plan = [ScoredModel(TUNED, model, nullcontext, prompts, loss)]
    notes: list[str] = []
    base = baseline_runner(model, baseline_model)
    if base is None:
        if baselines:
            reason = (
                "a classification head with its adapter disabled is untrained, and the base causal LM was not given"
                if classifier
                else "the model has no adapter to disable and no base model was given"
            )
            notes.append(f"baselines {', '.join(baselines)} not evaluated: {reason}")
        return plan, notes
    base_model, state = base
    if loss and classifier:
        notes.append("loss is the classification head's cross-entropy; the baselines generate, so they have no loss")
    elif loss and baselines:
        notes.append("loss is measured on the zero-shot prompts (tuned and zero-shot base), not on few-shot prompts")
    if ZERO_SHOT in baselines:
        plan.append(ScoredModel(ZERO_SHOT, base_model, state, prompts, loss and not classifier))
    if FEW_SHOT in baselines:
        few_shot = [few_shot_prompt(example, list(shots)) for example in examples]
        plan.append(ScoredModel(FEW_SHOT, base_model, state, few_shot, False))
    if RETRIEVAL_FEW_SHOT in baselines:
        nearest = [few_shot_prompt(example, list(own)) for example, own in zip(examples, retrieved, strict=True)]
        plan.append(ScoredModel(RETRIEVAL_FEW_SHOT, base_model, state, nearest, False))
    return plan, notes


def generates_text(metrics: Sequence[EvaluationMetric]) -> bool:
    """Whether any metric needs generated outputs (loss alone does not)."""
    return any(metric in TEXT_METRICS or metric == "judge" for metric in metrics)


def evaluation_metrics(spec: EvaluationSpec, dataset_format: str, references: Sequence[str]) -> list[EvaluationMetric]:
    """The spec's metrics, or those the data suggests when it lists none."""
    return list(spec.metrics) or default_metrics(dataset_format, references)


@dataclass
class EvalRun:
    """What every planned model is scored with: the samples, the settings, and the shared progress and timings."""

    tokenizer: Any
    examples: list[Example]
    samples: list[EvalSample]
    metrics: list[EvaluationMetric]
    labels: Sequence[str] | None
    max_new_tokens: int
    batch_size: int
    progress: Progress
    seconds: dict[str, float] = field(default_factory=dict)
    # Per model, each generation batch as (rows, seconds): every row of a batch waits for the whole batch.
    batches: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def references(self) -> list[str]:
        """The reference answers, in sample order."""
        return [sample.reference for sample in self.samples]

    def line_error(self, error: InvalidReferenceError) -> EvaluationInputError:
        """The error naming the validation line of the offending reference."""
        return EvaluationInputError(f"validation line {self.samples[error.index].line}: {error}")


def is_tuned_classifier(entry: ScoredModel) -> bool:
    """Whether this entry predicts with a classification head rather than by generating."""
    return entry.name == TUNED and is_sequence_classifier(entry.model)


def work_units(entry: ScoredModel, metrics: Sequence[EvaluationMetric]) -> int:
    """Progress units per sample for one planned model: a prediction pass, a loss pass, a judge call, as it needs."""
    classifier = is_tuned_classifier(entry)
    # A classifier's loss comes from its prediction pass.
    return int(classifier or generates_text(metrics)) + int(entry.loss and not classifier) + int("judge" in metrics)


def predict(entry: ScoredModel, run: EvalRun) -> tuple[list[str], float | None]:
    """The entry's outputs (head labels or generated text) and, for a classifier, its loss."""
    if is_tuned_classifier(entry):
        texts = [example.input_text for example in run.examples]
        names = head_labels(entry.model, run.labels)
        try:
            outputs, loss = classify(
                entry.model,
                run.tokenizer,
                texts,
                references=run.references,
                names=names,
                batch_size=run.batch_size,
                on_batch=run.progress.advance,
            )
        except InvalidReferenceError as error:
            raise run.line_error(error) from error
        return outputs, loss
    if not generates_text(run.metrics):
        return [""] * len(run.samples), None
    prompt_ids = [prompt_token_ids(run.tokenizer, prompt) for prompt in entry.prompts]
    timed = run.batches.setdefault(entry.name, [])
    last = time.monotonic()

    def batch_done(rows: int) -> None:
        nonlocal last
        now = time.monotonic()
        timed.append((rows, now - last))
        last = now
        run.progress.advance(rows)

    outputs = generate_outputs(
        entry.model,
        run.tokenizer,
        prompt_ids,
        batch_size=run.batch_size,
        max_new_tokens=run.max_new_tokens,
        on_batch=batch_done,
    )
    return outputs, None


def reference_loss(entry: ScoredModel, run: EvalRun) -> float:
    """The entry's mean cross-entropy on the reference completion tokens after its prompts."""
    prompt_ids = [prompt_token_ids(run.tokenizer, prompt) for prompt in entry.prompts]
    completion_ids = [
        completion_token_ids(run.tokenizer, prompt, reference)
        for prompt, reference in zip(entry.prompts, run.references, strict=True)
    ]
    loss, _ = completion_loss(
        entry.model,
        prompt_ids,
        completion_ids,
        batch_size=run.batch_size,
        pad=pad_id(run.tokenizer),
        on_batch=run.progress.advance,
    )
    return loss


def score_model(entry: ScoredModel, run: EvalRun) -> ModelResult:
    """Outputs, text scores and (if asked) loss and perplexity of one planned model, timed."""
    started = time.monotonic()
    result = ModelResult(outputs=[])
    with entry.adapter_state():
        result.outputs, head_loss = predict(entry, run)
        run.seconds[entry.name] = time.monotonic() - started
        if entry.loss and head_loss is not None:
            result.metrics["loss"] = head_loss
        elif entry.loss:
            loss_started = time.monotonic()
            loss = reference_loss(entry, run)
            # Tables go to JSON and the API status, which hold no NaN or infinity.
            if math.isfinite(loss):
                result.metrics["loss"] = loss
            if loss < MAX_EXP_ARGUMENT:
                result.metrics["perplexity"] = math.exp(loss)
            run.seconds["loss"] = run.seconds.get("loss", 0.0) + time.monotonic() - loss_started
    if generates_text(run.metrics) or is_tuned_classifier(entry):
        add_text_scores(result, run.samples, run.metrics, run.labels)
    return result


def add_text_scores(
    result: ModelResult,
    samples: Sequence[EvalSample],
    metrics: Sequence[EvaluationMetric],
    labels: Sequence[str] | None,
) -> None:
    """The text metrics of result's outputs, aggregated and per sample, into result: the one scoring of every arm,
    in-process or behind an endpoint."""
    try:
        scored = score_outputs(metrics, [sample.reference for sample in samples], result.outputs, labels)
    except InvalidReferenceError as error:
        raise EvaluationInputError(f"validation line {samples[error.index].line}: {error}") from error
    result.metrics.update(scored.scores)
    result.sample_scores = scored.samples
    result.confusion = scored.confusion


def request_tokens(entry: ScoredModel, run: EvalRun) -> list[int]:
    """Each request's input tokens as the model reads them: a classifier head the row's text alone, a generating
    model its whole prompt (label list and shots included)."""
    if is_tuned_classifier(entry):
        return [len(run.tokenizer(example.input_text)["input_ids"]) for example in run.examples]
    return [len(prompt_token_ids(run.tokenizer, prompt)) for prompt in entry.prompts]


def local_token_costs(
    plan: Sequence[ScoredModel], results: Mapping[str, ModelResult], run: EvalRun, price_per_hour: float | None
) -> dict[str, ServingCost]:
    """What the answers of the models served in-process cost per request: tokens as their tokenizer counts them (the
    cost argument of a short tuned prompt against a few-shot one), the latency of the batch that answered each row,
    and with a price per hour, the cost of the hardware time each request took at the throughput measured here."""
    costs: dict[str, ServingCost] = {}
    for entry in plan:
        prompt_tokens = request_tokens(entry, run)
        outputs = [] if is_tuned_classifier(entry) else results[entry.name].outputs
        completion_tokens = [len(run.tokenizer(output, add_special_tokens=False)["input_ids"]) for output in outputs]
        cost = token_cost(prompt_tokens, completion_tokens or [0] * len(prompt_tokens))
        timed = run.batches.get(entry.name) or []
        latencies = [seconds for rows, seconds in timed for _ in range(rows)]
        if latencies:
            # The hardware time a request took is its share of its batch's time.
            seconds_per_request = sum(seconds for _, seconds in timed) / len(latencies)
            cost = replace(
                cost,
                latency_p50_seconds=percentile(latencies, 0.5),
                latency_p95_seconds=percentile(latencies, 0.95),
                cost_per_1k_requests=None
                if price_per_hour is None
                else price_per_hour * seconds_per_request / 3600 * 1000,
            )
        costs[entry.name] = cost
    return costs


def score_contender(
    index: int,
    contender: ContenderSpec,
    run: EvalRun,
    train: Sequence[Example],
    spec: EvaluationSpec,
    seed: int,
    environ: Mapping[str, str] | None,
) -> tuple[ModelResult, ServingCost]:
    """A contender's answers on the run's rows, prompted its way, scored like every other model."""
    started = time.monotonic()
    outputs, records = ask_contender(
        index,
        contender,
        run.examples,
        train,
        spec,
        max_tokens=run.max_new_tokens,
        seed=seed,
        environ=environ,
        on_done=run.progress.advance,
    )
    run.seconds[contender.name] = time.monotonic() - started
    result = ModelResult(outputs=outputs)
    if generates_text(run.metrics):
        add_text_scores(result, run.samples, run.metrics, run.labels)
    return result, serving_cost(records, contender)


def add_judge_scores(
    judge: LlmJudge, results: dict[str, ModelResult], samples: Sequence[EvalSample], progress: Progress
) -> JudgeCost:
    """Grade every model's outputs with the judge; its scores join each model's metrics and per-sample scores."""
    cost = JudgeCost(model=judge.spec.model)
    for name, result in results.items():
        scores, per_sample = judge_outputs(judge, samples, result.outputs, cost, progress)
        result.metrics.update(scores)
        earlier = result.sample_scores or [{} for _ in samples]
        result.sample_scores = [{**before, **after} for before, after in zip(earlier, per_sample, strict=True)]
        log.info("judged %s: %s", name, scores)
    return cost


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
    started = time.monotonic()
    examples = list(validation[: spec.max_samples])
    if not examples:
        raise EvaluationInputError("there are no validation examples to evaluate")
    samples = [EvalSample(example.input_text, example.completion, example.line) for example in examples]
    metrics = evaluation_metrics(spec, dataset_format, [sample.reference for sample in samples])
    if "judge" in metrics and judge is None:
        raise EvaluationInputError("evaluation.metrics has judge but no judge was configured (evaluation.judge)")
    check_shots_available(spec, train)
    shots = select_shots(train, spec.few_shot_k, seed) if FEW_SHOT in spec.baselines else []
    retrieved = retrieved_shots(train, examples, spec.few_shot_k) if RETRIEVAL_FEW_SHOT in spec.baselines else []
    plan, notes = plan_models(
        model,
        baseline_model,
        examples,
        shots=shots,
        baselines=spec.baselines,
        loss="loss" in metrics,
        retrieved=retrieved,
    )
    run = EvalRun(
        tokenizer=tokenizer,
        examples=examples,
        samples=samples,
        metrics=metrics,
        labels=labels,
        max_new_tokens=spec.max_new_tokens or default_max_new_tokens(tokenizer, [s.reference for s in samples]),
        batch_size=spec.batch_size,
        progress=Progress(
            len(examples)
            * (
                sum(work_units(entry, metrics) for entry in plan) + len(spec.contenders) * (1 + int("judge" in metrics))
            ),
            progress,
        ),
    )
    was_training = bool(getattr(model, "training", False))
    for entry in plan:
        entry.model.eval()
    try:
        results: dict[str, ModelResult] = {}
        for entry in plan:
            log.info("evaluating %s on %d samples", entry.name, len(examples))
            results[entry.name] = score_model(entry, run)
    finally:
        if was_training:
            model.train()
    serving = local_token_costs(plan, results, run, spec.self_served_price_per_hour)
    for index, contender in enumerate(spec.contenders):
        log.info("asking contender %s (%s) on %d samples", contender.name, contender.model, len(examples))
        results[contender.name], serving[contender.name] = score_contender(
            index, contender, run, train, spec, seed, environ
        )
    cost = None
    if judge is not None and "judge" in metrics:
        judging = time.monotonic()
        cost = add_judge_scores(judge, results, samples, run.progress)
        run.seconds["judge"] = time.monotonic() - judging
    run.seconds["total"] = time.monotonic() - started
    return EvaluationResults(
        headline_metric=headline_metric(metrics, spec.gate.metric if spec.gate else None),
        samples=samples,
        models=results,
        seconds=run.seconds,
        judge_cost=cost,
        notes=notes,
        serving=serving,
    )
