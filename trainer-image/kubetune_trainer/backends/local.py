"""The local backend: one FineTuneJob trained and evaluated in this process (`python -m kubetune_trainer run`).

data (pre-flight, before any model is loaded) → model → train (resuming from the newest complete checkpoint) →
evaluate (if enabled) → publish. Every failure ends as a TrainerSummary with a TRAINER_REASON_* reason, written to the
termination message; exit codes are documented in kubetune_trainer.failures. What the hosted backend shares with this
one lives in kubetune_trainer.pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api import FineTuneJob, FineTuneJobSpec, UsageStatus, utc_now
from kubetune.contract import (
    TrainerSummary,
)
from kubetune_trainer.failures import ConfigError, EvaluationError, classify_failure, exit_code, failed_summary
from kubetune_trainer.pipeline import (
    EvaluationOutcome,
    RunRecord,
    check_spec_uris,
    data_stage,
    evaluation_figures,
    finite_tables,
    judge_for,
    outcome_sentences,
    write_termination_message,
)
from kubetune_trainer.progress.reporter import Reporter
from kubetune_trainer.publish.exports import check_exports, push_to_registry, write_gguf

if TYPE_CHECKING:
    from kubetune_trainer.data.rows import PreparedData
    from kubetune_trainer.train.trainer import TrainResult

log = logging.getLogger(__name__)

ENV_MODEL_CACHE = "KUBETUNE_MODEL_CACHE"  # where s3:// models are downloaded once; default <tmp>/kubetune-models


# ----------------------------------------------------------------------------------------------------------------------
# What the stages hand each other


@dataclass(frozen=True)
class RunSettings:
    """Where the run keeps local files and which process of a multi-GPU launch this is."""

    work_dir: Path
    model_cache_dir: Path
    is_main_process: bool = True
    world_size: int = 1


# ----------------------------------------------------------------------------------------------------------------------
# Config


def check_runnable(spec: FineTuneJobSpec) -> None:
    """Refuse what this trainer does not run and URIs it cannot use, before any stage starts."""
    if spec.backend != "local":
        raise ConfigError(f"backend {spec.backend} runs with `python -m kubetune_trainer hosted`, not `run`")
    check_spec_uris(spec, include_model=True)
    check_exports(spec, os.environ)


# ----------------------------------------------------------------------------------------------------------------------
# Stages


def route_library_logs() -> None:
    """transformers and datasets log through the root logger (JSON lines); their bars only on a terminal."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def model_stage(
    spec: FineTuneJobSpec, data: PreparedData, settings: RunSettings, reporter: Reporter
) -> tuple[Path, PreparedData]:
    """Resolve the base model to a local directory, and measure the data's token lengths with its tokenizer."""
    from kubetune_trainer.data.prepare import measure_tokens
    from kubetune_trainer.modeling import load_tokenizer, model_source, resolve_model_dir

    route_library_logs()
    model_dir = resolve_model_dir(spec.model, settings.model_cache_dir)
    tokenizer: Any = load_tokenizer(model_dir, model_source(spec.model))
    stats = measure_tokens(data.train, tokenizer, spec.dataset.max_length, spec.training.objective)
    measured = dataclasses.replace(data, stats=stats)
    reporter.report_dataset(measured.dataset_status())
    return model_dir, measured


def train_stage(
    spec: FineTuneJobSpec, data: PreparedData, model_dir: Path, settings: RunSettings, reporter: Reporter
) -> TrainResult:
    """Train, checkpointing to output.uri and resuming from the newest complete checkpoint there."""
    from kubetune_trainer.train.trainer import train

    return train(
        spec,
        data,
        model_dir,
        settings.work_dir / "train",
        progress=reporter,
        on_step=reporter.report_step,
        progress_interval_seconds=reporter.interval,
    )


def evaluate_stage(
    spec: FineTuneJobSpec,
    data: PreparedData,
    model_dir: Path,
    adapter_dir: Path,
    settings: RunSettings,
    reporter: Reporter,
) -> EvaluationOutcome:
    """Score the tuned adapter against the prompting baselines on the same held-out rows; write the report."""
    from kubetune_trainer.evaluate.gate import evaluate_gate
    from kubetune_trainer.evaluate.in_process import run_evaluation
    from kubetune_trainer.evaluate.report import evaluation_status, write_report
    from kubetune_trainer.evaluate.runner import EvaluationInputError
    from kubetune_trainer.evaluate.tuned_model import load_tuned_model, release_memory

    release_memory()
    tuned = load_tuned_model(spec, model_dir, adapter_dir, data.labels)
    judge = judge_for(spec)
    try:
        results = run_evaluation(
            tuned.model,
            tuned.tokenizer,
            data.validation,
            data.train,
            spec.evaluation,
            dataset_format=data.format,
            labels=data.labels,
            seed=spec.training.seed,
            judge=judge,
            baseline_model=tuned.baseline_model,
            progress=reporter.report_evaluation,
        )
    except EvaluationInputError as error:
        raise EvaluationError(f"evaluation: {error}") from error
    finally:
        if judge is not None:
            judge.close()
    gate_spec = spec.evaluation.gate
    gate = evaluate_gate(gate_spec, results.metric_tables()) if gate_spec is not None else None
    report = write_report(settings.work_dir / "eval", results, gate, gate_spec.fail_job if gate_spec else False)
    status = evaluation_status(results, gate)
    tables = finite_tables(results)
    reporter.report_scores(tables, status)
    return EvaluationOutcome(status=status, tables=tables, report=report)


def training_metrics(result: TrainResult) -> dict[str, float]:
    """The training figures: steps, runtime, mean and last logged loss."""
    metrics: dict[str, float] = {"trainSteps": float(result.steps), "trainRuntimeSeconds": result.runtime_seconds}
    if result.train_loss is not None and math.isfinite(result.train_loss):
        metrics["trainLoss"] = result.train_loss
    if result.final_loss is not None and math.isfinite(result.final_loss):
        metrics["finalLoss"] = result.final_loss
    return metrics


def run_metrics(result: TrainResult, evaluation: EvaluationOutcome | None, headline_only: bool) -> dict[str, float]:
    """Training figures, then the evaluation's (pipeline.evaluation_figures)."""
    return {**training_metrics(result), **evaluation_figures(evaluation, headline_only)}


def usage_of(result: TrainResult, record: RunRecord, settings: RunSettings) -> UsageStatus:
    """Trained tokens, GPU-seconds (GPUs in use × training wall time; 0 on CPU) and the run's wall seconds."""
    from kubetune_trainer.modeling import cuda_available

    gpus = settings.world_size if cuda_available() else 0
    return UsageStatus(
        trained_tokens=result.trained_tokens,
        gpu_seconds=round(gpus * record.timings.get("train", result.runtime_seconds), 3),
        wall_seconds=record.wall_seconds(),
    )


def publish_stage(
    job: FineTuneJob,
    data: PreparedData,
    model_dir: Path,
    result: TrainResult,
    evaluation: EvaluationOutcome | None,
    record: RunRecord,
    settings: RunSettings,
) -> tuple[Any, UsageStatus]:
    """Upload every artifact, then manifest.json; (ArtifactsStatus, usage)."""
    from kubetune_trainer.publish.manifest import (
        BaseModelRecord,
        RunManifest,
        TrainingRecord,
        dataset_record,
        job_reference,
        library_versions,
        model_revision,
        trainer_image,
        weight_files_sha256,
    )
    from kubetune_trainer.publish.outputs import publish

    spec = job.spec
    base_model = BaseModelRecord(
        name=spec.model.name,
        uri=spec.model.uri,
        revision=model_revision(spec.model, model_dir),
        weights_sha256=weight_files_sha256(model_dir),
    )
    usage = usage_of(result, record, settings)

    def manifest_for(hashes: dict[str, str]) -> RunManifest:
        return RunManifest(
            created_at=utc_now(),
            job=job_reference(job),
            spec=spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
            base_model=base_model,
            dataset=dataset_record(spec.dataset, data),
            image=trainer_image(job),
            libraries=library_versions(),
            training=TrainingRecord(
                steps=result.steps,
                total_steps=result.total_steps,
                resumed_from_step=result.resumed_from_step,
                checkpoint_steps=list(result.checkpoint_steps),
            ),
            metrics=run_metrics(result, evaluation, headline_only=False),
            evaluation=evaluation.status if evaluation else None,
            artifacts=hashes,
            timings=record.timings_so_far(),
            usage=usage.model_copy(update={"wall_seconds": record.wall_seconds()}),
        )

    report = evaluation.report if evaluation else None
    write_model_card(job, base_model, data, result, evaluation)
    gguf_file = write_gguf(spec, result.adapter_dir, result.merged_dir, settings.work_dir)
    push = None
    if spec.output.registry is not None:

        def push() -> str:
            return push_to_registry(job, result.adapter_dir, os.environ, utc_now(), base_model.revision)

    artifacts = publish(
        spec.output.uri,
        result.adapter_dir,
        result.merged_dir if spec.output.merge_adapter else None,
        report,
        manifest_for,
        gguf_file=gguf_file,
        push_adapter=push,
    )
    return artifacts, usage.model_copy(update={"wall_seconds": record.wall_seconds()})


def write_model_card(
    job: FineTuneJob,
    base_model: Any,  # output_manifest.BaseModelRecord
    data: PreparedData,
    result: TrainResult,
    evaluation: EvaluationOutcome | None,
) -> None:
    """adapter/README.md: the model card, in place of the template PEFT writes there."""
    from kubetune_trainer.publish.manifest import trainer_image
    from kubetune_trainer.publish.model_card import MODEL_CARD_FILE, CardFacts, render_model_card

    report = evaluation.report if evaluation else None
    facts = CardFacts(
        job=job,
        base_model=base_model,
        dataset=data.dataset_status(),
        steps=result.steps,
        final_loss=result.final_loss,
        evaluation=evaluation.status if evaluation else None,
        report_markdown=report.report_markdown.read_text(encoding="utf-8") if report else None,
        image=trainer_image(job),
    )
    (result.adapter_dir / MODEL_CARD_FILE).write_text(render_model_card(facts), encoding="utf-8")


def success_message(result: TrainResult, evaluation: EvaluationOutcome | None, output_uri: str) -> str:
    """One line for the summary: steps and loss, the headline comparison, where the artifacts are."""
    trained = f"trained {result.steps} steps"
    if result.final_loss is not None:
        trained += f" (loss {result.final_loss:.4f})"
    return "; ".join([trained, *outcome_sentences(evaluation, output_uri)])


# ----------------------------------------------------------------------------------------------------------------------
# The run


def run_stages(job: FineTuneJob, reporter: Reporter, settings: RunSettings, record: RunRecord) -> TrainerSummary:
    """Every stage in order; exceptions propagate to run_job, which turns them into the failed summary."""
    spec = job.spec
    check_runnable(spec)
    with record.stage(reporter, "data"):
        data = data_stage(spec, reporter)
        record.dataset = data.dataset_status()
    with record.stage(reporter, "model"):
        model_dir, data = model_stage(spec, data, settings, reporter)
        record.dataset = data.dataset_status()
    with record.stage(reporter, "train"):
        result = train_stage(spec, data, model_dir, settings, reporter)
    if not settings.is_main_process:
        # The main process evaluates and publishes; the others are done once training is.
        return TrainerSummary(outcome="Succeeded", message=f"trained {result.steps} steps", dataset=record.dataset)
    evaluation = None
    if spec.evaluation.enabled:
        with record.stage(reporter, "evaluate"):
            evaluation = evaluate_stage(spec, data, model_dir, result.adapter_dir, settings, reporter)
    with record.stage(reporter, "publish"):
        artifacts, usage = publish_stage(job, data, model_dir, result, evaluation, record, settings)
    return TrainerSummary(
        outcome="Succeeded",
        message=success_message(result, evaluation, spec.output.uri),
        metrics=run_metrics(result, evaluation, headline_only=True),
        dataset=record.dataset,
        evaluation=evaluation.status if evaluation else None,
        artifacts=artifacts,
        usage=usage,
    )


def default_settings(env: Mapping[str, str], work_dir: Path) -> RunSettings:
    """Local paths and process rank for a run whose scratch space is work_dir."""
    cache = env.get(ENV_MODEL_CACHE) or str(Path(tempfile.gettempdir()) / "kubetune-models")
    return RunSettings(
        work_dir=work_dir,
        model_cache_dir=Path(cache),
        is_main_process=Launch.from_env(env).is_main_process,
        world_size=Launch.from_env(env).world_size,
    )


def run_job(job: FineTuneJob, reporter: Reporter, settings: RunSettings | None = None) -> TrainerSummary:
    """Run one FineTuneJob through every stage and return its summary; a failure is a Failed summary, not a raise.

    Without settings the run works in a fresh temporary directory, removed afterwards. TrainingPreempted (SIGTERM
    while training, checkpoint uploaded) is the one exception that propagates: the caller exits for a retry.
    """
    from kubetune_trainer.train.trainer import TrainingPreempted

    record = RunRecord()
    with run_settings(settings) as effective:
        try:
            summary = run_stages(job, reporter, effective, record)
        except TrainingPreempted:
            raise
        except Exception as error:  # every failure must end as a summary with a reason
            failure = classify_failure(error)
            log.error(
                "%s in stage %s: %s",
                failure.reason,
                reporter.stage or "config",
                failure.message,
                exc_info=failure.reason == "InternalError",
                extra={"fields": {"reason": failure.reason}},
            )
            usage = UsageStatus(wall_seconds=record.wall_seconds())
            summary = failed_summary(failure, dataset=record.dataset, usage=usage)
    log.info("run finished: %s", summary.outcome, extra={"fields": {"reason": summary.reason}})
    return summary


@contextmanager
def run_settings(settings: RunSettings | None) -> Iterator[RunSettings]:
    """The given settings, or ones on a temporary work directory that is removed when the run ends."""
    if settings is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        yield settings
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-run-") as scratch:
        yield default_settings(os.environ, Path(scratch))


def shared_work_dir(env: Mapping[str, str]) -> Path | None:
    """The scratch directory every process of one multi-GPU launch shares (checkpoints hold each rank's files).

    The launcher's pid is the same for every rank and new for each launch; a single process gets None (a fresh
    temporary directory).
    """
    if not Launch.from_env(env).distributed:
        return None
    return Path(tempfile.gettempdir()) / f"kubetune-run-launch-{os.getppid()}"


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a multi-process launch (torchrun's WORLD_SIZE and RANK); one process: 1 and 0."""

    world_size: int = 1
    rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Launch:
        """Read from the launcher's environment; a value that is not a whole number is a ConfigError naming it."""
        values = {}
        for name, default in (("WORLD_SIZE", 1), ("RANK", 0)):
            raw = env.get(name) or str(default)
            try:
                values[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} from the launcher is not a whole number") from None
        return cls(world_size=max(1, values["WORLD_SIZE"]), rank=values["RANK"])

    @property
    def distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one that reports progress and publishes."""
        return self.rank == 0


def log_rank(env: Mapping[str, str]) -> int | None:
    """The rank each log line of a multi-process launch carries; None for one process (or one not yet known)."""
    try:
        launch = Launch.from_env(env)
    except ConfigError:
        return None  # the run itself refuses the launcher's values, in a log line of its own
    return launch.rank if launch.distributed else None


def run_in_process(job: FineTuneJob, reporter: Reporter, env: Mapping[str, str]) -> int:
    """run_job with this process's settings; writes the termination message (main process) and gives the exit code."""
    from kubetune.contract import EXIT_CODE_PREEMPTED
    from kubetune_trainer.train.trainer import TrainingPreempted

    work_dir = shared_work_dir(env)
    settings = default_settings(env, work_dir) if work_dir is not None else None
    try:
        summary = run_job(job, reporter, settings)
    except TrainingPreempted as preempted:
        # No summary: the pod is retried and resumes; a Failed summary here would outlive the run that succeeds.
        log.warning("%s", preempted)
        reporter.finish()
        return EXIT_CODE_PREEMPTED
    if Launch.from_env(env).is_main_process:
        # First: closing the status channel may wait on an API server that is away, and the termination message is
        # what the operator reads the result from.
        write_termination_message(summary, env)
    reporter.finish()
    if Launch.from_env(env).is_main_process and work_dir is not None:
        # The other ranks are done with the shared directory once training ended; only rank 0 went on.
        shutil.rmtree(work_dir, ignore_errors=True)
    return exit_code(summary)
