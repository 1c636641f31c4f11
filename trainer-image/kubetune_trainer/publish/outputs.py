"""The publish stage: adapter/, merged/, gguf/, eval/, the registry push and, last, manifest.json under output.uri.

manifest.json goes up only after every other artifact is in storage, so its presence means the run's outputs are
whole. A storage failure is retried inside the storage layer and then raised (StorageError), never reported as success.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune.api import ArtifactsStatus
from kubetune_trainer import storage
from kubetune_trainer.evaluate.report import (
    CHART_PNG,
    COST_CHART_PNG,
    PREDICTIONS_JSONL,
    REPORT_JSON,
    REPORT_MARKDOWN,
    ReportFiles,
)
from kubetune_trainer.publish.manifest import RunManifest, relative_hashes
from kubetune_trainer.train.checkpoints import list_checkpoints

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapter"
MERGED_PREFIX = "merged"
GGUF_PREFIX = "gguf"
EVAL_PREFIX = "eval"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class PublishedFiles:
    """Artifacts in storage (every one but the manifest): sha256 by path under output.uri, and their URIs."""

    hashes: dict[str, str]
    artifacts: ArtifactsStatus


def eval_uploads(files: ReportFiles) -> dict[str, Path]:
    """{name under eval/: local file} for the report's files (the chart only when one was drawn)."""
    # Under eval/ with the names the report gave them.
    uploads = {
        REPORT_JSON: files.report_json,
        REPORT_MARKDOWN: files.report_markdown,
        PREDICTIONS_JSONL: files.predictions,
    }
    if files.chart is not None:
        uploads[CHART_PNG] = files.chart
    if files.cost_chart is not None:
        uploads[COST_CHART_PNG] = files.cost_chart
    return uploads


def upload_file(path: Path, uri: str) -> str:
    """Upload one local file; its sha256."""
    data = storage.read_bytes(str(path))
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def newest_checkpoint_uri(output_uri: str) -> str | None:
    """URI of the newest complete checkpoint under output.uri, if any."""
    checkpoints = list_checkpoints(output_uri)
    return checkpoints[0].uri if checkpoints else None


def publish_outputs(
    output_uri: str,
    adapter_dir: Path,
    merged_dir: Path | None,
    report: ReportFiles | None,
    gguf_file: Path | None = None,
) -> PublishedFiles:
    """Upload the adapter (safetensors, adapter_config.json, tokenizer, model card), the merged model, the GGUF file
    and the evaluation files."""
    hashes = relative_hashes(ADAPTER_PREFIX, storage.upload_dir(adapter_dir, storage.join(output_uri, ADAPTER_PREFIX)))
    merged_uri = None
    if merged_dir is not None:
        merged_uri = storage.join(output_uri, MERGED_PREFIX)
        hashes.update(relative_hashes(MERGED_PREFIX, storage.upload_dir(merged_dir, merged_uri)))
    gguf_uri = None
    if gguf_file is not None:
        gguf_uri = storage.join(output_uri, GGUF_PREFIX, gguf_file.name)
        hashes[f"{GGUF_PREFIX}/{gguf_file.name}"] = upload_file(gguf_file, gguf_uri)
    report_uri = None
    if report is not None:
        for name, path in eval_uploads(report).items():
            hashes[f"{EVAL_PREFIX}/{name}"] = upload_file(path, storage.join(output_uri, EVAL_PREFIX, name))
        report_uri = storage.join(output_uri, EVAL_PREFIX, REPORT_JSON)
    artifacts = ArtifactsStatus(
        adapter=storage.join(output_uri, ADAPTER_PREFIX),
        checkpoint=newest_checkpoint_uri(output_uri),
        report=report_uri,
        merged_model=merged_uri,
        gguf=gguf_uri,
    )
    log.info("published %d artifacts under %s", len(hashes), output_uri)
    return PublishedFiles(hashes=hashes, artifacts=artifacts)


def publish_manifest(output_uri: str, manifest: RunManifest) -> str:
    """Write manifest.json last; its URI."""
    uri = storage.join(output_uri, MANIFEST_FILE)
    storage.write_bytes(uri, (manifest.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n").encode())
    return uri


def publish(
    output_uri: str,
    adapter_dir: Path,
    merged_dir: Path | None,
    report: ReportFiles | None,
    manifest_for: Callable[[dict[str, str]], RunManifest],
    gguf_file: Path | None = None,
    push_adapter: Callable[[], str] | None = None,
) -> ArtifactsStatus:
    """Every artifact, the adapter's push to a registry (`push_adapter` returns the pushed reference), then the
    manifest built from their hashes by `manifest_for`; the URIs for status.artifacts."""
    published = publish_outputs(output_uri, adapter_dir, merged_dir, report, gguf_file)
    manifest = manifest_for(published.hashes)
    artifacts = published.artifacts
    if push_adapter is not None:
        reference = push_adapter()
        manifest = manifest.model_copy(update={"adapter_image": reference})
        artifacts = artifacts.model_copy(update={"adapter_image": reference})
    manifest_uri = publish_manifest(output_uri, manifest)
    return artifacts.model_copy(update={"manifest": manifest_uri})
