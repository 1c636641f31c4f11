"""The publish stage of a hosted run: eval/ and manifest.json under output.uri, as for local jobs, and the summary's
figures. The manifest names openai.model as its base model (there are no weights to hash) and adds the hosted job:
its id, the fine-tuned model, the uploaded files, the hyperparameters as the service resolved them and the
checkpoints it kept (each a callable model of its own).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import Field

from kubetune.api import ApiModel, ArtifactsStatus, FineTuneJob, OpenAISpec, UsageStatus, utc_now
from kubetune_trainer import storage
from kubetune_trainer.backends.hosted.service import HostedOutcome, StepMetrics, is_figure
from kubetune_trainer.pipeline import EvaluationOutcome, RunRecord, evaluation_figures, outcome_sentences
from kubetune_trainer.publish.manifest import (
    BaseModelRecord,
    RunManifest,
    TrainingRecord,
    dataset_record,
    job_reference,
    library_versions,
    trainer_image,
)

if TYPE_CHECKING:
    from kubetune_trainer.data.rows import PreparedData

log = logging.getLogger(__name__)

HOSTED_LIBRARIES = ("openai", "kubetune")


class HostedCheckpointRecord(ApiModel):
    """A checkpoint the service kept: a model of its own that can be called like the final one."""

    step: int = Field(description="Training step of the checkpoint.")
    model: str = Field(description="The checkpoint's model name (fine_tuned_model_checkpoint).")
    metrics: dict[str, float] = Field(default_factory=dict, description="The service's figures at that step.")


class HostedJobRecord(ApiModel):
    """What the service ran: ids, names and settings as it resolved them."""

    base_url: str | None = Field(default=None, description="openai.baseUrl (absent: the SDK's default).")
    job_id: str = Field(description="The fine-tuning job's id.")
    base_model: str = Field(description="openai.model.")
    fine_tuned_model: str = Field(description="The fine-tuned model's name.")
    training_file: str = Field(description="Id of the uploaded training file.")
    validation_file: str | None = Field(default=None, description="Id of the uploaded validation file.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="As the service resolved them.")
    seed: int | None = Field(default=None, description="The job's seed.")
    trained_tokens: int | None = Field(default=None, description="Tokens the service billed for training.")
    checkpoints: list[HostedCheckpointRecord] = Field(default_factory=list, description="Checkpoints kept.")


class HostedRunManifest(RunManifest):
    """manifest.json of a hosted run: base_model names openai.model (no weights to hash), plus the hosted job."""

    hosted: HostedJobRecord


def hosted_job_record(openai_spec: OpenAISpec, outcome: HostedOutcome) -> HostedJobRecord:
    """The manifest's account of the hosted job."""
    job = outcome.job
    method = job.method
    supervised = method.supervised if method is not None else None
    resolved = (
        supervised.hyperparameters if supervised is not None and supervised.hyperparameters else job.hyperparameters
    )
    return HostedJobRecord(
        base_url=openai_spec.base_url,
        job_id=job.id,
        base_model=openai_spec.model,
        fine_tuned_model=outcome.fine_tuned_model,
        training_file=job.training_file,
        validation_file=job.validation_file,
        hyperparameters=resolved.model_dump(exclude_none=True) if resolved is not None else {},
        seed=job.seed,
        trained_tokens=job.trained_tokens,
        checkpoints=[
            HostedCheckpointRecord(
                step=checkpoint.step_number,
                model=checkpoint.fine_tuned_model_checkpoint,
                metrics={
                    name: float(value) for name, value in checkpoint.metrics.model_dump().items() if is_figure(value)
                },
            )
            for checkpoint in sorted(outcome.checkpoints, key=lambda checkpoint: checkpoint.step_number)
        ],
    )


def hosted_run_metrics(
    metrics: StepMetrics | None, evaluation: EvaluationOutcome | None, headline_only: bool
) -> dict[str, float]:
    """The service's training figures, then the evaluation's (pipeline.evaluation_figures)."""
    result: dict[str, float] = {}
    if metrics is not None:
        result["trainSteps"] = float(metrics.step)
        result.update(metrics.values)
    return {**result, **evaluation_figures(evaluation, headline_only)}


def hosted_publish_stage(
    job: FineTuneJob,
    data: PreparedData,
    outcome: HostedOutcome,
    evaluation: EvaluationOutcome | None,
    record: RunRecord,
    usage: UsageStatus,
) -> ArtifactsStatus:
    """eval/ (report.json, report.md, predictions, chart) and, last, manifest.json under output.uri."""
    from kubetune_trainer.publish.outputs import EVAL_PREFIX, REPORT_JSON, eval_uploads, publish_manifest, upload_file

    spec = job.spec
    assert spec.openai is not None
    output = spec.output.uri
    hashes: dict[str, str] = {}
    report_uri = None
    if evaluation is not None:
        for name, path in eval_uploads(evaluation.report).items():
            hashes[f"{EVAL_PREFIX}/{name}"] = upload_file(path, storage.join(output, EVAL_PREFIX, name))
        report_uri = storage.join(output, EVAL_PREFIX, REPORT_JSON)
    metrics = outcome.metrics
    manifest = HostedRunManifest(
        created_at=utc_now(),
        job=job_reference(job),
        spec=spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        base_model=BaseModelRecord(name=spec.openai.model, weights_sha256={}),
        dataset=dataset_record(spec.dataset, data),
        image=trainer_image(job),
        libraries=library_versions(HOSTED_LIBRARIES),
        training=TrainingRecord(
            steps=metrics.step if metrics else 0, total_steps=(metrics.total_steps or metrics.step) if metrics else 0
        ),
        metrics=hosted_run_metrics(metrics, evaluation, headline_only=False),
        evaluation=evaluation.status if evaluation else None,
        artifacts=hashes,
        timings={**record.timings, "total": record.wall_seconds()},
        usage=usage,
        hosted=hosted_job_record(spec.openai, outcome),
    )
    manifest_uri = publish_manifest(output, manifest)
    log.info("published %d evaluation files and the manifest under %s", len(hashes), output)
    return ArtifactsStatus(report=report_uri, manifest=manifest_uri)


def success_message(outcome: HostedOutcome, evaluation: EvaluationOutcome | None, output_uri: str) -> str:
    """One line: the hosted job and model, the headline comparison, where the artifacts are."""
    job = outcome.job
    trained = f"hosted job {job.id} trained {outcome.fine_tuned_model}"
    if outcome.metrics is not None:
        trained += f" in {outcome.metrics.step} steps"
    if job.trained_tokens:
        trained += f" ({job.trained_tokens} tokens)"
    return "; ".join([trained, *outcome_sentences(evaluation, output_uri)])
