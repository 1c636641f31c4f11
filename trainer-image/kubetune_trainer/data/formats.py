"""Turning parsed rows into Examples for each dataset format: detection, column mapping, templates, few-shot prompts."""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.data.files import SourceRow
from kubetune_trainer.data.rows import ChatMessages, DataError, Example, RowErrors

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
LABELS_PLACEHOLDER = "labels"
LABELS_SHOWN_IN_ERRORS = 10
SHOT_SEPARATOR = "\n\n"


RowConverter = Callable[[dict[str, Any], "RowFormat", int], Example]
# (user turn, completion, raw input) read from one row of a single-turn format.
SingleTurn = Callable[[dict[str, Any], "RowFormat"], tuple[str, str, str]]


class BadRowError(ValueError):
    """What is wrong with one row; the caller adds the file and line."""


@dataclass(frozen=True)
class RowFormat:
    """How rows of one dataset become Examples: the resolved format and the spec's rendering settings."""

    format: str
    columns: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    system_prompt: str | None = None
    labels: tuple[str, ...] | None = None


def required_columns(data_format: str) -> tuple[str, ...]:
    """The columns a row of this format must have."""
    return FORMATS[data_format].required


def mapped_names(names: list[str], columns: dict[str, str]) -> list[str]:
    """The file's column names plus the format names that dataset.columns maps onto present columns."""
    present = set(names)
    return list(dict.fromkeys([*names, *(name for name, source in columns.items() if source in present)]))


def detect_format(names: list[str], file: str) -> str:
    """The first format of FORMATS (in its order) whose required columns are all among `names`."""
    present = set(names)
    for candidate in FORMATS:
        if set(required_columns(candidate)) <= present:
            return candidate
    expected = "; ".join("+".join(required_columns(candidate)) for candidate in FORMATS)
    raise DataError(
        f"{file}: cannot detect the dataset format from its columns ({', '.join(names)}); expected one of: "
        f"{expected}. Set dataset.format, and dataset.columns to map the file's column names."
    )


def resolve_format(requested: str, names: list[str], columns: dict[str, str], file: str) -> str:
    """Check dataset.format and dataset.columns against the file's columns; detect the format when auto."""
    if requested != "auto" and requested not in FORMATS:
        raise DataError(f"dataset.format {requested!r} is not one of auto, {', '.join(FORMATS)}")
    for name, source in columns.items():
        if source not in names:
            raise DataError(
                f"dataset.columns.{name} maps to {source!r}, which is not a column of {file} "
                f"(columns: {', '.join(names)})"
            )
    available = mapped_names(names, columns)
    data_format = requested
    if requested == "auto":
        data_format = detect_format(available, file)
        log.info("%s: detected dataset format %s from columns %s", file, data_format, ", ".join(available))
    unknown = sorted(set(columns) - set(FORMATS[data_format].columns))
    if unknown:
        raise DataError(
            f"dataset.columns.{unknown[0]} is not a column of format {data_format} "
            f"(its columns: {', '.join(FORMATS[data_format].columns)})"
        )
    missing = [name for name in required_columns(data_format) if name not in available]
    if missing:
        raise DataError(
            f"{file} has no column {missing[0]!r}, which format {data_format} needs (columns: {', '.join(names)}); "
            f"map it with dataset.columns, e.g. {{{missing[0]}: <column in the file>}}"
        )
    return data_format


def template_fields(template: str) -> list[str]:
    """The column names a template's {placeholders} name, in order; DataError for a malformed template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise DataError(f"dataset.template is not a valid template: {error} (write {{{{ and }}}} for braces)") from None
    names: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise DataError("dataset.template has a placeholder without a column name ({}); write {column}")
        if any(mark in name for mark in ".[]"):
            raise DataError(f"dataset.template placeholder {{{name}}} must be a plain column name")
        names.append(name)
    return list(dict.fromkeys(names))


def check_template(template: str | None, data_format: str, names: list[str], file: str) -> None:
    """Every placeholder must name a column of the file ({labels} too, for classification)."""
    if template is None:
        return
    if not FORMATS[data_format].templated:
        raise DataError(f"dataset.template does not apply to format {data_format}: the conversation is the prompt")
    allowed = set(names) | ({LABELS_PLACEHOLDER} if FORMATS[data_format].labelled else set())
    for name in template_fields(template):
        if name not in allowed:
            raise DataError(
                f"dataset.template placeholder {{{name}}} names no column of {file} (columns: {', '.join(names)})"
            )


def check_settings(row_format: RowFormat) -> None:
    """Refuse spec settings that the resolved format would silently ignore."""
    if row_format.system_prompt is not None and not FORMATS[row_format.format].prompted:
        raise DataError(f"dataset.systemPrompt does not apply to format {row_format.format} (there is no prompt)")


def row_values(values: dict[str, Any], row_format: RowFormat) -> dict[str, Any]:
    """A row's columns plus the format's names mapped through dataset.columns; absent optional columns are ''."""
    mapped = dict(values)
    for name, source in row_format.columns.items():
        if source in values:
            mapped[name] = values[source]
        else:
            mapped.pop(name, None)
    for name in FORMATS[row_format.format].optional:
        if mapped.get(name) is None:
            mapped[name] = ""
    return mapped


def source_name(name: str, row_format: RowFormat) -> str:
    """The file's name for one of the format's columns, for error messages."""
    return row_format.columns.get(name, name)


def text_value(values: dict[str, Any], name: str, row_format: RowFormat, allow_empty: bool = False) -> str:
    """A string column of the row; BadRowError when it is missing, not a string, or (unless allowed) empty."""
    value = values.get(name)
    column = source_name(name, row_format)
    if value is None:
        raise BadRowError(f"missing column {column!r}")
    if not isinstance(value, str):
        raise BadRowError(f"column {column!r} is not a string (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise BadRowError(f"column {column!r} is empty")
    return value


def label_value(values: dict[str, Any], row_format: RowFormat) -> str:
    """The row's classification label as text (integer labels become their decimal string)."""
    value = values.get("label")
    column = source_name("label", row_format)
    if value is None:
        raise BadRowError(f"missing label (column {column!r})")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise BadRowError(f"label in column {column!r} is not a string (got {type(value).__name__})")
    if not value.strip():
        raise BadRowError(f"empty label (column {column!r})")
    return value


def describe_labels(labels: tuple[str, ...] | list[str]) -> str:
    """The label set for an error message, shortened when long."""
    shown = ", ".join(labels[:LABELS_SHOWN_IN_ERRORS])
    return shown if len(labels) <= LABELS_SHOWN_IN_ERRORS else f"{shown}, ... ({len(labels)} labels)"


def collect_labels(rows: list[SourceRow], row_format: RowFormat) -> list[str]:
    """The sorted distinct valid labels of the rows (bad labels are reported when the rows are converted)."""
    labels: set[str] = set()
    for row in rows:
        try:
            labels.add(label_value(row_values(row.values, row_format), row_format))
        except BadRowError:
            continue
    return sorted(labels)


def classification_instruction(labels: tuple[str, ...] | list[str], text: str) -> str:
    """The user turn for a classification example: the label set, then the text."""
    return (
        f"Classify the text into exactly one of these labels: {', '.join(labels)}.\n"
        f"Answer with the label only.\n\nText: {text}"
    )


def render_template(template: str, values: dict[str, Any]) -> str:
    """Fill a template's {column} placeholders from one row; BadRowError when a value is missing or not a scalar."""
    filled: dict[str, str] = {}
    for name in template_fields(template):
        value = values.get(name)
        if value is None:
            raise BadRowError(f"template placeholder {{{name}}}: column {name!r} is missing in this row")
        if isinstance(value, dict | list):
            raise BadRowError(f"template placeholder {{{name}}}: column {name!r} is a {type(value).__name__}")
        filled[name] = str(value)
    return template.format_map(filled)


def chat_messages(value: Any, column: str) -> ChatMessages:
    """Validate a list of {role, content} messages; only role and content are kept."""
    if not isinstance(value, list):
        raise BadRowError(f"column {column!r} is not a list of messages (got {type(value).__name__})")
    if not value:
        raise BadRowError(f"column {column!r} has no messages")
    messages: ChatMessages = []
    for index, message in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(message, dict):
            raise BadRowError(f"{where} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRowError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRowError(f"{where}.content is not a string (got {type(content).__name__})")
        messages.append({"role": role, "content": content})
    return messages


def last_user_content(messages: ChatMessages) -> str:
    """The content of the last user message, the conversation's raw input."""
    return next((message["content"] for message in reversed(messages) if message["role"] == "user"), "")


def with_system_prompt(messages: ChatMessages, system_prompt: str | None) -> ChatMessages:
    """Put dataset.systemPrompt first unless the conversation already opens with its own system message."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def messages_example(values: dict[str, Any], row_format: RowFormat) -> tuple[ChatMessages, str, str]:
    """A chat row: every message but the last is the prompt, the last (an assistant turn) is the completion."""
    column = source_name("messages", row_format)
    messages = chat_messages(values.get("messages"), column)
    answer = messages[-1]
    if answer["role"] != "assistant":
        raise BadRowError(f"the last message in {column!r} must be from the assistant (got {answer['role']})")
    if not answer["content"].strip():
        raise BadRowError(f"the last (assistant) message in {column!r} is empty")
    prompt = messages[:-1]
    if not any(message["role"] == "user" for message in prompt):
        raise BadRowError(f"{column!r} has no user message before the answer")
    return with_system_prompt(prompt, row_format.system_prompt), answer["content"], last_user_content(prompt)


def conversational_completion(value: Any, column: str) -> str:
    """The text of a completion given as [{role: assistant, content: ...}]."""
    messages = chat_messages(value, column)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRowError(f"column {column!r} must be one assistant message")
    return messages[0]["content"]


def prompt_completion_turn(values: dict[str, Any], row_format: RowFormat) -> tuple[str, str, str]:
    prompt = text_value(values, "prompt", row_format)
    return prompt, text_value(values, "completion", row_format), prompt


def instruction_turn(values: dict[str, Any], row_format: RowFormat) -> tuple[str, str, str]:
    instruction = text_value(values, "instruction", row_format)
    extra = text_value(values, "input", row_format, allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return user, text_value(values, "output", row_format), user


def question_answer_turn(values: dict[str, Any], row_format: RowFormat) -> tuple[str, str, str]:
    question = text_value(values, "question", row_format)
    context = text_value(values, "context", row_format, allow_empty=True)
    user = f"{context}\n\n{question}" if context.strip() else question
    return user, text_value(values, "answer", row_format), question


def classification_turn(values: dict[str, Any], row_format: RowFormat) -> tuple[str, str, str]:
    text = text_value(values, "text", row_format)
    label = label_value(values, row_format)
    labels = row_format.labels or ()
    if label not in labels:
        raise BadRowError(f"label {label!r} is not in the label set ({describe_labels(labels)})")
    return classification_instruction(labels, text), label, text


def template_prompt(values: dict[str, Any], row_format: RowFormat) -> str:
    """The rendered dataset.template, after dataset.systemPrompt when one is set."""
    assert row_format.template is not None
    extra = {LABELS_PLACEHOLDER: ", ".join(row_format.labels)} if row_format.labels else {}
    rendered = render_template(row_format.template, {**extra, **values})
    return f"{row_format.system_prompt}{SHOT_SEPARATOR}{rendered}" if row_format.system_prompt else rendered


def convert_row(values: dict[str, Any], row_format: RowFormat, line: int) -> Example:
    """One row (already mapped with row_values) as an Example; BadRowError says what is wrong with it."""
    return FORMATS[row_format.format].convert(values, row_format, line)


def messages_row(values: dict[str, Any], row_format: RowFormat, line: int) -> Example:
    messages, completion, input_text = messages_example(values, row_format)
    return Example(messages, completion, input_text, line)


def text_row(values: dict[str, Any], row_format: RowFormat, line: int) -> Example:
    if row_format.template is not None:
        text = template_prompt(values, row_format)
        if not text.strip():
            raise BadRowError("the rendered dataset.template is empty")
    else:
        text = text_value(values, "text", row_format)
    return Example("", text, text, line)


def single_turn_row(turn: SingleTurn) -> RowConverter:
    """A converter for a format whose row is one user turn and its answer (turn reads them from the row)."""

    def convert(values: dict[str, Any], row_format: RowFormat, line: int) -> Example:
        user, completion, input_text = turn(values, row_format)
        if row_format.template is not None:
            return Example(
                template_prompt(values, row_format), completion, input_text, line, row_format.system_prompt or ""
            )
        prompt = with_system_prompt([{"role": "user", "content": user}], row_format.system_prompt)
        return Example(prompt, completion, input_text, line)

    return convert


def prompt_completion_row(values: dict[str, Any], row_format: RowFormat, line: int) -> Example:
    if isinstance(values.get("prompt"), list):
        return conversational_prompt_completion(values, row_format, line)
    return single_turn_row(prompt_completion_turn)(values, row_format, line)


def conversational_prompt_completion(values: dict[str, Any], row_format: RowFormat, line: int) -> Example:
    """A prompt-completion row whose prompt is a list of messages (TRL's conversational prompt-completion)."""
    if row_format.template is not None:
        raise BadRowError(f"column {source_name('prompt', row_format)!r} holds messages; dataset.template needs text")
    prompt = chat_messages(values.get("prompt"), source_name("prompt", row_format))
    raw = values.get("completion")
    column = source_name("completion", row_format)
    completion = (
        conversational_completion(raw, column)
        if isinstance(raw, list)
        else text_value(values, "completion", row_format)
    )
    if not completion.strip():
        raise BadRowError(f"column {column!r} is empty")
    return Example(with_system_prompt(prompt, row_format.system_prompt), completion, last_user_content(prompt), line)


def convert_rows(rows: list[SourceRow], file: str, row_format: RowFormat) -> list[Example]:
    """Every row as an Example; DataError listing the bad rows as FILE:LINE: reason."""
    errors = RowErrors()
    examples: list[Example] = []
    for row in rows:
        try:
            examples.append(convert_row(row_values(row.values, row_format), row_format, row.line))
        except BadRowError as problem:
            errors.add(file, row.line, str(problem))
    errors.raise_if_any()
    return examples


@dataclass(frozen=True)
class DatasetFormat:
    """What one dataset format is: the columns it reads (under its own names), which of them may be absent, whether
    its rows carry a label from a closed set, a prompt, and a dataset.template, and how a row becomes an Example."""

    name: str
    columns: tuple[str, ...]
    convert: RowConverter
    optional: tuple[str, ...] = ()
    labelled: bool = False
    prompted: bool = True
    templated: bool = True

    @property
    def required(self) -> tuple[str, ...]:
        """The columns a row of this format must have."""
        return tuple(name for name in self.columns if name not in self.optional)


# Every dataset format, in the order auto tries them: the first whose required columns are all present wins (text
# and label before text alone). A new format is an entry here and its name in the spec's DatasetFormatName.
FORMATS: dict[str, DatasetFormat] = {
    spec.name: spec
    for spec in (
        DatasetFormat("messages", ("messages",), messages_row, templated=False),
        DatasetFormat("prompt-completion", ("prompt", "completion"), prompt_completion_row),
        DatasetFormat(
            "instruction", ("instruction", "input", "output"), single_turn_row(instruction_turn), optional=("input",)
        ),
        DatasetFormat(
            "question-answer",
            ("question", "answer", "context"),
            single_turn_row(question_answer_turn),
            optional=("context",),
        ),
        DatasetFormat("classification", ("text", "label"), single_turn_row(classification_turn), labelled=True),
        DatasetFormat("text", ("text",), text_row, prompted=False),
    )
}


def select_shots(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k train examples chosen with the seed, preferring distinct completions (for classification: distinct labels)."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    distinct: list[int] = []
    repeats: list[int] = []
    seen: set[str] = set()
    for index in order:
        (repeats if train[index].completion in seen else distinct).append(index)
        seen.add(train[index].completion)
    return [train[index] for index in (distinct + repeats)[:k]]


def few_shot_prompt(example: Example, shots: list[Example]) -> ChatMessages | str:
    """The example's prompt with solved `shots` (from train) before it, as chat turns or as rendered text blocks."""
    if not shots:
        return example.prompt
    if isinstance(example.prompt, str):
        return few_shot_text(example, shots)
    head = leading_system_messages(example.prompt)
    turns: ChatMessages = list(head)
    for shot in shots:
        if isinstance(shot.prompt, str):
            raise ValueError(f"few-shot example from line {shot.line} has a text prompt; the question is chat")
        turns.extend(shot.prompt[len(leading_system_messages(shot.prompt)) :])
        turns.append({"role": "assistant", "content": shot.completion})
    turns.extend(example.prompt[len(head) :])
    return turns


def leading_system_messages(messages: ChatMessages) -> ChatMessages:
    """The system messages at the start of a conversation."""
    count = 0
    while count < len(messages) and messages[count]["role"] == "system":
        count += 1
    return messages[:count]


def few_shot_text(example: Example, shots: list[Example]) -> str:
    """Rendered shots (prompt + answer) then the question, with the system prompt once at the top."""
    assert isinstance(example.prompt, str)
    blocks: list[str] = []
    for shot in shots:
        if not isinstance(shot.prompt, str):
            raise ValueError(f"few-shot example from line {shot.line} has a chat prompt; the question is text")
        blocks.append(without_system_prompt(shot.prompt, shot.system_prompt) + shot.completion)
    blocks.append(without_system_prompt(example.prompt, example.system_prompt))
    body = SHOT_SEPARATOR.join(blocks)
    return f"{example.system_prompt}{SHOT_SEPARATOR}{body}" if example.system_prompt else body


def without_system_prompt(prompt: str, system_prompt: str) -> str:
    """A template prompt without the system prompt template_prompt put at its head."""
    prefix = f"{system_prompt}{SHOT_SEPARATOR}"
    return prompt[len(prefix) :] if system_prompt and prompt.startswith(prefix) else prompt
