"""The tiny test models load with from_pretrained, render chat prompts, and run a forward pass and generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "Classify."},
    {"role": "user", "content": "The striker scored twice."},
    {"role": "assistant", "content": "Sports"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=512)
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_tokenizer_has_distinct_special_tokens_and_round_trips_text(tokenizer: Any) -> None:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    text = "Crédit card declined — why?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_renders_chatml_and_the_prompt_is_a_prefix_of_the_answered_chat(tokenizer: Any) -> None:
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nClassify.<|im_end|>\n<|im_start|>user\nThe striker scored twice.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert full.startswith(prompt) and full[len(prompt) :] == "Sports<|im_end|>"


def test_chat_template_marks_the_assistant_tokens(tokenizer: Any) -> None:
    encoded = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    answer = [token for token, mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if mask]
    assert tokenizer.decode(answer) == "Sports<|im_end|>"


def test_llama_loads_from_its_directory_with_the_requested_shape(model_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (
        "llama",
        2,
        64,
        4,
    )
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id


def test_llama_runs_a_forward_pass_and_greedy_generation(model_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(
        CONVERSATION[:-1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    logits = model(**inputs).logits
    assert tuple(logits.shape) == (1, inputs["input_ids"].shape[1], len(tokenizer))
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_same_seed_builds_the_same_weights(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again", model_dir)
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
