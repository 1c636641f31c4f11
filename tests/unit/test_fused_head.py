"""TRL's fused LM head, made compact on the CPU: only labelled positions are projected, and loss and gradients agree."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import trl.trainer.utils as trl_utils
from kubetune_trainer.train.cpu_speedups import compact_on_eager_devices, score_labelled_positions_only
from trl.trainer.utils import add_fused_lm_head

from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

ROWS, LENGTH, ANSWER = 3, 24, 3  # three rows of 24 tokens; the last 3 of each carry labels, like completion-only loss


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fused-head")
    return build_tiny_llama(root / "model", build_tiny_tokenizer(root / "tokenizer"))


def completion_batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, vocab, (ROWS, LENGTH), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -ANSWER:] = input_ids[:, -ANSWER:]
    labels[2, -1] = -100  # rows need not have the same number of labels
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def fused_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and how many positions the chunked head projected, for one fused forward and backward."""
    projected: list[int] = []
    original_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(hidden: torch.Tensor, *args: Any) -> Any:
        projected.append(hidden.shape[0])
        return original_apply(hidden, *args)

    model.zero_grad()
    trl_utils._ChunkedLogProbFunction.apply = counting_apply
    try:
        loss = model(**batch, fused_lm_head=True).loss
    finally:
        trl_utils._ChunkedLogProbFunction.apply = original_apply
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(projected)


def test_compact_scoring_projects_only_labelled_positions_with_the_same_loss_and_gradients(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    add_fused_lm_head(model)
    batch = completion_batch(model.config.vocab_size)
    labelled = int((batch["labels"][:, 1:] != -100).sum())

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # trl 1.16 on the CPU: every position
    full_loss, full_grads, full_projected = fused_loss(model, batch)
    assert score_labelled_positions_only()
    compact_loss, compact_grads, compact_projected = fused_loss(model, batch)

    assert full_projected == ROWS * (LENGTH - 1)
    assert compact_projected == labelled == ROWS * ANSWER - 1
    reference = model(**batch).loss.item()  # the model's own loss over full logits
    assert compact_loss == pytest.approx(full_loss, abs=1e-6) and compact_loss == pytest.approx(reference, abs=1e-5)
    assert compact_grads.keys() == full_grads.keys() and len(compact_grads) > 0
    for name, grad in compact_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eager_devices_compact_and_compiled_ones_keep_fixed_shapes() -> None:
    assert compact_on_eager_devices(torch.device("cpu")) and compact_on_eager_devices(torch.device("cuda"))
    assert not compact_on_eager_devices(torch.device("xla"))
    assert not compact_on_eager_devices("cpu")  # not a device


def test_a_trl_without_the_hook_trains_uncompacted_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(trl_utils, "_use_triton")
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.train.cpu_speedups"):
        assert not score_labelled_positions_only()
    assert "cannot make the fused LM head compact" in caplog.text
