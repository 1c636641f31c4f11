"""Publishing to a local output.uri: artifacts then manifest.json with their hashes; a failure leaves no manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from kubetune_trainer.evaluate.report import ReportFiles
from kubetune_trainer.publish.manifest import (
    BaseModelRecord,
    DatasetRecord,
    JobReference,
    RunManifest,
    TrainingRecord,
    library_versions,
    model_revision,
    trainer_image,
    weight_files_sha256,
)
from kubetune_trainer.publish.outputs import MANIFEST_FILE, eval_uploads, publish
from kubetune_trainer.storage import StorageError

from kubetune.api import DatasetStatus, FineTuneJob, ModelSpec, UsageStatus

pytestmark = pytest.mark.unit

JOB = FineTuneJob.model_validate(
    {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "news", "namespace": "ml"},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/news"},
            "image": "registry.example/kubetune-trainer:spec",
        },
    }
)


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    root = tmp_path / "work" / "adapter"
    write(root / "adapter_model.safetensors", b"weights")
    write(root / "adapter_config.json", b'{"r": 4}')
    write(root / "tokenizer.json", b"{}")
    return root


@pytest.fixture
def report_files(tmp_path: Path) -> ReportFiles:
    root = tmp_path / "work" / "eval"
    return ReportFiles(
        report_json=write(root / "report.json", b'{"headlineMetric": "accuracy"}'),
        report_markdown=write(root / "report.md", b"| metric |\n"),
        predictions=write(root / "predictions.jsonl", b'{"index": 0}\n'),
        chart=write(root / "scores.png", b"\x89PNG"),
    )


def manifest_with(hashes: dict[str, str]) -> RunManifest:
    return RunManifest(
        created_at="2026-01-01T00:00:00Z",
        job=JobReference(name="news", namespace="ml"),
        spec=JOB.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        base_model=BaseModelRecord(uri="s3://models/tiny", weights_sha256={"model.safetensors": "00" * 32}),
        dataset=DatasetRecord(train="s3://data/train.jsonl", sha256="11" * 32, stats=DatasetStatus(train_rows=3)),
        libraries={"torch": "2.13.0"},
        training=TrainingRecord(steps=4, total_steps=4),
        artifacts=hashes,
        timings={"train": 1.0},
        usage=UsageStatus(trained_tokens=10, gpu_seconds=0.0, wall_seconds=2.0),
    )


def test_every_artifact_goes_up_and_the_manifest_lists_their_hashes(
    tmp_path: Path, adapter_dir: Path, report_files: ReportFiles
) -> None:
    output = tmp_path / "out"

    artifacts = publish(str(output), adapter_dir, None, report_files, manifest_with)

    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert set(manifest["artifacts"]) == {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "eval/report.json",
        "eval/report.md",
        "eval/predictions.jsonl",
        "eval/chart.png",
    }
    for path, digest in manifest["artifacts"].items():
        assert hashlib.sha256((output / path).read_bytes()).hexdigest() == digest, path
    assert artifacts.adapter == str(output / "adapter")
    assert artifacts.report == str(output / "eval" / "report.json")
    assert artifacts.manifest == str(output / MANIFEST_FILE)
    assert artifacts.merged_model is None
    assert artifacts.checkpoint is None


def test_a_merged_model_is_published_beside_the_adapter(tmp_path: Path, adapter_dir: Path) -> None:
    merged = tmp_path / "work" / "merged"
    write(merged / "model.safetensors", b"merged weights")
    output = tmp_path / "out"

    artifacts = publish(str(output), adapter_dir, merged, None, manifest_with)

    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert "merged/model.safetensors" in manifest["artifacts"]
    assert artifacts.merged_model == str(output / "merged")
    assert artifacts.report is None


def test_a_storage_failure_midway_raises_and_leaves_no_manifest(
    tmp_path: Path, adapter_dir: Path, report_files: ReportFiles
) -> None:
    output = tmp_path / "out"
    # A file where eval/ must go: the evaluation files cannot be written after the adapter was.
    write(output / "eval", b"in the way")

    with pytest.raises(StorageError):
        publish(str(output), adapter_dir, None, report_files, manifest_with)

    assert (output / "adapter" / "adapter_model.safetensors").exists()
    assert not (output / MANIFEST_FILE).exists()


def test_the_chart_is_left_out_when_none_was_drawn(report_files: ReportFiles) -> None:
    without_chart = ReportFiles(report_files.report_json, report_files.report_markdown, report_files.predictions, None)

    assert set(eval_uploads(report_files)) == {"report.json", "report.md", "predictions.jsonl", "chart.png"}
    assert set(eval_uploads(without_chart)) == {"report.json", "report.md", "predictions.jsonl"}


def test_weight_hashes_cover_weight_files_only_and_follow_links(tmp_path: Path) -> None:
    blob = write(tmp_path / "blobs" / "abc", b"tensor bytes")
    model = tmp_path / "snapshots" / "0123abcd"
    model.mkdir(parents=True)
    (model / "model.safetensors").symlink_to(blob)
    write(model / "config.json", b"{}")

    assert weight_files_sha256(model) == {"model.safetensors": hashlib.sha256(b"tensor bytes").hexdigest()}


def test_the_revision_is_the_spec_s_or_the_hub_snapshot_commit(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--m" / "snapshots" / "0123abcd"

    assert model_revision(ModelSpec(name="org/m"), snapshot) == "0123abcd"
    assert model_revision(ModelSpec(name="org/m", revision="v2"), snapshot) == "v2"
    assert model_revision(ModelSpec(uri="/models/m"), tmp_path / "m") is None


def test_image_and_versions_are_recorded() -> None:
    versions = library_versions(("torch", "kubetune", "no-such-distribution-kubetune"))

    assert trainer_image(JOB, {"KUBETUNE_IMAGE": "registry.example/kubetune-trainer:1"}) == (
        "registry.example/kubetune-trainer:1"
    )
    assert trainer_image(JOB, {}) == "registry.example/kubetune-trainer:spec"
    assert versions["torch"] is not None
    assert versions["torch"].startswith("2.")
    assert versions["kubetune"] is not None
    assert versions["no-such-distribution-kubetune"] is None
