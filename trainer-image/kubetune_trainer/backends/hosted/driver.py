"""backend openai: `python -m kubetune_trainer hosted` fine-tunes a FineTuneJob through the OpenAI API from its pod.

Design. The hosted job is driven by a small pod, not by the operator: for `backend: openai` the operator creates the
same trainer Job as for local jobs, with 0 GPUs, the command `python -m kubetune_trainer hosted` and OPENAI_API_KEY
from openai.apiKeySecretRef by secretKeyRef. So the operator never reads Secrets (the key reaches only this pod), and
the Job/Pod lifecycle, events, phase mapping, progress channel (status.progress patches), termination-message summary
and retries are exactly the local backend's.

Stages: data (prepare_data as for local jobs; train and validation Examples as chat JSONL, checked against the
service's limits before any upload; then the upload, the job's creation and the service's own file validation) →
train (queued, running: step, total, epoch, loss and ETA from the job's metrics events and estimated_finish) →
evaluate (the hosted fine-tuned model vs the hosted base model zero- and few-shot, through chat completions, with local
jobs' metrics, report and gate) → publish (eval/ and manifest.json under output.uri, as local jobs do).

Restarts: files and the job are found again by name and metadata and never made twice (see hosted_service).

SIGTERM while the job is being created or followed: the pod reads its own FineTuneJob (its Role may get
finetunejobs/status, whose GET returns the whole object). Being deleted (deletionTimestamp, or already gone) or
suspended (spec.runPolicy.suspend) → the hosted job is cancelled, and a resumed FineTuneJob starts a new one;
otherwise it is a preemption and the job is left running for the retried pod to re-attach to. Either way the pod exits
143 without a summary. When the FineTuneJob cannot be read the job is left running: a wrong cancel throws away paid
work, a wrong keep is re-attached to or cancelled by hand. Outside those stages SIGTERM ends the process as usual
(the retried pod re-attaches and evaluates again).

The API key is read from OPENAI_API_KEY, handed to the SDK only and scrubbed from every message; it is never logged
and never in the summary or the status.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobSpec, OpenAISpec, UsageStatus
from kubetune.conditions import TRAINER_REASON_HOSTED_UNAVAILABLE, TRAINER_REASON_INTERNAL_ERROR
from kubetune.contract import ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_OPENAI_API_KEY, EXIT_CODE_PREEMPTED, TrainerSummary
from kubetune_trainer.backends.hosted.publish import hosted_publish_stage, hosted_run_metrics, success_message
from kubetune_trainer.backends.hosted.service import (
    EVENTS_PER_POLL,
    STAGE_OF_STATUS,
    TERMINAL_STATUSES,
    HostedServiceError,
    HostedSettings,
    StepMetrics,
    call_service,
    create_job,
    ensure_uploaded,
    find_job,
    finished_job,
    hosted_file_name,
    job_create_params,
    newest_metrics,
    next_poll_delay,
    openai_client,
    progress_of,
)
from kubetune_trainer.backends.hosted.validation import HostedFile, hosted_file, limits_for
from kubetune_trainer.evaluate.judge import redact
from kubetune_trainer.failures import (
    EXIT_CODE_RETRYABLE,
    ConfigError,
    EvaluationError,
    classify_failure,
    exit_code,
    failed_summary,
)
from kubetune_trainer.pipeline import (
    EvaluationOutcome,
    RunRecord,
    check_spec_uris,
    data_stage,
    finite_tables,
    judge_for,
    load_job,
    refuse_config,
    write_termination_message,
)
from kubetune_trainer.progress.reporter import (
    ProgressSettingsError,
    Reporter,
    TrainingStep,
    describe_api_error,
    json_logging,
    kubernetes_api,
    reporter_from_environment,
)

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

    from kubetune_trainer.data.rows import PreparedData

log = logging.getLogger(__name__)

CancelCheck = Callable[[], bool]
"""Asked on SIGTERM: whether the FineTuneJob is being deleted or suspended, so the hosted job must be cancelled."""

ENV_HOSTED_POLL_SECONDS = "KUBETUNE_HOSTED_POLL_SECONDS"  # first wait between polls of the hosted job (default 10)
# While nothing changes the wait doubles, up to this many times the first.
POLL_BACKOFF_LIMIT = 6
STATUS_READ_TIMEOUT = (3.0, 10.0)


class HostedPreempted(Exception):  # noqa: N818 - an outcome the entry point maps to an exit code
    """SIGTERM while the hosted job was created or followed; the pod exits 143 without a summary."""

    def __init__(self, job_id: str | None, cancelled: bool) -> None:
        what = "cancelled" if cancelled else "left running for the retried pod to re-attach to"
        super().__init__(f"SIGTERM: hosted fine-tuning job {job_id or '(not created)'} {what}")
        self.job_id = job_id
        self.cancelled = cancelled


@dataclass(frozen=True)
class HostedFiles:
    """The validated JSONL files: training always, validation when there are held-out rows."""

    train: HostedFile
    validation: HostedFile | None


@dataclass
class HostedState:
    """What the run learned about its hosted job so far; a failure's summary keeps it."""

    job_id: str | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None


class StopSignal:
    """SIGTERM as an event the train stage waits on instead of dying."""

    def __init__(self) -> None:
        self.event = threading.Event()

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Catch SIGTERM while the block runs (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def requested(signum: int, frame: object) -> None:
            log.warning("SIGTERM: deciding whether to cancel the hosted job or leave it running")
            self.event.set()

        previous = signal.signal(signal.SIGTERM, requested)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------------
# Config


def hosted_settings_from_environment(env: Mapping[str, str]) -> HostedSettings:
    """The defaults, with the poll interval from KUBETUNE_HOSTED_POLL_SECONDS when set; ConfigError when malformed."""
    raw = env.get(ENV_HOSTED_POLL_SECONDS, "").strip()
    if not raw:
        return HostedSettings()
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV_HOSTED_POLL_SECONDS}={raw!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{ENV_HOSTED_POLL_SECONDS}={raw!r} must be more than 0 seconds")
    return HostedSettings(poll_interval_seconds=seconds, max_poll_interval_seconds=seconds * POLL_BACKOFF_LIMIT)


def job_uid(job: FineTuneJob) -> str:
    """metadata.uid (the operator's manifest carries it); namespace.name for a manifest run by hand, which is only
    unique as long as no other cluster or earlier job of that name uses the same account."""
    uid = (job.metadata.model_extra or {}).get("uid")
    if uid:
        return str(uid)
    fallback = f"{job.metadata.namespace or 'default'}.{job.metadata.name}"
    log.warning("the FineTuneJob has no metadata.uid; its hosted job is keyed by %s", fallback)
    return fallback


def check_hosted_runnable(spec: FineTuneJobSpec, api_key: str) -> OpenAISpec:
    """spec.openai, after refusing what the hosted backend cannot run (ConfigError naming the field)."""
    if spec.backend != "openai" or spec.openai is None:
        raise ConfigError(
            f"backend {spec.backend} is run by `python -m kubetune_trainer run`; `hosted` runs backend openai"
        )
    if not api_key:
        ref = spec.openai.api_key_secret_ref
        raise ConfigError(
            f"{ENV_OPENAI_API_KEY} is empty: the operator fills it from openai.apiKeySecretRef "
            f"(secret {ref.name!r}, key {ref.key!r})"
        )
    # The hosted service has the model: no model.uri to check.
    check_spec_uris(spec, include_model=False)
    # A loss-only evaluation or a gate on loss is refused with the spec (the CRD's rules): a hosted model gives no
    # token probabilities.
    return spec.openai


# ----------------------------------------------------------------------------------------------------------------------
# SIGTERM: cancel or leave running


def is_stopped_by_user(finetunejob: Mapping[str, Any]) -> bool:
    """Whether the FineTuneJob is being deleted or is suspended (spec.runPolicy.suspend)."""
    metadata = finetunejob.get("metadata") or {}
    run_policy = (finetunejob.get("spec") or {}).get("runPolicy") or {}
    return bool(metadata.get("deletionTimestamp")) or bool(run_policy.get("suspend"))


def read_own_finetunejob(api: Any, namespace: str, name: str) -> Mapping[str, Any] | None:
    """The pod's FineTuneJob, None when it is gone.

    Read as the answer of an empty merge patch of its status: the trainer ServiceAccount may patch FineTuneJob status
    and nothing else, and the trainer admission policy lets that patch through for this pod's own job only (a `get`
    would have to be granted for every job of the namespace). An empty patch changes nothing and writes nothing.
    """
    from kubernetes.client.exceptions import ApiException

    try:
        result: Mapping[str, Any] = api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {},
            _content_type="application/merge-patch+json",
            _request_timeout=STATUS_READ_TIMEOUT,
        )
    except ApiException as error:
        # Deleting a FineTuneJob removes it before garbage collection reaches its trainer Job and this pod, so a
        # deletion shows as 404. Any other refusal cannot tell deletion from preemption: the caller leaves the job.
        if error.status == 404:
            return None
        raise
    return result


def cancel_check_from_environment(env: Mapping[str, str]) -> CancelCheck:
    """The SIGTERM question for this pod: reads KUBETUNE_JOB_NAMESPACE/KUBETUNE_JOB_NAME with the pod's credentials."""
    name, namespace = env.get(ENV_JOB_NAME, ""), env.get(ENV_JOB_NAMESPACE, "")

    def should_cancel() -> bool:
        if not name or not namespace:
            log.warning(
                "no %s/%s: cannot tell suspension from preemption; leaving the job running",
                ENV_JOB_NAMESPACE,
                ENV_JOB_NAME,
            )
            return False
        try:
            current = read_own_finetunejob(kubernetes_api(env), namespace, name)
        except Exception as error:  # an unreadable FineTuneJob must not cancel paid work
            log.warning(
                "cannot read FineTuneJob %s/%s (%s); leaving the hosted job running",
                namespace,
                name,
                describe_api_error(error),
            )
            return False
        return current is None or is_stopped_by_user(current)

    return should_cancel


def stop_hosted_job(
    client: OpenAI, job_id: str | None, should_cancel: CancelCheck, settings: HostedSettings, api_key: str
) -> HostedPreempted:
    """After SIGTERM: cancel the job when the FineTuneJob is deleted or suspended, else leave it; the exception."""
    if not should_cancel():
        log.warning("SIGTERM without deletion or suspension: hosted job %s left running", job_id)
        return HostedPreempted(job_id, cancelled=False)
    if job_id is None:
        return HostedPreempted(None, cancelled=True)
    try:
        call_service(
            f"cancel fine-tuning job {job_id}",
            lambda: client.fine_tuning.jobs.cancel(job_id),
            settings,
            api_key,
        )
    except HostedServiceError as error:
        log.error("could not cancel hosted job %s: %s", job_id, error)
        return HostedPreempted(job_id, cancelled=False)
    log.warning("FineTuneJob deleted or suspended: hosted job %s cancelled", job_id)
    return HostedPreempted(job_id, cancelled=True)


# ----------------------------------------------------------------------------------------------------------------------
# Data and the hosted job


def hosted_files(spec: FineTuneJobSpec, openai_spec: OpenAISpec, data: PreparedData) -> HostedFiles:
    """Training and validation examples as JSONL the service will take; DataError with dataset lines otherwise."""
    limits = limits_for(openai_spec.model)
    train = hosted_file(data.train, limits, f"dataset.train {spec.dataset.train}", min_examples=limits.min_examples)
    source = spec.dataset.validation or spec.dataset.train
    validation_field = "dataset.validation" if spec.dataset.validation else "dataset.train (validation split)"
    validation = (
        hosted_file(data.validation, limits, f"{validation_field} {source}", role="validation")
        if data.validation
        else None
    )
    return HostedFiles(train=train, validation=validation)


def start_or_attach(
    client: OpenAI,
    openai_spec: OpenAISpec,
    uid: str,
    files: HostedFiles,
    settings: HostedSettings,
    api_key: str,
    stop: StopSignal,
    should_cancel: CancelCheck,
) -> FineTuningJob:
    """The hosted job of an earlier attempt, or a new one on the (reused or fresh) uploads."""
    existing = find_job(client, uid, settings, api_key)
    if existing is not None:
        log.info("re-attaching to hosted job %s (%s)", existing.id, existing.status)
        return existing
    training_id = ensure_uploaded(
        client, hosted_file_name(uid, "train", files.train.sha256), files.train, settings, api_key
    )
    validation_id = None
    if files.validation is not None:
        name = hosted_file_name(uid, "validation", files.validation.sha256)
        validation_id = ensure_uploaded(client, name, files.validation, settings, api_key)
    if stop.event.is_set():
        raise stop_hosted_job(client, None, should_cancel, settings, api_key)
    return create_job(client, job_create_params(openai_spec, training_id, validation_id, uid), settings, api_key)


def log_events(events: list[FineTuningJobEvent]) -> None:
    """The service's message events in the pod log (metrics events become progress instead)."""
    for event in events:
        if event.type == "metrics":
            continue
        level = {"warn": logging.WARNING, "error": logging.ERROR}.get(event.level, logging.INFO)
        log.log(level, "hosted job: %s", event.message)


def report_metrics(reporter: Reporter, metrics: StepMetrics | None, reported_step: int | None) -> int | None:
    """A new step to the per-step channels (Prometheus gauges); the step now reported."""
    if metrics is None or metrics.step == reported_step:
        return reported_step
    reporter.report_step(
        TrainingStep(
            step=metrics.step,
            total_steps=metrics.total_steps or 0,
            trained_tokens=0,
            loss=metrics.train_loss,
            learning_rate=None,
        )
    )
    return metrics.step


def follow_job(
    client: OpenAI,
    job_id: str,
    reporter: Reporter,
    settings: HostedSettings,
    api_key: str,
    stop: StopSignal,
    should_cancel: CancelCheck,
) -> tuple[FineTuningJob, StepMetrics | None]:
    """Poll the job and its new events until it ends, reporting progress; HostedPreempted on SIGTERM."""
    delay = settings.poll_interval_seconds
    metrics: StepMetrics | None = None
    seen: set[str] = set()
    previous: tuple[str, int | None] | None = None
    reported_step: int | None = None
    while True:
        current = call_service(
            f"get fine-tuning job {job_id}", lambda: client.fine_tuning.jobs.retrieve(job_id), settings, api_key
        )
        page = call_service(
            f"list events of {job_id}",
            lambda: client.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PER_POLL),
            settings,
            api_key,
        )
        # The service lists events newest first.
        fresh = [event for event in reversed(page.data) if event.id not in seen]
        seen.update(event.id for event in fresh)
        log_events(fresh)
        metrics = newest_metrics(fresh, metrics)
        stage = STAGE_OF_STATUS.get(current.status, "train")
        if reporter.stage != stage:
            reporter.enter_stage(stage)
        progress = progress_of(current, metrics, time.time())
        reporter(progress)
        reported_step = report_metrics(reporter, metrics, reported_step)
        if current.status in TERMINAL_STATUSES:
            return current, metrics
        # The ETA moves on every poll; only the status and the step count as a change worth polling sooner for.
        observed = (current.status, progress.step)
        if previous is not None:
            delay = next_poll_delay(delay, observed != previous, settings)
        previous = observed
        if stop.event.wait(delay):
            raise stop_hosted_job(client, job_id, should_cancel, settings, api_key)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def hosted_evaluate_stage(
    spec: FineTuneJobSpec,
    data: PreparedData,
    client: OpenAI,
    fine_tuned_model: str,
    api_key: str,
    work_dir: Path,
    reporter: Reporter,
) -> EvaluationOutcome:
    """The hosted fine-tuned model vs the hosted base model, scored, gated and written as local jobs' report."""
    from kubetune_trainer.backends.hosted.evaluation import (
        MAX_CONCURRENCY,
        HostedModels,
        reply_token_cap,
        run_hosted_evaluation,
    )
    from kubetune_trainer.chat_endpoint import ChatEndpoint
    from kubetune_trainer.evaluate.gate import evaluate_gate
    from kubetune_trainer.evaluate.report import evaluation_status, write_report
    from kubetune_trainer.evaluate.runner import EvaluationInputError

    assert spec.openai is not None
    evaluation = spec.evaluation
    references = [example.completion for example in data.validation[: evaluation.max_samples]]
    endpoint = ChatEndpoint(
        client,
        api_key,
        concurrency=min(evaluation.batch_size, MAX_CONCURRENCY),
        max_tokens=reply_token_cap(evaluation, references),
        seed=spec.openai.seed if spec.openai.seed is not None else spec.training.seed,
    )
    judge = judge_for(spec)
    try:
        results = run_hosted_evaluation(
            endpoint,
            HostedModels(tuned=fine_tuned_model, base=spec.openai.model),
            data.validation,
            data.train,
            evaluation,
            dataset_format=data.format,
            labels=data.labels,
            seed=spec.training.seed,
            judge=judge,
            progress=reporter.report_evaluation,
        )
    except EvaluationInputError as error:
        raise EvaluationError(f"evaluation: {error}") from error
    finally:
        if judge is not None:
            judge.close()
    gate_spec = evaluation.gate
    gate = evaluate_gate(gate_spec, results.metric_tables()) if gate_spec is not None else None
    report = write_report(work_dir / "eval", results, gate, gate_spec.fail_job if gate_spec else False)
    status = evaluation_status(results, gate)
    tables = finite_tables(results)
    reporter.report_scores(tables, status)
    return EvaluationOutcome(status=status, tables=tables, report=report)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def run_hosted_stages(
    job: FineTuneJob,
    reporter: Reporter,
    *,
    api_key: str,
    work_dir: Path,
    settings: HostedSettings,
    should_cancel: CancelCheck,
    record: RunRecord,
    state: HostedState,
) -> TrainerSummary:
    """Every stage in order; exceptions propagate to run_hosted, which turns them into the failed summary."""
    spec = job.spec
    openai_spec = check_hosted_runnable(spec, api_key)
    uid = job_uid(job)
    with record.stage(reporter, "data"):
        data = data_stage(spec, reporter)
        record.dataset = data.dataset_status()
        files = hosted_files(spec, openai_spec, data)
    client = openai_client(openai_spec, api_key, settings)
    try:
        stop = StopSignal()
        began = time.monotonic()
        with stop.installed():
            hosted_job = start_or_attach(client, openai_spec, uid, files, settings, api_key, stop, should_cancel)
            state.job_id = hosted_job.id
            final, metrics = follow_job(client, hosted_job.id, reporter, settings, api_key, stop, should_cancel)
        record.timings["train"] = round(time.monotonic() - began, 3)
        state.fine_tuned_model = final.fine_tuned_model
        state.trained_tokens = final.trained_tokens
        outcome = finished_job(client, final, metrics, settings, api_key)
        evaluation = None
        if spec.evaluation.enabled:
            with record.stage(reporter, "evaluate"):
                evaluation = hosted_evaluate_stage(
                    spec, data, client, outcome.fine_tuned_model, api_key, work_dir, reporter
                )
    finally:
        client.close()
    usage = UsageStatus(trained_tokens=final.trained_tokens, wall_seconds=record.wall_seconds())
    with record.stage(reporter, "publish"):
        artifacts = hosted_publish_stage(job, data, outcome, evaluation, record, usage)
    return TrainerSummary(
        outcome="Succeeded",
        message=success_message(outcome, evaluation, spec.output.uri),
        metrics=hosted_run_metrics(outcome.metrics, evaluation, headline_only=True),
        dataset=record.dataset,
        evaluation=evaluation.status if evaluation else None,
        artifacts=artifacts,
        usage=usage.model_copy(update={"wall_seconds": record.wall_seconds()}),
        fine_tuned_model=outcome.fine_tuned_model,
    )


def run_hosted(
    job: FineTuneJob,
    reporter: Reporter,
    *,
    api_key: str,
    work_dir: Path,
    settings: HostedSettings | None = None,
    should_cancel: CancelCheck = lambda: False,
) -> TrainerSummary:
    """Run one backend-openai FineTuneJob and return its summary; a failure is a Failed summary, not a raise.

    HostedPreempted (SIGTERM while the hosted job was created or followed) is the one exception that propagates: the
    caller exits 143 for a retry. `should_cancel` answers, on SIGTERM, whether the FineTuneJob is deleted or suspended.
    """
    record = RunRecord()
    state = HostedState()
    try:
        summary = run_hosted_stages(
            job,
            reporter,
            api_key=api_key,
            work_dir=work_dir,
            settings=settings or HostedSettings(),
            should_cancel=should_cancel,
            record=record,
            state=state,
        )
    except HostedPreempted:
        raise
    except Exception as error:  # every failure must end as a summary with a reason
        classified = classify_failure(error)
        failure = dataclasses.replace(classified, message=redact(classified.message, api_key))
        log.error(
            "%s in stage %s: %s",
            failure.reason,
            reporter.stage or "config",
            failure.message,
            exc_info=failure.reason == TRAINER_REASON_INTERNAL_ERROR,
            extra={"fields": {"reason": failure.reason, "hostedJob": state.job_id}},
        )
        usage = UsageStatus(trained_tokens=state.trained_tokens, wall_seconds=record.wall_seconds())
        summary = failed_summary(failure, dataset=record.dataset, usage=usage, fine_tuned_model=state.fine_tuned_model)
    log.info("hosted run finished: %s", summary.outcome, extra={"fields": {"reason": summary.reason}})
    return summary


def hosted_exit_code(summary: TrainerSummary) -> int:
    """exit_code, except that a service still unavailable after every retry is worth a retried pod (75)."""
    if summary.outcome == "Failed" and summary.reason == TRAINER_REASON_HOSTED_UNAVAILABLE:
        return EXIT_CODE_RETRYABLE
    return exit_code(summary)


def hosted_main(config: Path | None, env: Mapping[str, str]) -> int:
    """The `hosted` command: run the job, write the termination message, and give the exit code."""
    reporters: list[Reporter] = []
    with json_logging(lambda: reporters[0].stage if reporters else None):
        try:
            reporters.append(reporter_from_environment(env))
            job = load_job(config, env)
            settings = hosted_settings_from_environment(env)
        except (ConfigError, ProgressSettingsError) as error:
            return refuse_config(error, env, reporters)
        reporter = reporters[0]
        with tempfile.TemporaryDirectory(prefix="kubetune-hosted-") as scratch:
            try:
                summary = run_hosted(
                    job,
                    reporter,
                    api_key=env.get(ENV_OPENAI_API_KEY, ""),
                    work_dir=Path(scratch),
                    settings=settings,
                    should_cancel=cancel_check_from_environment(env),
                )
            except HostedPreempted as preempted:
                # No summary: a retried pod re-attaches; a Failed summary here would outlive the run that succeeds.
                log.warning("%s", preempted)
                reporter.finish()
                return EXIT_CODE_PREEMPTED
        reporter.finish()
        write_termination_message(summary, env)
        return hosted_exit_code(summary)
