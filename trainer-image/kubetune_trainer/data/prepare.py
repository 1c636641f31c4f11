"""The trainer's data stage: fetch, parse, validate, split and measure the dataset before any model is loaded."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from kubetune.api import DatasetSpec
from kubetune_trainer import storage
from kubetune_trainer.data.files import SourceRow, column_names, read_rows
from kubetune_trainer.data.formats import (
    FORMATS,
    RowFormat,
    check_settings,
    check_template,
    collect_labels,
    convert_rows,
    describe_labels,
    few_shot_prompt,
    mapped_names,
    resolve_format,
)
from kubetune_trainer.data.rows import DataError, DataStats, Example, PreparedData, RowError

__all__ = [
    "DataError",
    "DataStats",
    "Example",
    "Objective",
    "PreparedData",
    "RowError",
    "few_shot_prompt",
    "measure_tokens",
    "prepare_data",
    "split_validation",
]

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_SHARE = 0.1
# What training feeds the model, which is what maxLength must hold: causal-lm the whole prompt + completion,
# sequence-classification only each example's input_text (the head never sees the prompt or its label list).
Objective = Literal["causal-lm", "sequence-classification"]
# Token statistics tokenize at most this many evenly spaced examples: the percentiles barely move past it.
MEASURED_EXAMPLES_LIMIT = 20_000
# Storage failures that say the dataset URI names nothing readable: bad input, not an outage.
MISSING_SOURCE_REASONS = frozenset(
    {storage.REASON_NO_SUCH_KEY, storage.REASON_NO_SUCH_BUCKET, storage.REASON_INVALID_URI, storage.REASON_LOCAL_IO}
)


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer the statistics use."""

    chat_template: Any
    eos_token_id: int | None

    def __call__(self, text: list[str], add_special_tokens: bool = True) -> Any: ...

    def apply_chat_template(self, conversation: Any, tokenize: bool = False) -> Any: ...


def fetch(uri: str, field: str) -> bytes:
    """The raw bytes of a dataset file.

    DataError (permanent) when the file is not there: no such key, bucket or local file, or the URI names a prefix or
    a directory; every retry would read the same. Anything else (an unreachable endpoint, throttling, a server error,
    missing or denied credentials, which a retried pod reads afresh from its Secret) may pass, so it stays a
    StorageError, which the trainer exits on as retryable. Both name the spec field and the URI.
    """
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as error:
        if error.reason in MISSING_SOURCE_REASONS:
            raise DataError(f"cannot read {field} {uri}: {error.message} ({error.reason})") from error
        raise storage.StorageError(uri, error.reason, f"cannot read {field}: {error.message}") from error


def dataset_sha256(train: bytes, validation: bytes | None) -> str:
    """sha256 of the train bytes, followed by the validation bytes when there is a validation file."""
    digest = hashlib.sha256(train)
    if validation is not None:
        digest.update(validation)
    return digest.hexdigest()


def label_set(spec_labels: list[str] | None, train_labels: list[str], file: str) -> list[str]:
    """dataset.labels, or the sorted distinct labels of train; at least two distinct labels."""
    if spec_labels is not None:
        duplicates = sorted({label for label in spec_labels if spec_labels.count(label) > 1})
        if duplicates:
            raise DataError(f"dataset.labels has duplicates: {', '.join(duplicates)}")
        labels = list(spec_labels)
    else:
        labels = train_labels
    if len(labels) < 2:
        where = "dataset.labels" if spec_labels is not None else f"{file} (column label)"
        raise DataError(f"classification needs at least 2 labels; {where} has {describe_labels(labels) or 'none'}")
    return labels


def row_format_for(spec: DatasetSpec, rows: list[SourceRow], file: str) -> RowFormat:
    """Resolve the format against the train file's columns and check the template and settings."""
    names = column_names(rows)
    data_format = resolve_format(spec.format, names, spec.columns, file)
    if spec.labels is not None and not FORMATS[data_format].labelled:
        raise DataError(f"dataset.labels applies to format classification only (the format is {data_format})")
    check_template(spec.template, data_format, mapped_names(names, spec.columns), file)
    row_format = RowFormat(
        format=data_format, columns=dict(spec.columns), template=spec.template, system_prompt=spec.system_prompt
    )
    check_settings(row_format)
    if FORMATS[data_format].labelled:
        labels = label_set(spec.labels, collect_labels(rows, row_format), file)
        row_format = dataclasses.replace(row_format, labels=tuple(labels))
    return row_format


def check_columns(rows: list[SourceRow], row_format: RowFormat, file: str) -> None:
    """A validation file must have the columns the train file's format needs."""
    resolve_format(row_format.format, column_names(rows), row_format.columns, file)
    check_template(row_format.template, row_format.format, mapped_names(column_names(rows), row_format.columns), file)


def split_indices(
    count: int, share: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """(train, validation) row indices, each in source order; the same seed always gives the same split.

    With groups (classification labels) the split is stratified: each label gives about `share` of its rows and keeps
    at least one in train.
    """
    if count < 2:
        raise DataError(
            f"dataset.train has {count} row: at least 2 are needed to hold out a validation split "
            "(or set dataset.validation)"
        )
    wanted = min(count - 1, max(1, round(count * share)))
    rng = random.Random(seed)
    chosen = stratified_choice(groups, wanted, rng) if groups is not None else []
    if not chosen:
        order = list(range(count))
        rng.shuffle(order)
        chosen = order[:wanted]
    held_out = set(chosen)
    return [index for index in range(count) if index not in held_out], sorted(held_out)


def stratified_choice(groups: Sequence[str], wanted: int, rng: random.Random) -> list[int]:
    """About `wanted` indices spread over groups in proportion to their size, never a group's last member."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    for name in sorted(members):
        rng.shuffle(members[name])
    total = len(groups)
    exact = {name: len(indices) * wanted / total for name, indices in members.items()}
    quota = {name: min(math.floor(exact[name]), len(members[name]) - 1) for name in members}
    # Largest remainder first; ties go to the label that sorts first, so the split does not depend on dict order.
    by_remainder = sorted(members, key=lambda name: (-(exact[name] - quota[name]), name))
    for name in by_remainder:
        if sum(quota.values()) >= wanted:
            break
        if quota[name] < len(members[name]) - 1:
            quota[name] += 1
    return [index for name in sorted(members) for index in members[name][: quota[name]]]


def split_validation(
    examples: list[Example], share: float, seed: int, stratify: bool = False
) -> tuple[list[Example], list[Example]]:
    """Hold out a deterministic share of the examples; stratify by completion (the label) for classification."""
    groups = [example.completion for example in examples] if stratify else None
    train, validation = split_indices(len(examples), share, seed, groups)
    return [examples[index] for index in train], [examples[index] for index in validation]


def percentile(sorted_values: list[int], share: float) -> int:
    """Nearest-rank percentile of ascending values (share 0.5 = median)."""
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


def example_texts(examples: list[Example], tokenizer: Tokenizer) -> tuple[list[str], bool]:
    """The full text of each example as training sees it, and whether the chat template (with its markers) made it."""
    if not examples or isinstance(examples[0].prompt, str):
        return [str(example.prompt) + example.completion for example in examples], False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the model's tokenizer has no chat template, so chat prompts cannot be rendered: set dataset.template "
            "to use plain-text prompts"
        )
    texts = [
        tokenizer.apply_chat_template(
            [*example.prompt, {"role": "assistant", "content": example.completion}], tokenize=False
        )
        for example in examples
    ]
    return [str(text) for text in texts], True


def measured_sample(examples: list[Example], limit: int = MEASURED_EXAMPLES_LIMIT) -> list[Example]:
    """All examples, or `limit` evenly spaced ones."""
    if len(examples) <= limit:
        return examples
    step = len(examples) / limit
    return [examples[int(position * step)] for position in range(limit)]


def token_lengths(examples: list[Example], tokenizer: Tokenizer, objective: Objective) -> list[int]:
    """Tokens per example as the objective's training sees them, unsorted."""
    if objective == "sequence-classification":
        # The classification trainer tokenizes input_text alone, with the tokenizer's special tokens and no EOS.
        return [len(ids) for ids in tokenizer([example.input_text for example in examples])["input_ids"]]
    texts, templated = example_texts(examples, tokenizer)
    encoded = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    # Plain-text examples get an end-of-sequence token appended in training; chat templates write their own.
    extra = 0 if templated or tokenizer.eos_token_id is None else 1
    return [len(ids) + extra for ids in encoded]


def measure_tokens(
    examples: list[Example], tokenizer: Tokenizer, max_length: int, objective: Objective = "causal-lm"
) -> DataStats:
    """Token-length percentiles of what the objective trains on and the share longer than max_length (truncated)."""
    lengths = sorted(token_lengths(measured_sample(examples), tokenizer, objective))
    if not lengths:
        raise DataError("no examples to measure")
    truncated = sum(1 for length in lengths if length > max_length)
    return DataStats(
        measured=len(lengths),
        p50=percentile(lengths, 0.5),
        p95=percentile(lengths, 0.95),
        max=lengths[-1],
        truncated_fraction=truncated / len(lengths),
        max_length=max_length,
    )


def prepare_data(
    spec: DatasetSpec, seed: int, tokenizer: Tokenizer | None = None, objective: Objective = "causal-lm"
) -> PreparedData:
    """Fetch, parse, validate (every row), split and measure the dataset; DataError on any bad input.

    Without a tokenizer the token statistics are skipped (stats is None), e.g. to validate data without a model.
    objective (training.objective) decides what is measured: see token_lengths.
    """
    train_bytes = fetch(spec.train, "dataset.train")
    train_rows = read_rows(train_bytes, spec.train)
    row_format = row_format_for(spec, train_rows, spec.train)
    train = convert_rows(train_rows, spec.train, row_format)
    validation_bytes: bytes | None = None
    if spec.validation is not None:
        validation_bytes = fetch(spec.validation, "dataset.validation")
        validation_rows = read_rows(validation_bytes, spec.validation)
        check_columns(validation_rows, row_format, spec.validation)
        validation = convert_rows(validation_rows, spec.validation, row_format)
    else:
        share = spec.validation_split if spec.validation_split is not None else DEFAULT_VALIDATION_SHARE
        train, validation = split_validation(train, share, seed, stratify=FORMATS[row_format.format].labelled)
    stats = measure_tokens(train, tokenizer, spec.max_length, objective) if tokenizer is not None else None
    log.info(
        "dataset %s: format %s, %d train and %d validation examples",
        spec.train,
        row_format.format,
        len(train),
        len(validation),
    )
    return PreparedData(
        format=row_format.format,
        train=train,
        validation=validation,
        labels=list(row_format.labels) if row_format.labels is not None else None,
        sha256=dataset_sha256(train_bytes, validation_bytes),
        stats=stats,
    )
