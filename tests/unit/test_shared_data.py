"""Finding the shared samples: beside the checkout, or $KUBETUNE_SHARED_DATA; a clear error when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.testbed.shared_data import ENV_VAR, REPO_ROOT, SharedDataMissingError, configured_dir, shared_sample


def test_the_samples_are_looked_for_beside_the_checkout_by_default() -> None:
    assert configured_dir({}) == REPO_ROOT.parent / "shared" / "data"
    assert configured_dir({ENV_VAR: "  "}) == REPO_ROOT.parent / "shared" / "data"


def test_the_environment_variable_moves_the_samples(tmp_path: Path) -> None:
    assert configured_dir({ENV_VAR: str(tmp_path)}) == tmp_path


def test_a_present_sample_is_returned(tmp_path: Path) -> None:
    sample = tmp_path / "banking77" / "test.jsonl"
    sample.parent.mkdir()
    sample.write_text('{"text": "card lost", "label": "lost_or_stolen_card"}\n')
    assert shared_sample("banking77", "test", tmp_path) == sample


def test_a_missing_sample_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SharedDataMissingError) as caught:
        shared_sample("ag_news", data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "ag_news" / "train.jsonl") in message
    assert ENV_VAR in message and "beside shared/" in message
    assert isinstance(caught.value, FileNotFoundError)
