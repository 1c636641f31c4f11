"""The trainer's data stage: file types, formats, detection, mapping, templates, few-shot, splits, stats, bad input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.data.files import first_oversized_line, read_rows
from kubetune_trainer.data.formats import resolve_format
from kubetune_trainer.data.prepare import (
    DataError,
    Example,
    PreparedData,
    few_shot_prompt,
    measure_tokens,
    percentile,
    prepare_data,
    split_indices,
    split_validation,
)
from pydantic import ValidationError

from kubetune.api import DatasetSpec
from tests.testbed.tiny_models import build_tiny_tokenizer

pytestmark = pytest.mark.unit

NEWS = [
    {"text": "Stocks fell sharply on Monday.", "label": "Business"},
    {"text": "The striker scored twice.", "label": "Sports"},
    {"text": "A new chip doubles battery life.", "label": "Sci/Tech"},
    {"text": "Talks resumed in Geneva.", "label": "World"},
] * 5


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prepare(path: str, **spec: Any) -> PreparedData:
    return prepare_data(DatasetSpec(train=path, **spec), seed=7, tokenizer=None)


def error_of(path: str, **spec: Any) -> str:
    with pytest.raises(DataError) as caught:
        prepare(path, **spec)
    return str(caught.value)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


# ---------------------------------------------------------------------------------------------------------------------
# File types


def test_jsonl_rows_are_numbered_by_source_line_and_blank_lines_are_skipped() -> None:
    rows = read_rows(b'{"text": "a"}\n\n{"text": "b"}\n', "train.jsonl")
    assert [(row.line, row.values) for row in rows] == [(1, {"text": "a"}), (3, {"text": "b"})]


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv"])
def test_a_row_over_the_limit_is_refused_by_line_before_it_is_parsed(name: str) -> None:
    # Not even valid JSON or CSV: the size is checked first, as parsing such a row is what costs gigabytes.
    data = b'text,label\n"fine",World\n' + b"x" * 101 + b"\n" + b"broken {\n"

    with pytest.raises(DataError, match=rf"^{name}:3: a row of 101 bytes, more than the 100 a row may have"):
        read_rows(data, name, max_row_bytes=100)


def test_the_first_oversized_line_is_found_with_its_size_and_a_last_line_without_newline_counts() -> None:
    assert first_oversized_line(b"ab\ncd\n", 2) is None
    assert first_oversized_line(b"ab\ncde", 2) == (2, 3)
    assert first_oversized_line(b"", 2) is None


def test_json_list_rows_are_numbered_from_one() -> None:
    rows = read_rows(json.dumps([{"text": "a"}, {"text": "b"}]).encode(), "train.json")
    assert [(row.line, row.values["text"]) for row in rows] == [(1, "a"), (2, "b")]


def test_csv_rows_carry_the_line_they_start_on_even_after_a_multiline_field() -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([["text", "label"], ["two\nlines", "World"], ["one line", "Sports"]])
    rows = read_rows(buffer.getvalue().encode(), "train.csv")
    assert [(row.line, row.values) for row in rows] == [
        (2, {"text": "two\nlines", "label": "World"}),
        (4, {"text": "one line", "label": "Sports"}),
    ]


def test_parquet_rows_keep_nested_messages(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": messages}, {"messages": messages}]), path)
    rows = read_rows(path.read_bytes(), "train.parquet")
    assert [row.line for row in rows] == [1, 2]
    assert rows[0].values["messages"] == messages


def test_every_file_type_gives_the_same_examples(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = NEWS[:8]
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "train.json").write_text(json.dumps(rows))
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    expected = [(e.prompt, e.completion) for e in prepare(jsonl).train]
    for name in ("train.json", "train.csv", "train.parquet"):
        assert [(e.prompt, e.completion) for e in prepare(str(tmp_path / name)).train] == expected, name


def test_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
    message = error_of(str(path))
    assert f"{path}:3: malformed JSON" in message
    assert ":1:" not in message and ":2:" not in message


def test_jsonl_line_that_is_not_an_object_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n["text", "b"]\n')
    assert f"{path}:2: expected a JSON object, got list" in error_of(str(path))


def test_malformed_json_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    assert f"{path}:3: malformed JSON" in error_of(str(path))


def test_json_file_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}')
    assert "expected a JSON list of objects, got object" in error_of(str(path))


def test_csv_row_with_the_wrong_number_of_fields_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,World\nextra,Sports,oops\n")
    assert f"{path}:3: has 3 fields, the header has 2" in error_of(str(path))


def test_unsupported_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    message = error_of(str(path))
    assert "unsupported file type '.txt'" in message and ".jsonl" in message


@pytest.mark.parametrize(
    ("name", "content"), [("train.jsonl", "\n\n"), ("train.csv", "text,label\n"), ("train.json", "[]")]
)
def test_empty_file_is_refused(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert f"{path} has no rows" in error_of(str(path))


def test_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "cafe", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    assert f"{path}:2: not UTF-8 text (bad byte at offset 44)" in error_of(str(path))


def test_error_lists_ten_bad_rows_and_counts_the_rest(tmp_path: Path) -> None:
    rows = [{"text": "ok", "label": "a"}, {"text": "ok", "label": "b"}] + [{"text": "x"}] * 13
    message = error_of(write_jsonl(tmp_path / "train.jsonl", rows))
    assert message.startswith("13 bad rows:")
    assert message.count("missing label") == 10
    assert f"{tmp_path / 'train.jsonl'}:12: missing label (column 'label')" in message
    assert "... and 3 more" in message


# ---------------------------------------------------------------------------------------------------------------------
# Formats


def test_messages_rows_split_into_prompt_and_final_assistant_answer(tmp_path: Path) -> None:
    conversation = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.", "weight": 1},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}] * 3)
    data = prepare(path, system_prompt="Be brief.")
    example = data.train[0]
    assert data.format == "messages"
    assert example.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert (example.completion, example.input_text, example.line) == ("Rome.", "And of Italy?", 1)


def test_messages_row_with_its_own_system_message_keeps_it(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "Row system."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}] * 2)
    prompt = prepare(path, system_prompt="Spec system.").train[0].prompt
    assert prompt == conversation[:2]


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "Hi"}], "the last message in 'messages' must be from the assistant (got user)"),
        (
            [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "x"}],
            "messages[0].content is not a string (got list)",
        ),
        (
            [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "x"}],
            "messages[0].role 'bot' is not one of",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}],
            "the last (assistant) message in 'messages' is empty",
        ),
        ([{"role": "assistant", "content": "x"}], "'messages' has no user message before the answer"),
        ([], "column 'messages' has no messages"),
        ("Hi", "column 'messages' is not a list of messages (got str)"),
    ],
)
def test_bad_messages_rows_are_reported_with_file_and_line(tmp_path: Path, messages: Any, reason: str) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {"messages": messages}, good])
    assert f"{path}:2: {reason}" in error_of(path, format="messages")


def test_prompt_completion_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 2)
    example = prepare(path, system_prompt="Do sums.").train[0]
    assert example.prompt == [{"role": "system", "content": "Do sums."}, {"role": "user", "content": "2+2="}]
    assert (example.completion, example.input_text) == ("4", "2+2=")


def test_conversational_prompt_completion_rows(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "2+2="}], "completion": [{"role": "assistant", "content": "4"}]}
    example = prepare(write_jsonl(tmp_path / "train.jsonl", [row] * 2)).train[0]
    assert (example.prompt, example.completion, example.input_text) == (row["prompt"], "4", "2+2=")


def test_instruction_rows_join_instruction_and_input(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    data = prepare(write_jsonl(tmp_path / "train.jsonl", rows), validation_split=0.4)
    by_answer = {e.completion: e for e in data.train + data.validation}
    assert by_answer["chat"].prompt == [{"role": "user", "content": "Translate to French.\n\ncat"}]
    assert by_answer["hi"].prompt == [{"role": "user", "content": "Say hi."}]
    assert data.format == "instruction"


def test_question_answer_rows_put_context_before_the_question(tmp_path: Path) -> None:
    rows = [{"question": "Who?", "answer": "Ada", "context": "Ada wrote it."}, {"question": "When?", "answer": "1843"}]
    data = prepare(write_jsonl(tmp_path / "train.jsonl", rows), validation_split=0.4)
    by_answer = {e.completion: e for e in data.train + data.validation}
    assert by_answer["Ada"].prompt == [{"role": "user", "content": "Ada wrote it.\n\nWho?"}]
    assert by_answer["Ada"].input_text == "Who?"
    assert by_answer["1843"].prompt == [{"role": "user", "content": "When?"}]


def test_text_rows_have_an_empty_prompt(tmp_path: Path) -> None:
    example = prepare(write_jsonl(tmp_path / "train.jsonl", [{"text": "Once upon a time."}] * 2)).train[0]
    assert (example.prompt, example.completion, example.input_text) == ("", "Once upon a time.", "Once upon a time.")


def test_classification_prompt_lists_the_sorted_labels_of_train(tmp_path: Path) -> None:
    data = prepare(write_jsonl(tmp_path / "train.jsonl", NEWS))
    example = next(e for e in data.train if e.completion == "Sports")
    assert data.format == "classification"
    assert data.labels == ["Business", "Sci/Tech", "Sports", "World"]
    assert example.prompt == [
        {
            "role": "user",
            "content": "Classify the text into exactly one of these labels: Business, Sci/Tech, Sports, World.\n"
            "Answer with the label only.\n\nText: The striker scored twice.",
        }
    ]
    assert example.input_text == "The striker scored twice."


def test_classification_label_set_from_spec_keeps_its_order(tmp_path: Path) -> None:
    labels = ["World", "Sports", "Business", "Sci/Tech", "Unused"]
    data = prepare(write_jsonl(tmp_path / "train.jsonl", NEWS), labels=labels)
    assert data.labels == labels
    assert "labels: World, Sports, Business, Sci/Tech, Unused." in str(data.train[0].prompt)


def test_integer_labels_become_text(tmp_path: Path) -> None:
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 3
    data = prepare(write_jsonl(tmp_path / "train.jsonl", rows))
    assert data.labels == ["0", "1"]
    assert {e.completion for e in data.train} == {"0", "1"}


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages"], "messages"),
        (["prompt", "completion"], "prompt-completion"),
        (["instruction", "input", "output"], "instruction"),
        (["question", "answer"], "question-answer"),
        (["text", "label"], "classification"),
        (["text"], "text"),
        (["text", "prompt", "completion"], "prompt-completion"),
    ],
)
def test_auto_detects_the_format_from_the_columns(columns: list[str], expected: str) -> None:
    assert resolve_format("auto", columns, {}, "train.jsonl") == expected


def test_auto_says_which_format_it_chose(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    prepare(write_jsonl(tmp_path / "train.jsonl", NEWS))
    assert "detected dataset format classification from columns text, label" in caplog.text


def test_auto_refuses_columns_it_cannot_place(tmp_path: Path) -> None:
    message = error_of(write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "intent": "b"}] * 2))
    assert "cannot detect the dataset format from its columns (sentence, intent)" in message
    assert "dataset.columns" in message


def test_column_mapping_renames_the_file_columns(tmp_path: Path) -> None:
    rows = [{"sentence": row["text"], "intent": row["label"]} for row in NEWS]
    data = prepare(write_jsonl(tmp_path / "train.jsonl", rows), columns={"text": "sentence", "label": "intent"})
    assert data.format == "classification"
    assert {e.completion for e in data.train} <= {"Business", "Sci/Tech", "Sports", "World"}
    assert data.train[0].input_text == rows[data.train[0].line - 1]["sentence"]


def test_column_mapping_to_an_absent_column_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", NEWS)
    message = error_of(path, columns={"label": "intent"})
    assert f"dataset.columns.label maps to 'intent', which is not a column of {path} (columns: text, label)" in message


def test_column_mapping_key_outside_the_format_is_refused(tmp_path: Path) -> None:
    message = error_of(write_jsonl(tmp_path / "train.jsonl", NEWS), format="classification", columns={"answer": "text"})
    assert "dataset.columns.answer is not a column of format classification (its columns: text, label)" in message


def test_missing_column_for_the_format_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "intent": "x"}] * 2)
    message = error_of(path, format="classification")
    assert f"{path} has no column 'label', which format classification needs" in message
    assert "{label: <column in the file>}" in message


def test_row_missing_its_label_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*NEWS[:4], {"text": "no label here"}])
    assert f"{path}:5: missing label (column 'label')" in error_of(path)


def test_label_outside_the_spec_label_set_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", NEWS[:4])
    message = error_of(path, labels=["World", "Sports", "Business"])
    assert f"{path}:3: label 'Sci/Tech' is not in the label set (World, Sports, Business)" in message


def test_validation_label_outside_the_train_label_set_is_reported(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", NEWS)
    validation = write_jsonl(tmp_path / "test.jsonl", [NEWS[0], {"text": "Rain tomorrow.", "label": "Weather"}])
    message = error_of(train, validation=validation)
    assert f"{validation}:2: label 'Weather' is not in the label set (Business, Sci/Tech, Sports, World)" in message


def test_validation_file_without_the_needed_columns_is_refused(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", NEWS)
    validation = write_jsonl(tmp_path / "test.jsonl", [{"text": "Rain tomorrow."}])
    assert f"{validation} has no column 'label'" in error_of(train, validation=validation)


def test_classification_needs_two_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}] * 3)
    assert "classification needs at least 2 labels" in error_of(path)


def test_duplicate_spec_labels_are_refused(tmp_path: Path) -> None:
    assert "dataset.labels has duplicates: World" in error_of(
        write_jsonl(tmp_path / "train.jsonl", NEWS), labels=["World", "World", "Sports"]
    )


def test_labels_for_a_format_other_than_classification_are_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    assert "dataset.labels applies to format classification only (the format is prompt-completion)" in error_of(
        path, labels=["x", "y"]
    )


def test_non_string_content_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "2+2=", "completion": 4}, {"prompt": "a", "completion": "b"}]
    )
    assert f"{path}:1: column 'completion' is not a string (got int)" in error_of(path)


def test_empty_completion_is_reported(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "q", "completion": " "}]
    )
    assert f"{path}:2: column 'completion' is empty" in error_of(path)


def test_empty_mapped_column_is_reported_under_the_file_name_for_it(tmp_path: Path) -> None:
    rows = [{"q": "Who?", "a": "Ada"}, {"q": "When?", "a": ""}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert f"{path}:2: column 'a' is empty" in error_of(path, columns={"question": "q", "answer": "a"})


def test_unknown_format_is_refused_by_the_spec_and_by_the_data_stage() -> None:
    with pytest.raises(ValidationError, match="format"):
        DatasetSpec.model_validate({"train": "/data/train.jsonl", "format": "chat"})
    with pytest.raises(DataError, match=r"dataset\.format 'chat' is not one of auto, messages"):
        resolve_format("chat", ["text"], {}, "train.jsonl")


def test_system_prompt_with_format_text_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    assert "dataset.systemPrompt does not apply to format text" in error_of(path, system_prompt="Hi")


# ---------------------------------------------------------------------------------------------------------------------
# Templates


def test_template_renders_a_text_prompt_after_the_system_prompt(tmp_path: Path) -> None:
    rows = [
        {"question": "Who?", "answer": "Ada", "source": "book"},
        {"question": "When?", "answer": "1843", "source": "web"},
    ]
    data = prepare(
        write_jsonl(tmp_path / "train.jsonl", rows),
        template="[{source}] Q: {question}\nA:",
        system_prompt="Answer briefly.",
        validation_split=0.4,
    )
    example = next(e for e in data.train + data.validation if e.completion == "Ada")
    assert example.prompt == "Answer briefly.\n\n[book] Q: Who?\nA:"
    assert example.system_prompt == "Answer briefly."


def test_template_can_use_mapped_names_and_the_label_list(tmp_path: Path) -> None:
    rows = [{"sentence": row["text"], "intent": row["label"]} for row in NEWS]
    data = prepare(
        write_jsonl(tmp_path / "train.jsonl", rows),
        columns={"text": "sentence", "label": "intent"},
        template="Labels: {labels}\nText: {text}\nLabel:",
    )
    example = data.train[0]
    assert example.prompt == f"Labels: Business, Sci/Tech, Sports, World\nText: {example.input_text}\nLabel:"


def test_template_for_format_text_renders_the_text(tmp_path: Path) -> None:
    rows = [{"title": "A", "body": "one"}, {"title": "B", "body": "two"}]
    data = prepare(
        write_jsonl(tmp_path / "train.jsonl", rows),
        format="text",
        columns={"text": "body"},
        template="# {title}\n{body}",
    )
    assert sorted(e.completion for e in data.train + data.validation) == ["# A\none", "# B\ntwo"]


def test_template_placeholder_naming_a_missing_column_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", NEWS)
    assert f"dataset.template placeholder {{sentence}} names no column of {path} (columns: text, label)" in error_of(
        path, template="Text: {sentence}"
    )


def test_template_placeholder_missing_in_one_row_is_reported(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b", "hint": "h"}, {"prompt": "c", "completion": "d"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert f"{path}:2: template placeholder {{hint}}: column 'hint' is missing in this row" in error_of(
        path, template="{hint}: {prompt}"
    )


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("Text: {text", "dataset.template is not a valid template"),
        ("Text: {}", "dataset.template has a placeholder without a column name"),
        ("Text: {text.upper}", "dataset.template placeholder {text.upper} must be a plain column name"),
    ],
)
def test_malformed_templates_are_refused(tmp_path: Path, template: str, reason: str) -> None:
    assert reason in error_of(write_jsonl(tmp_path / "train.jsonl", NEWS), template=template)


def test_template_with_messages_is_refused(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    message = error_of(write_jsonl(tmp_path / "train.jsonl", [row] * 2), template="{messages}")
    assert "dataset.template does not apply to format messages" in message


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot prompts


def test_few_shot_chat_prompt_puts_solved_shots_between_system_and_question() -> None:
    system = {"role": "system", "content": "Classify."}
    shots = [
        Example([system, {"role": "user", "content": "goal!"}], "Sports", "goal!", 1),
        Example([system, {"role": "user", "content": "stocks"}], "Business", "stocks", 2),
    ]
    question = Example([system, {"role": "user", "content": "chips"}], "Sci/Tech", "chips", 9)
    assert few_shot_prompt(question, shots) == [
        system,
        {"role": "user", "content": "goal!"},
        {"role": "assistant", "content": "Sports"},
        {"role": "user", "content": "stocks"},
        {"role": "assistant", "content": "Business"},
        {"role": "user", "content": "chips"},
    ]


def test_few_shot_template_prompt_keeps_the_system_prompt_once() -> None:
    def example(text: str, label: str) -> Example:
        return Example(f"Be brief.\n\nText: {text}\nLabel:", label, text, 1, "Be brief.")

    prompt = few_shot_prompt(
        example("chips", "Sci/Tech"), [example("goal!", " Sports"), example("stocks", " Business")]
    )
    assert prompt == "Be brief.\n\nText: goal!\nLabel: Sports\n\nText: stocks\nLabel: Business\n\nText: chips\nLabel:"


def test_few_shot_without_shots_is_the_prompt_itself() -> None:
    example = Example([{"role": "user", "content": "q"}], "a", "q", 1)
    assert few_shot_prompt(example, []) == example.prompt


def test_few_shot_refuses_mixed_prompt_kinds() -> None:
    chat = Example([{"role": "user", "content": "q"}], "a", "q", 1)
    text = Example("q", "a", "q", 2)
    with pytest.raises(ValueError, match="line 2 has a text prompt"):
        few_shot_prompt(chat, [text])
    with pytest.raises(ValueError, match="line 1 has a chat prompt"):
        few_shot_prompt(text, [chat])


def test_few_shot_prompts_from_prepared_data_work_for_both_kinds(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", NEWS)
    chat = prepare(path, system_prompt="Classify.")
    chat_prompt = few_shot_prompt(chat.validation[0], chat.train[:3])
    assert isinstance(chat_prompt, list)
    assert [m["role"] for m in chat_prompt] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    text = prepare(path, template="Text: {text}\nLabel: ", system_prompt="Classify.")
    text_prompt = few_shot_prompt(text.validation[0], text.train[:3])
    assert isinstance(text_prompt, str)
    assert text_prompt.count("Classify.") == 1 and text_prompt.count("Text: ") == 4


# ---------------------------------------------------------------------------------------------------------------------
# Splits and hashes


def test_split_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    first = split_indices(100, 0.1, seed=1)
    assert split_indices(100, 0.1, seed=1) == first
    assert split_indices(100, 0.1, seed=2) != first
    train, validation = first
    assert len(validation) == 10 and sorted(train + validation) == list(range(100))
    assert train == sorted(train) and validation == sorted(validation)


@pytest.mark.parametrize(("count", "share", "expected"), [(2, 0.1, 1), (5, 0.1, 1), (30, 0.25, 8), (3, 0.49, 1)])
def test_split_holds_out_at_least_one_row_and_leaves_one_for_training(count: int, share: float, expected: int) -> None:
    train, validation = split_indices(count, share, seed=0)
    assert len(validation) == expected and len(train) == count - expected


def test_split_of_a_single_row_is_refused() -> None:
    with pytest.raises(DataError, match=r"dataset\.train has 1 row: at least 2 are needed"):
        split_indices(1, 0.1, seed=0)


def test_classification_split_is_stratified_and_keeps_every_label_in_train() -> None:
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 9 + ["d"]
    examples = [Example("", label, label, line) for line, label in enumerate(labels, start=1)]
    train, validation = split_validation(examples, 0.1, seed=3, stratify=True)
    assert Counter(e.completion for e in validation) == Counter({"a": 6, "b": 3, "c": 1})
    assert {e.completion for e in train} == {"a", "b", "c", "d"}
    assert split_validation(examples, 0.1, seed=3, stratify=True) == (train, validation)


def test_prepared_split_uses_validation_split_and_the_seed(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    spec = DatasetSpec(train=write_jsonl(tmp_path / "train.jsonl", rows), validation_split=0.25)
    first = prepare_data(spec, seed=11)
    assert len(first.validation) == 10 and len(first.train) == 30
    assert [e.line for e in prepare_data(spec, seed=11).validation] == [e.line for e in first.validation]
    assert [e.line for e in prepare_data(spec, seed=12).validation] != [e.line for e in first.validation]


def test_validation_file_is_used_as_is_and_hashed_with_train(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", NEWS)
    validation = write_jsonl(tmp_path / "test.jsonl", NEWS[:3])
    data = prepare(train, validation=validation)
    assert len(data.train) == len(NEWS) and [e.line for e in data.validation] == [1, 2, 3]
    expected = hashlib.sha256(Path(train).read_bytes() + Path(validation).read_bytes()).hexdigest()
    assert data.sha256 == expected


def test_sha256_is_that_of_the_train_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", NEWS)
    assert prepare(path).sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Token statistics


@pytest.mark.parametrize(("share", "expected"), [(0.5, 3), (0.95, 5), (1.0, 5), (0.01, 1)])
def test_percentile_is_nearest_rank(share: float, expected: int) -> None:
    assert percentile([1, 2, 3, 4, 5], share) == expected


def test_stats_of_chat_examples_match_the_chat_template_token_count(tokenizer: Any) -> None:
    examples = [
        Example([{"role": "user", "content": "word " * n}], "Sports", "x", n) for n in (1, 2, 4, 8, 16, 32, 64, 128)
    ]
    lengths = sorted(
        len(
            tokenizer.apply_chat_template([*e.prompt, {"role": "assistant", "content": e.completion}], tokenize=True)[
                "input_ids"
            ]
        )
        for e in examples
    )
    stats = measure_tokens(examples, tokenizer, max_length=lengths[5])
    assert (stats.p50, stats.p95, stats.max, stats.measured) == (lengths[3], lengths[7], lengths[7], 8)
    assert stats.truncated_fraction == 2 / 8


def test_stats_of_text_examples_count_the_end_of_sequence_token(tokenizer: Any) -> None:
    examples = [Example("Q: hi\nA:", " there " * n, "hi", n) for n in (1, 3, 9)]
    lengths = sorted(len(tokenizer(str(e.prompt) + e.completion)["input_ids"]) + 1 for e in examples)
    stats = measure_tokens(examples, tokenizer, max_length=10_000)
    assert (stats.p50, stats.max, stats.truncated_fraction) == (lengths[1], lengths[2], 0.0)


def test_chat_prompts_need_a_tokenizer_with_a_chat_template(tokenizer: Any) -> None:
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"tokenizer has no chat template.*set dataset\.template"):
        measure_tokens([Example([{"role": "user", "content": "q"}], "a", "q", 1)], plain, max_length=64)


def test_prepare_data_measures_train_and_converts_to_dataset_status(tmp_path: Path, tokenizer: Any) -> None:
    long_row = {"text": "very long " * 200, "label": "World"}
    path = write_jsonl(tmp_path / "train.jsonl", [*NEWS, long_row])
    validation = write_jsonl(tmp_path / "test.jsonl", NEWS[:2])
    data = prepare_data(DatasetSpec(train=path, validation=validation, max_length=128), seed=0, tokenizer=tokenizer)
    assert data.stats is not None
    assert data.stats.measured == len(data.train) == 21
    assert data.stats.max > 128 >= data.stats.p95
    assert data.stats.truncated_fraction == 1 / 21
    status = data.dataset_status()
    assert status.to_wire() == {
        "format": "classification",
        "trainRows": len(data.train),
        "validationRows": len(data.validation),
        "sha256": data.sha256,
        "tokenLengths": {"p50": data.stats.p50, "p95": data.stats.p95, "max": data.stats.max},
        "truncatedFraction": data.stats.truncated_fraction,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Unreadable sources


def test_missing_local_file_names_the_field_and_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.jsonl")
    assert error_of(path) == f"cannot read dataset.train {path}: no such file (NoSuchKey)"


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    reset_moto(endpoint)
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "unit-test-key",
        "AWS_SECRET_ACCESS_KEY": "unit-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    reset_moto(endpoint)
    server.stop()


def reset_moto(endpoint: str) -> None:
    # moto keeps its state per process, not per server: start from, and leave behind, an empty store.
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_unreadable_s3_object_is_a_data_error_naming_the_uri(s3_endpoint: str) -> None:
    from kubetune_trainer import storage

    storage.s3_client().create_bucket(Bucket="datasets")
    storage.write_bytes("s3://datasets/news/train.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in NEWS))
    assert len(prepare("s3://datasets/news/train.jsonl").train) == 18
    with pytest.raises(DataError) as caught:
        prepare("s3://datasets/news/train.jsonl", validation="s3://datasets/news/missing.jsonl")
    assert (
        str(caught.value) == "cannot read dataset.validation s3://datasets/news/missing.jsonl: no such key (NoSuchKey)"
    )
    assert error_of("s3://no-such-bucket/train.jsonl") == (
        "cannot read dataset.train s3://no-such-bucket/train.jsonl: no such bucket 'no-such-bucket' (NoSuchBucket)"
    )


def test_an_s3_outage_is_a_retryable_storage_error_not_bad_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer import storage
    from kubetune_trainer.failures import classify_failure
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "unit-test-key",
        "AWS_SECRET_ACCESS_KEY": "unit-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        reset_moto(endpoint)
        storage.s3_client().create_bucket(Bucket="datasets")
        storage.write_bytes("s3://datasets/news/train.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in NEWS))
        assert len(prepare("s3://datasets/news/train.jsonl").train) == 18
        reset_moto(endpoint)
    finally:
        server.stop()

    # The same good file, with S3 gone: an outage, which a retried pod may get past, not a bad dataset.
    with pytest.raises(storage.StorageError) as caught:
        prepare("s3://datasets/news/train.jsonl")

    assert not isinstance(caught.value, DataError)
    assert caught.value.reason == storage.REASON_ENDPOINT_UNREACHABLE
    assert str(caught.value).startswith(
        "s3://datasets/news/train.jsonl: cannot read dataset.train: "
        f"S3 endpoint {endpoint} unreachable after 2 attempts"
    )
    failure = classify_failure(caught.value)
    assert (failure.reason, failure.retryable) == ("StorageError", True)
