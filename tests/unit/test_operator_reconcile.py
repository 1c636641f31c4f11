"""reconcile(job, observed children): which objects to create, which suspend to set and which phase to write, as a
table of what the cluster holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from kubetune_operator.lifecycle import jobset_as_job, jobset_missing_status
from kubetune_operator.queueing import QueueState
from kubetune_operator.reconcile import Observed, reconcile
from kubetune_operator.settings import OperatorSettings

from kubetune import conditions as c
from kubetune.api import FineTuneJob

pytestmark = pytest.mark.unit

UID = "ftj-uid"
NOW = "2026-01-01T00:10:00Z"
SETTINGS = OperatorSettings(trainer_image="registry.example.com/kubetune/trainer:1")
SUCCEEDED = {
    "phase": "Succeeded",
    "artifacts": {"adapter": "s3://out/demo/adapter", "gguf": "s3://out/demo/gguf/model-q8_0.gguf"},
    "evaluation": {"metric": "accuracy", "gate": {"metric": "accuracy", "passed": False}},
}


def finetunejob(
    status: dict[str, Any] | None = None, deleting: bool = False, serving: dict[str, Any] | None = None, **spec: Any
) -> FineTuneJob:
    metadata: dict[str, Any] = {"name": "demo", "namespace": "team", "uid": UID, "generation": 1}
    if deleting:
        metadata["deletionTimestamp"] = NOW
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": metadata,
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/demo", "gguf": {"quantization": "q8_0"}},
            **({"serving": serving} if serving else {}),
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return FineTuneJob.model_validate(body)


def trainer_job(owner: str | None = UID, suspend: bool = False, condition: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "demo-trainer", "namespace": "team", "uid": "job-uid"}
    if owner is not None:
        metadata["ownerReferences"] = [{"uid": owner, "kind": "FineTuneJob"}]
    conditions = [{"type": condition, "status": "True", "reason": condition}] if condition else []
    return {"metadata": metadata, "spec": {"suspend": suspend}, "status": {"conditions": conditions}}


def jobset(owner: str = UID, suspend: bool = False, condition: str | None = None, reason: str = "") -> dict[str, Any]:
    """A multi-node trainer's JobSet as the API server holds it."""
    metadata = {"name": "demo-trainer", "namespace": "team", "uid": "jobset-uid", "ownerReferences": [{"uid": owner}]}
    conditions = [{"type": condition, "status": "True", "reason": reason or condition}] if condition else []
    return jobset_as_job(
        {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": metadata,
            "spec": {"suspend": suspend, "replicatedJobs": [{"name": "node", "replicas": 1}]},
            "status": {"conditions": conditions, "restarts": 0},
        }
    )


QUEUED = QueueState(
    "job-uid", False, "Pending", "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"
)
PREEMPTED = QueueState(
    "job-uid", False, "Preempted", "Preempted to accommodate a workload due to prioritization in the ClusterQueue", True
)


def running_pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "demo-trainer-aaaaa", "creationTimestamp": NOW, "ownerReferences": [{"uid": "job-uid"}]},
        "spec": {"nodeName": "gpu-1"},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "image": "t:1", "state": {"running": {"startedAt": NOW}}}],
        },
    }


@dataclass(frozen=True)
class Case:
    """A job, what the watches hold, and what reconcile must answer."""

    id: str
    job: FineTuneJob
    observed: Observed
    create: tuple[str, ...]  # kind/name of each object to create, in order
    suspend: bool | None
    phase: str | None  # the phase the status change writes (None: no status write)


CASES = [
    Case("new job: its trainer Job, no status yet", finetunejob(), Observed(), ("Job/demo-trainer",), None, None),
    Case(
        "trainer Job deleted by hand while running: created again",
        finetunejob({"phase": "Running"}),
        Observed(),
        ("Job/demo-trainer",),
        None,
        "Pending",
    ),
    Case(
        "a Job of the same name left by an earlier FineTuneJob: ours is created (the create waits for GC)",
        finetunejob({"phase": "Pending"}),
        Observed(trainer_job(owner="an-earlier-ftj")),
        ("Job/demo-trainer",),
        None,
        "Pending",
    ),
    Case(
        "its pod runs the pre-flight: Validating, nothing to create",
        finetunejob({"phase": "Pending"}),
        Observed(trainer_job(), (running_pod(),)),
        (),
        None,
        "Validating",
    ),
    Case(
        "runPolicy.suspend set: the Job is suspended",
        finetunejob({"phase": "Running"}, runPolicy={"suspend": True}),
        Observed(trainer_job(), (running_pod(),)),
        (),
        True,
        "Validating",
    ),
    Case(
        "suspended Job resumed",
        finetunejob({"phase": "Queued"}),
        Observed(trainer_job(suspend=True)),
        (),
        False,
        "Pending",
    ),
    Case(
        "Kueue decides when a queued job runs",
        finetunejob({"phase": "Queued"}, queueName="gpu-queue"),
        Observed(trainer_job(suspend=True)),
        (),
        None,
        "Queued",
    ),
    Case(
        "multi-node job: its JobSet",
        finetunejob(resources={"nodes": 2}),
        Observed(),
        ("JobSet/demo-trainer",),
        None,
        None,
    ),
    Case(
        "multi-node job suspended by the user: the JobSet is suspended",
        finetunejob({"phase": "Running"}, resources={"nodes": 2}, runPolicy={"suspend": True}),
        Observed(jobset()),
        (),
        True,
        "Pending",
    ),
    Case(
        "multi-node JobSet completed: Succeeded",
        finetunejob({"phase": "Running"}, resources={"nodes": 2}),
        Observed(jobset(condition="Completed")),
        (),
        None,
        "Succeeded",
    ),
    Case(
        "multi-node JobSet out of restarts: Failed",
        finetunejob({"phase": "Running"}, resources={"nodes": 2}),
        Observed(jobset(condition="Failed", reason="ReachedMaxRestarts")),
        (),
        None,
        "Failed",
    ),
    Case(
        "queued with Kueue's reason",
        finetunejob({"phase": "Queued"}, queueName="gpu-queue"),
        Observed(trainer_job(suspend=True), queue=QUEUED),
        (),
        None,
        "Queued",
    ),
    Case(
        "preempted by Kueue: Queued again, nothing created",
        finetunejob({"phase": "Running"}, queueName="gpu-queue"),
        Observed(trainer_job(suspend=True), queue=PREEMPTED),
        (),
        None,
        "Queued",
    ),
    Case(
        "the trainer Job failed: the run fails, nothing is created again",
        finetunejob({"phase": "Running"}),
        Observed(trainer_job(condition="Failed")),
        (),
        None,
        "Failed",
    ),
    Case(
        "failed runs are never restarted",
        finetunejob({"phase": "Failed"}),
        Observed(),
        (),
        None,
        "Failed",
    ),
    Case(
        "a job being deleted gets nothing",
        finetunejob({"phase": "Running"}, deleting=True),
        Observed(),
        (),
        None,
        "Pending",
    ),
    Case(
        "succeeded and served: its Deployment and Service",
        finetunejob(SUCCEEDED, serving={"runtime": "llamaCpp", "whenGateFails": True}),
        Observed(),
        ("Deployment/demo-serve", "Service/demo-serve"),
        None,
        "Succeeded",
    ),
    Case(
        "succeeded, endpoint exists",
        finetunejob(SUCCEEDED, serving={"runtime": "llamaCpp", "whenGateFails": True}),
        Observed(serving=True),
        (),
        None,
        "Succeeded",
    ),
    Case(
        "succeeded but the gate failed: no endpoint",
        finetunejob(SUCCEEDED, serving={"runtime": "llamaCpp"}),
        Observed(),
        (),
        None,
        "Succeeded",
    ),
    Case(
        "succeeded without spec.serving",
        finetunejob(SUCCEEDED),
        Observed(),
        (),
        None,
        "Succeeded",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_reconcile(case: Case) -> None:
    result = reconcile(case.job, case.observed, SETTINGS, NOW)

    assert tuple(f"{child['kind']}/{child['metadata']['name']}" for child in result.children.create) == case.create
    assert result.children.suspend == case.suspend
    assert result.status.status.phase == case.phase


def test_a_trainer_job_of_an_earlier_finetunejob_is_not_read_as_this_job_s() -> None:
    result = reconcile(finetunejob({"phase": "Pending"}), Observed(trainer_job(owner="an-earlier-ftj")), SETTINGS, NOW)

    assert result.status.status.message == "trainer Job demo-trainer does not exist"


def test_every_object_to_create_is_in_the_job_s_namespace_and_labelled_as_kubetune_s() -> None:
    created = [
        *reconcile(finetunejob(), Observed(), SETTINGS, NOW).children.create,
        *reconcile(
            finetunejob(SUCCEEDED, serving={"runtime": "llamaCpp", "whenGateFails": True}), Observed(), SETTINGS, NOW
        ).children.create,
    ]

    assert len(created) == 3
    for child in created:
        assert child["metadata"]["namespace"] == "team"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"


def test_reconciling_again_after_the_status_is_written_asks_for_nothing_new() -> None:
    job = finetunejob({"phase": "Pending"})
    observed = Observed(trainer_job(), (running_pod(),))
    first = reconcile(job, observed, SETTINGS, NOW)
    written = FineTuneJob.model_validate(
        {**job.model_dump(by_alias=True, exclude_none=True, mode="json"), "status": first.status.status.to_wire()}
    )

    again = reconcile(written, observed, SETTINGS, NOW)

    assert (again.children.create, again.children.suspend, again.status.patch) == ((), None, {})


def condition(result: Any, condition_type: str) -> Any:
    return next(cond for cond in result.status.status.conditions if cond.type == condition_type)


def test_a_queued_job_says_why_in_kueue_s_words() -> None:
    result = reconcile(
        finetunejob({"phase": "Queued"}, queueName="gpu-queue"),
        Observed(trainer_job(suspend=True), queue=QUEUED),
        SETTINGS,
        NOW,
    )

    queued = condition(result, c.CONDITION_QUEUED)
    assert (queued.status, queued.reason) == ("True", c.REASON_WAITING_FOR_QUEUE)
    assert queued.message == (
        "waiting for Kueue to admit the trainer from LocalQueue gpu-queue; Kueue: couldn't assign flavors to pod set "
        "main: insufficient unused quota for nvidia.com/gpu"
    )


def test_a_preempted_job_says_it_was_preempted_and_resumes_from_its_checkpoint() -> None:
    result = reconcile(
        finetunejob({"phase": "Running"}, queueName="gpu-queue"),
        Observed(trainer_job(suspend=True), queue=PREEMPTED),
        SETTINGS,
        NOW,
    )

    queued = condition(result, c.CONDITION_QUEUED)
    assert (queued.status, queued.reason) == ("True", c.REASON_PREEMPTED)
    assert "Preempted to accommodate a workload" in queued.message
    assert "resumes from its newest checkpoint" in queued.message
    assert [(t.from_phase, t.to_phase) for t in result.status.transitions] == [("Running", "Queued")]


def test_a_multi_node_job_on_a_cluster_without_jobset_waits_and_says_what_to_install() -> None:
    change = jobset_missing_status(finetunejob(resources={"nodes": 2}), NOW)

    assert change.status.phase == "Pending"
    running = next(cond for cond in change.status.conditions if cond.type == c.CONDITION_RUNNING)
    assert (running.status, running.reason) == ("False", c.REASON_JOBSET_MISSING)
    assert running.message.startswith("resources.nodes is 2: a multi-node trainer runs as a JobSet")
    assert "restart the kubetune operator" in running.message
    assert [(t.from_phase, t.to_phase, t.reason) for t in change.transitions] == [
        (None, "Pending", c.REASON_JOBSET_MISSING)
    ]


def test_a_jobset_s_attempts_are_its_restarts_and_its_start_its_first_pod_s() -> None:
    view = jobset_as_job(
        {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": {"name": "demo-trainer", "uid": "jobset-uid", "ownerReferences": [{"uid": UID}]},
            "spec": {"suspend": False},
            "status": {"restarts": 1},
        }
    )
    pods = []
    for name, started in (("demo-trainer-node-0-0-aaaaa", "2026-01-01T00:05:00Z"), ("b", "2026-01-01T00:04:00Z")):
        pod = running_pod()
        pod["metadata"].update(name=name, labels={"jobset.sigs.k8s.io/jobset-uid": "jobset-uid"})
        pod["status"]["startTime"] = started
        pods.append(pod)

    result = reconcile(
        finetunejob({"phase": "Running"}, resources={"nodes": 2}), Observed(view, tuple(pods)), SETTINGS, NOW
    )

    trainer = result.status.status.trainer
    assert trainer is not None
    assert (trainer.job_name, trainer.attempts, trainer.start_time) == ("demo-trainer", 2, "2026-01-01T00:04:00Z")
