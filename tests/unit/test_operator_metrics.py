"""Operator metrics scraped over real HTTP from the operator's own registry: counts, transitions, per-job gauges."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from kubetune_operator.metrics import PHASES, MetricsServer, OperatorMetrics, gpu_seconds, progress_ratio
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import FineTuneJobStatus

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC)


@pytest.fixture
def served() -> Iterator[tuple[OperatorMetrics, MetricsServer]]:
    metrics = OperatorMetrics()
    server = metrics.serve(0, "127.0.0.1")
    yield metrics, server
    server.stop()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def job_labels(job: str = "demo", **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"namespace": "team", "job": job, **extra}.items()))


def status(**fields: object) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(fields)


RUNNING = status(
    phase="Running",
    progress={"stage": "train", "percent": 40.0, "loss": 1.25, "tokensPerSecond": 290.0},
    trainer={"jobName": "demo-trainer", "startTime": "2026-01-01T00:30:00Z"},
)
SUCCEEDED = status(
    phase="Succeeded",
    progress={"stage": "publish", "percent": 100.0, "loss": 0.5},
    evaluation={"metric": "accuracy", "tuned": 0.88, "baselines": {"zeroShot": 0.08, "fewShot": 0.31}},
    usage={"gpuSeconds": 7200.0},
)


def test_jobs_by_phase_counts_each_job_once(served: tuple[OperatorMetrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.observe_job("team", "a", RUNNING, 1, NOW)
    metrics.observe_job("team", "b", RUNNING, 1, NOW)
    metrics.observe_job("team", "a", SUCCEEDED, 1, NOW)
    samples = scrape(server)
    assert samples["kubetune_jobs", (("phase", "Running"),)] == 1
    assert samples["kubetune_jobs", (("phase", "Succeeded"),)] == 1
    assert samples["kubetune_jobs", (("phase", "Failed"),)] == 0
    metrics.forget_job("team", "a")
    assert scrape(server)["kubetune_jobs", (("phase", "Succeeded"),)] == 0


def test_jobs_by_phase_never_count_a_repeated_status_or_an_unknown_job(
    served: tuple[OperatorMetrics, MetricsServer],
) -> None:
    metrics, server = served
    for _ in range(3):
        metrics.observe_job("team", "a", RUNNING, 1, NOW)
    metrics.observe_job("team", "a", FineTuneJobStatus(), 1, NOW)  # no phase yet: keeps the known one
    assert scrape(server)["kubetune_jobs", (("phase", "Running"),)] == 1
    metrics.forget_job("team", "never-seen")
    metrics.forget_job("team", "a")
    metrics.forget_job("team", "a")
    samples = scrape(server)
    assert all(samples["kubetune_jobs", (("phase", phase),)] == 0 for phase in PHASES)
    metrics.observe_job("team", "b", RUNNING, 1, NOW)
    assert scrape(server)["kubetune_jobs", (("phase", "Running"),)] == 1


def test_per_job_gauges_follow_the_status(served: tuple[OperatorMetrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.observe_job("team", "demo", RUNNING, 2, NOW)
    samples = scrape(server)
    assert samples["kubetune_job_progress_ratio", job_labels()] == 0.4
    assert samples["kubetune_job_train_loss", job_labels()] == 1.25
    assert samples["kubetune_job_tokens_per_second", job_labels()] == 290.0
    assert samples["kubetune_job_gpu_seconds_total", job_labels()] == 2 * 1800.0
    assert not any(name == "kubetune_job_eval_score" for name, _ in samples)

    metrics.observe_job("team", "demo", SUCCEEDED, 2, NOW)
    samples = scrape(server)
    assert samples["kubetune_job_progress_ratio", job_labels()] == 1.0
    assert samples["kubetune_job_gpu_seconds_total", job_labels()] == 7200.0
    assert ("kubetune_job_tokens_per_second", job_labels()) not in samples
    assert samples["kubetune_job_eval_score", job_labels(model="tuned")] == 0.88
    assert samples["kubetune_job_eval_score", job_labels(model="zeroShot")] == 0.08
    assert samples["kubetune_job_eval_score", job_labels(model="fewShot")] == 0.31


def test_a_deleted_jobs_series_are_removed(served: tuple[OperatorMetrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.observe_job("team", "demo", SUCCEEDED, 1, NOW)
    metrics.observe_job("team", "other", RUNNING, 1, NOW)
    metrics.forget_job("team", "demo")
    samples = scrape(server)
    assert not any(dict(labels).get("job") == "demo" for _, labels in samples)
    assert samples["kubetune_job_train_loss", job_labels("other")] == 1.25
    metrics.forget_job("team", "never-seen")  # deleting an unknown job is harmless


def test_transitions_errors_and_reconcile_durations(served: tuple[OperatorMetrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.record_transition(None, "Pending")
    metrics.record_transition("Pending", "Running")
    metrics.record_transition("Pending", "Running")
    metrics.record_handler_error("ensure_trainer")
    with metrics.timed_reconcile():
        pass
    with pytest.raises(RuntimeError), metrics.timed_reconcile():
        raise RuntimeError("a failed pass is timed too")
    samples = scrape(server)
    transitions = "kubetune_job_phase_transitions_total"
    assert samples[transitions, (("from_phase", "New"), ("to_phase", "Pending"))] == 1
    assert samples[transitions, (("from_phase", "Pending"), ("to_phase", "Running"))] == 2
    assert samples["kubetune_handler_errors_total", (("handler", "ensure_trainer"),)] == 1
    assert samples["kubetune_reconcile_duration_seconds_count", ()] == 2


def test_registries_are_separate_per_operator() -> None:
    first, second = OperatorMetrics(), OperatorMetrics()
    first.record_handler_error("x")
    assert first.registry is not second.registry
    assert second.registry.get_sample_value("kubetune_handler_errors_total", {"handler": "x"}) is None


@pytest.mark.parametrize(
    ("fields", "gpus", "expected"),
    [
        ({"usage": {"gpuSeconds": 10.0}, "trainer": {"startTime": "2026-01-01T00:00:00Z"}}, 8, 10.0),
        ({"trainer": {"startTime": "2026-01-01T00:00:00Z"}}, 2, 7200.0),
        ({"trainer": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:10:00Z"}}, 4, 2400.0),
        ({"trainer": {"startTime": "2026-01-01T00:00:00Z"}}, 0, None),
        ({}, 1, None),
        ({"trainer": {"startTime": "not a time"}}, 1, None),
    ],
    ids=["reported", "running", "finished", "no gpus", "not started", "unreadable"],
)
def test_gpu_seconds(fields: dict[str, object], gpus: int, expected: float | None) -> None:
    assert gpu_seconds(status(**fields), gpus, NOW) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"phase": "Running", "progress": {"percent": 12.5}}, 0.125),
        ({"phase": "Running", "progress": {"percent": 130.0}}, 1.0),
        ({"phase": "Succeeded"}, 1.0),
        ({"phase": "Pending"}, None),
    ],
)
def test_progress_ratio(fields: dict[str, object], expected: float | None) -> None:
    assert progress_ratio(status(**fields)) == expected


def test_handler_error_series_exist_at_zero_before_any_error() -> None:
    from kubetune_operator.metrics import HANDLERS

    metrics = OperatorMetrics()
    for handler in HANDLERS:
        assert metrics.registry.get_sample_value("kubetune_handler_errors_total", {"handler": handler}) == 0
