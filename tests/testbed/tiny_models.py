"""Tiny real models built offline for fast tests: a byte-level BPE tokenizer with a ChatML template, a random Llama."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tests.testbed.shared_data import SHARED_DATA_DIR

SAMPLE_FILES = ("ag_news/train.jsonl", "banking77/train.jsonl")

BOS_TOKEN = "<|endoftext|>"
CHAT_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, CHAT_START_TOKEN, EOS_TOKEN, PAD_TOKEN)

# ChatML. The assistant turn is wrapped in {% generation %} so that assistant-only loss masks work; a prompt rendered
# with add_generation_prompt is a prefix of the same conversation with its answer, as completion-only loss needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Used when the shared sample data is absent (e.g. on CI): byte-level BPE still encodes any text, only less compactly.
FALLBACK_TEXTS = (
    "Classify the text into exactly one of these labels: World, Sports, Business, Sci/Tech.",
    "Answer with the label only.",
    "What is the capital of France? The capital of France is Paris.",
    "I lost my card and need a new one. How do I check my balance?",
    "Stocks rallied on Wall Street as oil prices fell.",
    "The team won the championship after a late goal.",
)


def sample_texts(data_dir: Path = SHARED_DATA_DIR) -> list[str]:
    """The `text` fields of the shared sample train files, or FALLBACK_TEXTS when they are not on this machine."""
    texts: list[str] = []
    for name in SAMPLE_FILES:
        path = data_dir / name
        if path.exists():
            texts.extend(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
    return texts or list(FALLBACK_TEXTS)


def build_tiny_tokenizer(path: str | Path, vocab_size: int = 1024, texts: Iterable[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer, wrap it with bos/eos/pad and a ChatML chat template, save it to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts) if texts is not None else sample_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    target = Path(path)
    tokenizer.save_pretrained(target)
    return target


def build_tiny_llama(path: str | Path, tokenizer_path: str | Path, seed: int = 0) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 64, 4 heads) sized to the tokenizer, saved with it to `path`."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    target = Path(path)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
