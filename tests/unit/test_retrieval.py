"""Retrieval few-shot: each evaluated row's shots are the train rows most like it."""

from __future__ import annotations

import pytest
from kubetune_trainer.data.rows import Example
from kubetune_trainer.evaluate.retrieval import retrieved_shots

pytestmark = pytest.mark.unit


def row(text: str, label: str, line: int) -> Example:
    return Example(prompt=text, completion=label, input_text=text, line=line)


TRAIN = [
    row("the striker scored twice in the cup final", "Sports", 1),
    row("shares fell as the bank cut its forecast", "Business", 2),
    row("the new chip doubles battery life in phones", "Sci/Tech", 3),
    row("the goalkeeper saved a penalty in the final", "Sports", 4),
    row("the central bank raised interest rates again", "Business", 5),
    row("a rover found water ice on mars", "Sci/Tech", 6),
]


def test_each_row_gets_the_most_similar_train_rows_the_closest_last() -> None:
    queries = [row("who scored in the cup final", "Sports", 10), row("the bank cut rates", "Business", 11)]

    shots = retrieved_shots(TRAIN, queries, k=2)

    # "the bank cut" is closest to row 2 (shares fell as the bank cut its forecast), so it comes last.
    assert [[shot.line for shot in own] for own in shots] == [[4, 1], [5, 2]]


def test_the_evaluated_row_is_never_its_own_shot() -> None:
    # A validation row that is also in train (a split can repeat rows) is not handed its own answer.
    query = row("the striker scored twice in the cup final", "Sports", 99)
    [shots] = retrieved_shots(TRAIN, [query], k=1)
    assert [shot.line for shot in shots] == [4]


def test_ties_go_to_the_earlier_row_and_runs_repeat_exactly() -> None:
    twins = [row("same words here", "A", 1), row("same words here", "B", 2), row("other text", "C", 3)]
    query = row("same words", "?", 9)
    first = retrieved_shots(twins, [query], k=1)
    assert [shot.line for shot in first[0]] == [1]
    assert retrieved_shots(twins, [query], k=2) == retrieved_shots(twins, [query], k=2)


def test_nothing_to_retrieve_from_gives_no_shots() -> None:
    assert retrieved_shots([], [row("q", "a", 1)], k=3) == [[]]
    assert retrieved_shots(TRAIN, [], k=3) == []
