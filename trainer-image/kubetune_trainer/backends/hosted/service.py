"""The OpenAI fine-tuning API as the hosted backend uses it: error mapping, retries, idempotent uploads and jobs,
and the job's status, events and checkpoints turned into progress and metrics.

Idempotency: a training file is uploaded under a deterministic name (FineTuneJob uid, role, sha256 of the file's
content) and reused when files.list already has it; the job carries metadata {kubetune-uid: uid} and is looked up by
it (jobs.list with the metadata filter, checked again on this side for services that ignore the filter) before one is
created. So a pod that restarts at any point uploads nothing twice and creates no second job. A job that is
`cancelled` is not re-attached to: kubetune cancels its job on suspend, and a resumed job starts a new one.

Errors: 401/403 → HostedAuthError; 429 with code insufficient_quota → HostedQuotaExceeded; other 4xx →
HostedRequestRejected (a rejected file, a bad hyperparameter), each with the service's code and message. 408/409/
429/5xx and connection errors are retried by the SDK (`max_retries`, its backoff and the service's retry-after),
then by `call_service` with its own doubling backoff; still failing, HostedServiceUnavailable, which a retried pod
may get past. Every message is scrubbed of the API key.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from kubetune.api import OpenAISpec, ProgressStatus
from kubetune.conditions import (
    TRAINER_REASON_HOSTED_AUTH_ERROR,
    TRAINER_REASON_HOSTED_JOB_CANCELLED,
    TRAINER_REASON_HOSTED_JOB_FAILED,
    TRAINER_REASON_HOSTED_QUOTA_EXCEEDED,
    TRAINER_REASON_HOSTED_REQUEST_REJECTED,
    TRAINER_REASON_HOSTED_UNAVAILABLE,
)
from kubetune_trainer.backends.hosted.validation import HostedFile
from kubetune_trainer.evaluate.judge import redact
from kubetune_trainer.progress.reporter import Stage
from kubetune_trainer.train.progress import percent_done

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

METADATA_UID = "kubetune-uid"
FILE_PURPOSE: Final = "fine-tune"
FILE_MEDIA_TYPE = "application/jsonl"
QUOTA_CODE = "insufficient_quota"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# The service validates the uploaded files before queueing: the data stage goes on until it is done.
STAGE_OF_STATUS: dict[str, Stage] = {
    "validating_files": "data",
    "queued": "train",
    "running": "train",
    "succeeded": "train",
    "failed": "train",
    "cancelled": "train",
}
EVENTS_PER_POLL = 100
# Figures of metrics events and checkpoints, by the name the summary and manifest give them.
METRIC_NAMES = {
    "train_loss": "finalLoss",
    "train_mean_token_accuracy": "trainMeanTokenAccuracy",
    "valid_loss": "validLoss",
    "valid_mean_token_accuracy": "validMeanTokenAccuracy",
    "full_valid_loss": "fullValidLoss",
    "full_valid_mean_token_accuracy": "fullValidMeanTokenAccuracy",
}


class HostedServiceError(Exception):
    """The service refused or failed a request for good; `reason` is a TRAINER_REASON_HOSTED_* constant."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class HostedSettings:
    """How hard to try and how often to look."""

    sdk_max_retries: int = 3  # the SDK's retries of one request (408/409/429/5xx, connection), with its backoff
    request_timeout_seconds: float = 60.0  # per HTTP request
    transient_attempts: int = 5  # call_service's attempts, each with the SDK's retries, before giving up
    transient_backoff_seconds: float = 5.0  # call_service's first wait; doubled per attempt
    max_backoff_seconds: float = 120.0  # call_service's longest wait
    poll_interval_seconds: float = 10.0  # first wait between polls of the job, and again after every change
    max_poll_interval_seconds: float = 60.0  # longest wait between polls while nothing changes


@dataclass(frozen=True)
class StepMetrics:
    """The newest figures the service reported for a training step (a metrics event or a checkpoint)."""

    step: int
    total_steps: int | None = None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def train_loss(self) -> float | None:
        """The step's training loss."""
        return self.values.get("finalLoss")


@dataclass(frozen=True)
class HostedOutcome:
    """The finished hosted job, its checkpoints and the newest training figures."""

    job: FineTuningJob
    fine_tuned_model: str
    checkpoints: list[FineTuningJobCheckpoint]
    metrics: StepMetrics | None


def openai_client(spec: OpenAISpec, api_key: str, settings: HostedSettings) -> OpenAI:
    """The SDK client for openai.baseUrl (default: the SDK's, i.e. OPENAI_BASE_URL or OpenAI's) with bounded retries."""
    from openai import OpenAI

    return OpenAI(
        api_key=api_key,
        base_url=spec.base_url,
        max_retries=settings.sdk_max_retries,
        timeout=settings.request_timeout_seconds,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Errors and retries


def error_detail(error: Exception) -> str:
    """The service's own words: `HTTP 429 insufficient_quota: You exceeded your quota (param x)`, or the exception."""
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    code = getattr(error, "code", None)
    message = body.get("message") if isinstance(body, Mapping) else None
    text = str(message) if message else str(getattr(error, "message", "") or error)
    param = getattr(error, "param", None)
    parts = [f"HTTP {status}" if status is not None else type(error).__name__]
    if code:
        parts.append(f"{code}:")
    parts.append(text)
    if param:
        parts.append(f"(param {param})")
    return " ".join(parts)


def is_transient(error: Exception) -> bool:
    """Whether a retry may succeed: timeouts, connection errors, 408/409/429 (not quota) and 5xx."""
    from openai import APIConnectionError, APIStatusError

    if isinstance(error, APIConnectionError):
        return True
    if isinstance(error, APIStatusError):
        if error.status_code == 429:
            return error.code != QUOTA_CODE
        return error.status_code in (408, 409) or error.status_code >= 500
    return False


def permanent_error(error: Exception, action: str, api_key: str) -> HostedServiceError | None:
    """The HostedServiceError for a refusal no retry will change; None for anything else."""
    from openai import APIStatusError

    if not isinstance(error, APIStatusError) or is_transient(error):
        return None
    detail = redact(error_detail(error), api_key)
    if error.status_code in (401, 403):
        return HostedServiceError(
            TRAINER_REASON_HOSTED_AUTH_ERROR,
            f"{action}: {detail}; check the API key in the Secret named by openai.apiKeySecretRef",
        )
    if error.status_code == 429:
        return HostedServiceError(
            TRAINER_REASON_HOSTED_QUOTA_EXCEEDED, f"{action}: {detail}; the account's quota or billing limit is spent"
        )
    return HostedServiceError(TRAINER_REASON_HOSTED_REQUEST_REJECTED, f"{action}: {detail}")


def backoff_seconds(attempt: int, settings: HostedSettings) -> float:
    """The wait after the attempt-th failed call (1-based): doubling from transient_backoff_seconds, capped."""
    return float(min(settings.max_backoff_seconds, settings.transient_backoff_seconds * 2 ** (attempt - 1)))


def call_service(
    action: str,
    call: Callable[[], T],
    settings: HostedSettings,
    api_key: str,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """call() with transient failures retried (beyond the SDK's own retries); HostedServiceError otherwise."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as error:
            refused = permanent_error(error, action, api_key)
            if refused is not None:
                raise refused from None
            if not is_transient(error):
                raise
            detail = redact(error_detail(error), api_key)
            if attempt >= settings.transient_attempts:
                raise HostedServiceError(
                    TRAINER_REASON_HOSTED_UNAVAILABLE,
                    f"{action}: still failing after {attempt} attempts (each with the SDK's retries): {detail}",
                ) from None
            delay = backoff_seconds(attempt, settings)
            log.warning(
                "%s: %s; attempt %d of %d, next in %.1fs", action, detail, attempt, settings.transient_attempts, delay
            )
            sleep(delay)


# ----------------------------------------------------------------------------------------------------------------------
# Files and jobs


def hosted_file_name(uid: str, role: str, sha256: str) -> str:
    """The deterministic upload name: the same job and the same content give the same name."""
    return f"kubetune-{uid}-{role}-{sha256[:16]}.jsonl"


def find_uploaded_file(client: OpenAI, name: str, size: int) -> str | None:
    """The id of an earlier upload of this file (same name and size, not in error), if there is one."""
    for item in client.files.list(purpose=FILE_PURPOSE):
        if item.filename == name and item.bytes == size and getattr(item, "status", None) != "error":
            return item.id
    return None


def ensure_uploaded(client: OpenAI, name: str, hosted: HostedFile, settings: HostedSettings, api_key: str) -> str:
    """The id of the file in the service: an earlier upload of the same name and size, or a new upload."""
    existing = call_service(
        "list uploaded files", lambda: find_uploaded_file(client, name, len(hosted.content)), settings, api_key
    )
    if existing is not None:
        log.info("reusing uploaded file %s (%s)", existing, name)
        return existing
    created = call_service(
        f"upload {name}",
        lambda: client.files.create(file=(name, hosted.content, FILE_MEDIA_TYPE), purpose=FILE_PURPOSE),
        settings,
        api_key,
    )
    log.info("uploaded %s as %s (%d examples, %d bytes)", name, created.id, hosted.examples, len(hosted.content))
    return created.id


def auto_or(value: float | None) -> float | str:
    """A hyperparameter as the API takes it: the number, or "auto" when unset."""
    return "auto" if value is None else value


def job_create_params(spec: OpenAISpec, training_file: str, validation_file: str | None, uid: str) -> dict[str, Any]:
    """The keyword arguments of jobs.create: supervised method with its hyperparameters, metadata, suffix and seed."""
    hyperparameters = spec.hyperparameters
    params: dict[str, Any] = {
        "model": spec.model,
        "training_file": training_file,
        "metadata": {METADATA_UID: uid},
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": auto_or(hyperparameters.n_epochs),
                    "batch_size": auto_or(hyperparameters.batch_size),
                    "learning_rate_multiplier": auto_or(hyperparameters.learning_rate_multiplier),
                }
            },
        },
    }
    if validation_file is not None:
        params["validation_file"] = validation_file
    if spec.suffix:
        params["suffix"] = spec.suffix
    if spec.seed is not None:
        params["seed"] = spec.seed
    return params


def newest_live_job(jobs: list[FineTuningJob], uid: str) -> FineTuningJob | None:
    """The newest job carrying this uid that was not cancelled."""
    mine = [job for job in jobs if (job.metadata or {}).get(METADATA_UID) == uid and job.status != "cancelled"]
    return max(mine, key=lambda job: job.created_at) if mine else None


def find_job(client: OpenAI, uid: str, settings: HostedSettings, api_key: str) -> FineTuningJob | None:
    """The hosted job an earlier attempt of this FineTuneJob created, if any (see newest_live_job)."""
    jobs = call_service(
        "list fine-tuning jobs",
        lambda: list(client.fine_tuning.jobs.list(metadata={METADATA_UID: uid}, limit=100)),
        settings,
        api_key,
    )
    return newest_live_job(jobs, uid)


def create_job(client: OpenAI, params: dict[str, Any], settings: HostedSettings, api_key: str) -> FineTuningJob:
    """Create the hosted job."""
    job = call_service("create fine-tuning job", lambda: client.fine_tuning.jobs.create(**params), settings, api_key)
    log.info("created fine-tuning job %s on %s", job.id, job.model)
    return job


# ----------------------------------------------------------------------------------------------------------------------
# Status, events and checkpoints → progress and metrics


def is_figure(value: Any) -> bool:
    """A finite number (booleans are not figures)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def step_metrics_of(data: Mapping[str, Any]) -> StepMetrics | None:
    """A metrics event's data ({step, total_steps, train_loss, ...}) as StepMetrics; None without a step."""
    step = data.get("step")
    if not isinstance(step, int | float) or isinstance(step, bool):
        return None
    total = data.get("total_steps")
    values = {name: float(data[key]) for key, name in METRIC_NAMES.items() if is_figure(data.get(key))}
    return StepMetrics(
        step=int(step), total_steps=int(total) if isinstance(total, int | float) else None, values=values
    )


def newest_metrics(events: list[FineTuningJobEvent], previous: StepMetrics | None) -> StepMetrics | None:
    """The highest-step metrics among the events and what was known before, with the newest total steps given."""
    best = previous
    total = previous.total_steps if previous else None
    for event in events:
        if event.type != "metrics" or not isinstance(event.data, Mapping):
            continue
        metrics = step_metrics_of(event.data)
        if metrics is None:
            continue
        total = metrics.total_steps if metrics.total_steps is not None else total
        if best is None or metrics.step >= best.step:
            best = metrics
    if best is None:
        return None
    return StepMetrics(best.step, best.total_steps if best.total_steps is not None else total, best.values)


def checkpoint_metrics(checkpoints: list[FineTuningJobCheckpoint]) -> StepMetrics | None:
    """The newest checkpoint's metrics (the final one carries the full validation figures)."""
    if not checkpoints:
        return None
    newest = max(checkpoints, key=lambda checkpoint: checkpoint.step_number)
    data = {key: value for key, value in newest.metrics.model_dump().items() if value is not None}
    data["step"] = newest.step_number
    return step_metrics_of(data)


def resolved_epochs(job: FineTuningJob) -> int | None:
    """The number of epochs the service settled on (an int once "auto" is resolved)."""
    candidates: list[Any] = [job.hyperparameters.n_epochs if job.hyperparameters else None]
    method = job.method
    if method is not None and method.supervised is not None and method.supervised.hyperparameters is not None:
        candidates.append(method.supervised.hyperparameters.n_epochs)
    return next((value for value in candidates if isinstance(value, int) and not isinstance(value, bool)), None)


def progress_of(job: FineTuningJob, metrics: StepMetrics | None, now: float) -> ProgressStatus:
    """status.progress for the job: stage from its status; step, total, epoch, percent, loss from the newest metrics;
    ETA from estimated_finish."""
    stage = STAGE_OF_STATUS.get(job.status, "train")
    update: dict[str, Any] = {"stage": stage}
    if metrics is not None:
        update["step"] = metrics.step
        update["loss"] = metrics.train_loss
        if metrics.total_steps:
            update["total_steps"] = metrics.total_steps
            update["percent"] = percent_done(metrics.step, metrics.total_steps)
            epochs = resolved_epochs(job)
            if epochs:
                update["epoch"] = round(metrics.step / metrics.total_steps * epochs, 3)
    if job.status == "succeeded":
        update["percent"] = 100.0
        update["eta_seconds"] = 0
    elif job.estimated_finish:
        update["eta_seconds"] = max(0, math.ceil(job.estimated_finish - now))
    return ProgressStatus(**update)


def next_poll_delay(previous: float, changed: bool, settings: HostedSettings) -> float:
    """The first interval again after a change; doubled (up to the maximum) while nothing moves."""
    if changed:
        return settings.poll_interval_seconds
    return min(settings.max_poll_interval_seconds, previous * 2)


def finished_job(
    client: OpenAI, job: FineTuningJob, metrics: StepMetrics | None, settings: HostedSettings, api_key: str
) -> HostedOutcome:
    """The succeeded job with its checkpoints; HostedServiceError with the service's code and message otherwise."""
    if job.status == "failed":
        error = job.error
        detail = f"{error.code}: {error.message}" if error else "no error given"
        if error is not None and error.param:
            detail += f" (param {error.param})"
        raise HostedServiceError(
            TRAINER_REASON_HOSTED_JOB_FAILED, redact(f"hosted fine-tuning job {job.id} failed: {detail}", api_key)
        )
    if job.status == "cancelled":
        raise HostedServiceError(
            TRAINER_REASON_HOSTED_JOB_CANCELLED,
            f"hosted fine-tuning job {job.id} was cancelled outside kubetune (not by a suspend or delete)",
        )
    if not job.fine_tuned_model:
        raise HostedServiceError(
            TRAINER_REASON_HOSTED_JOB_FAILED, f"hosted fine-tuning job {job.id} succeeded but names no fine-tuned model"
        )
    checkpoints: list[FineTuningJobCheckpoint] = call_service(
        f"list checkpoints of {job.id}",
        lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data),
        settings,
        api_key,
    )
    final = checkpoint_metrics(checkpoints)
    merged = metrics
    if final is not None and (metrics is None or final.step >= metrics.step):
        total = final.total_steps or (metrics.total_steps if metrics else None)
        merged = StepMetrics(final.step, total, {**(metrics.values if metrics else {}), **final.values})
    return HostedOutcome(job=job, fine_tuned_model=job.fine_tuned_model, checkpoints=checkpoints, metrics=merged)
