"""Every query of the Grafana dashboard, run by a real Prometheus scraping a real operator metrics endpoint the way the
chart's ServiceMonitor does (honorLabels), returns the series it is meant to show."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator.metrics import MetricsServer, OperatorMetrics

from kubetune.api import FineTuneJobStatus
from tests.testbed.chart import CHART_DIR
from tests.testbed.processes import wait_for
from tests.testbed.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

DASHBOARD_FILE = CHART_DIR / "dashboards" / "kubetune.json"
NAMESPACE = "team"
# What Grafana puts in for the dashboard's variables when "All" is selected; 30s spans many 1s scrapes.
GRAFANA_VARIABLES = {"$namespace": ".*", "$finetunejob": ".*", "$__rate_interval": "30s"}
RUNNING = FineTuneJobStatus.model_validate(
    {
        "phase": "Running",
        "progress": {"percent": 40.0, "loss": 1.25, "tokensPerSecond": 290.0},
        "trainer": {"jobName": "running-trainer", "startTime": "2026-01-01T00:00:00Z"},
    }
)
SUCCEEDED = FineTuneJobStatus.model_validate(
    {
        "phase": "Succeeded",
        "progress": {"percent": 100.0, "loss": 0.5, "tokensPerSecond": 310.0},
        "evaluation": {"metric": "accuracy", "tuned": 0.88, "baselines": {"zeroShot": 0.08, "fewShot": 0.31}},
        "usage": {"gpuSeconds": 5400.0},
    }
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def operator_metrics() -> Iterator[tuple[OperatorMetrics, MetricsServer]]:
    """The operator's metrics, served over HTTP, with a running and a finished job."""
    metrics = OperatorMetrics()
    server = metrics.serve(0, "127.0.0.1")
    now = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC)
    metrics.observe_job(NAMESPACE, "running", RUNNING, 1, now)
    metrics.observe_job(NAMESPACE, "finished", SUCCEEDED, 1, now)
    for from_phase, to_phase in [(None, "Pending"), ("Pending", "Running"), ("Running", "Succeeded")]:
        metrics.record_transition(from_phase, to_phase)
    metrics.record_handler_error("reconcile")
    yield metrics, server
    server.stop()


def honor_labels(server: PrometheusServer) -> None:
    """Scrape with honor_labels, as the chart's ServiceMonitor does, so that the per-job `namespace` and `job` labels
    stay as the operator wrote them; applied through Prometheus's own /-/reload."""
    config_file = server.work_dir / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    for scrape in config["scrape_configs"]:
        scrape["honor_labels"] = True
    config_file.write_text(yaml.safe_dump(config))
    request = urllib.request.Request(f"{server.url}/-/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture(scope="module")
def scraped(
    testbed_dir: Path, operator_metrics: tuple[OperatorMetrics, MetricsServer]
) -> Iterator[tuple[PrometheusServer, OperatorMetrics]]:
    """Prometheus once it holds several scrapes of the operator, with the job labels honoured (one per module: the
    `prometheus` fixture would start one per test)."""
    metrics, server = operator_metrics
    prom = PrometheusServer(
        work_dir=testbed_dir / f"prometheus-dashboard-{uuid.uuid4().hex[:6]}",
        jobs={"kubetune-operator": [f"127.0.0.1:{server.port}"]},
    ).start()
    try:
        honor_labels(prom)
        wait_for(lambda: bool(prom.query('kubetune_job_train_loss{job="running"}')), 60, "the first honoured scrape")
        # A handler error between scrapes, so that increase() over the window has something to count.
        metrics.record_handler_error("reconcile")
        wait_for(lambda: bool(prom.query("count_over_time(kubetune_jobs[30s]) > 3")), 60, "a few scrapes")
        yield prom, metrics
    finally:
        prom.stop()


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], promql(target["expr"]))
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def by_labels(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(item["metric"].get(label, "") for label in labels): float(item["value"][1]) for item in result}


def test_every_panel_query_returns_series(dashboard: dict[str, Any], scraped: tuple[PrometheusServer, Any]) -> None:
    prom, _ = scraped

    empty = [(title, expr) for title, expr in dashboard_targets(dashboard) if not prom.query(expr)]

    assert dashboard_targets(dashboard)
    assert not empty


def query_of(dashboard: dict[str, Any], title: str) -> str:
    (expr,) = [expr for panel_title, expr in dashboard_targets(dashboard) if panel_title == title]
    return expr


def test_panels_show_the_operators_figures(dashboard: dict[str, Any], scraped: tuple[PrometheusServer, Any]) -> None:
    prom, _ = scraped

    phases = by_labels(prom.query(query_of(dashboard, "Jobs by phase")), "phase")
    progress = by_labels(prom.query(query_of(dashboard, "Progress per job")), "namespace", "job")
    scores = by_labels(prom.query(query_of(dashboard, "Eval score: tuned vs baselines")), "job", "model")
    (gpu_hours,) = by_labels(prom.query(query_of(dashboard, "GPU-hours")), "").values()
    errors = by_labels(prom.query(query_of(dashboard, "Handler errors")), "handler")

    assert phases[("Running",)] == 1
    assert phases[("Succeeded",)] == 1
    assert progress == {(NAMESPACE, "running"): 0.4, (NAMESPACE, "finished"): 1.0}
    assert scores == {("finished", "tuned"): 0.88, ("finished", "zeroShot"): 0.08, ("finished", "fewShot"): 0.31}
    assert gpu_hours >= 1.5  # the finished job's 5400 s, plus the running job's wall time so far
    assert errors[("reconcile",)] > 0


def test_variables_list_the_namespaces_and_jobs(
    dashboard: dict[str, Any], scraped: tuple[PrometheusServer, Any]
) -> None:
    prom, _ = scraped
    variables = {v["name"]: v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"}

    def label_values(definition: str) -> set[str]:
        # Grafana's label_values(selector, label) is the label's values over the selector's series.
        selector, label = definition.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        return {item["metric"][label] for item in prom.query(f"count by ({label}) ({promql(selector)})")}

    assert label_values(variables["namespace"]) == {NAMESPACE}
    assert label_values(variables["finetunejob"]) == {"running", "finished"}
