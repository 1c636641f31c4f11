"""The exports a spec asks for beside the adapter (GGUF, the registry push): checked before training, made after it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kubetune.api import FineTuneJob, FineTuneJobSpec
from kubetune.contract import ENV_REGISTRY_CONFIG, REGISTRY_CONFIG_DIR, REGISTRY_CONFIG_FILE
from kubetune_trainer.publish.gguf_export import GgufExportError, converter_dir, converter_missing, export_gguf
from kubetune_trainer.publish.registry_push import (
    Credentials,
    check_access,
    push_adapter,
    read_credentials,
    registry_host,
)

GGUF_SUBDIR = "gguf"


def registry_config_path(env: Mapping[str, str]) -> Path:
    """The mounted docker config.json: $KUBETUNE_REGISTRY_CONFIG, else where the operator mounts the Secret."""
    return Path(env.get(ENV_REGISTRY_CONFIG) or f"{REGISTRY_CONFIG_DIR}/{REGISTRY_CONFIG_FILE}")


def registry_credentials(spec: FineTuneJobSpec, env: Mapping[str, str]) -> Credentials | None:
    """output.registry's credentials, or None when the spec names no Secret (an open registry)."""
    export = spec.output.registry
    if export is None or export.credentials_secret_ref is None:
        return None
    return read_credentials(registry_config_path(env), registry_host(export.repository))


def check_exports(spec: FineTuneJobSpec, env: Mapping[str, str]) -> None:
    """Before any training: the GGUF converter is there, and the registry takes these credentials for a push."""
    if spec.output.gguf is not None:
        problem = converter_missing(converter_dir())
        if problem:
            raise GgufExportError(f"output.gguf: {problem}")
    if spec.output.registry is not None:
        check_access(spec.output.registry, registry_credentials(spec, env))


def gguf_source(spec: FineTuneJobSpec, adapter_dir: Path, merged_dir: Path | None) -> Path:
    """The full model the converter reads: the merged one, or the adapter folder itself after full fine-tuning."""
    if spec.method == "full":
        return adapter_dir
    if merged_dir is None:
        raise GgufExportError("output.gguf: the merged model was not written, so there is nothing to convert")
    return merged_dir


def write_gguf(spec: FineTuneJobSpec, adapter_dir: Path, merged_dir: Path | None, work_dir: Path) -> Path | None:
    """work_dir/gguf/model-<quantization>.gguf when output.gguf asks for it."""
    if spec.output.gguf is None:
        return None
    source = gguf_source(spec, adapter_dir, merged_dir)
    return export_gguf(source, work_dir / GGUF_SUBDIR, spec.output.gguf.quantization).path


def artifact_annotations(job: FineTuneJob, created: str) -> dict[str, str]:
    """The pushed manifest's annotations (OCI's standard keys): what it is, from which job, when."""
    spec = job.spec
    return {
        "org.opencontainers.image.title": job.metadata.name,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.description": f"LoRA adapter of {spec.model.name or spec.model.uri}, "
        f"trained by kubetune FineTuneJob {job.metadata.namespace or 'default'}/{job.metadata.name}",
        "org.opencontainers.image.source": spec.output.uri,
    }


def artifact_config(job: FineTuneJob, base_model_revision: str | None) -> dict[str, str | None]:
    """The artifact's config blob: what a serving side needs to pair the adapter with its base model."""
    spec = job.spec
    return {
        "baseModel": spec.model.name or spec.model.uri,
        "baseModelRevision": base_model_revision,
        "method": spec.method,
        "objective": spec.training.objective,
        "job": f"{job.metadata.namespace or 'default'}/{job.metadata.name}",
        "output": spec.output.uri,
    }


def push_to_registry(
    job: FineTuneJob, adapter_dir: Path, env: Mapping[str, str], created: str, base_model_revision: str | None
) -> str:
    """Push the adapter folder to output.registry; repository:tag@sha256:digest."""
    export = job.spec.output.registry
    assert export is not None
    return push_adapter(
        adapter_dir,
        export,
        job.metadata.name,
        artifact_annotations(job, created),
        artifact_config(job, base_model_revision),
        registry_credentials(job.spec, env),
    )
