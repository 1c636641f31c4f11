"""Kueue's preemption of a trainer as it ships, on the real node: a job of higher priority takes the quota, the running
trainer is suspended (SIGTERM: it checkpoints), waits in Queued with Kueue's reason, and resumes from that checkpoint
once the other job is done, without training a finished step again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import JOBS_NAMESPACE, Product
from tests.e2e.test_faults import (
    MAX_STEPS,
    PREEMPTED,
    PodRecorder,
    exit_code,
    fault_job,
    resumed_step,
    running_pod,
    succeeded,
    wait_for_checkpoint,
)
from tests.testbed.batch_engines import KUEUE_API
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.e2e

CLUSTER_QUEUE = "e2e-one-gpu"
LOCAL_QUEUE = "one-gpu"
PRIORITIES = {"e2e-low": 100, "e2e-high": 1000}


@pytest.fixture(scope="module")
def one_gpu_queue(product: Product) -> Iterator[str]:
    """A ClusterQueue of one GPU for the jobs' namespace, preempting lower priorities, and its LocalQueue."""
    kube = product.kube
    for name, value in PRIORITIES.items():
        kube.apply(
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value}
        )
    kube.apply({"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": "gpu"}})
    kube.apply(
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": JOBS_NAMESPACE}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["nvidia.com/gpu"],
                        "flavors": [{"name": "gpu", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 1}]}],
                    }
                ],
            },
        }
    )
    kube.apply(
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": LOCAL_QUEUE, "namespace": JOBS_NAMESPACE},
            "spec": {"clusterQueue": CLUSTER_QUEUE},
        }
    )
    yield LOCAL_QUEUE
    kube.kubectl("delete", "localqueue", LOCAL_QUEUE, "-n", JOBS_NAMESPACE, "--wait=false")
    kube.kubectl("delete", "clusterqueue", CLUSTER_QUEUE, "--wait=false")


def queued_condition(product: Product, name: str) -> dict[str, Any]:
    conditions = (product.get(name).get("status") or {}).get("conditions") or []
    return next((dict(c) for c in conditions if c["type"] == "Queued"), {})


def test_a_preempted_trainer_checkpoints_waits_and_resumes_without_repeating_a_step(
    product: Product, inputs: dict[str, str], one_gpu_queue: str
) -> None:
    low = fault_job("patient", inputs, product.bucket, queueName=one_gpu_queue, runPolicy={"backoffLimit": 0})
    low["spec"]["resources"] = {"gpus": 1, "priorityClassName": "e2e-low"}
    product.apply(low)
    with PodRecorder(product, "patient") as recorder:
        running_pod(product, "patient")
        first_complete = wait_for_checkpoint(product, "patient")

        urgent = fault_job("urgent", inputs, product.bucket, queueName=one_gpu_queue)
        urgent["spec"]["training"]["maxSteps"] = 4
        urgent["spec"]["resources"] = {"gpus": 1, "priorityClassName": "e2e-high"}
        product.apply(urgent)

        wait_for(
            lambda: queued_condition(product, "patient").get("reason") == "Preempted",
            180,
            "the low-priority job to be preempted by Kueue",
        )
        queued = queued_condition(product, "patient")
        assert queued["status"] == "True" and "resumes from its newest checkpoint" in queued["message"]
        assert product.get("patient")["status"]["phase"] == "Queued"
        urgent_job = product.wait_for_phase("urgent", {"Succeeded", "Failed"}, timeout=600)
        assert urgent_job["status"]["phase"] == "Succeeded"
        job = succeeded(product, "patient", timeout=900)

    first, second = recorder.pods()
    # SIGTERM from Kueue's suspension: the trainer finished its step, uploaded it and exited 143; backoffLimit 0,
    # yet the job lives on: a suspension is no failure.
    assert exit_code(first) == 143
    preempted = PREEMPTED.search(first["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert preempted is not None and int(preempted.group(1)) >= first_complete
    assert resumed_step(product, second) == int(preempted.group(1))
    assert job["status"]["progress"]["step"] == MAX_STEPS
