"""Packed batches on the CPU: [rows, longest row] with block-diagonal attention, TRL's labels, real tokens counted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.data.rows import Example, PreparedData
from kubetune_trainer.modeling import LoadedModel
from kubetune_trainer.train.callbacks import RunFlags
from kubetune_trainer.train.cpu_speedups import (
    IGNORED_LABEL,
    REAL_TOKENS_PER_ROW,
    BlockDiagonalPackedCollator,
    block_diagonal_packed_sft_trainer,
    packed_position_ids,
)
from kubetune_trainer.train.trainer import build_trainer

from kubetune.api import FineTuneJobSpec
from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.unit

PAD = 0
X = IGNORED_LABEL


def packed_row(*examples: tuple[list[int], list[int]]) -> dict[str, Any]:
    """A row as TRL's bfd packing stores it, from (input_ids, labels) examples: concatenated, with seq_lengths."""
    return {
        "input_ids": [token for ids, _ in examples for token in ids],
        "labels": [label for _, labels in examples for label in labels],
        "seq_lengths": [len(ids) for ids, _ in examples],
    }


def whole(ids: list[int]) -> tuple[list[int], list[int]]:
    """An example trained on every token (language modelling, or completion-only loss off)."""
    return ids, list(ids)


def completion(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    """An example under completion-only loss: its prompt labelled -100."""
    return prompt + answer, [X] * len(prompt) + answer


@dataclass(frozen=True)
class Case:
    name: str
    rows: list[dict[str, Any]]
    input_ids: list[list[int]]
    position_ids: list[list[int]]
    labels: list[list[int]]
    real_tokens: list[int]


CASES = [
    Case(
        "two examples in one row, one in a shorter row with a pad tail",
        [packed_row(whole([11, 12, 13]), whole([21, 22])), packed_row(whole([31, 32]))],
        input_ids=[[11, 12, 13, 21, 22], [31, 32, PAD, PAD, PAD]],
        position_ids=[[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]],
        # Each example's first token is not learnt from the previous example; the tail is no target.
        labels=[[X, 12, 13, X, 22], [X, 32, X, X, X]],
        real_tokens=[5, 2],
    ),
    Case(
        "completion-only loss keeps every prompt token out of the loss",
        [packed_row(completion([11, 12], [13]), completion([21], [22, 23])), packed_row(completion([31, 32], [33]))],
        input_ids=[[11, 12, 13, 21, 22, 23], [31, 32, 33, PAD, PAD, PAD]],
        position_ids=[[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]],
        labels=[[X, X, 13, X, 22, 23], [X, X, 33, X, X, X]],
        real_tokens=[6, 3],
    ),
    Case(
        "a pad token that is also the EOS ending each example counts as real inside the rows",
        [packed_row(whole([11, PAD]), whole([21, 22, PAD])), packed_row(whole([31, PAD]), whole([PAD]))],
        input_ids=[[11, PAD, 21, 22, PAD], [31, PAD, PAD, PAD, PAD]],
        position_ids=[[0, 1, 0, 1, 2], [0, 1, 0, 0, 1]],
        labels=[[X, PAD, X, 22, PAD], [X, PAD, X, X, X]],
        real_tokens=[5, 3],
    ),
    Case(
        "rows of the same length have no tail",
        [packed_row(whole([11, 12]), whole([21])), packed_row(whole([31, 32, 33]))],
        input_ids=[[11, 12, 21], [31, 32, 33]],
        position_ids=[[0, 1, 0], [0, 1, 2]],
        labels=[[X, 12, X], [X, 32, 33]],
        real_tokens=[3, 3],
    ),
    Case(
        "a single row",
        [packed_row(whole([11, 12, 13]), whole([21, 22]))],
        input_ids=[[11, 12, 13, 21, 22]],
        position_ids=[[0, 1, 2, 0, 1]],
        labels=[[X, 12, 13, X, 22]],
        real_tokens=[5],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_packed_rows_become_one_padded_batch_without_an_attention_mask(case: Case) -> None:
    batch = BlockDiagonalPackedCollator(pad_token_id=PAD)(case.rows)

    assert set(batch) == {"input_ids", "labels", "position_ids", REAL_TOKENS_PER_ROW}, "no attention_mask"
    assert tuple(batch["input_ids"].shape) == (len(case.rows), max(len(row["input_ids"]) for row in case.rows))
    assert batch["input_ids"].tolist() == case.input_ids
    assert batch["position_ids"].tolist() == case.position_ids
    assert batch["labels"].tolist() == case.labels
    assert batch[REAL_TOKENS_PER_ROW].tolist() == case.real_tokens
    assert int(batch[REAL_TOKENS_PER_ROW].sum()) == sum(sum(row["seq_lengths"]) for row in case.rows)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_real_tokens_match_trls_padding_free_batch(case: Case) -> None:
    """What the rows hold before their tails is exactly what TRL's concatenated row trained on."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ours = BlockDiagonalPackedCollator(pad_token_id=PAD)(case.rows)
    trl = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(case.rows)

    for name in ("input_ids", "labels", "position_ids"):
        real = [value for row, n in enumerate(ours[REAL_TOKENS_PER_ROW].tolist()) for value in ours[name][row, :n]]
        assert [int(value) for value in real] == trl[name][0].tolist(), name


@pytest.mark.parametrize(
    ("position_ids", "real", "expected"),
    [
        ([[0, 1, 2, 0]], [[1, 1, 1, 0]], [[0, 1, 2, 0]]),
        ([[0, 1, 0, 0, 0]], [[1, 1, 0, 0, 0]], [[0, 1, 0, 1, 2]]),
        ([[0, 0, 1, 0], [0, 1, 2, 3]], [[1, 1, 1, 0], [1, 1, 1, 1]], [[0, 0, 1, 0], [0, 1, 2, 3]]),
    ],
)
def test_the_pad_tail_is_numbered_from_zero(
    position_ids: list[list[int]], real: list[list[int]], expected: list[list[int]]
) -> None:
    import torch

    numbered = packed_position_ids(torch.tensor(position_ids), torch.tensor(real).bool())

    assert numbered.tolist() == expected


# ----------------------------------------------------------------------------------------------------------------------
# On the tiny random Llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=512)
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), tokenizer_dir)


def test_each_packed_example_sees_only_itself(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [[7, 5, 9], [6, 4]]  # the second row has a pad tail of 11 tokens
    examples = [[torch.randint(3, 500, (n,), generator=generator).tolist() for n in row] for row in lengths]
    rows = [packed_row(*(whole(ids) for ids in row)) for row in examples]
    batch = BlockDiagonalPackedCollator(pad_token_id=int(model.config.pad_token_id))(rows)
    # No cache, as in training (TRL passes use_cache=False): with one, transformers does not look for packed examples.
    model_inputs = {name: value for name, value in batch.items() if name != REAL_TOKENS_PER_ROW} | {"use_cache": False}

    with torch.no_grad():
        packed = model(**model_inputs).logits
        as_one_sequence = model(input_ids=batch["input_ids"]).logits
        for row, row_examples in enumerate(examples):
            start = 0
            for ids in row_examples:
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                inside = packed[row, start : start + len(ids)]
                torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)
                start += len(ids)
        # Not vacuous: read as one sequence per row, the later examples see the earlier ones.
        assert not torch.allclose(as_one_sequence[0, 7:12], packed[0, 7:12], atol=1e-3)

        trl_batch = trl_padding_free_batch(rows, int(model.config.pad_token_id))
        trl_loss = model(**trl_batch, use_cache=False).loss
        our_loss = model(**model_inputs).loss
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-5)


def trl_padding_free_batch(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """TRL's own packed batch (one concatenated row), as trained on before and on CUDA."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)(rows)
    return {name: batch[name] for name in ("input_ids", "labels", "position_ids")}


def test_the_trainer_feeds_packed_batches_whole_and_counts_their_real_tokens(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from kubetune_trainer.train import trainer as training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(training, "cuda_available", lambda: False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # As for a model without a pad token of its own (load_tokenizer): pad = EOS, which ends every packed example.
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = LoadedModel(model, tokenizer, "causal-lm", "full", "no")
    texts = [("a short line. " * (1 + index % 4)).strip() for index in range(24)]
    train = [Example(prompt="", completion=text, input_text=text, line=n) for n, text in enumerate(texts, 1)]
    data = PreparedData(format="text", train=train, validation=[], labels=None, sha256="0" * 64, stats=None)
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(model_dir)},
            "dataset": {"train": "s3://bucket/train.jsonl", "format": "text", "maxLength": 32},
            "method": "full",
            "training": {
                "packing": True,
                "batchSize": 3,
                "maxSteps": 2,
                "checkpointEvery": 100,
                "warmupSteps": 0,
                "gradientCheckpointing": True,
            },
            "output": {"uri": "s3://bucket/out"},
        }
    )
    trainer = build_trainer(spec, data=data, loaded=loaded, checkpoints_dir=tmp_path / "checkpoints", flags=RunFlags())
    assert isinstance(trainer, block_diagonal_packed_sft_trainer())
    assert isinstance(trainer.data_collator, BlockDiagonalPackedCollator)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (3, 1)
    collate = trainer.data_collator
    collated: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    fed: list[dict[str, Any]] = []

    def collate_and_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(rows)
        collated.append((rows, batch))
        return batch

    def record_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            fed.append(dict(kwargs))

    trainer.data_collator = collate_and_record
    hook = model.register_forward_pre_hook(record_forward, with_kwargs=True)
    try:
        trainer.train()
    finally:
        hook.remove()

    assert len(fed) == 2, "one forward per step: the whole batch at once"
    for inputs, (_, batch) in zip(fed, collated, strict=False):  # the dataloader may have collated one batch ahead
        assert "attention_mask" not in inputs and REAL_TOKENS_PER_ROW not in inputs
        assert inputs["input_ids"].shape[0] == 3 and torch.equal(inputs["input_ids"], batch["input_ids"])
        assert torch.equal(inputs["position_ids"], batch["position_ids"])
    trained_rows = [row for rows, _ in collated[: len(fed)] for row in rows]
    real = sum(len(row["input_ids"]) for row in trained_rows)
    by_pad_id = sum(int((inputs["input_ids"] != tokenizer.pad_token_id).sum()) for inputs in fed)
    assert trainer.state.num_input_tokens_seen == real
    assert by_pad_id < real, "the EOS ending each example is the pad id: counting by pad id would miss it"
