"""The kubetune command line: `validate` and `crd`, run through click's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.crd import build_crd, render_crd_yaml
from kubetune_cli.cli import main
from tests.invalid_manifests import INVALID_MANIFESTS, VALID_MANIFESTS

pytestmark = pytest.mark.unit

LEARNING_RATE_CASE = next(case for case in INVALID_MANIFESTS if case.name == "learning-rate-above-one")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_validate_accepts_a_valid_file(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", VALID_MANIFESTS["minimal"])

    result = runner.invoke(main, ["validate", "-f", str(path)])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: 1 FineTuneJob(s) valid\n"
    assert result.stderr == ""


def test_validate_counts_every_document(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.yaml", "---\n".join(VALID_MANIFESTS.values()))

    result = runner.invoke(main, ["validate", "--filename", str(path)])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: {len(VALID_MANIFESTS)} FineTuneJob(s) valid\n"


def test_validate_refuses_an_invalid_file_on_stderr(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", LEARNING_RATE_CASE.text)

    result = runner.invoke(main, ["validate", "-f", str(path)])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}:{LEARNING_RATE_CASE.error_line}:5: spec.training.learningRate: ")
    assert "less than or equal to 1" in result.stderr


def test_validate_checks_every_file_and_fails_if_any_is_bad(runner: CliRunner, tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", LEARNING_RATE_CASE.text)
    good = write(tmp_path, "good.yaml", VALID_MANIFESTS["everything"])

    result = runner.invoke(main, ["validate", "-f", str(bad), "-f", str(good)])

    assert result.exit_code == 1
    assert result.stdout == f"{good}: 1 FineTuneJob(s) valid\n"
    assert f"{bad}:" in result.stderr


def test_validate_reads_stdin(runner: CliRunner) -> None:
    refused = runner.invoke(main, ["validate", "-f", "-"], input=LEARNING_RATE_CASE.text)
    accepted = runner.invoke(main, ["validate", "-f", "-"], input=VALID_MANIFESTS["minimal"])

    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"<stdin>:{LEARNING_RATE_CASE.error_line}:5: spec.training.learningRate")
    assert accepted.exit_code == 0
    assert accepted.stdout == "<stdin>: 1 FineTuneJob(s) valid\n"


def test_validate_reports_a_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["validate", "-f", str(tmp_path / "absent.yaml")])

    assert result.exit_code == 1
    assert "absent.yaml: cannot read" in result.stderr


def test_validate_needs_a_file(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate"])

    assert result.exit_code == 2
    assert "Missing option '-f'" in result.stderr


def test_crd_prints_the_generated_crd(runner: CliRunner) -> None:
    result = runner.invoke(main, ["crd"])

    assert result.exit_code == 0
    assert result.stdout == render_crd_yaml()
    assert yaml.safe_load(result.stdout) == build_crd()


def test_crd_writes_a_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "crd.yaml"

    result = runner.invoke(main, ["crd", "-o", str(path)])

    assert result.exit_code == 0
    assert path.read_text() == render_crd_yaml()


def test_help_lists_the_subcommands(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])

    assert result.exit_code == 0
    assert "validate" in result.stdout
    assert "crd" in result.stdout
