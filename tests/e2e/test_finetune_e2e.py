"""The product end to end: Helm install → operator pod → FineTuneJob → trainer pod → S3 artifacts, status, Prometheus.

Everything runs as it ships: the operator image runs as the chart's Deployment on the real node (kubelet, containerd,
runc), so it acts with exactly the chart's ServiceAccount and RBAC; the trainer image runs as the Job's pod there too,
with the namespace's trainer identity the operator made. Prometheus finds both pods through the API server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubetune.api import significant
from tests.e2e.conftest import CONTENDER, JOBS_NAMESPACE, LLAMA_SECRET, Product, finetunejob
from tests.testbed.processes import REPO_ROOT, wait_for

pytestmark = pytest.mark.e2e

DASHBOARD = REPO_ROOT / "charts" / "kubetune" / "dashboards" / "kubetune.json"


@pytest.fixture(scope="module")
def succeeded_job(product: Product, inputs: dict[str, str]) -> dict[str, Any]:
    output = f"s3://{product.bucket}/runs/ok/"
    manifest = finetunejob("ok", inputs["model"], inputs["train"], output)
    # A contender: SmolLM2 behind llama.cpp's server, reached from the pod with its key from a Secret.
    manifest["spec"]["evaluation"]["contenders"] = [
        {
            "name": CONTENDER,
            "baseUrl": product.llama.base_url,
            "model": product.llama.model,
            "apiKeySecretRef": {"name": LLAMA_SECRET, "key": "api-key"},
            "prompting": "retrievalFewShot",
            "pricePerMillionInputTokens": 0.2,
            "pricePerMillionOutputTokens": 0.6,
        }
    ]
    product.apply(manifest)
    return product.wait_for_phase("ok", {"Succeeded", "Failed"})


def condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    matches = [c for c in job["status"].get("conditions", []) if c["type"] == kind]
    assert matches, f"no {kind} condition in {job['status'].get('conditions')}"
    return dict(matches[0])


def test_job_runs_to_succeeded_through_the_lifecycle(product: Product, succeeded_job: dict[str, Any]) -> None:
    status = succeeded_job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    # The phase only moves forward: Pending and Validating (the trainer's few-second pre-flight; both maybe too quick
    # to see) → Running → Evaluating → Succeeded.
    seen = [phase for phase in product.seen_phases["ok"] if phase != "Pending"]
    assert [phase for phase in seen if phase != "Validating"] == ["Running", "Evaluating", "Succeeded"]
    assert "Validating" not in seen[1:]
    assert condition(succeeded_job, "Succeeded")["status"] == "True"
    assert status["observedGeneration"] == succeeded_job["metadata"]["generation"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 6
    assert status["trainer"]["jobName"]


def test_results_land_in_status_and_artifacts_in_s3(product: Product, succeeded_job: dict[str, Any]) -> None:
    status = succeeded_job["status"]
    artifacts = status["artifacts"]
    manifest = json.loads(product.s3_object(artifacts["manifest"]))
    assert manifest["dataset"]["sha256"] == status["dataset"]["sha256"]
    report = json.loads(product.s3_object(artifacts["report"]))
    assert set(status["evaluation"]["baselines"]) == {"zeroShot", "fewShot", CONTENDER}
    assert status["evaluation"]["metric"] == "accuracy"
    # Status shows four significant digits; report.json keeps every digit.
    assert status["evaluation"]["tuned"] == significant(report["models"]["tuned"]["metrics"]["accuracy"])
    assert status["usage"]["trainedTokens"] > 0
    assert condition(succeeded_job, "EvalPassed")["status"] == "True"
    adapter_keys = product.s3.client().list_objects_v2(
        Bucket=product.bucket, Prefix=artifacts["adapter"].removeprefix(f"s3://{product.bucket}/")
    )
    names = {item["Key"].rsplit("/", 1)[-1] for item in adapter_keys.get("Contents", [])}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names


def test_every_transition_is_an_event(product: Product, succeeded_job: dict[str, Any]) -> None:
    result = product.kube.kubectl(
        "get", "events", "-n", JOBS_NAMESPACE, "--field-selector", "involvedObject.name=ok", "-o", "json", check=True
    )
    messages = " ".join(event["message"] for event in json.loads(result.stdout)["items"])
    assert "Succeeded" in messages
    assert "Running" in messages


def test_printer_columns_show_phase_progress_and_score(product: Product, succeeded_job: dict[str, Any]) -> None:
    table = product.kube.kubectl("get", "ftj", "ok", "-n", JOBS_NAMESPACE, check=True).stdout
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "METRIC", "SCORE", "AGE"]
    cells = table_cells(header, row)
    assert cells["PHASE"] == "Succeeded"
    assert cells["MODEL"] == "tiny"  # the last part of the model's uri, s3://<bucket>/models/tiny/
    assert cells["PROGRESS"] == "publish (6/6 steps trained)"
    # Four significant digits at most: what a person reads at a glance.
    assert len(cells["LOSS"].lstrip("0.").replace(".", "")) <= 4
    assert float(cells["LOSS"]) == succeeded_job["status"]["progress"]["loss"]
    assert cells["METRIC"] == "accuracy"
    assert float(cells["SCORE"]) == succeeded_job["status"]["evaluation"]["tuned"]


def table_cells(header: str, row: str) -> dict[str, str]:
    """kubectl's table cells by column, from the header's column starts (a cell may be empty)."""
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return {name: row[start:end].strip() for name, start, end in zip(names, starts, ends, strict=True)}


def test_a_contender_is_scored_and_costed_in_status_and_report(product: Product, succeeded_job: dict[str, Any]) -> None:
    status = succeeded_job["status"]
    report = json.loads(product.s3_object(status["artifacts"]["report"]))
    served = report["serving"][CONTENDER]
    # Every held-out row went to the real server from the trainer pod, and its token counts came back.
    assert (served["requests"], served["failed"]) == (6, 0)
    assert served["promptTokensMean"] > 0 and served["latencyP50Seconds"] > 0
    expected = (served["promptTokensMean"] * 0.2 + served["completionTokensMean"] * 0.6) / 1e6 * 1000
    assert served["costPer1kRequests"] == pytest.approx(expected)
    assert status["evaluation"]["costPer1kRequests"] == {CONTENDER: significant(expected)}
    assert status["evaluation"]["baselines"][CONTENDER] == significant(
        report["models"][CONTENDER]["metrics"]["accuracy"]
    )
    markdown = product.s3_object(status["artifacts"]["report"].replace("report.json", "report.md")).decode()
    assert f"| {CONTENDER} |" in markdown and "cost per 1k requests" in markdown
    # The key reached the pod through its Secret only.
    events = product.kube.kubectl("get", "events", "-n", JOBS_NAMESPACE, "-o", "json", check=True).stdout
    logs = product.kube.kubectl("logs", "-n", JOBS_NAMESPACE, "job/ok-trainer", check=False).stdout
    for text in (json.dumps(status), json.dumps(report), markdown, events, logs):
        assert product.llama.api_key not in text


def test_bad_data_fails_fast_with_a_data_error(product: Product, inputs: dict[str, str]) -> None:
    product.apply(finetunejob("bad-data", inputs["model"], inputs["bad"], f"s3://{product.bucket}/runs/bad/"))
    job = product.wait_for_phase("bad-data", {"Failed", "Succeeded"}, timeout=240)
    failed = condition(job, "Failed")
    assert job["status"]["phase"] == "Failed"
    # A permanent failure is not retried, and the trainer never leaves its data pre-flight: the job is never Running
    # and the last stage the trainer reported is data. (The Validating phase may last less than one poll.)
    seen = product.seen_phases["bad-data"]
    assert not {"Running", "Evaluating"} & set(seen), seen
    assert "Pending" not in seen[1:], seen
    assert job["status"]["progress"]["stage"] == "data"
    assert job["status"]["trainer"]["attempts"] == 1
    assert failed["reason"] == "DataError"
    assert "bad.jsonl:2" in failed["message"]


def test_prometheus_scraped_the_operator_and_the_trainer(product: Product, succeeded_job: dict[str, Any]) -> None:
    wait_for(
        lambda: bool(product.prometheus.query('kubetune_jobs{phase="Succeeded"} >= 1')),
        30,
        "the Succeeded job in kubetune_jobs",
    )
    assert product.prometheus.query('kubetune_job_phase_transitions_total{to_phase="Succeeded"}')
    # The trainer's process has exited, so its series are stale now: look back over the run.
    query = 'max_over_time(kubetune_trainer_step{job="kubetune-trainer", pod=~"ok-trainer-.+"}[10m])'
    [step] = product.prometheus.query(query)
    assert float(step["value"][1]) == 6


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def grafana_to_promql(expr: str) -> str:
    """Grafana's template variables and interval macros, as this test bed's Prometheus needs them."""
    for variable, value in {
        "$__rate_interval": "1m",
        "$__interval": "15s",
        "$__range": "1h",
        "$namespace": ".*",
        "$finetunejob": ".*",
    }.items():
        expr = expr.replace(variable, value)
    return expr


def test_every_dashboard_query_returns_data_after_a_run(product: Product, succeeded_job: dict[str, Any]) -> None:
    queries = dashboard_queries()
    assert queries
    empty = []
    for title, expr in queries:
        promql = grafana_to_promql(expr)
        if not product.prometheus.query(promql):
            empty.append(f"{title}: {promql}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_manifest_yaml_round_trips(succeeded_job: dict[str, Any]) -> None:
    # What `kubectl get -o yaml` shows is a valid manifest for `kubetune validate` once status is dropped.
    from kubetune.api import FineTuneJob

    document = {key: succeeded_job[key] for key in ("apiVersion", "kind", "spec")}
    document["metadata"] = {"name": succeeded_job["metadata"]["name"]}
    assert FineTuneJob.model_validate(yaml.safe_load(yaml.safe_dump(document))).spec.training.max_steps == 6
