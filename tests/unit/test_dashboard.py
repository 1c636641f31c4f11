"""The Grafana dashboard: well-formed, on a datasource variable, and querying only series and labels the operator
really exports (read from a live OperatorMetrics exposition, so a renamed metric fails here)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from kubetune_operator.metrics import OperatorMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import FineTuneJobStatus
from tests.testbed.chart import CHART_DIR

pytestmark = pytest.mark.unit

DASHBOARD_FILE = CHART_DIR / "dashboards" / "kubetune.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC_NAME = re.compile(r"\bkubetune_[a-z0-9_]+\b")
# PromQL keywords that precede a label list; Grafana's own $__ variables are not labels.
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
BUILT_IN_LABELS = {"le", "__name__", "quantile"}
REQUIRED_TOPICS = {
    "kubetune_jobs": "jobs by phase",
    "kubetune_job_progress_ratio": "progress per job",
    "kubetune_job_train_loss": "training loss",
    "kubetune_job_tokens_per_second": "tokens/s",
    "kubetune_job_gpu_seconds_total": "GPU-hours",
    "kubetune_job_eval_score": "eval score tuned vs baselines",
    "kubetune_job_phase_transitions_total": "transitions",
    "kubetune_handler_errors_total": "handler errors",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every sample name the operator exports with the labels it carries, after exercising every series once."""
    metrics = OperatorMetrics()
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Succeeded",
            "progress": {"percent": 100.0, "loss": 0.4, "tokensPerSecond": 310.0},
            "evaluation": {"metric": "accuracy", "tuned": 0.9, "baselines": {"zeroShot": 0.2, "fewShot": 0.4}},
            "usage": {"gpuSeconds": 5400.0},
        }
    )
    metrics.observe_job("team", "demo", status, 1, datetime.now(UTC))
    metrics.record_transition(None, "Pending")
    metrics.record_handler_error("reconcile")
    with metrics.timed_reconcile():
        pass
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every target."""
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (variable["name"], variable["definition"])
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]


def labels_used(expr: str, legend: str) -> set[str]:
    """Labels an expression groups or matches by, and those its legend prints."""
    grouped = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    return grouped | set(MATCHER.findall(expr)) | set(LEGEND_LABEL.findall(legend))


def test_datasource_is_a_variable_used_by_every_panel_and_target(dashboard: dict[str, Any]) -> None:
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]

    assert datasource["name"] == "datasource"
    assert datasource["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(target["datasource"] == DATASOURCE for target in panel["targets"]), panel["title"]


def test_panels_are_identified_and_placed(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]

    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] > 0
        assert grid["h"] > 0
        assert grid["x"] + grid["w"] <= 24
    assert dashboard["uid"] == "kubetune"


def test_every_panel_explains_itself(dashboard: dict[str, Any]) -> None:
    assert all(panel["title"] and panel["description"] for panel in panels(dashboard))


def test_each_topic_has_a_panel(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr, _ in queries(dashboard) for name in METRIC_NAME.findall(expr)}

    missing = {metric: topic for metric, topic in REQUIRED_TOPICS.items() if metric not in used}

    assert not missing


def test_every_query_uses_exported_series_only(dashboard: dict[str, Any], exported: dict[str, set[str]]) -> None:
    expressions = [(title, expr) for title, expr, _ in queries(dashboard)] + variable_queries(dashboard)

    unknown = [
        (title, name) for title, expr in expressions for name in METRIC_NAME.findall(expr) if name not in exported
    ]

    assert expressions
    assert not unknown, f"series the operator does not export (see operator/kubetune_operator/metrics.py): {unknown}"


def test_every_label_a_query_uses_is_on_its_series(dashboard: dict[str, Any], exported: dict[str, set[str]]) -> None:
    problems = []
    for title, expr, legend in queries(dashboard):
        available = set().union(*(exported.get(name, set()) for name in METRIC_NAME.findall(expr)))
        missing = labels_used(expr, legend) - available - BUILT_IN_LABELS
        if missing:
            problems.append((title, sorted(missing)))

    assert not problems


def test_the_label_check_notices_a_missing_label(exported: dict[str, set[str]]) -> None:
    used = labels_used('sum by (pod) (kubetune_job_train_loss{namespace=~"$namespace"})', "{{job}}")

    assert used - exported["kubetune_job_train_loss"] == {"pod"}


def test_per_job_queries_follow_the_namespace_and_job_variables(dashboard: dict[str, Any]) -> None:
    for title, expr, _ in queries(dashboard):
        if "kubetune_job_" in expr and "phase_transitions" not in expr:
            assert 'namespace=~"$namespace"' in expr, title
            assert 'job=~"$finetunejob"' in expr, title


def test_variables_list_finetunejobs_by_namespace(dashboard: dict[str, Any]) -> None:
    definitions = dict(variable_queries(dashboard))

    assert definitions["namespace"].startswith("label_values(")
    assert definitions["namespace"].endswith(", namespace)")
    assert '$namespace"' in definitions["finetunejob"]
    assert definitions["finetunejob"].endswith(", job)")
