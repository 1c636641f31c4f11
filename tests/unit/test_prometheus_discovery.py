"""The test bed's pod discovery for Prometheus: running pods' `metrics` ports become file-discovery targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.testbed.prometheus import PodDiscovery, pod_scrape_jobs, pod_targets

pytestmark = pytest.mark.unit


def pod(name: str, phase: str, ip: str | None, ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"containers": [{"name": "trainer", "ports": ports}]},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


def test_only_running_pods_with_an_ip_and_a_port_named_metrics_are_targets() -> None:
    pods = [
        pod("a", "Running", "10.200.0.5", [{"name": "metrics", "containerPort": 9090}, {"name": "health"}]),
        pod("b", "Pending", None, [{"name": "metrics", "containerPort": 9090}]),
        pod("c", "Succeeded", "10.200.0.6", [{"name": "metrics", "containerPort": 9090}]),
        pod("d", "Running", "10.200.0.7", [{"name": "http", "containerPort": 80}]),
    ]

    assert pod_targets(pods) == [{"targets": ["10.200.0.5:9090"], "labels": {"namespace": "team", "pod": "a"}}]


def test_one_job_per_component_reads_its_own_targets_file() -> None:
    jobs = pod_scrape_jobs(PodDiscovery(kubeconfig="k"), Path("/t"))

    assert [job["job_name"] for job in jobs] == ["kubetune-operator", "kubetune-trainer"]
    assert [job["file_sd_configs"][0]["files"] for job in jobs] == [["/t/operator.json"], ["/t/trainer.json"]]
    assert all(job["honor_labels"] for job in jobs)
