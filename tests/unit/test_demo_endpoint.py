"""The line `make demo` ends with: a command that asks the served tuned model to classify a row as it was tuned to."""

from __future__ import annotations

import json
import shlex

from kubetune_trainer.data.formats import classification_instruction

from tests.testbed.demo import ask_line


def test_the_demo_line_is_one_shell_command_with_the_tuned_prompt() -> None:
    text = "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling band"
    line = ask_line("10.96.0.12", "agnews-qlora", ["Business", "Sci/Tech", "Sports", "World"], text)

    curl, pipe = line.split(" | ")
    words = shlex.split(curl)
    assert words[:3] == ["curl", "-s", "http://10.96.0.12:8080/v1/chat/completions"]
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "agnews-qlora"
    # The apostrophe is dropped so that the single-quoted body stays one word; the rest is the tuned prompt.
    prompt = classification_instruction(["Business", "Sci/Tech", "Sports", "World"], text.replace("'", ""))
    assert body["messages"] == [{"role": "user", "content": prompt}]
    assert pipe == "python3 -m json.tool"
