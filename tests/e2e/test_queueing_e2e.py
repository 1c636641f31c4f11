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
    checkpoint_steps,
    exit_code,
    fault_job,
    resumed_step,
    running_pod,
    succeeded,
    trainer_pods,
    wait_for_checkpoint,
)
from tests.testbed.batch_engines import install_gpu_queue, install_priority_classes
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.e2e

CLUSTER_QUEUE = "e2e-one-gpu"
LOCAL_QUEUE = "one-gpu"
PRIORITIES = {"e2e-low": 100, "e2e-high": 1000}


@pytest.fixture(scope="module")
def one_gpu_queue(product: Product) -> Iterator[str]:
    """A ClusterQueue of one GPU for the jobs' namespace, preempting lower priorities, and its LocalQueue."""
    install_priority_classes(product.kube, PRIORITIES)
    install_gpu_queue(product.kube, CLUSTER_QUEUE, LOCAL_QUEUE, JOBS_NAMESPACE, gpus=1)
    yield LOCAL_QUEUE
    product.kube.kubectl("delete", "localqueue", LOCAL_QUEUE, "-n", JOBS_NAMESPACE, "--wait=false")
    product.kube.kubectl("delete", "clusterqueue", CLUSTER_QUEUE, "--wait=false")


def queued_condition(product: Product, name: str) -> dict[str, Any]:
    conditions = (product.get(name).get("status") or {}).get("conditions") or []
    return next((dict(c) for c in conditions if c["type"] == "Queued"), {})


def preempt_by_an_urgent_job(product: Product, inputs: dict[str, str], victim: str, urgent: str, queue: str) -> None:
    """Submit a short 1-GPU job of high priority to `queue` and wait until Kueue has preempted `victim` for it."""
    manifest = fault_job(urgent, inputs, product.bucket, queueName=queue)
    manifest["spec"]["training"]["maxSteps"] = 4
    manifest["spec"]["resources"] = {"gpus": 1, "priorityClassName": "e2e-high"}
    product.apply(manifest)
    wait_for(
        lambda: queued_condition(product, victim).get("reason") == "Preempted",
        180,
        f"{victim} to be preempted by Kueue",
    )


def test_a_preempted_trainer_checkpoints_waits_and_resumes_without_repeating_a_step(
    product: Product, inputs: dict[str, str], one_gpu_queue: str
) -> None:
    low = fault_job("patient", inputs, product.bucket, queueName=one_gpu_queue, runPolicy={"backoffLimit": 0})
    low["spec"]["resources"] = {"gpus": 1, "priorityClassName": "e2e-low"}
    product.apply(low)
    with PodRecorder(product, "patient") as recorder:
        running_pod(product, "patient")
        first_complete = wait_for_checkpoint(product, "patient")

        preempt_by_an_urgent_job(product, inputs, "patient", "urgent", one_gpu_queue)
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


@pytest.fixture(scope="module")
def two_gpu_queue(product: Product, one_gpu_queue: str) -> Iterator[str]:
    """A second ClusterQueue, of two GPUs (the priority classes come with the first), and its LocalQueue."""
    kube = product.kube
    name, local = "e2e-two-gpus", "two-gpus"
    install_gpu_queue(kube, name, local, JOBS_NAMESPACE, gpus=2)
    yield local
    kube.kubectl("delete", "localqueue", local, "-n", JOBS_NAMESPACE, "--wait=false")
    kube.kubectl("delete", "clusterqueue", name, "--wait=false")


def test_a_preempted_two_node_trainer_stops_as_one_unit_and_both_nodes_resume_from_one_step(
    product: Product, inputs: dict[str, str], two_gpu_queue: str
) -> None:
    wide = fault_job("wide", inputs, product.bucket, queueName=two_gpu_queue)
    wide["spec"]["resources"] = {"gpus": 1, "nodes": 2, "priorityClassName": "e2e-low"}
    product.apply(wide)
    with PodRecorder(product, "wide") as recorder:
        wait_for(lambda: len(running_pods(product, "wide")) == 2, 240, "both nodes of the wide job running")
        first_complete = wait_for_checkpoint(product, "wide")

        # Kueue evicts the whole group (one Workload) though one GPU would do: both nodes stop, checkpoint once.
        preempt_by_an_urgent_job(product, inputs, "wide", "urgent-two", two_gpu_queue)
        wait_for(lambda: not trainer_pods(product, "wide"), 180, "the suspended group's pods to be gone")
        stopped_at = max(checkpoint_steps(product, "wide")[0])
        assert product.get("wide")["status"]["phase"] == "Queued"
        assert product.wait_for_phase("urgent-two", {"Succeeded", "Failed"}, 600)["status"]["phase"] == "Succeeded"
        job = succeeded(product, "wide", timeout=600)

    pods = recorder.pods()
    assert len(pods) == 4, "two nodes, stopped and resumed as one group"
    resumed = pods[2:]
    assert stopped_at >= first_complete
    assert [resumed_step(product, pod) for pod in resumed] == [stopped_at, stopped_at]
    assert job["status"]["progress"]["step"] == MAX_STEPS


def running_pods(product: Product, name: str) -> list[dict[str, Any]]:
    return [pod for pod in trainer_pods(product, name) if pod["status"].get("phase") == "Running"]
