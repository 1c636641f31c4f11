"""Faults injected into a run of what ships, on the real node: a killed trainer container, an eviction, the operator's
pod deleted, S3 refusing connections during a checkpoint, kube-apiserver restarted, the node's kubelet lost. Each run
must end as the README's fault table says: resumed from the newest complete checkpoint, nothing created twice, nothing
lost for good, never stuck in Running."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from typing import Any

import pytest

from tests.conftest import KwokCluster
from tests.e2e.conftest import JOBS_NAMESPACE, OPERATOR_NAMESPACE, Product, finetunejob
from tests.testbed.controlplane import NODE_MONITOR_GRACE_SECONDS
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.e2e

MAX_STEPS = 40
CHECKPOINT_EVERY = 2
LOST_NODE_TOLERATION_SECONDS = 10  # the job's own toleration of an unreachable node (Kubernetes' default: 300)
RESUMED = re.compile(r"resuming from checkpoint step (\d+)")
PREEMPTED = re.compile(r"preempted \(SIGTERM\) after step (\d+)")
STEP_DIR = re.compile(r"checkpoints/step-(\d+)/(.+)$")


def fault_job(name: str, inputs: dict[str, str], bucket: str, **spec: Any) -> dict[str, Any]:
    """A job long enough to hit mid-run (40 steps, a checkpoint every 2), with a short evaluation."""
    manifest = finetunejob(name, inputs["model"], inputs["train"], f"s3://{bucket}/runs/{name}/")
    manifest["spec"]["training"].update({"maxSteps": MAX_STEPS, "checkpointEvery": CHECKPOINT_EVERY})
    manifest["spec"]["evaluation"].update({"maxSamples": 2, "baselines": []})
    manifest["spec"].update(spec)
    return manifest


def trainer_pods(product: Product, name: str) -> list[dict[str, Any]]:
    """The job's trainer pods, oldest first."""
    result = product.kube.kubectl(
        "get", "pods", "-n", JOBS_NAMESPACE, "-l", f"kubetune.io/job-name={name}", "-o", "json", check=True
    )
    pods: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return sorted(pods, key=lambda pod: (pod["metadata"]["creationTimestamp"], pod["metadata"]["name"]))


class PodRecorder:
    """Every version of the job's trainer pods seen while recording: a pod the cluster deletes once it ends (an evicted
    one, a suspended Job's, a lost node's) is still there to read afterwards. A watch sees each change, the last
    status before the deletion included; a list every 0.2 s covers the gaps while the watch reconnects (the API server
    restarted)."""

    def __init__(self, product: Product, name: str) -> None:
        self.product, self.name = product, name
        self.latest: dict[str, dict[str, Any]] = {}
        self.last_error: Exception | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.watcher: subprocess.Popen[str] | None = None
        self.threads = [
            threading.Thread(target=self._record, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]

    def __enter__(self) -> PodRecorder:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        if self.watcher is not None:
            self.watcher.terminate()
        for thread in self.threads:
            thread.join(10)

    def _record(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                pods = trainer_pods(self.product, self.name)
            except Exception as error:  # the API server may be restarting: the next round reads again
                self.last_error = error
                continue
            self._keep(pods)

    def _watch(self) -> None:
        kube = self.product.kube
        selector = f"kubetune.io/job-name={self.name}"
        while not self.stopped.is_set():
            argv = ["kubectl", f"--kubeconfig={kube.kubeconfig}", "get", "pods", "-n", JOBS_NAMESPACE]
            self.watcher = subprocess.Popen(
                [*argv, "-l", selector, "-o", "json", "--watch"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            document: list[str] = []
            assert self.watcher.stdout is not None
            for line in self.watcher.stdout:
                document.append(line)
                if line.rstrip("\n") == "}":  # kubectl ends each object it prints with a closing brace alone
                    self._keep([json.loads("".join(document))])
                    document = []
            self.watcher.wait()
            self.stopped.wait(0.5)

    def _keep(self, pods: list[dict[str, Any]]) -> None:
        """Record each pod's newest version (by resourceVersion: the list and the watch may cross)."""
        with self.lock:
            for pod in pods:
                name = pod["metadata"]["name"]
                known = self.latest.get(name)
                if known is None or int(pod["metadata"]["resourceVersion"]) >= int(
                    known["metadata"]["resourceVersion"]
                ):
                    self.latest[name] = pod

    def pods(self) -> list[dict[str, Any]]:
        """Every pod seen, oldest first, as last seen."""
        with self.lock:
            seen = list(self.latest.values())
        assert seen, f"no pod of {self.name} was seen (last error: {self.last_error})"
        return sorted(seen, key=lambda pod: (pod["metadata"]["creationTimestamp"], pod["metadata"]["name"]))


def exit_code(pod: dict[str, Any]) -> int | None:
    """The trainer container's exit code once it terminated."""
    statuses = pod["status"].get("containerStatuses") or [{}]
    terminated = (statuses[0].get("state") or {}).get("terminated")
    return int(terminated["exitCode"]) if terminated else None


def disruption_reason(pod: dict[str, Any]) -> str | None:
    """Why the cluster stopped the pod (its DisruptionTarget condition), None when it did not."""
    conditions = pod["status"].get("conditions") or []
    return next((c["reason"] for c in conditions if c["type"] == "DisruptionTarget" and c["status"] == "True"), None)


def running_pod(product: Product, name: str) -> dict[str, Any]:
    """The job's trainer pod once its container runs."""
    found: list[dict[str, Any]] = []

    def running() -> bool:
        found[:] = [pod for pod in trainer_pods(product, name) if pod["status"].get("phase") == "Running"]
        return bool(found)

    wait_for(running, 180, f"a running trainer pod of {name}")
    return found[-1]


def checkpoint_steps(product: Product, name: str) -> tuple[set[int], set[int]]:
    """(steps with a COMPLETE marker, steps with any object) under the job's checkpoints/ in S3."""
    listed = product.s3.client().list_objects_v2(Bucket=product.bucket, Prefix=f"runs/{name}/checkpoints/")
    complete, started = set(), set()
    for item in listed.get("Contents", []):
        match = STEP_DIR.search(item["Key"])
        if match:
            started.add(int(match.group(1)))
            if match.group(2) == "COMPLETE":
                complete.add(int(match.group(1)))
    return complete, started


def wait_for_checkpoint(product: Product, name: str) -> int:
    """The first step whose checkpoint is complete in S3."""
    wait_for(lambda: bool(checkpoint_steps(product, name)[0]), 240, f"{name}'s first complete checkpoint", 0.1)
    return min(checkpoint_steps(product, name)[0])


def pod_log(product: Product, pod: dict[str, Any]) -> str:
    result = product.kube.kubectl("logs", "-n", JOBS_NAMESPACE, pod["metadata"]["name"])
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


def resumed_step(product: Product, pod: dict[str, Any]) -> int | None:
    """The checkpoint step a trainer pod resumed from, from its own log."""
    match = RESUMED.search(pod_log(product, pod))
    return int(match.group(1)) if match else None


def event_reasons(product: Product, name: str) -> set[str]:
    """Reasons of the Events on the FineTuneJob (the operator writes one per phase change, with its reason)."""
    result = product.kube.kubectl(
        "get", "events", "-n", JOBS_NAMESPACE, "--field-selector", f"involvedObject.name={name}", "-o", "json",
        check=True,
    )  # fmt: skip
    return {event["reason"] for event in json.loads(result.stdout)["items"]}


def container_id(pod: dict[str, Any]) -> str:
    """The trainer container's id in containerd (containerStatuses[].containerID is `containerd://ID`)."""
    return str(pod["status"]["containerStatuses"][0]["containerID"]).removeprefix("containerd://")


def succeeded(product: Product, name: str, timeout: float = 420) -> dict[str, Any]:
    job = product.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=timeout)
    assert job["status"]["phase"] == "Succeeded", json.dumps(job["status"], indent=1)
    assert job["status"]["progress"]["step"] == MAX_STEPS
    return job


def test_a_killed_trainer_container_is_retried_and_resumes_from_the_newest_complete_checkpoint(
    product: Product, inputs: dict[str, str], kwok_cluster: KwokCluster
) -> None:
    product.apply(fault_job("killed", inputs, product.bucket, runPolicy={"backoffLimit": 2}))
    pod = running_pod(product, "killed")
    wait_for_checkpoint(product, "killed")

    kwok_cluster.node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id(pod))
    wait_for(lambda: len(trainer_pods(product, "killed")) == 2, 120, "the Job's second pod")
    newest_complete = max(checkpoint_steps(product, "killed")[0])  # nothing is written once the container is dead
    job = succeeded(product, "killed")

    first, second = trainer_pods(product, "killed")
    assert exit_code(first) == 137
    assert resumed_step(product, second) == newest_complete
    assert job["status"]["trainer"]["attempts"] == 2
    assert "disruptions" not in job["status"]["trainer"]  # a killed container is the trainer's failure


def test_an_evicted_trainer_is_a_disruption_not_a_failure_and_resumes(product: Product, inputs: dict[str, str]) -> None:
    # backoffLimit 0: were the eviction counted as a failure, the job would fail.
    product.apply(fault_job("evicted", inputs, product.bucket, runPolicy={"backoffLimit": 0}))
    with PodRecorder(product, "evicted") as recorder:
        pod = running_pod(product, "evicted")
        first_complete = wait_for_checkpoint(product, "evicted")
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod["metadata"]["name"], "namespace": JOBS_NAMESPACE},
        }
        result = product.kube.kubectl(
            "create", "--raw", f"/api/v1/namespaces/{JOBS_NAMESPACE}/pods/{pod['metadata']['name']}/eviction",
            "-f", "-", input_text=json.dumps(eviction),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        job = succeeded(product, "evicted")

    first, second = recorder.pods()
    # SIGTERM: the trainer finished its step, saved and uploaded it, and exited 143 (its log's tail is the pod's
    # termination message); the next pod started from exactly that step.
    assert exit_code(first) == 143
    assert disruption_reason(first) == "EvictionByEvictionAPI"
    preempted = PREEMPTED.search(first["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert preempted is not None
    assert int(preempted.group(1)) >= first_complete
    assert resumed_step(product, second) == int(preempted.group(1))
    assert (job["status"]["trainer"]["attempts"], job["status"]["trainer"]["disruptions"]) == (2, 1)
    assert job["status"]["trainer"]["disruptedPods"] == [first["metadata"]["name"]]
    assert "Evicted" in event_reasons(product, "evicted")


def test_the_operator_pod_deleted_mid_run_creates_nothing_twice_and_status_converges(
    product: Product, inputs: dict[str, str]
) -> None:
    product.apply(fault_job("orphaned", inputs, product.bucket))
    running_pod(product, "orphaned")
    trainer_job = json.loads(
        product.kube.kubectl("get", "job", "orphaned-trainer", "-n", JOBS_NAMESPACE, "-o", "json", check=True).stdout
    )
    operator_pods = product.kube.kubectl(
        "get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "jsonpath={.items[*].metadata.name}", check=True
    ).stdout.split()

    product.kube.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, *operator_pods, "--wait=false", check=True)
    job = succeeded(product, "orphaned")

    jobs = json.loads(product.kube.kubectl("get", "jobs", "-n", JOBS_NAMESPACE, "-o", "json", check=True).stdout)
    owned = [j for j in jobs["items"] if j["metadata"]["labels"].get("kubetune.io/job-name") == "orphaned"]
    assert [j["metadata"]["uid"] for j in owned] == [trainer_job["metadata"]["uid"]]
    assert job["status"]["trainer"]["attempts"] == 1
    assert job["status"]["artifacts"]["adapter"] == f"s3://{product.bucket}/runs/orphaned/adapter"
    new_pods = product.kube.kubectl(
        "get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "jsonpath={.items[*].metadata.name}", check=True
    ).stdout.split()
    assert not set(new_pods) & set(operator_pods)


def peering_leader(product: Product) -> str:
    """The operator pod that acts: the kopf peer of the highest priority (peer ids hold the pod's host name)."""
    name = product.values.get("peering", {}).get("name", "kubetune")
    result = product.kube.kubectl("get", "clusterkopfpeering", name, "-o", "json", check=True)
    peers = json.loads(result.stdout).get("status") or {}
    leader_id = max(peers, key=lambda peer: peers[peer]["priority"])
    pods = product.kube.kubectl(
        "get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "jsonpath={.items[*].metadata.name}", check=True
    ).stdout.split()
    (leader,) = [pod for pod in pods if f"@{pod}" in leader_id]
    return leader


def test_with_two_operator_replicas_the_leader_deleted_mid_run_hands_over_and_creates_nothing_twice(
    product: Product, inputs: dict[str, str]
) -> None:
    two_replicas = {**product.values, "replicas": 2}
    product.release.upgrade(two_replicas)
    try:
        ready = ["get", "deployment", "-n", OPERATOR_NAMESPACE, "-o", "jsonpath={.items[0].status.readyReplicas}"]
        wait_for(lambda: product.kube.kubectl(*ready).stdout.strip() == "2", 240, "two ready operator replicas")
        wait_for(lambda: len(peers_of(product)) == 2, 60, "both replicas in the peering")
        product.apply(fault_job("handover", inputs, product.bucket))
        running_pod(product, "handover")
        trainer_job = json.loads(
            product.kube.kubectl("get", "job", "handover-trainer", "-n", JOBS_NAMESPACE, "-o", "json").stdout
        )
        leader = peering_leader(product)

        product.kube.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, leader, "--wait=false", check=True)
        job = succeeded(product, "handover")
    finally:
        product.release.upgrade(product.values)
        wait_for(lambda: product.kube.kubectl(*ready).stdout.strip() == "1", 240, "one ready operator replica")

    jobs = json.loads(product.kube.kubectl("get", "jobs", "-n", JOBS_NAMESPACE, "-o", "json", check=True).stdout)
    owned = [j for j in jobs["items"] if j["metadata"]["labels"].get("kubetune.io/job-name") == "handover"]
    assert [j["metadata"]["uid"] for j in owned] == [trainer_job["metadata"]["uid"]]
    assert job["status"]["trainer"]["attempts"] == 1
    assert job["status"]["evaluation"]["tuned"] is not None


def peers_of(product: Product) -> dict[str, Any]:
    name = product.values.get("peering", {}).get("name", "kubetune")
    result = product.kube.kubectl("get", "clusterkopfpeering", name, "-o", "json")
    return dict(json.loads(result.stdout).get("status") or {}) if result.returncode == 0 else {}


def test_s3_refusing_connections_during_a_checkpoint_is_a_storage_error_then_a_resume_from_a_complete_one(
    product: Product, inputs: dict[str, str]
) -> None:
    product.apply(fault_job("s3-outage", inputs, product.bucket, runPolicy={"backoffLimit": 4}))
    running_pod(product, "s3-outage")
    first_complete = wait_for_checkpoint(product, "s3-outage")

    with product.s3.refusing_connections():
        # The next checkpoint's upload fails (the trainer's S3 retries outlasted): the pod exits retryably.
        wait_for(
            lambda: any(p["status"].get("phase") == "Failed" for p in trainer_pods(product, "s3-outage")),
            180,
            "the trainer to give up on S3",
        )
    complete_after_outage, started_after_outage = checkpoint_steps(product, "s3-outage")
    job = succeeded(product, "s3-outage")

    pods = trainer_pods(product, "s3-outage")
    failed = [pod for pod in pods if pod["status"].get("phase") == "Failed"]
    terminated = failed[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 75, terminated
    assert "StorageError" in terminated["message"]
    # The retry resumed from a checkpoint that was complete when S3 came back, never from one cut short.
    resumed = resumed_step(product, pods[-1])
    assert resumed is not None
    assert resumed >= first_complete
    assert resumed == max(complete_after_outage)
    # A checkpoint the outage cut short (objects but no COMPLETE marker) is newer, and was passed over.
    assert all(step > resumed for step in started_after_outage - complete_after_outage)
    assert job["status"]["trainer"]["attempts"] == len(pods)


def test_a_restarted_api_server_loses_no_progress_for_good(
    product: Product, inputs: dict[str, str], kwok_cluster: KwokCluster
) -> None:
    product.apply(fault_job("api-restart", inputs, product.bucket))
    running_pod(product, "api-restart")
    # Down from the last steps until after the run ended: the trainer's last updates wait for the API server.
    wait_for(
        lambda: max(checkpoint_steps(product, "api-restart")[0], default=0) >= MAX_STEPS - 2 * CHECKPOINT_EVERY,
        240,
        "the run's last checkpoints",
        0.1,
    )
    # Stopping takes up to 10 s (a graceful shutdown, then SIGKILL), starting ~5-10 s more: ~20-25 s away in all.
    kwok_cluster.kube.restart_apiserver(down_seconds=5)
    job = succeeded(product, "api-restart")

    # The operator's watches and the trainer's status channel both came back: the final step and the results landed.
    assert job["status"]["progress"]["percent"] == 100
    assert job["status"]["trainer"]["attempts"] == 1
    assert job["status"]["evaluation"]["tuned"] is not None
    assert job["status"]["artifacts"]["manifest"].endswith("manifest.json")


def test_a_lost_node_ends_running_with_a_clear_reason_and_the_job_resumes_when_it_returns(
    product: Product, inputs: dict[str, str], kwok_cluster: KwokCluster
) -> None:
    tolerations = [
        {"key": f"node.kubernetes.io/{condition}", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": LOST_NODE_TOLERATION_SECONDS}
        for condition in ("unreachable", "not-ready")
    ]  # fmt: skip
    resources = {"gpus": 1, "tolerations": tolerations}
    product.apply(fault_job("node-lost", inputs, product.bucket, resources=resources))
    node = kwok_cluster.node
    with PodRecorder(product, "node-lost") as recorder:
        pod = running_pod(product, "node-lost")
        wait_for_checkpoint(product, "node-lost")
        # The machine dies: its kubelet and the trainer's container with it. The pod still reads Running.
        node.stop_kubelet()
        try:
            node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id(pod))
            timeout = NODE_MONITOR_GRACE_SECONDS + LOST_NODE_TOLERATION_SECONDS + 60
            lost = wait_until_condition(product, "node-lost", "Running", "False", "NodeLost", timeout)
            assert product.get("node-lost")["status"]["phase"] == "Pending"
            assert node.name in lost["message"]
            assert "out-of-service" in lost["message"]
        finally:
            node.start_kubelet()
        job = succeeded(product, "node-lost")

    first, *_, last = recorder.pods()
    assert disruption_reason(first) == "DeletionByTaintManager"
    assert job["status"]["trainer"]["disruptions"] == 1
    assert resumed_step(product, last) is not None


def wait_until_condition(
    product: Product, name: str, kind: str, status: str, reason: str, timeout: float
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        for condition in product.get(name)["status"].get("conditions") or []:
            if (condition["type"], condition["status"], condition["reason"]) == (kind, status, reason):
                found.update(condition)
                return True
        return False

    wait_for(reached, timeout, f"{name}: {kind}={status} ({reason})", interval=1)
    return found
