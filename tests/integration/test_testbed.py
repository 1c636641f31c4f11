"""The test bed is real: CEL refusals from the API server, Jobs scheduled onto GPU nodes, S3, Prometheus, models."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import KwokCluster
from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import free_port, wait_for
from tests.testbed.prometheus import PrometheusServer
from tests.testbed.s3 import S3Server

pytestmark = pytest.mark.integration

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.testbed.kubetune.io"},
    "spec": {
        "group": "testbed.kubetune.io",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                ],
                                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, low: int, high: int) -> dict[str, Any]:
    return {
        "apiVersion": "testbed.kubetune.io/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"min": low, "max": high},
    }


def job_manifest(name: str, node_kind: str, command: list[str]) -> dict[str, Any]:
    """A one-pod Job asking for a GPU on the given kind of fake node."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubetune.io/testbed-kubelet": node_kind},
                    "containers": [
                        {
                            "name": "main",
                            "image": "kubetune-testbed/python:local",
                            "command": command,
                            "env": [{"name": "GREETING", "value": "hello from the pod"}],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                }
            },
        },
    }


def job_pod(kube: ControlPlane, namespace: str, job: str) -> dict[str, Any]:
    result = kube.kubectl("get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json", check=True)
    items = json.loads(result.stdout)["items"]
    assert len(items) == 1, f"expected one pod for job {job}, got {len(items)}"
    return dict(items[0])


def wait_job_condition(kube: ControlPlane, namespace: str, job: str, condition: str, timeout: float = 90) -> None:
    def has_condition() -> bool:
        result = kube.kubectl("get", "job", job, "-n", namespace, "-o", "json", check=True)
        conditions = json.loads(result.stdout)["status"].get("conditions", [])
        return any(c["type"] == condition and c["status"] == "True" for c in conditions)

    wait_for(has_condition, timeout, f"job {job} to be {condition}")


def test_api_server_version_is_the_pinned_release(kube: ControlPlane) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json", check=True).stdout)["serverVersion"]
    assert version["gitVersion"].startswith("v1.33.")
    assert version["minor"] == "33"


def test_cel_rule_refuses_a_bad_object_with_its_message(kube: ControlPlane, namespace: str) -> None:
    kube.apply(WIDGET_CRD)
    wait_for(
        lambda: "Established" in kube.kubectl("get", "crd", "widgets.testbed.kubetune.io", "-o", "yaml").stdout,
        30,
        "the Widget CRD to be established",
    )
    good = kube.kubectl("create", "-n", namespace, "-f", "-", input_text=json.dumps(widget("good", 1, 2)))
    assert good.returncode == 0, good.stderr
    bad = kube.kubectl("create", "-n", namespace, "-f", "-", input_text=json.dumps(widget("bad", 5, 2)))
    assert bad.returncode != 0
    assert "min must not exceed max" in bad.stderr
    assert "spec" in bad.stderr


def test_rbac_is_enforced_for_service_accounts(kube: ControlPlane, namespace: str) -> None:
    kube.kubectl("create", "serviceaccount", "reader", "-n", namespace, check=True)
    kubeconfig = kube.service_account_kubeconfig(namespace, "reader")
    denied = kube.kubectl("--kubeconfig", kubeconfig, "get", "secrets", "-n", namespace)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    kube.kubectl("create", "role", "secret-reader", "--verb=list", "--resource=secrets", "-n", namespace, check=True)
    kube.kubectl(
        "create", "rolebinding", "reader", "--role=secret-reader", f"--serviceaccount={namespace}:reader",
        "-n", namespace, check=True,
    )  # fmt: skip
    wait_for(
        lambda: kube.kubectl("--kubeconfig", kubeconfig, "get", "secrets", "-n", namespace).returncode == 0,
        20,
        "the RoleBinding to take effect",
    )


def test_kwok_completes_a_job_pod_on_a_fake_gpu_node(kwok_cluster: KwokCluster, namespace: str) -> None:
    kube = kwok_cluster.kube
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(job_manifest("fake", "kwok", ["true"])))
    wait_job_condition(kube, namespace, "fake", "Complete")
    pod = job_pod(kube, namespace, "fake")
    assert pod["spec"]["nodeName"] == kwok_cluster.kwok_node
    assert pod["status"]["phase"] == "Succeeded"


def test_s3_object_round_trips_through_boto3(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="data/train.jsonl", Body=b'{"text": "hi", "label": "x"}\n')
    body = client.get_object(Bucket=s3_bucket, Key="data/train.jsonl")["Body"].read()
    assert body == b'{"text": "hi", "label": "x"}\n'
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="data/")
    assert [item["Key"] for item in listed["Contents"]] == ["data/train.jsonl"]


@pytest.fixture
def metrics_target() -> Iterator[str]:
    """A tiny HTTP server exposing one counter in the Prometheus text format."""
    port = free_port()
    body = b"# TYPE kubetune_testbed_probe_total counter\nkubetune_testbed_probe_total 42\n"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}"
    server.shutdown()


def test_prometheus_returns_a_scraped_series(
    prometheus: Callable[[dict[str, list[str]]], PrometheusServer], metrics_target: str
) -> None:
    server = prometheus({"probe": [metrics_target]})
    wait_for(lambda: bool(server.query("kubetune_testbed_probe_total")), 60, "Prometheus to scrape the probe")
    [sample] = server.query('kubetune_testbed_probe_total{job="probe"}')
    assert sample["value"][1] == "42"
