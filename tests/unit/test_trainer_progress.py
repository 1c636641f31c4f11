"""The trainer's progress channel without a cluster: JSON-lines logs, the reporter, status patch pacing, /metrics."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

import pytest
from kubernetes.client import ApiException
from kubetune_trainer.progress.reporter import (
    STAGES,
    JsonLinesFormatter,
    LogChannel,
    ProgressChannel,
    ProgressSettingsError,
    PrometheusChannel,
    Reporter,
    Stage,
    StatusPatcher,
    TrainingStep,
    json_logging,
    merged,
    metrics_port,
    progress_interval,
    reporter_from_environment,
    terminal_reporter,
)

from kubetune.api import DatasetStatus, EvaluationStatus, ProgressStatus

pytestmark = pytest.mark.unit


class RecordingStatusApi:
    """Stands in for CustomObjectsApi's one status call and records each patch body (in-process, no server)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with self.lock:
            self.bodies.append(args[5])
        return args[5]


class StageRecorder(ProgressChannel):
    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        self.stages.append(stage)


class BrokenChannel(ProgressChannel):
    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        raise RuntimeError("this channel is broken")


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------------------
# Settings from the environment


def test_interval_and_port_come_from_the_environment_with_defaults() -> None:
    assert progress_interval({}) == 10.0
    assert progress_interval({"KUBETUNE_PROGRESS_INTERVAL_SECONDS": "2.5"}) == 2.5
    assert metrics_port({}) is None
    assert metrics_port({"KUBETUNE_METRICS_PORT": "0"}) is None
    assert metrics_port({"KUBETUNE_METRICS_PORT": "9400"}) == 9400


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"KUBETUNE_PROGRESS_INTERVAL_SECONDS": "soon"}, "KUBETUNE_PROGRESS_INTERVAL_SECONDS"),
        ({"KUBETUNE_PROGRESS_INTERVAL_SECONDS": "-1"}, "KUBETUNE_PROGRESS_INTERVAL_SECONDS"),
        ({"KUBETUNE_METRICS_PORT": "http"}, "KUBETUNE_METRICS_PORT"),
        ({"KUBETUNE_METRICS_PORT": "70000"}, "KUBETUNE_METRICS_PORT"),
    ],
)
def test_malformed_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ProgressSettingsError, match=variable):
        reporter_from_environment(env)


def test_merge_follows_json_merge_patch_for_nested_objects() -> None:
    assert merged({"progress": {"step": 1, "loss": 2.0}, "dataset": {"trainRows": 3}}, {"progress": {"step": 2}}) == {
        "progress": {"step": 2, "loss": 2.0},
        "dataset": {"trainRows": 3},
    }


# ----------------------------------------------------------------------------------------------------------------------
# JSON-lines logs


def test_each_record_is_one_json_object_with_time_level_stage_message_and_fields() -> None:
    stream = io.StringIO()
    stage = {"now": "train"}
    logger = logging.getLogger("kubetune.test.progress")

    with json_logging(lambda: stage["now"], stream=stream):
        logger.info("step %d done", 3, extra={"fields": {"loss": 1.5}, "attempt": 2})
        stage["now"] = "evaluate"
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("evaluation failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]

    assert [line["stage"] for line in lines] == ["train", "evaluate"]
    first, second = lines
    assert set(first) == {"time", "level", "stage", "logger", "message", "fields"}
    assert first["level"] == "info"
    assert first["message"] == "step 3 done"
    assert first["fields"] == {"loss": 1.5, "attempt": 2}
    assert second["level"] == "error"
    assert "ValueError: boom" in second["traceback"]


def test_json_logging_is_removed_after_the_block() -> None:
    stream = io.StringIO()
    with json_logging(lambda: None, stream=stream):
        pass
    logging.getLogger("kubetune.test.progress").warning("after")

    assert stream.getvalue() == ""


def test_the_formatter_writes_values_json_cannot_hold_as_text() -> None:
    record = logging.makeLogRecord({"msg": "x", "levelname": "INFO", "fields": {"path": object}})

    line = json.loads(JsonLinesFormatter(lambda: "data").format(record))

    assert line["fields"]["path"].startswith("<class")


class SignalMidWrite(io.StringIO):
    """A stream during whose first write a real signal arrives (as SIGTERM may while a log line is written)."""

    def __init__(self) -> None:
        super().__init__()
        self.signalled = False

    def write(self, text: str) -> int:
        if not self.signalled:
            self.signalled = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().write(text)


def test_a_signal_handler_that_logs_mid_write_is_written_after_it_not_lost() -> None:
    stream = SignalMidWrite()
    logger = logging.getLogger("kubetune.test.progress")
    handled: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        logger.warning("checkpoint requested")
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:
        with json_logging(lambda: "train", stream=stream):
            logger.info("step 1 done")
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert handled == [signal.SIGUSR1]
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
        "step 1 done",
        "checkpoint requested",
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Reporter


def test_a_failing_channel_never_reaches_the_caller_and_the_others_still_hear() -> None:
    recorder = StageRecorder()
    reporter = Reporter([BrokenChannel(), recorder])

    for stage in STAGES:
        reporter.enter_stage(stage)
    reporter.finish()

    assert recorder.stages == list(STAGES)
    assert reporter.progress.stage == "publish"


def test_training_progress_keeps_the_stage_and_fills_the_progress() -> None:
    reporter = Reporter([])
    reporter.enter_stage("train")

    reporter(ProgressStatus(stage="train", step=4, total_steps=10, loss=1.25))
    reporter.enter_stage("evaluate")

    assert reporter.progress.stage == "evaluate"
    assert (reporter.progress.step, reporter.progress.total_steps, reporter.progress.loss) == (4, 10, 1.25)


def test_the_status_says_progress_with_its_unit_and_the_loss_to_four_significant_digits() -> None:
    reporter = Reporter([])
    reporter.enter_stage("data")
    assert reporter.progress.summary == "data"
    reporter.enter_stage("train")
    reporter(ProgressStatus(stage="train", step=120, total_steps=300, percent=40.0, loss=0.23025472164154054))
    assert (reporter.progress.summary, reporter.progress.loss) == ("train 40% (120/300 steps)", 0.2303)

    reporter.enter_stage("evaluate")
    assert reporter.progress.summary == "evaluate"
    reporter.report_evaluation(50, 200)
    assert reporter.progress.summary == "evaluate 25% (50/200 samples)"
    reporter.enter_stage("publish")
    assert reporter.progress.summary == "publish (120/300 steps trained)"


def test_the_terminal_reporter_has_no_bar_when_stderr_is_not_a_terminal() -> None:
    reporter = terminal_reporter(io.StringIO())

    assert [type(channel) for channel in reporter.channels] == [LogChannel]


def test_the_log_channel_reports_evaluation_at_a_bounded_rate_and_always_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = LogChannel(interval=3600)
    caplog.set_level(logging.INFO, logger="kubetune_trainer.progress.reporter")

    for done in range(1, 51):
        channel.evaluation_advanced(done, 50)

    reported = [
        getattr(record, "fields", None) for record in caplog.records if record.getMessage() == "evaluation progress"
    ]
    assert reported == [{"done": 1, "total": 50}, {"done": 50, "total": 50}]


# ----------------------------------------------------------------------------------------------------------------------
# Status patches: pacing, merging, forcing


def test_updates_between_patches_are_merged_not_lost_and_the_final_one_is_always_sent() -> None:
    api = RecordingStatusApi()
    patcher = StatusPatcher(api, "ns", "job", interval=3600)

    patcher.progress_changed(ProgressStatus(stage="train", step=1, loss=1.0), final=False)
    wait_until(lambda: len(api.bodies) == 1)
    for step in range(2, 21):
        patcher.progress_changed(ProgressStatus(stage="train", step=step, loss=1.0 / step), final=False)
    time.sleep(0.2)
    sent_within_the_interval = len(api.bodies)
    patcher.close()

    # The first update goes at once; the other 19 wait for the interval and leave as one merged patch on close.
    assert sent_within_the_interval == 1
    assert len(api.bodies) == 2
    assert api.bodies[0]["status"]["progress"]["step"] == 1
    assert api.bodies[-1]["status"]["progress"]["step"] == 20


def test_evaluation_progress_is_paced_like_training_and_its_end_is_sent_at_once() -> None:
    api = RecordingStatusApi()
    patcher = StatusPatcher(api, "ns", "job", interval=3600)
    reporter = Reporter([patcher])
    reporter.enter_stage("evaluate")
    wait_until(lambda: len(api.bodies) == 1)

    for done in range(1, 300):
        reporter.report_evaluation(done, 300)
    time.sleep(0.2)
    within_the_interval = len(api.bodies)
    reporter.report_evaluation(300, 300)
    wait_until(lambda: len(api.bodies) == 2)
    patcher.close()

    # 299 batches within the hour-long interval send nothing; the last sample is forced out, the counts merged into
    # one patch, and the reporter's own progress (its final word) carries them too.
    assert within_the_interval == 1
    sent = api.bodies[1]["status"]["progress"]
    assert {key: sent[key] for key in ("evalDone", "evalTotal", "evalPercent")} == {
        "evalDone": 300,
        "evalTotal": 300,
        "evalPercent": 100.0,
    }
    assert sent["summary"] == "evaluate 100% (300/300 samples)"
    assert sent["updatedAt"]
    assert reporter.progress.stage == "evaluate"
    assert (reporter.progress.eval_done, reporter.progress.eval_total) == (300, 300)


def test_stages_after_training_keep_the_evaluation_counts() -> None:
    api = RecordingStatusApi()
    patcher = StatusPatcher(api, "ns", "job", interval=3600)
    patcher.stage_changed("publish", ProgressStatus(stage="publish", eval_done=3, eval_total=3))
    wait_until(lambda: len(api.bodies) == 1)
    patcher.close()

    sent = api.bodies[0]["status"]["progress"]
    assert (sent["stage"], sent["evalDone"], sent["evalTotal"]) == ("publish", 3, 3)


def test_evaluation_percent_is_rounded_and_none_without_work() -> None:
    from kubetune_trainer.progress.reporter import evaluation_progress

    assert evaluation_progress(1, 3).eval_percent == 33.3
    assert evaluation_progress(0, 0).eval_percent is None


def test_forced_updates_do_not_wait_for_the_interval() -> None:
    api = RecordingStatusApi()
    patcher = StatusPatcher(api, "ns", "job", interval=3600)
    # The evaluation counts go out as nulls (deleted by the merge patch): a retry must not show the last attempt's.
    cleared = {"evalDone": None, "evalTotal": None, "evalPercent": None}
    expected = {"progress": {"stage": "data", **cleared}, "dataset": {"trainRows": 9}}

    patcher.stage_changed("data", ProgressStatus(stage="data"))
    patcher.dataset_measured(DatasetStatus(train_rows=9))
    deadline = time.monotonic() + 10
    sent: dict[str, Any] = {}
    while sent != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        with api.lock:
            sent = {}
            for body in api.bodies:
                sent = merged(sent, body["status"])
    patcher.close()

    # Both arrived before close, although the interval is an hour (they may share one patch).
    assert sent == expected


def test_an_unreachable_api_server_is_logged_and_training_goes_on() -> None:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configuration.retries = 0
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    patcher = StatusPatcher(api, "ns", "job", interval=0, flush_seconds=1.5)
    reporter = Reporter([patcher])

    started = time.monotonic()
    reporter.enter_stage("train")
    reporter(ProgressStatus(step=1))
    submitted_in = time.monotonic() - started
    reporter.finish()

    assert submitted_in < 0.5, "reporting must not wait for the API server"
    assert patcher.failures >= 2, "closing retries what is pending"
    assert patcher.sent == 0
    assert patcher.last_error is not None
    assert "Connection refused" in patcher.last_error or "MaxRetryError" in patcher.last_error


class AwayThenBackStatusApi(RecordingStatusApi):
    """An API server that fails the first `away` patches (restarting: connections refused, or 403 until its
    authorizers have synced), then takes them."""

    def __init__(self, away: int, error: Exception) -> None:
        super().__init__()
        self.away = away
        self.error = error
        self.calls = 0

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.away:
            raise self.error
        return super().patch_namespaced_custom_object_status(*args, **kwargs)


@pytest.mark.parametrize("away", [ConnectionRefusedError("the API server is restarting"), ApiException(status=403)])
def test_the_last_progress_lands_once_the_api_server_is_back_even_after_the_run_ended(away: Exception) -> None:
    api = AwayThenBackStatusApi(away=3, error=away)
    patcher = StatusPatcher(api, "ns", "job", interval=3600, flush_seconds=10)

    patcher.submit({"progress": {"step": 7}})
    patcher.submit({"progress": {"step": 40, "percent": 100.0}}, force=True)
    patcher.close()

    assert api.calls == 4
    assert api.bodies == [{"status": {"progress": {"step": 40, "percent": 100.0}}}]
    assert patcher.failures == 3


class RefusingStatusApi(RecordingStatusApi):
    """An API server on which the FineTuneJob is gone, as the Kubernetes client reports it (HTTP 404)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from kubernetes.client import ApiException

        self.calls += 1
        raise ApiException(status=404, reason="Not Found")


def test_a_refused_patch_is_not_retried_and_closing_does_not_wait_on_it() -> None:
    api = RefusingStatusApi()
    patcher = StatusPatcher(api, "ns", "job", interval=3600, flush_seconds=30)

    patcher.submit({"progress": {"step": 40}}, force=True)
    started = time.monotonic()
    patcher.close()

    assert api.calls == 1
    assert time.monotonic() - started < 5
    assert patcher.last_error == "HTTP 404: Not Found"


# ----------------------------------------------------------------------------------------------------------------------
# Prometheus endpoint


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_metrics_endpoint_serves_training_progress_and_evaluation_scores() -> None:
    channel = PrometheusChannel(free_port(), address="127.0.0.1")
    reporter = Reporter([channel])
    try:
        reporter.enter_stage("train")
        # A resumed run: 100 tokens were trained before this process started.
        reporter.report_step(TrainingStep(step=3, total_steps=10, trained_tokens=100, loss=None, learning_rate=1e-4))
        reporter.report_step(TrainingStep(step=4, total_steps=10, trained_tokens=160, loss=2.5, learning_rate=9e-5))
        reporter(ProgressStatus(step=4, total_steps=10, tokens_per_second=321.5))
        evaluation = EvaluationStatus(metric="accuracy", tuned=0.9, baselines={"zeroShot": 0.1, "fewShot": 0.4})
        reporter.report_scores({"tuned": {"accuracy": 0.9}}, evaluation)
        samples = scrape(channel.port)
    finally:
        reporter.finish()

    assert value(samples, "kubetune_trainer_step") == 4
    assert value(samples, "kubetune_trainer_total_steps") == 10
    assert value(samples, "kubetune_trainer_loss") == 2.5
    assert value(samples, "kubetune_trainer_learning_rate") == pytest.approx(9e-5)
    assert value(samples, "kubetune_trainer_tokens_per_second") == 321.5
    assert value(samples, "kubetune_trainer_trained_tokens_total") == 60
    assert value(samples, "kubetune_trainer_eval_score", model="tuned") == 0.9
    assert value(samples, "kubetune_trainer_eval_score", model="zeroShot") == 0.1
    assert value(samples, "kubetune_trainer_eval_score", model="fewShot") == 0.4


def test_the_metrics_endpoint_is_off_without_a_port_and_stops_with_the_reporter() -> None:
    port = free_port()
    off = reporter_from_environment({"KUBETUNE_METRICS_PORT": "0"})
    on = reporter_from_environment({"KUBETUNE_METRICS_PORT": str(port)})

    assert not any(isinstance(channel, PrometheusChannel) for channel in off.channels)
    assert value(scrape(port), "kubetune_trainer_step") == 0
    on.finish()
    with pytest.raises(OSError):
        scrape(port)


def test_without_a_job_name_there_is_no_status_channel() -> None:
    reporter = reporter_from_environment({"KUBETUNE_JOB_NAMESPACE": "ns"})

    assert not any(isinstance(channel, StatusPatcher) for channel in reporter.channels)


def test_the_json_log_leaves_out_each_http_request_of_the_openai_client_but_keeps_its_warnings() -> None:
    stream = io.StringIO()
    with json_logging(lambda: "evaluate", stream=stream):
        logging.getLogger("httpx").info('HTTP Request: POST http://judge/v1/chat/completions "HTTP/1.1 200 OK"')
        logging.getLogger("httpx").warning("connection pool is full")
        logging.getLogger("kubetune_trainer.evaluate.runner").info("judged tuned")
    messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert messages == ["connection pool is full", "judged tuned"]
    assert logging.getLogger("httpx").level == logging.NOTSET  # put back afterwards
