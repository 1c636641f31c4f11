"""manifest.json: what a run was made from and what it produced (spec, model and data hashes, versions, artifacts)."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import Field

from kubetune import contract
from kubetune.api import (
    API_VERSION,
    ApiModel,
    DatasetSpec,
    DatasetStatus,
    EvaluationStatus,
    FineTuneJob,
    ModelSpec,
    UsageStatus,
)
from kubetune_trainer import storage
from kubetune_trainer.data.rows import PreparedData
from kubetune_trainer.modeling import WEIGHT_SUFFIXES

MANIFEST_KIND = "FineTuneRunManifest"
ENV_IMAGE = contract.ENV_IMAGE
# The trainer image puts kubetune on PYTHONPATH instead of installing it; its Dockerfile records the version here.
ENV_KUBETUNE_VERSION = "KUBETUNE_VERSION"
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "kubetune")
HUB_SNAPSHOTS_DIR = "snapshots"


class JobReference(ApiModel):
    """Which FineTuneJob the run belonged to."""

    name: str = Field(description="metadata.name of the FineTuneJob.")
    namespace: str | None = Field(default=None, description="metadata.namespace (absent for kubetune train).")


class BaseModelRecord(ApiModel):
    """The base model as it was resolved and loaded."""

    name: str | None = Field(default=None, description="Hub id (model.name).")
    uri: str | None = Field(default=None, description="model.uri.")
    revision: str | None = Field(default=None, description="model.revision, or the hub snapshot's commit.")
    weights_sha256: dict[str, str] = Field(description="sha256 of every weight file, by its path in the model dir.")


class DatasetRecord(ApiModel):
    """The data the run trained and evaluated on."""

    train: str = Field(description="dataset.train.")
    validation: str | None = Field(default=None, description="dataset.validation.")
    sha256: str | None = Field(default=None, description="sha256 of the train bytes followed by the validation bytes.")
    stats: DatasetStatus = Field(description="Rows, format, token lengths and truncated share.")


class TrainingRecord(ApiModel):
    """What training did."""

    steps: int = Field(description="Optimizer steps done.")
    total_steps: int = Field(description="Optimizer steps planned.")
    resumed_from_step: int | None = Field(default=None, description="Checkpoint step this attempt resumed from.")
    checkpoint_steps: list[int] = Field(default_factory=list, description="Checkpoints uploaded by this attempt.")


class RunManifest(ApiModel):
    """The manifest.json document, written last under output.uri: its presence means the run's artifacts are whole."""

    api_version: str = Field(default=API_VERSION, description="kubetune.io/v1alpha1.")
    kind: str = Field(default=MANIFEST_KIND, description="FineTuneRunManifest.")
    created_at: str = Field(description="When the manifest was written (RFC 3339).")
    job: JobReference
    spec: dict[str, object] = Field(description="The resolved spec (defaults filled in) the run used.")
    base_model: BaseModelRecord
    dataset: DatasetRecord
    image: str | None = Field(default=None, description="Trainer image (KUBETUNE_IMAGE, else spec.image).")
    libraries: dict[str, str | None] = Field(description="Versions of the libraries that shaped the result.")
    training: TrainingRecord
    metrics: dict[str, float] = Field(default_factory=dict, description="Training and evaluation metrics.")
    evaluation: EvaluationStatus | None = Field(default=None, description="The evaluation's headline and gate.")
    artifacts: dict[str, str] = Field(description="sha256 of every artifact, by its path under output.uri.")
    adapter_image: str | None = Field(
        default=None, description="The adapter pushed to output.registry: repository:tag@sha256:digest."
    )
    timings: dict[str, float] = Field(description="Seconds spent in each stage.")
    usage: UsageStatus


def job_reference(job: FineTuneJob) -> JobReference:
    return JobReference(name=job.metadata.name, namespace=job.metadata.namespace)


def dataset_record(spec: DatasetSpec, data: PreparedData) -> DatasetRecord:
    """The data a run used, as both backends record it: its URIs, the hash of its bytes and what pre-flight found."""
    return DatasetRecord(train=spec.train, validation=spec.validation, sha256=data.sha256, stats=data.dataset_status())


def library_versions(names: Sequence[str] = LIBRARIES, env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Installed versions of the named distributions (None for one that is not installed; kubetune from
    KUBETUNE_VERSION when it runs from source)."""
    source = os.environ if env is None else env
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = source.get(ENV_KUBETUNE_VERSION) if name == "kubetune" else None
    return versions


def weight_files_sha256(model_dir: Path) -> dict[str, str]:
    """sha256 of every weight file under the model directory (hub snapshots link to blobs; the content counts)."""
    return {
        path.relative_to(model_dir).as_posix(): storage.file_sha256(path)
        for path in sorted(model_dir.rglob("*"))
        if path.suffix in WEIGHT_SUFFIXES and path.is_file()
    }


def model_revision(model: ModelSpec, model_dir: Path) -> str | None:
    """model.revision, or the commit of the hub snapshot the name resolved to (its directory name)."""
    if model.revision:
        return model.revision
    if model.name is not None and model_dir.parent.name == HUB_SNAPSHOTS_DIR:
        return model_dir.name
    return None


def trainer_image(job: FineTuneJob, env: Mapping[str, str] | None = None) -> str | None:
    """The image this trainer runs in: KUBETUNE_IMAGE when set (the operator sets the container's image), else
    spec.image."""
    source = os.environ if env is None else env
    return source.get(ENV_IMAGE) or job.spec.image


def relative_hashes(prefix: str, hashes: Mapping[str, str]) -> dict[str, str]:
    """{path: sha256} from an upload under `prefix`, keyed by the path under output.uri."""
    return {f"{prefix}/{path}": digest for path, digest in hashes.items()}
