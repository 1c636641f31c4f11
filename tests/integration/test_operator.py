"""The operator as a process (`python -m kubetune_operator`) against a real control plane, acting with exactly
`operator_rbac_rules()`: children with owner references, real pod failures, suspend/resume, restarts, deletion."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator.builders import LABEL_JOB_NAME
from kubetune_operator.rbac import operator_rbac_rules
from kubetune_operator.settings import DEFAULT_TRAINER_SERVICE_ACCOUNT
from prometheus_client.parser import text_string_to_metric_families

from kubetune import conditions as c
from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.crd import CRD_NAME, render_crd_yaml
from tests.conftest import KwokCluster
from tests.testbed.batch_engines import install_gpu_queue, install_priority_classes
from tests.testbed.controlplane import ControlPlane
from tests.testbed.kwok import gpu_node_manifest
from tests.testbed.node import NODE_KIND_LABEL
from tests.testbed.processes import ManagedProcess, free_port, http_ok, wait_for
from tests.testbed.trainer_credentials import SETTINGS as TRAINER_SETTINGS
from tests.testbed.trainer_credentials import install_trainer_rbac

pytestmark = pytest.mark.integration

OPERATOR_NAMESPACE = "kubetune-system"
# Not the chart's names: the e2e test installs the chart (release kubetune) into the same control plane.
OPERATOR_ACCOUNT = "testbed-operator"
PEERING_YAML = Path(__file__).resolve().parents[2] / "operator" / "kubetune_operator" / "peering.yaml"
ON_KWOK = {NODE_KIND_LABEL: "kwok"}  # kwok runs the pod and completes it at once
ON_NODE = {NODE_KIND_LABEL: "real"}  # the real node runs the trainer image in a container
NOWHERE = {"pool": "no-such-pool"}  # no node matches: the pod stays unschedulable
# What a FineTuneJob owns: its trainer Job (whose pods the Job owns). The trainer identity is per namespace.
CHILD_KINDS = ("job",)
IDENTITY_KINDS = ("serviceaccount", "rolebinding")
TRAINER_ACCOUNT = DEFAULT_TRAINER_SERVICE_ACCOUNT
# Each operator start outranks the ones before, so a replica that died without leaving the peering never pauses it.
_priorities = itertools.count(int(time.time()) % 1_000_000)


@pytest.fixture(scope="module")
def cluster(kwok_cluster: KwokCluster, tmp_path_factory: pytest.TempPathFactory) -> ControlPlane:
    """The control plane with the FineTuneJob CRD and kopf's peering CRDs installed."""
    kube = kwok_cluster.kube
    crd = tmp_path_factory.mktemp("crd") / "crd.yaml"
    crd.write_text(render_crd_yaml())
    for path in (crd, PEERING_YAML):
        kube.kubectl("apply", "--server-side", "-f", str(path), check=True)
    for name in (CRD_NAME, "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", check=True)
    return kube


@pytest.fixture(scope="module")
def operator_kubeconfig(cluster: ControlPlane) -> str:
    """A ServiceAccount bound to a ClusterRole of exactly operator_rbac_rules(), as the chart installs it."""
    kube = cluster
    if kube.kubectl("get", "namespace", OPERATOR_NAMESPACE).returncode != 0:
        kube.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=True)
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}})  # fmt: skip
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": OPERATOR_ACCOUNT},
            "rules": operator_rbac_rules(),
        }
    )
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": OPERATOR_ACCOUNT},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}],
        }
    )
    install_trainer_rbac(kube)  # the chart's trainer ClusterRole, which the operator binds per namespace
    kubeconfig = kube.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT)
    can_i = kube.kubectl("--kubeconfig", kubeconfig, "auth", "can-i", "list", "secrets", "-A")
    assert can_i.stdout.strip() == "no", "the operator's identity must not read Secrets"
    return kubeconfig


@dataclass
class Operator:
    """One operator process, started and stopped by the test."""

    kubeconfig: str
    log_dir: Path
    trainer_image: str
    metrics_port: int = 0
    health_port: int = 0
    process: ManagedProcess | None = None

    def start(self) -> Operator:
        self.metrics_port = free_port()
        self.health_port = free_port()
        while self.health_port == self.metrics_port:  # free_port can hand out a just-released port again
            self.health_port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("KUBETUNE_", "KUBECONFIG"))}
        env.update(
            {
                "KUBECONFIG": self.kubeconfig,
                # The test bed's API server has a self-signed certificate; one warning per request drowns the log.
                "PYTHONWARNINGS": "ignore:Unverified HTTPS request",
                "KUBETUNE_LISTEN_ADDRESS": "127.0.0.1",
                "KUBETUNE_METRICS_PORT": str(self.metrics_port),
                "KUBETUNE_HEALTH_PORT": str(self.health_port),
                "KUBETUNE_PEERING_PRIORITY": str(next(_priorities)),
                "KUBETUNE_TRAINER_IMAGE": self.trainer_image,
                "KUBETUNE_S3_ENDPOINT": "http://127.0.0.1:9",
                "KUBETUNE_S3_REGION": "us-east-1",
                "KUBETUNE_TRAINER_CLUSTER_ROLE": TRAINER_SETTINGS.trainer_cluster_role,
            }
        )
        name = f"operator-{uuid.uuid4().hex[:6]}"
        self.process = ManagedProcess(name, [sys.executable, "-m", "kubetune_operator"], self.log_dir, env=env).start()
        try:
            wait_for(
                lambda: (
                    self.process is not None
                    and self.process.alive()
                    and http_ok(f"http://127.0.0.1:{self.health_port}/healthz")
                ),
                90,
                f"the operator's /healthz on port {self.health_port}",
            )
        except TimeoutError as error:
            self.stop()  # never leave a replica behind: it would outlive the test and act on later jobs
            raise AssertionError(f"{error}\n{self.log()}") from None
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)

    def get(self, path: str, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        return self.process.log_tail(200) if self.process else ""


@pytest.fixture
def operator(operator_kubeconfig: str, testbed_dir: Path, kwok_cluster: KwokCluster) -> Iterator[Operator]:
    running = Operator(operator_kubeconfig, testbed_dir / "operator", kwok_cluster.images.trainer).start()
    yield running
    running.stop()


def finetunejob(name: str, node_selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    resources = {"gpus": 1, "nodeSelector": node_selector, **spec.pop("resources", {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://out/{name}"},
            "resources": resources,
            **spec,
        },
    }


class Jobs:
    """FineTuneJobs and their children, read as admin."""

    def __init__(self, kube: ControlPlane, namespace: str) -> None:
        from kubernetes import client

        self.kube = kube
        self.namespace = namespace
        self.api = kube.api_client()
        self.custom = client.CustomObjectsApi(self.api)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return created

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return found

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def count_in_phase(self, phase: str) -> int:
        """FineTuneJobs in this phase across the whole cluster (the operator watches every namespace)."""
        listed = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        return sum(1 for item in listed["items"] if (item.get("status") or {}).get("phase") == phase)

    def child(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.kube.kubectl("get", kind, name, "-n", self.namespace, "-o", "json")
        return json.loads(result.stdout) if result.returncode == 0 else None

    def children_of(self, job: str, kind: str) -> list[dict[str, Any]]:
        result = self.kube.kubectl(
            "get", kind, "-n", self.namespace, "-l", f"{LABEL_JOB_NAME}={job}", "-o", "json", check=True
        )
        items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
        return items

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        for condition in (self.get(name).get("status") or {}).get("conditions") or []:
            if condition["type"] == kind:
                return dict(condition)
        return None

    def events(self, name: str) -> list[dict[str, Any]]:
        result = self.kube.kubectl(
            "get", "events", "-n", self.namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json",
            check=True,
        )  # fmt: skip
        items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
        return items

    def wait_phase(self, name: str, phase: str, *, operator: Operator, timeout: float = 90) -> dict[str, Any]:
        def reached() -> bool:
            return (self.get(name).get("status") or {}).get("phase") == phase

        try:
            wait_for(reached, timeout, f"FineTuneJob {name} to reach {phase}")
        except TimeoutError as error:
            raise AssertionError(f"{error}; status: {self.get(name).get('status')}\n{operator.log()}") from None
        return self.get(name)

    def wait_condition(
        self, name: str, kind: str, status: str, reason: str, *, operator: Operator, timeout: float = 90
    ) -> dict[str, Any]:
        def reached() -> bool:
            found = self.condition(name, kind)
            return found is not None and (found["status"], found["reason"]) == (status, reason)

        try:
            wait_for(reached, timeout, f"{name}: {kind}={status} ({reason})")
        except TimeoutError as error:
            raise AssertionError(f"{error}; status: {self.get(name).get('status')}\n{operator.log()}") from None
        found = self.condition(name, kind)
        assert found is not None
        return found


@pytest.fixture
def jobs(cluster: ControlPlane, namespace: str) -> Jobs:
    return Jobs(cluster, namespace)


def phase_events(jobs: Jobs, name: str) -> list[dict[str, Any]]:
    """The operator's phase-transition Events on a FineTuneJob ("<from> → <to>: <message>"), oldest first."""
    events = [e for e in jobs.events(name) if " → " in e.get("message", "")]
    # Event timestamps have 1 s resolution; the resourceVersion (an etcd revision) orders events within a second.
    return sorted(
        events,
        key=lambda e: (e.get("firstTimestamp") or e.get("eventTime") or "", int(e["metadata"]["resourceVersion"])),
    )


def phase_gauge(operator: Operator, phase: str) -> float:
    """The operator's kubetune_jobs{phase=...} value."""
    for family in text_string_to_metric_families(operator.get("/metrics", operator.metrics_port)):
        for sample in family.samples:
            if sample.name == "kubetune_jobs" and sample.labels.get("phase") == phase:
                return float(sample.value)
    raise AssertionError(f"kubetune_jobs has no phase={phase} series")


def child_uids(jobs: Jobs, name: str) -> dict[str, str]:
    """uids of the job's children and of the namespace's trainer identity, by kind."""
    uids = {}
    named = [(kind, f"{name}-trainer") for kind in CHILD_KINDS] + [(kind, TRAINER_ACCOUNT) for kind in IDENTITY_KINDS]
    for kind, child_name in named:
        child = jobs.child(kind, child_name)
        assert child is not None, f"{kind} {child_name} is missing"
        uids[kind] = child["metadata"]["uid"]
    return uids


def test_children_are_created_owned_and_the_job_succeeds(jobs: Jobs, operator: Operator) -> None:
    created = jobs.create(finetunejob("happy", ON_KWOK))
    done = jobs.wait_phase("happy", "Succeeded", operator=operator)

    for kind in CHILD_KINDS:
        child = jobs.child(kind, "happy-trainer")
        assert child is not None, f"{kind} happy-trainer was not created"
        owners = child["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"], o["uid"], o["controller"]) for o in owners] == [
            ("FineTuneJob", "happy", created["metadata"]["uid"], True)
        ]
        assert child["metadata"]["labels"][LABEL_JOB_NAME] == "happy"
    pod_spec = jobs.child("job", "happy-trainer")["spec"]["template"]["spec"]  # type: ignore[index]
    env = {item["name"]: item.get("value") for item in pod_spec["containers"][0]["env"]}
    manifest = yaml.safe_load(env["KUBETUNE_JOB_MANIFEST"])
    assert manifest["spec"]["image"] == operator.trainer_image
    assert manifest["spec"]["s3"]["endpoint"] == "http://127.0.0.1:9"
    assert pod_spec["serviceAccountName"] == TRAINER_ACCOUNT
    # The namespace's trainer identity: shared by its jobs, owned by none, bound to the chart's trainer ClusterRole.
    for kind in IDENTITY_KINDS:
        identity = jobs.child(kind, TRAINER_ACCOUNT)
        assert identity is not None, f"{kind} {TRAINER_ACCOUNT} was not created"
        assert not identity["metadata"].get("ownerReferences")
    binding = jobs.child("rolebinding", TRAINER_ACCOUNT)
    assert binding is not None
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": TRAINER_SETTINGS.trainer_cluster_role,
    }
    assert jobs.child("configmap", "happy-trainer") is None
    assert jobs.child("role", "happy-trainer") is None

    status = done["status"]
    assert status["trainer"]["jobName"] == "happy-trainer"
    assert status["trainer"]["attempts"] == 1
    assert status["observedGeneration"] == 1
    conditions = {cond["type"]: (cond["status"], cond["reason"]) for cond in status["conditions"]}
    assert conditions[c.CONDITION_SUCCEEDED] == ("True", c.REASON_COMPLETED)
    assert conditions[c.CONDITION_VALIDATED] == ("True", c.REASON_JOB_CREATED)
    assert conditions[c.CONDITION_RUNNING][0] == "False"
    # The operator writes nothing but the status: no finalizer, no kopf bookkeeping in annotations.
    metadata = done["metadata"]
    assert not metadata.get("finalizers")
    assert not any(key.startswith(("kubetune.io/", "kopf.zalando.org/")) for key in metadata.get("annotations", {}))
    assert done["metadata"]["generation"] == created["metadata"]["generation"]

    wait_for(lambda: any(e["reason"] == c.REASON_COMPLETED for e in jobs.events("happy")), 30, "the Completed Event")
    transitions = phase_events(jobs, "happy")
    assert transitions[0]["message"].startswith("New → ")
    # kwok's pod never reports a stage, so it is Validating while it runs (or too quick to see at all).
    assert transitions[-1]["message"].startswith(
        ("Running → Succeeded", "Validating → Succeeded", "Pending → Succeeded")
    )
    assert all(e["type"] == "Normal" for e in transitions)

    # The gauge counts every FineTuneJob in the cluster (other tests leave theirs behind) and follows the operator's
    # own watch, which may lag the read above: it must settle on what the API server lists as Succeeded.
    wait_for(
        lambda: phase_gauge(operator, "Succeeded") == jobs.count_in_phase("Succeeded") >= 1,
        30,
        "kubetune_jobs{phase=Succeeded} to count the succeeded jobs",
    )
    metrics = operator.get("/metrics", operator.metrics_port)
    assert f'kubetune_job_progress_ratio{{job="happy",namespace="{jobs.namespace}"}} 1.0' in metrics
    assert 'kubetune_job_phase_transitions_total{from_phase="New",to_phase=' in metrics
    assert f'kubetune_job_gpu_seconds_total{{job="happy",namespace="{jobs.namespace}"}}' in metrics
    # kopf caches probe results for 10 s.
    wait_for(
        lambda: json.loads(operator.get("/healthz", operator.health_port))["trackedJobs"] >= 1,
        30,
        "/healthz to count the job",
    )


def test_a_trainer_that_really_fails_fails_the_job_with_the_cause(jobs: Jobs, operator: Operator) -> None:
    # The trainer image runs on the real node with no S3 credentials at all (neither the job nor the operator names a
    # Secret): it reports a storage failure, naming what to set, before it loads anything.
    jobs.create(finetunejob("broken", ON_NODE, runPolicy={"backoffLimit": 0}))
    failed = jobs.wait_condition(
        "broken", c.CONDITION_FAILED, "True", c.TRAINER_REASON_STORAGE_ERROR, operator=operator, timeout=180
    )
    assert "s3://data/train.jsonl: cannot read dataset.train: no S3 credentials" in failed["message"]
    assert "(after 1 attempt)" in failed["message"]
    assert jobs.get("broken")["status"]["phase"] == "Failed"
    wait_for(
        lambda: any(
            e["type"] == "Warning" and e["reason"] == c.TRAINER_REASON_STORAGE_ERROR for e in jobs.events("broken")
        ),
        30,
        "a Warning Event for the failure",
    )


def test_a_missing_credentials_secret_keeps_the_job_pending_naming_it(jobs: Jobs, operator: Operator) -> None:
    # The kubelet cannot build the container's environment, and keeps retrying: the job waits, saying why.
    jobs.create(finetunejob("no-secret", ON_NODE, s3={"credentialsSecretRef": "missing-s3"}))

    waiting = jobs.wait_condition(
        "no-secret", c.CONDITION_RUNNING, "False", "CreateContainerConfigError", operator=operator, timeout=120
    )

    assert "missing-s3" in waiting["message"]
    assert jobs.get("no-secret")["status"]["phase"] == "Pending"


def test_an_image_that_cannot_be_pulled_keeps_the_job_pending_with_the_cause(
    jobs: Jobs, operator: Operator, kwok_cluster: KwokCluster
) -> None:
    # A real pull from the test bed's registry, of a tag it does not hold.
    image = kwok_cluster.registry.image("kubetune/trainer:missing")
    jobs.create(finetunejob("no-image", ON_NODE, image=image))

    waiting = jobs.wait_condition(
        "no-image", c.CONDITION_RUNNING, "False", c.REASON_IMAGE_PULL_BACKOFF, operator=operator, timeout=120
    )

    assert image in waiting["message"]
    assert "not found" in waiting["message"]
    assert jobs.get("no-image")["status"]["phase"] == "Pending"


def test_a_trainer_over_its_memory_limit_is_oom_killed_and_the_job_fails_saying_so(
    jobs: Jobs, operator: Operator
) -> None:
    # The trainer image under a 64 MiB cgroup limit: importing its libraries alone needs more, and the kernel's OOM
    # killer ends it.
    jobs.create(finetunejob("hungry", ON_NODE, resources={"memory": "64Mi"}, runPolicy={"backoffLimit": 0}))

    failed = jobs.wait_condition(
        "hungry", c.CONDITION_FAILED, "True", c.REASON_OOM_KILLED, operator=operator, timeout=180
    )

    assert "raise resources.memory" in failed["message"]
    assert jobs.get("hungry")["status"]["phase"] == "Failed"


# ---------------------------------------------------------------------------------------------------------------------
# Kueue (its real controller: quota, admission order, preemption) and JobSet (multi-node trainers).


@dataclass(frozen=True)
class GpuQueue:
    """A ClusterQueue of `gpus` nvidia.com/gpu (preempting lower priorities within it) and the namespace's LocalQueue
    pointing at it. The pools are node labels no node has until the test adds a kwok node with them: an admitted
    trainer's pod waits there, holding its quota, until the test lets it run (and kwok complete it)."""

    name: str
    namespace: str

    @property
    def local_queue(self) -> str:
        return "gpu-queue"

    def pool(self, label: str) -> dict[str, str]:
        return {"pool": f"{self.name}-{label}"}


@pytest.fixture
def gpu_queue(cluster: ControlPlane, namespace: str) -> Iterator[GpuQueue]:
    queue = GpuQueue(f"gpus-{namespace}", namespace)
    install_gpu_queue(cluster, queue.name, queue.local_queue, namespace, gpus=2)
    yield queue
    cluster.kubectl("delete", "node", "-l", f"pool-of={queue.name}", "--wait=false")
    cluster.kubectl("delete", "clusterqueue", queue.name, "--wait=false")


def open_pool(kube: ControlPlane, queue: GpuQueue, label: str) -> None:
    """A kwok GPU node in the pool: the trainers waiting there get scheduled, and kwok completes their pods."""
    node = gpu_node_manifest(f"{queue.name}-{label}")
    node["metadata"]["labels"].update({**queue.pool(label), "pool-of": queue.name})
    kube.apply(node)


def trainer_suspended(jobs: Jobs, kind: str, name: str) -> bool | None:
    """spec.suspend of the job's trainer (Job or JobSet); None while it does not exist."""
    trainer = jobs.child(kind, f"{name}-trainer")
    return None if trainer is None else bool(trainer["spec"].get("suspend"))


def wait_admitted(jobs: Jobs, name: str, *, operator: Operator, kind: str = "job") -> None:
    """Kueue admitted the job's trainer: it unsuspended it, and the FineTuneJob is not (or no longer) Queued."""
    try:
        wait_for(lambda: trainer_suspended(jobs, kind, name) is False, 60, f"Kueue to admit {name}'s trainer")
        wait_for(
            lambda: (
                (jobs.get(name).get("status") or {}).get("phase") not in (None, "Queued")
                and (jobs.condition(name, c.CONDITION_QUEUED) or {}).get("status") != "True"
            ),
            60,
            f"{name} to leave Queued",
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}; status: {jobs.get(name).get('status')}\n{operator.log()}") from None


def test_three_one_gpu_jobs_share_a_two_gpu_queue_the_third_waits_until_one_finishes(
    jobs: Jobs, operator: Operator, gpu_queue: GpuQueue
) -> None:
    queued = {"queueName": gpu_queue.local_queue}
    for name in ("first", "second"):
        jobs.create(finetunejob(name, gpu_queue.pool("a"), **queued))
        wait_admitted(jobs, name, operator=operator)
    jobs.create(finetunejob("third", gpu_queue.pool("b"), **queued))

    waiting = jobs.wait_condition("third", c.CONDITION_QUEUED, "True", c.REASON_WAITING_FOR_QUEUE, operator=operator)
    wait_for(
        lambda: (
            "insufficient unused quota for nvidia.com/gpu"
            in (jobs.condition("third", c.CONDITION_QUEUED) or {})["message"]
        ),
        30,
        "Kueue's reason on the third job",
    )
    waiting = jobs.condition("third", c.CONDITION_QUEUED) or {}
    assert waiting["message"].startswith(
        f"waiting for Kueue to admit the trainer from LocalQueue {gpu_queue.local_queue}; Kueue: "
    )
    assert jobs.get("third")["status"]["phase"] == "Queued"
    assert trainer_suspended(jobs, "job", "third") is True
    time.sleep(3)  # the first two hold the quota while their pods wait: the third stays queued
    assert trainer_suspended(jobs, "job", "third") is True

    open_pool(jobs.kube, gpu_queue, "a")  # the first two run and finish
    for name in ("first", "second"):
        jobs.wait_phase(name, "Succeeded", operator=operator)
    wait_admitted(jobs, "third", operator=operator)
    open_pool(jobs.kube, gpu_queue, "b")
    jobs.wait_phase("third", "Succeeded", operator=operator)


def test_a_higher_priority_job_preempts_a_lower_one_which_is_admitted_again_later(
    jobs: Jobs, operator: Operator, gpu_queue: GpuQueue
) -> None:
    install_priority_classes(jobs.kube, {"kubetune-test-low": 100, "kubetune-test-high": 1000})
    low = {"queueName": gpu_queue.local_queue, "resources": {"priorityClassName": "kubetune-test-low"}}
    high = {"queueName": gpu_queue.local_queue, "resources": {"priorityClassName": "kubetune-test-high"}}
    for name in ("low-a", "low-b"):
        jobs.create(finetunejob(name, gpu_queue.pool("low"), **low))
        wait_admitted(jobs, name, operator=operator)

    jobs.create(finetunejob("urgent", gpu_queue.pool("high"), **high))

    wait_admitted(jobs, "urgent", operator=operator)
    preempted = [name for name in ("low-a", "low-b") if trainer_suspended(jobs, "job", name)]
    assert len(preempted) == 1, "one 1-GPU job makes room for the 1-GPU urgent one"
    (victim,) = preempted
    condition = jobs.wait_condition(victim, c.CONDITION_QUEUED, "True", c.REASON_PREEMPTED, operator=operator)
    assert "Preempted" in condition["message"] and "resumes from its newest checkpoint" in condition["message"]
    assert jobs.get(victim)["status"]["phase"] == "Queued"
    assert jobs.children_of(victim, "pods") == [], "a suspended trainer's pod is stopped (SIGTERM: it checkpoints)"

    open_pool(jobs.kube, gpu_queue, "high")  # the urgent job runs and finishes: its quota comes back
    jobs.wait_phase("urgent", "Succeeded", operator=operator)
    wait_admitted(jobs, victim, operator=operator)


def test_a_two_node_job_runs_as_a_jobset_admitted_by_kueue_as_one_unit(
    jobs: Jobs, operator: Operator, gpu_queue: GpuQueue
) -> None:
    created = jobs.create(
        finetunejob("wide", gpu_queue.pool("wide"), queueName=gpu_queue.local_queue, resources={"nodes": 2})
    )
    # Two nodes of one GPU: the whole 2-GPU quota, admitted at once; a 1-GPU job behind it waits for all of it.
    wait_admitted(jobs, "wide", operator=operator, kind="jobset")
    jobs.create(finetunejob("narrow", gpu_queue.pool("wide"), queueName=gpu_queue.local_queue))
    jobs.wait_condition("narrow", c.CONDITION_QUEUED, "True", c.REASON_WAITING_FOR_QUEUE, operator=operator)

    jobset = jobs.child("jobset", "wide-trainer")
    assert jobset is not None
    assert [(o["kind"], o["name"], o["uid"]) for o in jobset["metadata"]["ownerReferences"]] == [
        ("FineTuneJob", "wide", created["metadata"]["uid"])
    ]
    wait_for(lambda: len(jobs.children_of("wide", "pods")) == 2, 60, "JobSet's two trainer pods")
    pods = sorted(jobs.children_of("wide", "pods"), key=lambda pod: pod["metadata"]["name"])
    assert [pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for pod in pods] == ["0", "1"]
    assert [pod["spec"]["hostname"] for pod in pods] == ["wide-trainer-node-0-0", "wide-trainer-node-0-1"]
    assert {pod["spec"]["subdomain"] for pod in pods} == {"wide-trainer"}
    assert all(pod["metadata"]["name"].startswith("wide-trainer-node-0-") for pod in pods)
    assert jobs.child("job", "wide-trainer") is None, "a multi-node trainer is no batch Job of that name"

    open_pool(jobs.kube, gpu_queue, "wide")
    done = jobs.wait_phase("wide", "Succeeded", operator=operator)
    assert done["status"]["trainer"]["jobName"] == "wide-trainer"
    jobs.wait_phase("narrow", "Succeeded", operator=operator)


def test_unschedulable_then_deadline_exceeded(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("stuck", NOWHERE, runPolicy={"activeDeadlineSeconds": 8}))
    waiting = jobs.wait_condition("stuck", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    assert "cannot be scheduled" in waiting["message"]
    assert jobs.get("stuck")["status"]["phase"] == "Pending"
    failed = jobs.wait_condition("stuck", c.CONDITION_FAILED, "True", c.REASON_DEADLINE_EXCEEDED, operator=operator)
    assert "activeDeadlineSeconds (8s)" in failed["message"]


def test_created_suspended_then_resumed_runs_to_the_end(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("paused", ON_KWOK, runPolicy={"suspend": True}))
    jobs.wait_condition("paused", c.CONDITION_SUSPENDED, "True", c.REASON_SUSPENDED_BY_USER, operator=operator)
    trainer = jobs.child("job", "paused-trainer")
    assert trainer is not None and trainer["spec"]["suspend"] is True
    assert jobs.children_of("paused", "pods") == []
    assert jobs.get("paused")["status"]["phase"] == "Pending"

    jobs.patch_spec("paused", {"runPolicy": {"suspend": False}})
    done = jobs.wait_phase("paused", "Succeeded", operator=operator)
    conditions = {cond["type"]: cond["status"] for cond in done["status"]["conditions"]}
    assert conditions[c.CONDITION_SUSPENDED] == "False"
    trainer = jobs.child("job", "paused-trainer")
    assert trainer is not None and trainer["spec"]["suspend"] is False


def test_suspending_a_running_job_stops_its_pod(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("interrupted", NOWHERE))
    jobs.wait_condition("interrupted", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    jobs.patch_spec("interrupted", {"runPolicy": {"suspend": True}})
    jobs.wait_condition("interrupted", c.CONDITION_SUSPENDED, "True", c.REASON_SUSPENDED_BY_USER, operator=operator)
    trainer = jobs.child("job", "interrupted-trainer")
    assert trainer is not None and trainer["spec"]["suspend"] is True
    wait_for(lambda: jobs.children_of("interrupted", "pods") == [], 60, "the Job controller to delete the pod")

    jobs.patch_spec("interrupted", {"runPolicy": {"suspend": False}})
    jobs.wait_condition("interrupted", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    assert jobs.condition("interrupted", c.CONDITION_SUSPENDED)["status"] == "False"  # type: ignore[index]


def test_an_operator_restart_creates_nothing_twice(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("restarted", NOWHERE))
    jobs.wait_condition("restarted", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    before = child_uids(jobs, "restarted")
    validated_at = jobs.condition("restarted", c.CONDITION_VALIDATED)["lastTransitionTime"]  # type: ignore[index]

    operator.stop()
    operator.start()
    # The new process acts on the job (so it has resumed it), and nothing was created again.
    jobs.patch_spec("restarted", {"runPolicy": {"suspend": True}})
    jobs.wait_condition("restarted", c.CONDITION_SUSPENDED, "True", c.REASON_SUSPENDED_BY_USER, operator=operator)
    assert child_uids(jobs, "restarted") == before
    assert len(jobs.children_of("restarted", "jobs")) == 1
    assert jobs.condition("restarted", c.CONDITION_VALIDATED)["lastTransitionTime"] == validated_at  # type: ignore[index]
    # A second "New → ..." Event would mean the restarted operator took the job for a new one.
    assert len([e for e in phase_events(jobs, "restarted") if e["message"].startswith("New → ")]) == 1


def test_deleting_a_job_while_the_operator_is_down_does_not_hang(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("doomed", NOWHERE))
    jobs.wait_condition("doomed", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    child_uids(jobs, "doomed")

    operator.stop()
    deleted = jobs.kube.kubectl("delete", PLURAL, "doomed", "-n", jobs.namespace, "--timeout=20s")
    assert deleted.returncode == 0, deleted.stderr

    def all_children_gone() -> bool:
        return all(jobs.child(kind, "doomed-trainer") is None for kind in CHILD_KINDS)

    wait_for(all_children_gone, 60, "the garbage collector to delete the children")
    assert jobs.children_of("doomed", "pods") == []
    # The namespace's trainer identity serves its other jobs and stays.
    assert all(jobs.child(kind, TRAINER_ACCOUNT) is not None for kind in IDENTITY_KINDS)


def test_a_hosted_job_gets_a_trainer_job_without_gpus_that_drives_it(jobs: Jobs, operator: Operator) -> None:
    hosted = finetunejob("hosted", ON_KWOK, backend="openai")
    hosted["spec"].pop("resources")
    hosted["spec"]["openai"] = {"model": "gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "key"}}
    jobs.create(hosted)

    wait_for(lambda: jobs.child("job", "hosted-trainer") is not None, 60, "the hosted job's trainer Job")
    container = jobs.child("job", "hosted-trainer")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "hosted"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    key = next(item for item in container["env"] if item["name"] == "OPENAI_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "openai", "key": "key"}


def test_only_the_highest_priority_replica_acts(
    jobs: Jobs, operator: Operator, operator_kubeconfig: str, testbed_dir: Path
) -> None:
    second = Operator(
        operator_kubeconfig, testbed_dir / "operator", operator.trainer_image
    ).start()  # outranks `operator`
    try:
        wait_for(lambda: "Pausing operations in favour of" in operator.log(), 30, "the first replica to pause")
        jobs.create(finetunejob("shared", NOWHERE))
        jobs.wait_condition("shared", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=second)
        assert "created Job shared-trainer" in second.log()
        assert "shared-trainer" not in operator.log()
    finally:
        second.stop()
    # With the higher replica gone (it leaves the peering on a clean stop), the other one takes over.
    wait_for(lambda: "Resuming operations after the pause" in operator.log().split("Pausing operations")[-1], 30,
             "the first replica to resume")  # fmt: skip
    jobs.create(finetunejob("takeover", NOWHERE))
    jobs.wait_condition("takeover", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    assert "created Job takeover-trainer" in operator.log()


def test_a_trainer_job_deleted_by_hand_is_put_back(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("resilient", NOWHERE))
    jobs.wait_condition("resilient", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    before = child_uids(jobs, "resilient")
    deleted = jobs.kube.kubectl("delete", "job", "resilient-trainer", "-n", jobs.namespace, "--wait=true")
    assert deleted.returncode == 0, deleted.stderr

    def replaced() -> bool:
        job = jobs.child("job", "resilient-trainer")
        return job is not None and job["metadata"]["uid"] != before["job"]

    wait_for(replaced, 60, "the operator to recreate the trainer Job")
    after = child_uids(jobs, "resilient")
    assert {kind: uid for kind, uid in after.items() if kind != "job"} == {
        kind: uid for kind, uid in before.items() if kind != "job"
    }
    assert len(jobs.children_of("resilient", "jobs")) == 1
    jobs.wait_condition("resilient", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)


def test_a_deleted_trainer_identity_is_created_again_now_or_for_the_next_job(jobs: Jobs, operator: Operator) -> None:
    jobs.create(finetunejob("waiting", NOWHERE))
    jobs.wait_condition("waiting", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator)
    before = {kind: uid for kind, uid in child_uids(jobs, "waiting").items() if kind in IDENTITY_KINDS}

    # While a trainer Job may still start pods, a deleted ServiceAccount or RoleBinding is created again at once.
    for kind in IDENTITY_KINDS:
        deleted = jobs.kube.kubectl("delete", kind, TRAINER_ACCOUNT, "-n", jobs.namespace, "--wait=true")
        assert deleted.returncode == 0, deleted.stderr

    def recreated() -> bool:
        found = {kind: jobs.child(kind, TRAINER_ACCOUNT) for kind in IDENTITY_KINDS}
        return all(item is not None and item["metadata"]["uid"] != before[kind] for kind, item in found.items())

    try:
        wait_for(recreated, 60, "the operator to create the trainer identity again")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{operator.log()}") from None

    # With no trainer Job left to start, it waits for the namespace's next job, whose pods then run as it.
    removed = jobs.kube.kubectl("delete", PLURAL, "waiting", "-n", jobs.namespace, "--wait=true")
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: jobs.child("job", "waiting-trainer") is None, 60, "the garbage collector to delete the Job")
    for kind in IDENTITY_KINDS:
        deleted = jobs.kube.kubectl("delete", kind, TRAINER_ACCOUNT, "-n", jobs.namespace, "--wait=true")
        assert deleted.returncode == 0, deleted.stderr
    jobs.create(finetunejob("next", ON_KWOK))
    jobs.wait_phase("next", "Succeeded", operator=operator)
    assert all(jobs.child(kind, TRAINER_ACCOUNT) is not None for kind in IDENTITY_KINDS)


def test_a_trainer_job_the_api_server_refuses_is_created_once_it_is_allowed(jobs: Jobs, operator: Operator) -> None:
    # A ResourceQuota of no Jobs makes the API server refuse the create (403); the operator backs off and retries
    # until the quota is gone, then creates the Job once.
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-jobs", "namespace": jobs.namespace},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    jobs.kube.apply(quota)
    jobs.create(finetunejob("held", NOWHERE))

    # The operator's log is shared with earlier tests' jobs (whose namespaces may still be terminating): only this
    # job's lines count.
    def refusals() -> list[str]:
        prefix = f"[{jobs.namespace}/held] cannot create the trainer Job (retrying in"
        return [line for line in operator.log().splitlines() if prefix in line]

    wait_for(refusals, 60, "a refused create")
    refusal = refusals()[0]
    assert "HTTP 403" in refusal and "quota" in refusal, refusal
    # Each attempt is one request: the client does not sleep and retry inside the create (which would hold every
    # other job's status back meanwhile); the operator's own backoff retries the job.
    assert not [line for line in operator.log().splitlines() if "will retry" in line and jobs.namespace in line]
    assert jobs.child("job", "held-trainer") is None
    deleted = jobs.kube.kubectl("delete", "resourcequota", "no-jobs", "-n", jobs.namespace, "--wait=true")
    assert deleted.returncode == 0, deleted.stderr

    jobs.wait_condition("held", c.CONDITION_RUNNING, "False", c.REASON_UNSCHEDULABLE, operator=operator, timeout=120)
    assert len(jobs.children_of("held", "jobs")) == 1


def serving_of(jobs: Jobs, name: str) -> dict[str, Any]:
    return dict((jobs.get(name).get("status") or {}).get("serving") or {})


def add_artifacts(jobs: Jobs, name: str, artifacts: dict[str, str], gate_passed: bool | None = None) -> None:
    """What a trainer's summary brings into status (kwok's pods leave none), written as the operator would."""
    status: dict[str, Any] = {"artifacts": artifacts}
    if gate_passed is not None:
        status["evaluation"] = {"metric": "accuracy", "gate": {"metric": "accuracy", "passed": gate_passed}}
    jobs.custom.patch_namespaced_custom_object_status(GROUP, VERSION, jobs.namespace, PLURAL, name, {"status": status})


def test_a_succeeded_job_gets_its_endpoint_owned_by_it_and_a_deleted_one_comes_back(
    jobs: Jobs, operator: Operator
) -> None:
    serving = {"runtime": "llamaCpp", "image": "registry.kubetune.test/kubetune/no-such-server:1"}
    output = {"uri": "s3://out/served", "gguf": {"quantization": "q8_0"}}
    created = jobs.create(finetunejob("served", ON_KWOK, output=output, serving=serving))
    jobs.wait_phase("served", "Succeeded", operator=operator)
    # kwok's trainer pod published nothing: no endpoint, and status.serving says why.
    wait_for(lambda: "published no GGUF file" in serving_of(jobs, "served").get("message", ""), 30, "the reason")
    assert jobs.child("deployment", "served-serve") is None

    add_artifacts(
        jobs, "served", {"adapter": "s3://out/served/adapter", "gguf": "s3://out/served/gguf/model-q8_0.gguf"}
    )
    wait_for(lambda: jobs.child("deployment", "served-serve") is not None, 30, "the endpoint's Deployment")
    deployment = jobs.child("deployment", "served-serve")
    service = jobs.child("service", "served-serve")
    assert deployment is not None and service is not None
    for child in (deployment, service):
        owners = [(o["kind"], o["name"], o["uid"]) for o in child["metadata"]["ownerReferences"]]
        assert owners == [("FineTuneJob", "served", created["metadata"]["uid"])]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][-2:] == ["s3://out/served/gguf/model-q8_0.gguf", "/models/model.gguf"]
    assert pod["containers"][0]["image"] == serving["image"]
    wait_for(
        lambda: serving_of(jobs, "served").get("url") == f"http://served-serve.{jobs.namespace}.svc:8080/v1",
        30,
        "status.serving.url",
    )
    assert serving_of(jobs, "served")["model"] == "served"
    # The operator watches its Deployments: one deleted by hand is created again.
    jobs.kube.kubectl("delete", "deployment", "served-serve", "-n", jobs.namespace, "--wait=false", check=True)

    def recreated() -> bool:
        again = jobs.child("deployment", "served-serve")
        return again is not None and again["metadata"]["uid"] != deployment["metadata"]["uid"]

    wait_for(recreated, 60, "the deleted Deployment to be created again")
    assert "cannot create the endpoint" not in operator.log()


def test_a_job_whose_gate_failed_gets_no_endpoint_unless_asked(jobs: Jobs, operator: Operator) -> None:
    output = {"uri": "s3://out/gated", "gguf": {"quantization": "q8_0"}}
    for name, serving in (
        ("gated", {"runtime": "llamaCpp"}),
        ("gated-anyway", {"runtime": "llamaCpp", "whenGateFails": True}),
    ):
        jobs.create(finetunejob(name, ON_KWOK, output={**output, "uri": f"s3://out/{name}"}, serving=serving))
    for name in ("gated", "gated-anyway"):
        jobs.wait_phase(name, "Succeeded", operator=operator)
        add_artifacts(jobs, name, {"gguf": f"s3://out/{name}/gguf/model-q8_0.gguf"}, gate_passed=False)
    wait_for(lambda: jobs.child("deployment", "gated-anyway-serve") is not None, 30, "the asked-for endpoint")
    wait_for(lambda: "gate failed" in serving_of(jobs, "gated").get("message", ""), 30, "the reason in status")
    assert jobs.child("deployment", "gated-serve") is None
    assert jobs.child("service", "gated-serve") is None
