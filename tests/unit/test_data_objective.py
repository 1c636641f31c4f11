"""Pre-flight token statistics measure what the training objective feeds the model, not always the causal-LM prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.backends.local import RunSettings, model_stage
from kubetune_trainer.data.prepare import measure_tokens, prepare_data
from kubetune_trainer.data.rows import Example
from kubetune_trainer.progress.reporter import ProgressChannel, Reporter

from kubetune.api import DatasetSpec, DatasetStatus, FineTuneJobSpec
from tests.testbed.shared_data import shared_sample
from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.unit

# Many long label names and short texts: the causal-LM prompt (which lists every label) dwarfs the text itself.
LABELS = [f"customer_intent_about_topic_number_{index}" for index in range(40)]
SHORT_ROWS = [{"text": f"where is my card {index}", "label": LABELS[index % len(LABELS)]} for index in range(80)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_sequence_classification_measures_the_input_text_alone(tmp_path: Path, tiny_tokenizer: Any) -> None:
    spec = DatasetSpec(train=write_jsonl(tmp_path / "train.jsonl", SHORT_ROWS), validation_split=0.1, max_length=64)

    head = prepare_data(spec, seed=0, tokenizer=tiny_tokenizer, objective="sequence-classification")
    generation = prepare_data(spec, seed=0, tokenizer=tiny_tokenizer)

    assert head.stats is not None and generation.stats is not None
    # Exactly what the classification trainer tokenizes (input_text, special tokens, no EOS): nothing is cut.
    lengths = sorted(len(ids) for ids in tiny_tokenizer([e.input_text for e in head.train])["input_ids"])
    assert (head.stats.max, head.stats.measured) == (lengths[-1], len(head.train))
    assert head.stats.max < 64
    assert head.stats.truncated_fraction == 0.0
    # The default is still causal-lm: the 40-label prompt of every row is longer than maxLength.
    assert generation.stats.p50 > 64
    assert generation.stats.truncated_fraction == 1.0


def test_measure_tokens_counts_no_end_of_sequence_token_for_a_head(tiny_tokenizer: Any) -> None:
    texts = ["word " * count for count in (2, 4, 8)]
    examples = [Example(f"Label this: {text}\nLabel: ", "label", text, line) for line, text in enumerate(texts, 1)]
    text_lengths = sorted(len(tiny_tokenizer(e.input_text)["input_ids"]) for e in examples)

    head = measure_tokens(examples, tiny_tokenizer, max_length=text_lengths[1], objective="sequence-classification")
    generation = measure_tokens(examples, tiny_tokenizer, max_length=text_lengths[1])

    assert (head.p50, head.max, head.truncated_fraction) == (text_lengths[1], text_lengths[2], 1 / 3)
    # The causal-LM example adds the prompt, the label and an EOS to the same text.
    assert generation.max > head.max
    assert generation.truncated_fraction == 1.0


def test_banking77_sample_fits_max_length_128_for_the_head(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = DatasetSpec(
        train=str(shared_sample("banking77", "train")),
        validation=str(shared_sample("banking77", "test")),
        format="classification",
        max_length=128,
    )

    head = prepare_data(spec, seed=42, tokenizer=tokenizer, objective="sequence-classification")
    generation = prepare_data(spec, seed=42, tokenizer=tokenizer, objective="causal-lm")

    assert head.stats is not None and generation.stats is not None
    assert head.stats.truncated_fraction == 0.0
    assert head.stats.max <= 128
    # The generated-text prompt lists all 77 intents (~600 tokens): every row would be cut at 128.
    assert generation.stats.p50 > 500
    assert generation.stats.truncated_fraction == 1.0


class DatasetRecorder(ProgressChannel):
    """Keeps every status.dataset the trainer reports."""

    def __init__(self) -> None:
        self.reports: list[DatasetStatus] = []

    def dataset_measured(self, dataset: DatasetStatus) -> None:
        self.reports.append(dataset)


def test_model_stage_reports_the_objectives_token_lengths(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    model_dir = build_tiny_llama(tmp_path / "model", tiny_tokenizer_dir)
    train = write_jsonl(tmp_path / "train.jsonl", SHORT_ROWS)
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(model_dir)},
            "dataset": {"train": train, "format": "classification", "maxLength": 64},
            "training": {"objective": "sequence-classification"},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    data = prepare_data(spec.dataset, spec.training.seed)
    recorder = DatasetRecorder()
    settings = RunSettings(work_dir=tmp_path / "work", model_cache_dir=tmp_path / "cache")

    _, measured = model_stage(spec, data, settings, Reporter([recorder]))

    assert measured.stats is not None
    assert measured.stats.truncated_fraction == 0.0
    assert recorder.reports[-1].truncated_fraction == 0.0
    assert recorder.reports[-1].token_lengths is not None
    assert recorder.reports[-1].token_lengths.max == measured.stats.max < 64
