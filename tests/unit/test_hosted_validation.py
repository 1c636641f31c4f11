"""The hosted training file: Examples as chat JSONL and the service's limits, checked before any upload."""

from __future__ import annotations

import json

import pytest
from kubetune_trainer.backends.hosted.validation import (
    DEFAULT_EXAMPLE_TOKEN_LIMIT,
    HostedLimits,
    approximate_tokens,
    chat_messages_of,
    example_token_limit,
    hosted_file,
    message_problems,
)
from kubetune_trainer.data.rows import DataError, Example

pytestmark = pytest.mark.unit

SOURCE = "dataset.train s3://data/train.jsonl"


def chat_example(line: int, answer: str = "Sports", text: str = "The match ended 2-1.") -> Example:
    return Example([{"role": "user", "content": text}], answer, text, line)


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        ("gpt-3.5-turbo-0125", 16_385),
        ("gpt-4o-mini-2024-07-18", 65_536),
        ("ft:gpt-3.5-turbo-0125:acme:news:abc123", 16_385),
        ("my-local-llama", DEFAULT_EXAMPLE_TOKEN_LIMIT),
    ],
)
def test_token_limit_follows_the_base_model(model: str, limit: int) -> None:
    assert example_token_limit(model) == limit


def test_approximate_tokens_count_bytes_over_four_plus_message_framing() -> None:
    # 8 ASCII bytes = 2 tokens, 3 two-byte characters (6 bytes) = 2 tokens; 3 per message, 3 priming the reply.
    messages = [{"role": "user", "content": "abcdefgh"}, {"role": "assistant", "content": "ééé"}]

    assert approximate_tokens(messages) == 2 + 2 + 2 * 3 + 3


def test_chat_prompts_are_kept_and_the_completion_becomes_the_answer() -> None:
    example = Example(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], "Hello.", "Hi?", 4
    )

    assert chat_messages_of(example) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_a_template_prompt_is_the_user_turn_with_its_system_prompt_as_a_system_message() -> None:
    example = Example("Be brief.\n\n### Q: Hi?\n### A:", "Hello.", "Hi?", 2, system_prompt="Be brief.")

    assert chat_messages_of(example) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "### Q: Hi?\n### A:"},
        {"role": "assistant", "content": "Hello."},
    ]


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "assistant", "content": "Only an answer."}], "no user message before the assistant's answer"),
        ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}], "the last message must be"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "messages[1] (assistant) has no"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[0].role 'tool' is not"),
    ],
    ids=["text-format-without-prompt", "answer-not-last", "empty-answer", "unknown-role"],
)
def test_conversations_the_service_refuses_are_named(messages: list[dict[str, str]], problem: str) -> None:
    assert any(problem in found for found in message_problems(messages)), message_problems(messages)


def test_a_good_conversation_has_no_problems() -> None:
    assert message_problems(chat_messages_of(chat_example(1))) == []


def test_the_file_is_deterministic_jsonl_with_one_conversation_per_line() -> None:
    examples = [chat_example(line) for line in range(1, 11)]

    first = hosted_file(examples, HostedLimits(), SOURCE, min_examples=10)
    again = hosted_file(examples, HostedLimits(), SOURCE, min_examples=10)

    assert first.content == again.content and first.sha256 == again.sha256
    lines = first.content.decode().splitlines()
    assert first.examples == len(lines) == 10
    assert json.loads(lines[0]) == {"messages": chat_messages_of(examples[0])}


def test_fewer_examples_than_the_service_minimum_are_refused() -> None:
    with pytest.raises(DataError, match=r"dataset.train s3://data/train.jsonl: 9 training examples .* at least 10"):
        hosted_file([chat_example(line) for line in range(9)], HostedLimits(), SOURCE, min_examples=10)


def test_every_bad_example_is_listed_with_its_dataset_line() -> None:
    examples = [chat_example(line) for line in range(1, 12)]
    examples[2] = Example("", "just text", "just text", 3)
    examples[6] = chat_example(7, text="x" * 400)

    with pytest.raises(DataError) as refused:
        hosted_file(examples, HostedLimits(max_example_tokens=50), SOURCE, min_examples=10)

    assert [(error.line, error.file) for error in refused.value.row_errors] == [(3, SOURCE), (7, SOURCE)]
    assert "no user message" in refused.value.row_errors[0].reason
    assert "(training file line 3)" in refused.value.row_errors[0].reason
    # 400 bytes = 100 tokens, "Sports" 2, two messages 6, reply priming 3.
    assert "about 111 tokens, over the model's 50-token" in refused.value.row_errors[1].reason


def test_a_file_over_the_upload_limit_is_refused() -> None:
    with pytest.raises(DataError, match="over the service's 100-byte upload limit"):
        hosted_file([chat_example(line) for line in range(10)], HostedLimits(max_file_bytes=100), SOURCE)
