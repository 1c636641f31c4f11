"""The operator on a cluster that serves neither JobSet nor Kueue (the demo's, or a plain cluster): it starts, serves
single-node jobs as before, and a multi-node job waits with a condition that says what to install."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune import conditions as c
from kubetune.crd import render_crd_yaml
from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import ManagedProcess, free_port, http_ok, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd and an API server with the FineTuneJob CRD and nothing else: no JobSet, no Kueue, no controllers."""
    work = tmp_path_factory.mktemp("bare-cluster")
    kube = ControlPlane(work_dir=work)
    try:
        kube.start()
        (work / "crd.yaml").write_text(render_crd_yaml())
        kube.kubectl("apply", "--server-side", "-f", str(work / "crd.yaml"), check=True)
        kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s", check=True)
        yield kube
    finally:
        kube.stop()


@pytest.fixture
def operator_process(bare_cluster: ControlPlane, tmp_path: Path) -> Iterator[ManagedProcess]:
    health_port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KUBETUNE_", "KUBECONFIG"))}
    env.update(
        {
            "KUBECONFIG": bare_cluster.kubeconfig,
            "PYTHONWARNINGS": "ignore:Unverified HTTPS request",
            "KUBETUNE_STANDALONE": "true",
            "KUBETUNE_TRAINER_IMAGE": "registry.example.com/kubetune/trainer:1",
            "KUBETUNE_LISTEN_ADDRESS": "127.0.0.1",
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_HEALTH_PORT": str(health_port),
        }
    )
    process = ManagedProcess("operator", [sys.executable, "-m", "kubetune_operator"], tmp_path, env=env).start()
    try:
        wait_for(lambda: process.alive() and http_ok(f"http://127.0.0.1:{health_port}/healthz"), 90, "/healthz")
        yield process
    finally:
        process.stop(timeout=30)


def finetunejob(name: str, **resources: int) -> dict[str, object]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team"},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://out/{name}"},
            "resources": resources,
        },
    }


def test_a_multi_node_job_waits_with_jobset_missing_and_single_node_jobs_still_run(
    bare_cluster: ControlPlane, operator_process: ManagedProcess
) -> None:
    kube = bare_cluster
    kube.kubectl("create", "namespace", "team", check=True)
    kube.apply(finetunejob("wide", nodes=2))
    kube.apply(finetunejob("narrow"))

    def running_condition(name: str) -> dict[str, str]:
        result = kube.kubectl("get", "finetunejob", name, "-n", "team", "-o", "json", check=True)
        conditions = (json.loads(result.stdout).get("status") or {}).get("conditions") or []
        return next((cond for cond in conditions if cond["type"] == c.CONDITION_RUNNING), {})

    wait_for(lambda: running_condition("wide").get("reason") == c.REASON_JOBSET_MISSING, 60, "JobSetMissing")
    message = running_condition("wide")["message"]
    assert "which this cluster does not serve" in message and "restart the kubetune operator" in message
    # The single-node job gets its batch Job as ever (no controller runs here to start its pod).
    wait_for(
        lambda: kube.kubectl("get", "job", "narrow-trainer", "-n", "team").returncode == 0, 60, "narrow's trainer Job"
    )
    assert operator_process.running()
    assert "Unresolved resources cannot be served" in operator_process.log_tail(200)
