"""`kubetune train -f job.yaml` on local paths: the trainer's run in-process, the table and the artifacts printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kubetune.api import FineTuneJob
from kubetune_cli.cli import main
from tests.testbed.shared_data import shared_sample
from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama(root / "model", build_tiny_tokenizer(root / "tokenizer", vocab_size=512))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in shared_sample("ag_news").read_text().splitlines()[:40]]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": row["text"][:80], "label": row["label"]}) + "\n" for row in rows))
    return path


def job(name: str, model: Path, train: Path, output: Path, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"train": str(train), "format": "classification", "maxLength": 256, "validationSplit": 0.2},
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"maxSteps": 2, "batchSize": 4, "learningRate": 5e-3, "warmupSteps": 0, "checkpointEvery": 2},
            "evaluation": {"maxSamples": 4, "batchSize": 4, "maxNewTokens": 4, "fewShotK": 2},
            "output": {"uri": str(output)},
            **spec,
        },
    }


def write_jobs(path: Path, *jobs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(jobs))
    return path


def test_train_runs_the_job_and_prints_the_evaluation_table_and_artifacts(
    tiny_model: Path, train_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    manifest = write_jobs(tmp_path / "job.yaml", job("news", tiny_model, train_file, output))

    result = CliRunner().invoke(main, ["train", "-f", str(manifest)])

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("news: Succeeded: trained 2 steps")
    assert "| metric | zero-shot | few-shot | fine-tuned | lift (vs best baseline) |" in result.stdout
    assert "| accuracy |" in result.stdout
    assert f"  adapter: {output / 'adapter'}" in result.stdout
    assert f"  manifest: {output / 'manifest.json'}" in result.stdout
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert (output / "eval" / "report.md").read_text() in result.stdout
    # The adapter's model card: the run's own table, and a manifest that runs the same job again.
    card = (output / "adapter" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "| accuracy |" in card and "2 optimizer steps" in card
    rerun = FineTuneJob.model_validate(yaml.safe_load(card.split("```yaml\n")[-1].split("```")[0]))
    assert rerun.spec.output.uri == str(output) and rerun.spec.lora is not None and rerun.spec.lora.r == 4
    manifest_doc = json.loads((output / "manifest.json").read_text())
    assert manifest_doc["job"] == {"name": "news"}
    # Only warnings are logged without --verbose, each as one JSON line.
    for line in result.stderr.splitlines():
        assert json.loads(line)["level"] in ("warning", "error")


def test_output_uri_overrides_the_spec_per_job_when_a_file_has_several(
    tiny_model: Path, train_file: Path, tmp_path: Path
) -> None:
    unused = tmp_path / "unused"
    manifest = write_jobs(
        tmp_path / "jobs.yaml",
        job("first", tiny_model, train_file, unused, evaluation={"enabled": False}),
        job("second", tiny_model, train_file, unused, evaluation={"enabled": False}),
    )
    runs = tmp_path / "runs"

    result = CliRunner().invoke(main, ["train", "-f", str(manifest), "--output-uri", str(runs)])

    assert result.exit_code == 0, result.output
    assert (runs / "first" / "manifest.json").is_file()
    assert (runs / "second" / "manifest.json").is_file()
    assert not unused.exists()
    assert "| metric |" not in result.stdout


def test_bad_data_exits_non_zero_with_the_reason_and_the_line(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "World"}\n{"text": "no label"}\n{"text": "x", "label": "Sports"}\n')
    manifest = write_jobs(tmp_path / "job.yaml", job("bad", tiny_model, bad, tmp_path / "out"))

    result = CliRunner().invoke(main, ["train", "-f", str(manifest)])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert "bad: Failed (DataError):" in result.stderr
    assert f"{bad}:2" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_storage_failure_while_publishing_fails_the_run_and_writes_no_manifest(
    tiny_model: Path, train_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    # A file where adapter/ must go: training and its checkpoints succeed, publishing the adapter cannot.
    (output / "adapter").write_text("in the way")
    manifest = write_jobs(tmp_path / "job.yaml", job("blocked", tiny_model, train_file, output))

    result = CliRunner().invoke(main, ["train", "-f", str(manifest)])

    assert result.exit_code == 1, result.output
    assert "blocked: Failed (StorageError):" in result.stderr
    assert str(output / "adapter") in result.stderr
    assert (output / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert not (output / "manifest.json").exists()
