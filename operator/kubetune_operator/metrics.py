"""The operator's Prometheus metrics, on its own registry: job counts by phase, transitions, errors, per-job gauges."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.api import FineTuneJobStatus, Phase

PHASES: tuple[str, ...] = get_args(Phase)
NEW_PHASE = "New"  # from_phase of a job's first transition
EVAL_MODEL_TUNED = "tuned"
JOB_LABELS = ("namespace", "job")
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime, None when absent or unreadable."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def gpu_seconds(status: FineTuneJobStatus, gpus: int, now: datetime) -> float | None:
    """GPU-seconds used: the trainer's own figure when reported, else GPUs × the trainer Job's run time so far."""
    if status.usage is not None and status.usage.gpu_seconds is not None:
        return status.usage.gpu_seconds
    trainer = status.trainer
    start = parse_time(trainer.start_time) if trainer else None
    if start is None or gpus <= 0:
        return None
    end = (parse_time(trainer.completion_time) if trainer else None) or now
    return max(0.0, (end - start).total_seconds()) * gpus


def progress_ratio(status: FineTuneJobStatus) -> float | None:
    """Training progress 0-1: the trainer's percent, 1 once Succeeded."""
    if status.phase == "Succeeded":
        return 1.0
    if status.progress is not None and status.progress.percent is not None:
        return min(1.0, max(0.0, status.progress.percent / 100))
    return None


def eval_scores(status: FineTuneJobStatus) -> dict[str, float]:
    """Headline score per model: tuned and each baseline (zeroShot, fewShot)."""
    evaluation = status.evaluation
    if evaluation is None:
        return {}
    scores = dict(evaluation.baselines)
    if evaluation.tuned is not None:
        scores[EVAL_MODEL_TUNED] = evaluation.tuned
    return scores


# Every kopf handler that counts its errors; their series start at 0 so that rate()/increase() have data before the
# first error (handlers.counted() refuses a name missing here).
# kopf's event handlers, and the steps whose failures they (or the status workers) count on their own.
HANDLERS = (
    "finetunejob_event",
    "trainer_job_event",
    "trainer_pod_event",
    "workload_event",
    "trainer_identity_event",
    "ensure_trainer",
    "apply_suspend",
    "reconcile_status",
    "ensure_serving",
    "serving_event",
    "ensure_check",
    "endpoint_check_event",
)


@dataclass
class OperatorMetrics:
    """All operator metrics on one registry; per-job series carry {namespace, job} and go when the job goes."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _phases: dict[tuple[str, str], str] = field(default_factory=dict)
    _eval_models: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Gauge("kubetune_jobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.transitions = Counter(
            "kubetune_job_phase_transitions", "FineTuneJob phase changes.", ["from_phase", "to_phase"], registry=r
        )
        self.handler_errors = Counter(
            "kubetune_handler_errors", "Handler calls that raised, by handler.", ["handler"], registry=r
        )
        self.reconcile_duration = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Seconds to derive and write one FineTuneJob's status.",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.progress = Gauge("kubetune_job_progress_ratio", "Training progress, 0 to 1.", JOB_LABELS, registry=r)
        self.train_loss = Gauge("kubetune_job_train_loss", "Latest training loss.", JOB_LABELS, registry=r)
        self.tokens_per_second = Gauge(
            "kubetune_job_tokens_per_second", "Real (non-pad) tokens trained per second.", JOB_LABELS, registry=r
        )
        self.eval_score = Gauge(
            "kubetune_job_eval_score",
            "Headline evaluation score of the tuned adapter and each prompting baseline.",
            [*JOB_LABELS, "model"],
            registry=r,
        )
        # A gauge, not a Counter: the value is read from status (and may be restated by the trainer), not counted here.
        self.gpu_seconds = Gauge(
            "kubetune_job_gpu_seconds_total", "GPU-seconds used by the job's trainer.", JOB_LABELS, registry=r
        )
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
        for handler in HANDLERS:
            self.handler_errors.labels(handler)

    def observe_job(self, namespace: str, job: str, status: FineTuneJobStatus, gpus: int, now: datetime) -> None:
        """Refresh the job's phase count and per-job gauges from its status."""
        key = (namespace, job)
        with self._lock:
            if status.phase:
                self._move_phase(key, status.phase)
            progress = status.progress
            _set_or_clear(self.progress, key, progress_ratio(status))
            _set_or_clear(self.train_loss, key, progress.loss if progress else None)
            _set_or_clear(self.tokens_per_second, key, progress.tokens_per_second if progress else None)
            _set_or_clear(self.gpu_seconds, key, gpu_seconds(status, gpus, now))
            scores = eval_scores(status)
            for model in self._eval_models.get(key, set()) - scores.keys():
                _remove(self.eval_score, (*key, model))
            for model, score in scores.items():
                self.eval_score.labels(*key, model).set(score)
            self._eval_models[key] = set(scores)

    def forget_job(self, namespace: str, job: str) -> None:
        """Drop every series of a deleted job and its phase from the counts."""
        key = (namespace, job)
        with self._lock:
            self._move_phase(key, None)
            for gauge in (self.progress, self.train_loss, self.tokens_per_second, self.gpu_seconds):
                _remove(gauge, key)
            for model in self._eval_models.pop(key, set()):
                _remove(self.eval_score, (*key, model))

    def record_transition(self, from_phase: str | None, to_phase: str) -> None:
        """Count one phase change."""
        self.transitions.labels(from_phase or NEW_PHASE, to_phase).inc()

    def record_handler_error(self, handler: str) -> None:
        """Count one failed handler call."""
        self.handler_errors.labels(handler).inc()

    @contextmanager
    def timed_reconcile(self) -> Iterator[None]:
        """Observe the duration of the enclosed reconcile pass."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.reconcile_duration.observe(time.perf_counter() - started)

    def serve(self, port: int, address: str) -> MetricsServer:
        """Serve /metrics over HTTP; port 0 picks a free one (see MetricsServer.port)."""
        server, thread = start_http_server(port, address, registry=self.registry)
        return MetricsServer(server, thread)

    def _move_phase(self, key: tuple[str, str], phase: str | None) -> None:
        # Only the two phases involved change: a recount of every job on every status write would make a burst of
        # N jobs cost N^2 (lock held meanwhile).
        previous = self._phases.pop(key, None)
        if phase is not None:
            self._phases[key] = phase
        if previous == phase:
            return
        if previous is not None:
            self.jobs.labels(previous).dec()
        if phase is not None:
            self.jobs.labels(phase).inc()


@dataclass
class MetricsServer:
    """A running /metrics HTTP server."""

    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _set_or_clear(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    if value is None:
        _remove(gauge, labels)
    else:
        gauge.labels(*labels).set(value)


def _remove(gauge: Gauge, labels: tuple[str, ...]) -> None:
    # prometheus_client raises KeyError for a series that was never set; absent is what we want either way.
    try:
        gauge.remove(*labels)
    except KeyError:
        return
