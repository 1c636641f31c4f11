"""The trainer's progress channel: its FineTuneJob's status, Prometheus gauges, JSON-lines logs, a terminal bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from kubetune.api import GROUP, PLURAL, VERSION, DatasetStatus, EvaluationStatus, ProgressStatus, significant, utc_now
from kubetune.contract import ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_METRICS_PORT, ENV_PROGRESS_INTERVAL
from kubetune_trainer.train.progress import DEFAULT_PROGRESS_INTERVAL_SECONDS, RateLimit, TrainingStep

log = logging.getLogger(__name__)

Stage = Literal["data", "model", "train", "evaluate", "publish"]
STAGES_BEFORE_EVALUATION: frozenset[str] = frozenset({"data", "model", "train"})
EVALUATION_PROGRESS_FIELDS = ("evalDone", "evalTotal", "evalPercent")
STAGES: tuple[Stage, ...] = ("data", "model", "train", "evaluate", "publish")
FIELD_MANAGER = "kubetune-trainer"
MERGE_PATCH = "application/merge-patch+json"
# (connect, read) seconds per status patch; patches go out from a background thread, so a slow API never stalls a step.
STATUS_REQUEST_TIMEOUT = (3.0, 10.0)
# How long closing keeps retrying the last status patch (the API server may be restarting); the termination message
# carries the result if it never lands.
STATUS_FLUSH_SECONDS = 60.0
# Backoff between attempts after a failed patch: doubling from the first to the second.
STATUS_RETRY_SECONDS = 0.5
STATUS_RETRY_MAX_SECONDS = 5.0
METRIC_PREFIX = "kubetune_trainer"
HTTP_CLIENT_LOGGERS = ("httpx", "httpx2")


class ProgressSettingsError(ValueError):
    """A KUBETUNE_* progress setting in the environment is malformed; the message names the variable."""


def merged(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` laid over `base` the way a JSON merge patch applies (nested objects merge, other values replace)."""
    result = dict(base)
    for key, value in update.items():
        old = result.get(key)
        result[key] = merged(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return result


def evaluation_progress(done: int, total: int) -> ProgressStatus:
    """status.progress's evaluation fields: samples scored (summed over every pass), of how many, and the percent."""
    percent = round(100.0 * min(done, total) / total, 1) if total > 0 else None
    progress = ProgressStatus(eval_done=done, eval_total=total, eval_percent=percent, updated_at=utc_now())
    return progress.model_copy(update={"summary": progress_summary(progress.model_copy(update={"stage": "evaluate"}))})


def progress_summary(progress: ProgressStatus) -> str | None:
    """The progress in words with its unit, as `kubectl get ftj` shows it: `train 40% (120/300 steps)`,
    `evaluate 25% (50/200 samples)`, or the stage alone."""
    if progress.stage == "train" and progress.step is not None and progress.total_steps:
        return f"train {progress.percent or 0:.0f}% ({progress.step}/{progress.total_steps} steps)"
    if progress.stage == "evaluate" and progress.eval_total and progress.eval_done is not None:
        return f"evaluate {progress.eval_percent or 0:.0f}% ({progress.eval_done}/{progress.eval_total} samples)"
    if progress.stage == "publish" and progress.step is not None and progress.total_steps:
        return f"publish ({progress.step}/{progress.total_steps} steps trained)"
    return progress.stage


def for_status(progress: ProgressStatus) -> ProgressStatus:
    """progress as the status shows it: its summary in words, the loss to four significant digits."""
    return progress.model_copy(update={"summary": progress_summary(progress), "loss": significant(progress.loss)})


def progress_interval(env: Mapping[str, str]) -> float:
    """KUBETUNE_PROGRESS_INTERVAL_SECONDS (default 10): the least seconds between status patches."""
    raw = env.get(ENV_PROGRESS_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_INTERVAL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ProgressSettingsError(f"{ENV_PROGRESS_INTERVAL}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ProgressSettingsError(f"{ENV_PROGRESS_INTERVAL}={raw!r} must be zero or more seconds")
    return value


def metrics_port(env: Mapping[str, str]) -> int | None:
    """KUBETUNE_METRICS_PORT as a port number; None (no endpoint) when unset or 0."""
    raw = env.get(ENV_METRICS_PORT, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ProgressSettingsError(f"{ENV_METRICS_PORT}={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ProgressSettingsError(f"{ENV_METRICS_PORT}={raw!r} is outside 0-65535")
    return port or None


# ----------------------------------------------------------------------------------------------------------------------
# Channels: each gets every event and ignores what it has no use for.


class ProgressChannel:
    """One place progress goes. Every method is a no-op here; channels override the events they use."""

    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        """A new stage began; `progress` is the whole progress so far with the new stage set."""

    def dataset_measured(self, dataset: DatasetStatus) -> None:
        """Pre-flight (or the token measurement after it) described the data."""

    def progress_changed(self, progress: ProgressStatus, final: bool) -> None:
        """Training progress at a bounded rate; `final` for the last word of the run."""

    def step_finished(self, step: TrainingStep) -> None:
        """Every optimizer step (cheap consumers only: gauges, a bar)."""

    def evaluation_advanced(self, done: int, total: int) -> None:
        """Units of evaluation work done so far."""

    def scores_known(self, tables: Mapping[str, Mapping[str, float]], evaluation: EvaluationStatus) -> None:
        """Evaluation finished: every model's scores and the headline."""

    def close(self) -> None:
        """Flush and release what the channel holds."""


class LogChannel(ProgressChannel):
    """Progress as log records (JSON lines on stderr once json logging is installed); evaluation at a bounded rate."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = RateLimit(interval)
        self.clock = clock

    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        log.info("stage %s", stage)

    def dataset_measured(self, dataset: DatasetStatus) -> None:
        log.info("dataset", extra={"fields": dataset.to_wire()})

    def progress_changed(self, progress: ProgressStatus, final: bool) -> None:
        log.info("progress", extra={"fields": progress.to_wire()})

    def evaluation_advanced(self, done: int, total: int) -> None:
        if self.limit.allow(self.clock(), force=done >= total):
            log.info("evaluation progress", extra={"fields": {"done": done, "total": total}})

    def scores_known(self, tables: Mapping[str, Mapping[str, float]], evaluation: EvaluationStatus) -> None:
        log.info("evaluation scores", extra={"fields": {"models": {k: dict(v) for k, v in tables.items()}}})


class TerminalBar(ProgressChannel):
    """A tqdm bar on a terminal: optimizer steps while training, work units while evaluating."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None
        self.kind: str | None = None

    def _bar(self, kind: str, total: int, initial: int = 0) -> Any:
        if self.bar is not None and self.kind == kind and self.bar.total == total:
            return self.bar
        self.close()
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        unit = "step" if kind == "train" else "unit"
        self.bar = tqdm(total=total, initial=initial, desc=kind, unit=unit, file=self.stream, dynamic_ncols=True)
        self.kind = kind
        return self.bar

    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        self.close()

    def step_finished(self, step: TrainingStep) -> None:
        if step.total_steps <= 0:
            return
        bar = self._bar("train", step.total_steps, initial=max(0, step.step - 1))
        bar.update(step.step - bar.n)
        if step.loss is not None:
            bar.set_postfix(loss=f"{step.loss:.4f}", refresh=False)

    def evaluation_advanced(self, done: int, total: int) -> None:
        if total <= 0:
            return
        bar = self._bar("evaluate", total)
        bar.update(done - bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        self.kind = None


class PrometheusChannel(ProgressChannel):
    """The trainer's /metrics endpoint: step, totals, loss, learning rate, throughput, tokens and evaluation scores."""

    def __init__(self, port: int, address: str = "0.0.0.0") -> None:  # Prometheus scrapes the pod IP
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        # A registry of its own: several runs in one process (kubetune train -f many.yaml) must not collide.
        self.registry = CollectorRegistry()
        self.step = Gauge(f"{METRIC_PREFIX}_step", "Optimizer steps done.", registry=self.registry)
        self.total_steps = Gauge(f"{METRIC_PREFIX}_total_steps", "Optimizer steps planned.", registry=self.registry)
        self.loss = Gauge(f"{METRIC_PREFIX}_loss", "Latest logged training loss.", registry=self.registry)
        self.learning_rate = Gauge(f"{METRIC_PREFIX}_learning_rate", "Current learning rate.", registry=self.registry)
        self.tokens_per_second = Gauge(
            f"{METRIC_PREFIX}_tokens_per_second", "Real (non-pad) tokens trained per second.", registry=self.registry
        )
        self.trained_tokens = Counter(
            f"{METRIC_PREFIX}_trained_tokens", "Real (non-pad) tokens trained by this process.", registry=self.registry
        )
        self.eval_score = Gauge(
            f"{METRIC_PREFIX}_eval_score",
            "Headline evaluation score per model (tuned, zeroShot, fewShot).",
            ["model"],
            registry=self.registry,
        )
        self.counted_tokens: int | None = None
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

    @property
    def port(self) -> int:
        """The port the endpoint listens on."""
        return int(self.server.server_port)

    def step_finished(self, step: TrainingStep) -> None:
        self.step.set(step.step)
        self.total_steps.set(step.total_steps)
        if step.loss is not None and math.isfinite(step.loss):
            self.loss.set(step.loss)
        if step.learning_rate is not None:
            self.learning_rate.set(step.learning_rate)
        # A resumed run starts with tokens already seen; the counter counts only this process's.
        if self.counted_tokens is None:
            self.counted_tokens = step.trained_tokens
        if step.trained_tokens > self.counted_tokens:
            self.trained_tokens.inc(step.trained_tokens - self.counted_tokens)
            self.counted_tokens = step.trained_tokens

    def progress_changed(self, progress: ProgressStatus, final: bool) -> None:
        if progress.tokens_per_second is not None:
            self.tokens_per_second.set(progress.tokens_per_second)

    def scores_known(self, tables: Mapping[str, Mapping[str, float]], evaluation: EvaluationStatus) -> None:
        if evaluation.tuned is not None:
            self.eval_score.labels(model="tuned").set(evaluation.tuned)
        for model, score in evaluation.baselines.items():
            self.eval_score.labels(model=model).set(score)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StatusPatcher(ProgressChannel):
    """Merge-patches status.progress and status.dataset of one FineTuneJob through the status subresource.

    A background thread sends the patches, at most one per `interval` seconds except forced ones (stage changes, the
    dataset, the final update); updates that arrive in between are merged, never dropped. A failed patch is logged and
    its content retried with backoff, merged with anything newer: the API server being away (a restart, an upgrade)
    must never stop training, and what it missed lands once it is back. Closing keeps retrying what is pending for up
    to its timeout, so a run that ends while the API server is away still leaves its last progress behind.
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        flush_seconds: float = STATUS_FLUSH_SECONDS,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self.flush_seconds = flush_seconds
        self.clock = clock
        self.sent = 0
        self.failures = 0
        self.last_error: str | None = None
        self._pending: dict[str, Any] = {}
        self._force = False
        self._closing = False
        self._close_deadline = math.inf
        self._last_attempt: float | None = None
        self._retry_delay = 0.0  # after a failed patch: how long to wait before the next attempt
        self._retryable = True  # whether the last failure may pass (the API away), or never will (refused)
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kubetune-status-patcher", daemon=True)
        self._thread.start()

    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        wire = progress.to_wire()
        if stage in STAGES_BEFORE_EVALUATION:
            # A retried attempt starts over: the last attempt's evaluation counts are deleted (null in a merge patch).
            wire = {**dict.fromkeys(EVALUATION_PROGRESS_FIELDS), **wire}
        self.submit({"progress": wire}, force=True)

    def dataset_measured(self, dataset: DatasetStatus) -> None:
        self.submit({"dataset": dataset.to_wire()}, force=True)

    def progress_changed(self, progress: ProgressStatus, final: bool) -> None:
        self.submit({"progress": progress.to_wire()}, force=final)

    def evaluation_advanced(self, done: int, total: int) -> None:
        # Paced like training progress (one patch per interval at most); the last sample goes out at once.
        self.submit({"progress": evaluation_progress(done, total).to_wire()}, force=done >= total)

    def submit(self, status: dict[str, Any], force: bool = False) -> None:
        """Queue fields of .status; sent at once when forced, else when `interval` has passed since the last patch."""
        with self._wake:
            self._pending = merged(self._pending, status)
            self._force = self._force or force
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Send what is pending, retrying for up to `timeout` seconds (flush_seconds by default), and stop the
        thread."""
        timeout = self.flush_seconds if timeout is None else timeout
        with self._wake:
            self._closing = True
            self._close_deadline = self.clock() + timeout
            self._wake.notify()
        self._thread.join(timeout + STATUS_REQUEST_TIMEOUT[0] + STATUS_REQUEST_TIMEOUT[1])
        if self._thread.is_alive():
            log.warning("status patch still in flight after %.0fs; giving up on it", timeout)
        elif self._pending:
            log.warning("the last status update was not delivered within %.0fs: %s", timeout, self.last_error)

    def _due_in(self) -> float:
        if self._last_attempt is None:
            return 0.0
        since = self.clock() - self._last_attempt
        if self._retry_delay:  # the last patch failed: back off, whatever is asking for this one
            return max(0.0, self._retry_delay - since)
        if self._force or self._closing:
            return 0.0
        return max(0.0, self.interval - since)

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    if self._closing and (not self._pending or self.clock() >= self._close_deadline):
                        return
                    due_in = self._due_in()
                    if self._pending and due_in == 0.0:
                        break
                    wait = due_in if self._pending else None
                    if self._closing:
                        wait = min(due_in, max(0.0, self._close_deadline - self.clock()))
                    self._wake.wait(timeout=wait)
                body, self._pending, self._force = self._pending, {}, False
            delivered = self._send(body)
            with self._wake:
                self._last_attempt = self.clock()
                if delivered or not self._retryable:  # a refused patch is dropped: sent again, it would fail again
                    self._retry_delay = 0.0
                else:
                    # Newer values win over the failed ones; everything goes out with the next attempt.
                    self._pending = merged(body, self._pending)
                    self._retry_delay = min(max(2 * self._retry_delay, STATUS_RETRY_SECONDS), STATUS_RETRY_MAX_SECONDS)

    def _send(self, status: dict[str, Any]) -> bool:
        self._retryable = True
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                {"status": status},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
                _request_timeout=STATUS_REQUEST_TIMEOUT,
            )
        except Exception as error:  # any failure of the API must stay out of training
            self.failures += 1
            self.last_error = describe_api_error(error)
            self._retryable = is_retryable(error)
            log.warning("cannot patch the status of FineTuneJob %s/%s: %s", self.namespace, self.name, self.last_error)
            return False
        self.sent += 1
        return True


# Refusals that a retry of the same patch cannot turn into success: malformed, the FineTuneJob gone, invalid. 401 and
# 403 are not among them: an API server that is starting answers them until its authorizers have synced.
PERMANENT_HTTP_STATUSES = frozenset({400, 404, 410, 422})


def is_retryable(error: Exception) -> bool:
    """Anything but a refusal of the patch itself (a connection failure, a timeout, a server error, an API server
    still starting): worth sending again."""
    return getattr(error, "status", None) not in PERMANENT_HTTP_STATUSES


def describe_api_error(error: Exception) -> str:
    """An API failure in one line: the HTTP status and the server's message, or the connection error."""
    status = getattr(error, "status", None)
    body = getattr(error, "body", None)
    if status is not None:
        message = ""
        if body:
            try:
                message = str(json.loads(body).get("message", ""))
            except (ValueError, AttributeError):
                message = str(body)[:200]
        return f"HTTP {status}: {message or getattr(error, 'reason', '')}".strip()
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def kubernetes_api(env: Mapping[str, str]) -> Any:
    """A CustomObjectsApi from KUBECONFIG (its first file) when set, else the pod's in-cluster service account."""
    from kubernetes import client, config

    kubeconfig = env.get("KUBECONFIG", "").split(os.pathsep)[0]
    if kubeconfig:
        return client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.CustomObjectsApi(client.ApiClient(configuration))


# ----------------------------------------------------------------------------------------------------------------------
# The reporter every stage talks to


class Reporter:
    """Fans progress out to its channels; a channel that fails is logged and skipped, never raised to the caller.

    It is also the training stage's ProgressSink (call it with a ProgressStatus) and the evaluation's progress
    callback (`report_evaluation`), which the judge calls from its worker threads.
    """

    def __init__(
        self, channels: Sequence[ProgressChannel], interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS
    ) -> None:
        self.channels = list(channels)
        self.interval = interval
        self.stage: Stage | None = None
        self.progress = ProgressStatus()
        self._lock = threading.Lock()

    def _each(self, event: str, *args: Any) -> None:
        for channel in self.channels:
            try:
                getattr(channel, event)(*args)
            except Exception:  # progress must never fail the run
                log.warning("progress channel %s failed on %s", type(channel).__name__, event, exc_info=True)

    def enter_stage(self, stage: Stage) -> None:
        """Start a stage: data, model, train, evaluate or publish (always reported at once)."""
        with self._lock:
            self.stage = stage
            self.progress = for_status(self.progress.model_copy(update={"stage": stage, "updated_at": utc_now()}))
            self._each("stage_changed", stage, self.progress)

    def report_dataset(self, dataset: DatasetStatus) -> None:
        """What pre-flight found in the data (status.dataset)."""
        with self._lock:
            self._each("dataset_measured", dataset)

    def __call__(self, progress: ProgressStatus) -> None:
        """Training progress from the training stage's tracker (already at a bounded rate)."""
        with self._lock:
            update = progress.model_dump(exclude_none=True)
            self.progress = for_status(
                self.progress.model_copy(update={**update, "stage": self.stage or progress.stage})
            )
            self._each("progress_changed", self.progress, False)

    def report_step(self, step: TrainingStep) -> None:
        """Every optimizer step."""
        with self._lock:
            self._each("step_finished", step)

    def report_evaluation(self, done: int, total: int) -> None:
        """Evaluation work done so far (samples scored, summed over every pass)."""
        with self._lock:
            update = evaluation_progress(done, total).model_dump(exclude_none=True)
            self.progress = for_status(self.progress.model_copy(update=update))
            self._each("evaluation_advanced", done, total)

    def report_scores(self, tables: Mapping[str, Mapping[str, float]], evaluation: EvaluationStatus) -> None:
        """The evaluation's scores."""
        with self._lock:
            self._each("scores_known", tables, evaluation)

    def finish(self) -> None:
        """The final update of the run (always sent), then every channel flushed and closed."""
        with self._lock:
            self.progress = self.progress.model_copy(update={"updated_at": utc_now()})
            self._each("progress_changed", self.progress, True)
            self._each("close")


def reporter_from_environment(env: Mapping[str, str], is_main_process: bool = True) -> Reporter:
    """The trainer pod's reporter: logs always; on the main process the status patches and the metrics endpoint.

    Status patches need KUBETUNE_JOB_NAME and KUBETUNE_JOB_NAMESPACE (the operator sets both); without them, or
    without credentials, the run goes on with logs only.
    """
    interval = progress_interval(env)
    channels: list[ProgressChannel] = [LogChannel(interval)]
    if not is_main_process:
        return Reporter(channels, interval)
    name, namespace = env.get(ENV_JOB_NAME, ""), env.get(ENV_JOB_NAMESPACE, "")
    if name and namespace:
        try:
            channels.append(StatusPatcher(kubernetes_api(env), namespace, name, interval))
        except Exception as error:  # no credentials is a degraded run, not a failed one
            log.warning("status.progress will not be reported: %s: %s", type(error).__name__, error)
    port = metrics_port(env)
    if port is not None:
        try:
            channels.append(PrometheusChannel(port))
        except OSError as error:
            log.warning("no metrics endpoint on port %d: %s", port, error)
    if sys.stderr.isatty():
        channels.append(TerminalBar(sys.stderr))
    return Reporter(channels, interval)


def terminal_reporter(stream: TextIO | None = None, interval: float = 1.0) -> Reporter:
    """The reporter of `kubetune train`: no Kubernetes, a bar when `stream` (stderr) is a terminal, logs."""
    target = stream if stream is not None else sys.stderr
    channels: list[ProgressChannel] = [LogChannel(interval)]
    if target.isatty():
        channels.append(TerminalBar(target))
    return Reporter(channels, interval)


# ----------------------------------------------------------------------------------------------------------------------
# JSON-lines logs


LOG_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "fields"}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, stage, logger, message, fields; the traceback when there is one, and
    the process's rank under a multi-GPU launch (every rank logs to the same container log)."""

    def __init__(self, stage_of: Callable[[], str | None], rank: int | None = None) -> None:
        super().__init__()
        self.stage_of = stage_of
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", None) or {})
        # Anything else passed through `extra=` is a field too.
        fields.update({k: v for k, v in vars(record).items() if k not in LOG_RECORD_ATTRIBUTES})
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "stage": self.stage_of(),
            "logger": record.name,
            "message": record.getMessage(),
            "fields": fields,
        }
        if self.rank is not None:
            entry["rank"] = self.rank
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TerminalSafeHandler(logging.StreamHandler[TextIO]):
    """Writes around a live tqdm bar on a terminal, plainly elsewhere; safe to log from a signal handler.

    A signal handler that logs (the SIGTERM checkpoint request does) runs between two bytecodes of this thread,
    possibly in the middle of a write: re-entering the stream then raises "reentrant call", and the handler would
    die before doing its job. Such a record is held back and written once the interrupted write is done.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.writing = False
        self.deferred: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's own contract: report, never raise
            self.handleError(record)
            return
        if self.writing:
            self.deferred.append(line)
            return
        self.writing = True
        try:
            self.write_line(line)
            while self.deferred:
                self.write_line(self.deferred.pop(0))
        except Exception:
            self.handleError(record)
        finally:
            self.writing = False

    def write_line(self, line: str) -> None:
        """One line to the stream, through tqdm when a bar may be showing."""
        if self.stream.isatty():
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.flush()


@contextmanager
def json_logging(
    stage_of: Callable[[], str | None], stream: TextIO | None = None, level: int = logging.INFO, rank: int | None = None
) -> Iterator[None]:
    """Route every log record (and warnings) to `stream` (stderr) as JSON lines while the block runs."""
    root = logging.getLogger()
    handler = TerminalSafeHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLinesFormatter(stage_of, rank))
    previous_level = root.level
    # The openai SDK's HTTP client logs every request at INFO: a line per judge or contender call would bury the
    # progress lines (failed calls are logged by the judge and the contenders).
    http_loggers = [logging.getLogger(name) for name in HTTP_CLIENT_LOGGERS]
    http_levels = [logger.level for logger in http_loggers]
    # Handlers already there (a test harness's capture) stay; a pod's root logger has none.
    root.addHandler(handler)
    root.setLevel(level)
    for logger in http_loggers:
        logger.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(previous_level)
        for logger, previous in zip(http_loggers, http_levels, strict=True):
            logger.setLevel(previous)
