"""A multi-node trainer as it ships, on the real node: the operator (the chart's Deployment) makes a JobSet, the JobSet
controller its two pods of the trainer image, which find rank 0 by its hostname through the cluster's DNS, train as one
gloo group, and resume together after one of them is stopped."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import KwokCluster
from tests.e2e.conftest import JOBS_NAMESPACE, Product
from tests.e2e.test_faults import (
    MAX_STEPS,
    PodRecorder,
    checkpoint_steps,
    container_id,
    exit_code,
    fault_job,
    pod_log,
    resumed_step,
    succeeded,
    trainer_pods,
    wait_for_checkpoint,
)
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.e2e

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
WORKER_PREEMPTED = re.compile(r"exitcode\s*: 143 ")
UPLOADED = re.compile(r"checkpoint step \d+ uploaded to")


def running_pods(product: Product, name: str, count: int) -> list[dict[str, Any]]:
    """The job's `count` trainer pods once every one runs, by node rank."""
    found: list[dict[str, Any]] = []

    def running() -> bool:
        found[:] = [pod for pod in trainer_pods(product, name) if pod["status"].get("phase") == "Running"]
        return len(found) == count

    wait_for(running, 240, f"{count} running trainer pods of {name}")
    return sorted(found, key=lambda pod: int(pod["metadata"]["labels"][COMPLETION_INDEX]))


def attempt_and_rank(pod: dict[str, Any]) -> tuple[int, int]:
    labels = pod["metadata"]["labels"]
    return int(labels[RESTART_ATTEMPT]), int(labels[COMPLETION_INDEX])


def wait_for_group_restart(product: Product, name: str) -> int:
    """Wait until JobSet restarts the job's group (its second attempt's pods exist); the newest complete checkpoint
    step then."""
    wait_for(
        lambda: any(attempt_and_rank(pod)[0] == 1 for pod in trainer_pods(product, name)),
        240,
        "JobSet to restart the group",
    )
    return max(checkpoint_steps(product, name)[0])


def test_two_nodes_meet_at_rank_zero_and_after_sigterm_to_one_the_group_resumes(
    product: Product, inputs: dict[str, str]
) -> None:
    product.apply(fault_job("pair", inputs, product.bucket, resources={"nodes": 2, "gpus": 1}))
    with PodRecorder(product, "pair") as recorder:
        rank0, rank1 = running_pods(product, "pair", 2)
        assert [pod["spec"]["hostname"] for pod in (rank0, rank1)] == ["pair-trainer-node-0-0", "pair-trainer-node-0-1"]
        first_complete = wait_for_checkpoint(product, "pair")
        # The kubelet stops rank 1's pod (SIGTERM, as for a drain): the ranks agree on a step, rank 0 uploads it, both
        # exit, and JobSet restarts the group, which resumes from that checkpoint.
        deleted = product.kube.kubectl("delete", "pod", "-n", JOBS_NAMESPACE, rank1["metadata"]["name"], "--wait=false")
        assert deleted.returncode == 0, deleted.stderr
        # Nothing is written between the group stopping and the new pods loading their model.
        newest_complete = wait_for_group_restart(product, "pair")
        job = succeeded(product, "pair", timeout=600)

    pods = {attempt_and_rank(pod): pod for pod in recorder.pods()}
    assert set(pods) == {(0, 0), (0, 1), (1, 0), (1, 1)}, "two pods, restarted once as a group"
    # Rank 0 was not signalled, yet stopped as preempted: its launcher ends with the worker's exit 143, the trainer's
    # code for "stopped by SIGTERM after saving" (rank 1's pod, deleted, may be gone before it could be read).
    assert exit_code(pods[(0, 0)]) == 143
    message = pods[(0, 0)]["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    assert WORKER_PREEMPTED.search(message), message
    assert newest_complete >= first_complete
    assert resumed_step(product, pods[(1, 0)]) == newest_complete
    assert resumed_step(product, pods[(1, 1)]) == newest_complete, "every node resumes from the same step"
    # Rank 0 uploads every checkpoint; rank 1 only trains.
    assert UPLOADED.search(pod_log(product, pods[(1, 0)]))
    assert not UPLOADED.search(pod_log(product, pods[(1, 1)]))
    assert job["status"]["progress"]["step"] == MAX_STEPS
    assert (job["status"]["trainer"]["jobName"], job["status"]["trainer"]["attempts"]) == ("pair-trainer", 2)
    jobset = json.loads(
        product.kube.kubectl("get", "jobset", "pair-trainer", "-n", JOBS_NAMESPACE, "-o", "json", check=True).stdout
    )
    assert jobset["status"]["restarts"] == 1
    assert MAX_STEPS in checkpoint_steps(product, "pair")[0]


def test_a_node_killed_without_warning_restarts_the_group_from_the_newest_complete_checkpoint(
    product: Product, inputs: dict[str, str], kwok_cluster: KwokCluster
) -> None:
    product.apply(fault_job("lost-rank", inputs, product.bucket, resources={"nodes": 2, "gpus": 1}))
    with PodRecorder(product, "lost-rank") as recorder:
        _, rank1 = running_pods(product, "lost-rank", 2)
        wait_for_checkpoint(product, "lost-rank")
        # Rank 1's container dies at once (SIGKILL, as when it runs out of memory): no checkpoint of its own, no word
        # to rank 0, whose next collective finds the peer gone; JobSet restarts the group.
        kwok_cluster.node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id(rank1))
        # Rank 0 of the first group may still finish an upload it began before the kill: at least this one.
        complete_at_restart = wait_for_group_restart(product, "lost-rank")
        job = succeeded(product, "lost-rank", timeout=600)

    pods = {attempt_and_rank(pod): pod for pod in recorder.pods()}
    assert set(pods) == {(0, 0), (0, 1), (1, 0), (1, 1)}, "two pods, restarted once as a group"
    assert exit_code(pods[(0, 1)]) == 137
    resumed = resumed_step(product, pods[(1, 0)])
    assert resumed is not None and resumed >= complete_at_restart
    assert resumed_step(product, pods[(1, 1)]) == resumed, "every node resumes from the same step"
    assert job["status"]["progress"]["step"] == MAX_STEPS
    assert job["status"]["trainer"]["attempts"] == 2
