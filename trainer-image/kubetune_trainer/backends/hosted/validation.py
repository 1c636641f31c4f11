"""The hosted training file: Examples as OpenAI chat JSONL, checked against the service's documented limits first.

What is checked before anything is uploaded (each a DataError naming the dataset file and line):

- at least MIN_TRAINING_EXAMPLES (10) training examples, as the fine-tuning guide requires;
- every message has a known role and non-empty text content; a user message comes before the answer; the last
  message is a non-empty assistant message (the turn the service trains on);
- the approximate token count of each example stays within the base model's training-example limit (the service
  silently cuts longer examples from the end, which removes the answer);
- the whole file stays under the Files API's size limit (512 MB).

Token counts are an approximation without the model's tokenizer (tiktoken is not in the image): OpenAI's rule of
thumb of about 4 characters per token for English, taken over UTF-8 bytes (never fewer than characters, and closer
for non-Latin scripts, whose characters are each nearer a token), plus the cookbook's 3 tokens of framing per message
and 3 that prime the reply. The service re-checks the file; what it still rejects ends the run as a failed job.
dataset.maxLength does not apply: the service has no truncation setting of its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kubetune_trainer.data.formats import without_system_prompt
from kubetune_trainer.data.rows import ChatMessages, DataError, Example, RowErrors

MIN_TRAINING_EXAMPLES = 10
MAX_FILE_BYTES = 512 * 1024 * 1024
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3
TOKENS_PRIMING_REPLY = 3
CHAT_ROLES = ("system", "user", "assistant")
# Training-example context of the documented fine-tunable models; longest prefix wins. A model the table does not
# name (a compatible service's, a newer one) gets DEFAULT_EXAMPLE_TOKEN_LIMIT.
EXAMPLE_TOKEN_LIMITS: dict[str, int] = {
    "gpt-3.5-turbo": 16_385,
    "gpt-4o-mini": 65_536,
    "gpt-4o": 65_536,
    "gpt-4.1": 65_536,
}
DEFAULT_EXAMPLE_TOKEN_LIMIT = 65_536


@dataclass(frozen=True)
class HostedLimits:
    """The service's limits on a training file."""

    min_examples: int = MIN_TRAINING_EXAMPLES
    max_example_tokens: int = DEFAULT_EXAMPLE_TOKEN_LIMIT
    max_file_bytes: int = MAX_FILE_BYTES


@dataclass(frozen=True)
class ChatRecord:
    """One line of the JSONL file ({"messages": [...]}) and the dataset line it came from."""

    messages: ChatMessages
    source_line: int

    def to_json(self) -> str:
        """The JSONL line, without its newline."""
        return json.dumps({"messages": self.messages}, ensure_ascii=False)


@dataclass(frozen=True)
class HostedFile:
    """A validated JSONL file ready for upload: its bytes, their sha256 and how many examples it holds."""

    content: bytes
    sha256: str
    examples: int


def example_token_limit(model: str) -> int:
    """The training-example token limit of a base model (or of a fine-tuned one, `ft:<base>:...`)."""
    base = model.removeprefix("ft:").split(":")[0]
    matches = [prefix for prefix in EXAMPLE_TOKEN_LIMITS if base.startswith(prefix)]
    return EXAMPLE_TOKEN_LIMITS[max(matches, key=len)] if matches else DEFAULT_EXAMPLE_TOKEN_LIMIT


def limits_for(model: str) -> HostedLimits:
    """The limits that apply to a training file for this base model."""
    return HostedLimits(max_example_tokens=example_token_limit(model))


def chat_messages_of(example: Example) -> ChatMessages:
    """The conversation the service trains on: chat prompts as they are, a template prompt as the user turn (its
    systemPrompt as a system message), then the completion as the assistant's answer."""
    answer = {"role": "assistant", "content": example.completion}
    if isinstance(example.prompt, list):
        return [*example.prompt, answer]
    messages: ChatMessages = []
    if example.system_prompt:
        messages.append({"role": "system", "content": example.system_prompt})
    user = without_system_prompt(example.prompt, example.system_prompt)
    if user:
        messages.append({"role": "user", "content": user})
    return [*messages, answer]


def chat_records(examples: Sequence[Example]) -> list[ChatRecord]:
    """Each example as a JSONL record, with its dataset line."""
    return [ChatRecord(chat_messages_of(example), example.line) for example in examples]


def approximate_tokens(messages: ChatMessages) -> int:
    """Tokens of a conversation by the documented approximation (see the module docstring)."""
    content = sum(math.ceil(len(message["content"].encode()) / BYTES_PER_TOKEN) for message in messages)
    return content + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PRIMING_REPLY


def message_problems(messages: ChatMessages) -> list[str]:
    """What is wrong with one conversation, in words; empty when the service will take it."""
    problems: list[str] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            problems.append(f"messages[{index}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{index}] ({role}) has no text content")
    if not messages or messages[-1].get("role") != "assistant":
        problems.append("the last message must be the assistant's answer")
    if not any(message.get("role") == "user" for message in messages[:-1]):
        problems.append(
            "no user message before the assistant's answer (format text has no prompt: hosted chat fine-tuning "
            "needs prompt/answer pairs)"
        )
    return problems


def check_records(records: Sequence[ChatRecord], limits: HostedLimits, source: str, role: str) -> None:
    """DataError listing every record the service would refuse or cut, by `source` file and line."""
    errors = RowErrors()
    for number, record in enumerate(records, 1):
        where = f"{role} file line {number}"
        for problem in message_problems(record.messages):
            errors.add(source, record.source_line, f"{problem} ({where})")
        tokens = approximate_tokens(record.messages)
        if tokens > limits.max_example_tokens:
            errors.add(
                source,
                record.source_line,
                f"about {tokens} tokens, over the model's {limits.max_example_tokens}-token training-example limit; "
                f"the service would cut it from the end, answer included ({where})",
            )
    errors.raise_if_any()


def hosted_file(
    examples: Sequence[Example], limits: HostedLimits, source: str, role: str = "training", min_examples: int = 0
) -> HostedFile:
    """The validated JSONL bytes of the examples; DataError (naming `source` and its lines) when the service would
    refuse them. `min_examples` applies to the training file (the service's minimum); `source` is the spec field and
    URI the examples came from."""
    if len(examples) < min_examples:
        raise DataError(
            f"{source}: {len(examples)} {role} examples (after holding out the validation rows); OpenAI fine-tuning "
            f"needs at least {min_examples}"
        )
    records = chat_records(examples)
    check_records(records, limits, source, role)
    content = "".join(record.to_json() + "\n" for record in records).encode()
    if len(content) > limits.max_file_bytes:
        raise DataError(
            f"{source}: the {role} file would be {len(content)} bytes, over the service's "
            f"{limits.max_file_bytes}-byte upload limit; use fewer or shorter examples"
        )
    return HostedFile(content=content, sha256=hashlib.sha256(content).hexdigest(), examples=len(records))
