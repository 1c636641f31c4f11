"""Status derivation from a trainer Job and its pods: phases, condition reasons, results, transitions, idempotence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from kubetune_operator.lifecycle import (
    StatusChange,
    derive_status,
    invalid_spec_status,
    needs_trainer,
    suspend_change,
)

from kubetune import conditions as c
from kubetune.api import FineTuneJob, FineTuneJobStatus
from kubetune.contract import TrainerSummary

pytestmark = pytest.mark.unit

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"
T2 = "2026-01-01T00:10:00Z"
JOB_UID = "job-uid-1"


def finetunejob(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> FineTuneJob:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team", "uid": "ftj-uid", "generation": generation},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/demo"},
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return FineTuneJob.model_validate(body)


def trainer_job(*conditions: tuple[str, str], suspend: bool = False, **status: Any) -> dict[str, Any]:
    """A batch/v1 Job as the API returns it; conditions as (type, reason), all True."""
    return {
        "metadata": {"name": "demo-trainer", "namespace": "team", "uid": JOB_UID},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason,
                    "message": f"{reason} happened",
                    "lastTransitionTime": T1,
                }
                for kind, reason in conditions
            ],
            **status,
        },
    }


@dataclass
class PodState:
    """What a trainer pod looks like at one moment."""

    name: str = "demo-trainer-aaaaa"
    created: str = T0
    phase: str = "Pending"
    scheduled: dict[str, str] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    deleting: bool = False
    disruption: str | None = None  # the reason of a True DisruptionTarget condition

    def manifest(self) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": self.phase}
        conditions = [{"type": "PodScheduled", **self.scheduled}] if self.scheduled is not None else []
        if self.disruption:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": self.disruption})
        if conditions:
            status["conditions"] = conditions
        if self.state:
            status["containerStatuses"] = [{"name": "trainer", "image": "trainer:1", "state": self.state}]
        metadata: dict[str, Any] = {
            "name": self.name,
            "creationTimestamp": self.created,
            "ownerReferences": [{"uid": JOB_UID}],
        }
        if self.deleting:
            metadata["deletionTimestamp"] = T2
        return {"metadata": metadata, "spec": {"nodeName": "gpu-node-3"}, "status": status}


def summary(**fields: Any) -> str:
    return TrainerSummary.model_validate(fields).to_termination_message()


def terminated(reason: str, code: int, message: str = "") -> dict[str, Any]:
    return {"terminated": {"reason": reason, "exitCode": code, "message": message}}


def conditions_of(change: StatusChange) -> dict[str, tuple[str, str]]:
    return {cond.type: (cond.status, cond.reason) for cond in change.status.conditions}


def apply(job: FineTuneJob, change: StatusChange) -> FineTuneJob:
    """The FineTuneJob after the API server merged the patch into its status."""
    body = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    status = body.get("status") or {}
    for key, value in change.patch.get("status", {}).items():
        status[key] = {**status.get(key, {}), **value} if key == "metrics" else value
    body["status"] = status
    return FineTuneJob.model_validate(body)


RUNNING_POD = PodState(phase="Running", scheduled={"status": "True"}, state={"running": {"startedAt": T0}})
SUCCEEDED_SUMMARY = summary(
    outcome="Succeeded",
    message="done",
    metrics={"train_loss": 0.42, "eval_accuracy": 0.88},
    dataset={"format": "classification", "trainRows": 2000, "sha256": "ab" * 32},
    evaluation={
        "metric": "accuracy",
        "tuned": 0.88,
        "baselines": {"zeroShot": 0.08, "fewShot": 0.31},
        "lift": {"zeroShot": 0.8, "fewShot": 0.57},
        "samples": 200,
        "gate": {"passed": True, "message": "accuracy 0.880 >= 0.5"},
    },
    artifacts={"adapter": "s3://out/demo/adapter/", "report": "s3://out/demo/eval/report.json"},
    usage={"trainedTokens": 123456, "gpuSeconds": 3600.0},
)
GATE_FAILED_SUMMARY = summary(
    outcome="Succeeded",
    evaluation={"metric": "accuracy", "tuned": 0.2, "gate": {"passed": False, "message": "accuracy 0.200 < 0.5"}},
)


@dataclass
class Case:
    """One row of the phase table."""

    id: str
    job_kwargs: dict[str, Any]
    trainer: dict[str, Any] | None
    pods: list[PodState]
    phase: str
    reason: str
    conditions: dict[str, tuple[str, str]]
    message_has: str = ""
    status: dict[str, Any] | None = None


GATE = {"gate": {"metric": "accuracy", "threshold": 0.5}}
GATE_FAIL_JOB = {"gate": {"metric": "accuracy", "threshold": 0.5, "failJob": True}}

CASES = [
    Case(
        "job created, no pod yet",
        {},
        trainer_job(),
        [],
        "Pending",
        c.REASON_JOB_CREATED,
        {c.CONDITION_VALIDATED: ("True", c.REASON_JOB_CREATED), c.CONDITION_RUNNING: ("False", c.REASON_JOB_CREATED)},
        "waiting for its pod",
    ),
    Case(
        "pod unschedulable",
        {},
        trainer_job(active=1),
        [PodState(scheduled={"status": "False", "reason": "Unschedulable", "message": "0/3 nodes: Insufficient gpu"})],
        "Pending",
        c.REASON_UNSCHEDULABLE,
        {c.CONDITION_RUNNING: ("False", c.REASON_UNSCHEDULABLE)},
        "Insufficient gpu",
    ),
    Case(
        "image pull back-off",
        {},
        trainer_job(active=1),
        [PodState(scheduled={"status": "True"}, state={"waiting": {"reason": "ImagePullBackOff", "message": "nope"}})],
        "Pending",
        c.REASON_IMAGE_PULL_BACKOFF,
        {c.CONDITION_RUNNING: ("False", c.REASON_IMAGE_PULL_BACKOFF)},
        "cannot pull trainer:1: nope",
    ),
    Case(
        "err image pull",
        {},
        trainer_job(active=1),
        [PodState(scheduled={"status": "True"}, state={"waiting": {"reason": "ErrImagePull"}})],
        "Pending",
        c.REASON_IMAGE_PULL_BACKOFF,
        {c.CONDITION_RUNNING: ("False", c.REASON_IMAGE_PULL_BACKOFF)},
    ),
    Case(
        "missing secret",
        {},
        trainer_job(active=1),
        [
            PodState(
                scheduled={"status": "True"},
                state={"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}},
            )
        ],
        "Pending",
        "CreateContainerConfigError",
        {c.CONDITION_RUNNING: ("False", "CreateContainerConfigError")},
        'secret "s3" not found',
    ),
    Case(
        "container creating",
        {},
        trainer_job(active=1),
        [PodState(scheduled={"status": "True"}, state={"waiting": {"reason": "ContainerCreating"}})],
        "Pending",
        c.REASON_JOB_CREATED,
        {c.CONDITION_RUNNING: ("False", c.REASON_JOB_CREATED)},
        "is starting",
    ),
    Case(
        "pod running, its trainer has not reported yet",
        {},
        trainer_job(active=1, startTime=T0),
        [RUNNING_POD],
        "Validating",
        c.REASON_VALIDATING,
        {c.CONDITION_RUNNING: ("True", c.REASON_VALIDATING)},
        "checking the spec and every dataset row",
    ),
    Case(
        "trainer reports its data pre-flight",
        {},
        trainer_job(active=1, startTime=T0),
        [RUNNING_POD],
        "Validating",
        c.REASON_VALIDATING,
        {c.CONDITION_RUNNING: ("True", c.REASON_VALIDATING)},
        status={"phase": "Validating", "progress": {"stage": "data", "updatedAt": T0}},
    ),
    Case(
        "training",
        {},
        trainer_job(active=1, startTime=T0),
        [RUNNING_POD],
        "Running",
        c.REASON_TRAINING,
        {c.CONDITION_RUNNING: ("True", c.REASON_TRAINING)},
        status={"phase": "Validating", "progress": {"stage": "train", "step": 3, "updatedAt": T1}},
    ),
    Case(
        "a retried pod validates again, whatever the last attempt reported",
        {},
        trainer_job(active=1, failed=1),
        [
            PodState(name="p1", phase="Failed", state=terminated("Error", 75)),
            PodState(name="p2", created=T1, phase="Running", state={"running": {"startedAt": T1}}),
        ],
        "Validating",
        c.REASON_VALIDATING,
        {c.CONDITION_RUNNING: ("True", c.REASON_VALIDATING)},
        "attempt 2",
        status={"phase": "Evaluating", "progress": {"stage": "evaluate", "updatedAt": T0}},
    ),
    Case(
        "trainer reports the evaluate stage",
        {},
        trainer_job(active=1),
        [RUNNING_POD],
        "Evaluating",
        c.REASON_EVALUATING,
        {c.CONDITION_RUNNING: ("True", c.REASON_EVALUATING)},
        status={"phase": "Running", "progress": {"stage": "evaluate", "percent": 100}},
    ),
    Case(
        "retry after an OOM kill",
        {},
        trainer_job(active=1, failed=1),
        [PodState(name="p1", phase="Failed", state=terminated("OOMKilled", 137)), PodState(name="p2", created=T1)],
        "Pending",
        c.REASON_JOB_CREATED,
        {c.CONDITION_RUNNING: ("False", c.REASON_JOB_CREATED)},
        "attempt 2; the last one failed: the trainer ran out of memory",
    ),
    Case(
        "a deleted pod is not the live one",
        {},
        trainer_job(active=1),
        [PodState(name="old", phase="Running", deleting=True), PodState(name="new", created=T1)],
        "Pending",
        c.REASON_JOB_CREATED,
        {},
        "trainer pod new is starting",
    ),
    Case(
        "pod succeeded, Job not yet marked Complete",
        {},
        trainer_job(active=0, succeeded=1),
        [PodState(phase="Succeeded", state=terminated("Completed", 0, SUCCEEDED_SUMMARY))],
        "Running",
        c.REASON_TRAINING,
        {c.CONDITION_RUNNING: ("True", c.REASON_TRAINING)},
        "waiting for its Job to complete",
    ),
    Case(
        "pod succeeded while evaluating, Job not yet marked Complete",
        {},
        trainer_job(active=0, succeeded=1),
        [PodState(phase="Succeeded", state=terminated("Completed", 0))],
        "Evaluating",
        c.REASON_EVALUATING,
        {c.CONDITION_RUNNING: ("True", c.REASON_EVALUATING)},
        status={"phase": "Evaluating"},
    ),
    Case(
        "suspended by the user",
        {"runPolicy": {"suspend": True}},
        trainer_job(suspend=True),
        [],
        "Pending",
        c.REASON_SUSPENDED_BY_USER,
        {
            c.CONDITION_SUSPENDED: ("True", c.REASON_SUSPENDED_BY_USER),
            c.CONDITION_RUNNING: ("False", c.REASON_SUSPENDED_BY_USER),
        },
    ),
    Case(
        "waiting for Kueue",
        {"queueName": "gpu-queue"},
        trainer_job(suspend=True),
        [],
        "Queued",
        c.REASON_WAITING_FOR_QUEUE,
        {c.CONDITION_QUEUED: ("True", c.REASON_WAITING_FOR_QUEUE)},
        "LocalQueue gpu-queue",
    ),
    Case(
        "unsuspended, Job not yet resumed",
        {},
        trainer_job(suspend=True),
        [],
        "Pending",
        c.REASON_RESUMING,
        {c.CONDITION_RUNNING: ("False", c.REASON_RESUMING)},
    ),
    Case(
        "completed with a passing gate",
        {"evaluation": GATE},
        trainer_job(("Complete", "CompletionsReached"), succeeded=1, startTime=T0, completionTime=T2),
        [PodState(phase="Succeeded", state=terminated("Completed", 0, SUCCEEDED_SUMMARY))],
        "Succeeded",
        c.REASON_COMPLETED,
        {
            c.CONDITION_SUCCEEDED: ("True", c.REASON_COMPLETED),
            c.CONDITION_RUNNING: ("False", c.REASON_COMPLETED),
            c.CONDITION_EVAL_PASSED: ("True", c.REASON_GATE_PASSED),
        },
        "tuned accuracy 0.880 vs zeroShot 0.080, fewShot 0.310",
    ),
    Case(
        "completed, gate failed, failJob",
        {"evaluation": GATE_FAIL_JOB},
        trainer_job(("Complete", "CompletionsReached"), succeeded=1),
        [PodState(phase="Succeeded", state=terminated("Completed", 0, GATE_FAILED_SUMMARY))],
        "Failed",
        c.REASON_GATE_FAILED,
        {c.CONDITION_FAILED: ("True", c.REASON_GATE_FAILED), c.CONDITION_EVAL_PASSED: ("False", c.REASON_GATE_FAILED)},
        "accuracy 0.200 < 0.5",
    ),
    Case(
        "completed, gate failed, job kept",
        {"evaluation": GATE},
        trainer_job(("Complete", "CompletionsReached"), succeeded=1),
        [PodState(phase="Succeeded", state=terminated("Completed", 0, GATE_FAILED_SUMMARY))],
        "Succeeded",
        c.REASON_COMPLETED,
        {c.CONDITION_SUCCEEDED: ("True", c.REASON_COMPLETED), c.CONDITION_EVAL_PASSED: ("False", c.REASON_GATE_FAILED)},
    ),
    Case(
        "completed without a summary",
        {},
        trainer_job(("Complete", "CompletionsReached"), succeeded=1),
        [PodState(phase="Succeeded", state=terminated("Completed", 0))],
        "Succeeded",
        c.REASON_COMPLETED,
        {c.CONDITION_SUCCEEDED: ("True", c.REASON_COMPLETED)},
        "without a summary",
    ),
    Case(
        "trainer's own failure reason",
        {},
        trainer_job(("Failed", "BackoffLimitExceeded"), failed=3),
        [
            PodState(
                name=f"p{i}",
                created=f"2026-01-01T00:0{i}:00Z",
                phase="Failed",
                state=terminated(
                    "Error", 1, summary(outcome="Failed", reason="DataError", message="train.jsonl line 3: no label")
                ),
            )
            for i in range(3)
        ],
        "Failed",
        c.TRAINER_REASON_DATA_ERROR,
        {c.CONDITION_FAILED: ("True", c.TRAINER_REASON_DATA_ERROR), c.CONDITION_RUNNING: ("False", "DataError")},
        "train.jsonl line 3: no label (after 3 attempts)",
    ),
    Case(
        "permanent trainer exit before the Job controller fails the Job",
        {},
        trainer_job(failed=1),
        [
            PodState(
                phase="Failed",
                state=terminated(
                    "Error", 65, summary(outcome="Failed", reason="DataError", message="bad.jsonl:2: malformed JSON")
                ),
            )
        ],
        "Failed",
        c.TRAINER_REASON_DATA_ERROR,
        {c.CONDITION_FAILED: ("True", c.TRAINER_REASON_DATA_ERROR), c.CONDITION_RUNNING: ("False", "DataError")},
        "bad.jsonl:2: malformed JSON",
    ),
    Case(
        "hosted job cancelled by someone else",
        {"backend": "openai", "openai": {"model": "gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "key"}}},
        trainer_job(("Failed", "PodFailurePolicy"), failed=1),
        [
            PodState(
                phase="Failed",
                state=terminated(
                    "Error",
                    65,
                    summary(outcome="Failed", reason="HostedJobCancelled", message="hosted job ftjob-1 was cancelled"),
                ),
            )
        ],
        "Cancelled",
        c.TRAINER_REASON_HOSTED_JOB_CANCELLED,
        {
            c.CONDITION_FAILED: ("True", c.TRAINER_REASON_HOSTED_JOB_CANCELLED),
            c.CONDITION_RUNNING: ("False", c.TRAINER_REASON_HOSTED_JOB_CANCELLED),
        },
        "hosted job ftjob-1 was cancelled",
    ),
    Case(
        "a retryable trainer exit waits for the retry",
        {},
        trainer_job(failed=1),
        [PodState(phase="Failed", state=terminated("Error", 75, summary(outcome="Failed", reason="StorageError")))],
        "Pending",
        c.REASON_JOB_CREATED,
        {c.CONDITION_RUNNING: ("False", c.REASON_JOB_CREATED)},
        "attempt 2",
    ),
    Case(
        "OOMKilled",
        {"runPolicy": {"backoffLimit": 0}},
        trainer_job(("Failed", "BackoffLimitExceeded"), failed=1),
        [PodState(phase="Failed", state=terminated("OOMKilled", 137, "Killed"))],
        "Failed",
        c.REASON_OOM_KILLED,
        {c.CONDITION_FAILED: ("True", c.REASON_OOM_KILLED)},
        "raise resources.memory (after 1 attempt)",
    ),
    Case(
        "deadline exceeded",
        {"runPolicy": {"activeDeadlineSeconds": 600}},
        trainer_job(("Failed", "DeadlineExceeded"), failed=1),
        [PodState(phase="Failed", state=terminated("Error", 143, "Terminated"))],
        "Failed",
        c.REASON_DEADLINE_EXCEEDED,
        {c.CONDITION_FAILED: ("True", c.REASON_DEADLINE_EXCEEDED)},
        "activeDeadlineSeconds (600s)",
    ),
    Case(
        "crash with a log tail",
        {"runPolicy": {"backoffLimit": 1}},
        trainer_job(("Failed", "BackoffLimitExceeded"), failed=2),
        [
            PodState(
                name="p2", created=T1, phase="Failed", state=terminated("Error", 1, "a\nb\nc\nSegmentation fault")
            ),
            PodState(name="p1", phase="Failed", state=terminated("Error", 1, "x")),
        ],
        "Failed",
        c.REASON_BACKOFF_LIMIT_EXCEEDED,
        {c.CONDITION_FAILED: ("True", c.REASON_BACKOFF_LIMIT_EXCEEDED)},
        "failed 2 times (runPolicy.backoffLimit 1); last: the trainer exited with code 1: b | c | Segmentation fault",
    ),
    Case(
        "trainer reports a reason that is no condition reason",
        {},
        trainer_job(("Failed", "BackoffLimitExceeded"), failed=1),
        [PodState(phase="Failed", state=terminated("Error", 1, summary(outcome="Failed", reason="bad reason!")))],
        "Failed",
        c.TRAINER_REASON_INTERNAL_ERROR,
        {c.CONDITION_FAILED: ("True", c.TRAINER_REASON_INTERNAL_ERROR)},
    ),
    Case(
        "failed for another Job reason",
        {},
        trainer_job(("Failed", "PodFailurePolicy")),
        [],
        "Failed",
        "PodFailurePolicy",
        {c.CONDITION_FAILED: ("True", "PodFailurePolicy")},
        "PodFailurePolicy happened",
    ),
    Case(
        "the node of the only pod stopped responding: evicted, its deletion waits on the lost kubelet",
        {},
        trainer_job(active=1),
        [replace(RUNNING_POD, deleting=True, disruption="DeletionByTaintManager")],
        "Pending",
        c.REASON_NODE_LOST,
        {c.CONDITION_RUNNING: ("False", c.REASON_NODE_LOST)},
        "on gpu-node-3 was stopped because its node stopped responding: not a failure; a new pod resumes from the "
        "newest checkpoint once gpu-node-3's kubelet confirms the pod stopped",
        status={"phase": "Running"},
    ),
    Case(
        "evicted through the Eviction API, checkpointing on SIGTERM",
        {},
        trainer_job(active=1),
        [replace(RUNNING_POD, deleting=True, disruption="EvictionByEvictionAPI")],
        "Pending",
        c.REASON_EVICTED,
        {c.CONDITION_RUNNING: ("False", c.REASON_EVICTED)},
        "was stopped because it was evicted (the Eviction API: a node drain or an autoscaler): not a failure",
        status={"phase": "Running"},
    ),
    Case(
        "the next pod of a preempted one runs: no failure is named",
        {},
        trainer_job(active=1),
        [
            PodState(
                name="b",
                created=T1,
                phase="Running",
                scheduled={"status": "True"},
                state={"running": {"startedAt": T1}},
            ),
            PodState(name="a", phase="Failed", state=terminated("Error", 143), disruption="PreemptionByScheduler"),
        ],
        "Validating",
        c.REASON_VALIDATING,
        {c.CONDITION_RUNNING: ("True", c.REASON_VALIDATING)},
        "checking the spec and every dataset row",
        status={"phase": "Pending"},
    ),
    Case(
        "out of retries after an eviction and a failure: only the failure counts",
        {"runPolicy": {"backoffLimit": 0}},
        trainer_job(("Failed", c.REASON_BACKOFF_LIMIT_EXCEEDED)),
        [
            PodState(name="b", created=T1, phase="Failed", state=terminated("Error", 1)),
            PodState(name="a", phase="Failed", state=terminated("Error", 143), disruption="EvictionByEvictionAPI"),
        ],
        "Failed",
        c.REASON_BACKOFF_LIMIT_EXCEEDED,
        {c.CONDITION_FAILED: ("True", c.REASON_BACKOFF_LIMIT_EXCEEDED)},
        "the trainer failed 1 time (runPolicy.backoffLimit 0); last: the trainer exited with code 1",
    ),
    Case(
        "the Job vanished mid-run",
        {},
        None,
        [],
        "Pending",
        c.REASON_TRAINER_JOB_MISSING,
        {c.CONDITION_RUNNING: ("False", c.REASON_TRAINER_JOB_MISSING)},
        "demo-trainer does not exist",
        status={"phase": "Running"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_phase_reason_and_conditions(case: Case) -> None:
    job = finetunejob(case.status, **case.job_kwargs)
    change = derive_status(job, case.trainer, [pod.manifest() for pod in case.pods], T2)
    assert change.status.phase == case.phase
    found = conditions_of(change)
    for kind, expected in case.conditions.items():
        assert found.get(kind) == expected, f"{kind}: {found.get(kind)} != {expected}"
    headline = {"Failed": c.CONDITION_FAILED, "Succeeded": c.CONDITION_SUCCEEDED}.get(case.phase, c.CONDITION_RUNNING)
    if case.phase == "Queued":
        headline = c.CONDITION_QUEUED
    assert found[headline][1] == case.reason
    assert case.message_has in (change.status.message or "")
    previous_phase = job.status.phase if job.status else None
    assert change.patch["status"].get("phase", previous_phase) == case.phase
    assert all(cond.observed_generation == 1 for cond in change.status.conditions)


def test_trainer_summary_becomes_metrics_evaluation_artifacts_usage_and_dataset() -> None:
    job = finetunejob({"phase": "Running", "metrics": {"earlier": 1.0}}, evaluation=GATE)
    done = trainer_job(("Complete", "CompletionsReached"), succeeded=1, startTime=T0, completionTime=T2)
    pod = PodState(phase="Succeeded", state=terminated("Completed", 0, SUCCEEDED_SUMMARY)).manifest()
    status = derive_status(job, done, [pod], T2).patch["status"]
    assert status["model"] == "SmolLM2-135M-Instruct"  # the Model column of `kubectl get ftj`
    assert status["metrics"] == {"earlier": 1.0, "train_loss": 0.42, "eval_accuracy": 0.88}
    assert status["evaluation"]["baselines"] == {"zeroShot": 0.08, "fewShot": 0.31}
    assert status["evaluation"]["gate"] == {"passed": True, "message": "accuracy 0.880 >= 0.5"}
    assert status["artifacts"] == {"adapter": "s3://out/demo/adapter/", "report": "s3://out/demo/eval/report.json"}
    assert status["usage"] == {"trainedTokens": 123456, "gpuSeconds": 3600.0}
    assert status["dataset"]["trainRows"] == 2000
    assert status["trainer"] == {"jobName": "demo-trainer", "attempts": 1, "startTime": T0, "completionTime": T2}
    assert status["observedGeneration"] == 1
    assert "progress" not in status


def test_an_evaluation_that_scored_too_little_is_a_condition_and_in_the_message() -> None:
    problem = "judge smollm2 graded 1 of 40 outputs (response format json_object), too few for a judge score"
    unjudged = summary(
        outcome="Succeeded",
        evaluation={"metric": "rougeL", "tuned": 0.6, "baselines": {"zeroShot": 0.2}, "problems": [problem]},
    )
    job = finetunejob({"phase": "Evaluating"})
    done = trainer_job(("Complete", "CompletionsReached"), succeeded=1)
    pod = PodState(phase="Succeeded", state=terminated("Completed", 0, unjudged)).manifest()
    change = derive_status(job, done, [pod], T2)

    assert change.status.phase == "Succeeded"
    assert conditions_of(change)["Scored"] == ("False", "TooFewScored")
    scored = next(condition for condition in change.status.conditions if condition.type == "Scored")
    assert scored.message == problem
    assert change.status.message == f"tuned rougeL 0.600 vs zeroShot 0.200; but {problem}"


def test_a_fully_scored_evaluation_adds_no_scored_condition() -> None:
    job = finetunejob({"phase": "Evaluating"})
    done = trainer_job(("Complete", "CompletionsReached"), succeeded=1)
    pod = PodState(phase="Succeeded", state=terminated("Completed", 0, SUCCEEDED_SUMMARY)).manifest()
    assert "Scored" not in conditions_of(derive_status(job, done, [pod], T2))


def test_a_failed_runs_partial_results_are_kept() -> None:
    failed_summary = summary(
        outcome="Failed", reason="TrainingDiverged", message="loss is NaN at step 40", dataset={"trainRows": 10}
    )
    job = finetunejob({"phase": "Running"})
    pod = PodState(phase="Failed", state=terminated("Error", 1, failed_summary)).manifest()
    change = derive_status(job, trainer_job(("Failed", "BackoffLimitExceeded"), failed=1), [pod], T2)
    assert conditions_of(change)[c.CONDITION_FAILED] == ("True", "TrainingDiverged")
    assert change.patch["status"]["dataset"] == {"trainRows": 10}
    assert change.patch["status"]["trainer"]["completionTime"] == T1


def test_deriving_again_after_the_patch_changes_nothing() -> None:
    job = finetunejob()
    first = derive_status(job, trainer_job(active=1), [RUNNING_POD.manifest()], T1)
    again = derive_status(apply(job, first), trainer_job(active=1), [RUNNING_POD.manifest()], T2)
    assert again.is_empty
    assert again.transitions == ()


def test_last_transition_time_is_kept_while_a_condition_holds_and_moves_when_it_flips() -> None:
    job = finetunejob()
    running = apply(job, derive_status(job, trainer_job(active=1), [RUNNING_POD.manifest()], T0))
    body = running.model_dump(by_alias=True, exclude_none=True, mode="json")
    body["status"]["progress"] = {"stage": "evaluate"}  # what the trainer patches in
    evaluating = FineTuneJob.model_validate(body)
    change = derive_status(evaluating, trainer_job(active=1), [RUNNING_POD.manifest()], T1)
    by_type = {cond.type: cond for cond in change.status.conditions}
    assert by_type[c.CONDITION_RUNNING].reason == c.REASON_EVALUATING
    assert by_type[c.CONDITION_RUNNING].last_transition_time == T0  # still True: same transition
    done = trainer_job(("Complete", "CompletionsReached"), succeeded=1)
    pod = PodState(phase="Succeeded", state=terminated("Completed", 0, SUCCEEDED_SUMMARY)).manifest()
    finished = derive_status(apply(evaluating, change), done, [pod], T2)
    by_type = {cond.type: cond for cond in finished.status.conditions}
    assert (by_type[c.CONDITION_RUNNING].status, by_type[c.CONDITION_RUNNING].last_transition_time) == ("False", T2)
    assert by_type[c.CONDITION_SUCCEEDED].last_transition_time == T2


def training(job: FineTuneJob) -> FineTuneJob:
    """The job after its trainer reported a training step."""
    body = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    body["status"] = {**body.get("status", {}), "progress": {"stage": "train", "step": 1, "updatedAt": T1}}
    return FineTuneJob.model_validate(body)


def test_a_condition_that_no_longer_holds_turns_false_with_the_current_reason() -> None:
    job = finetunejob(queueName="gpu-queue")
    queued = apply(job, derive_status(job, trainer_job(suspend=True), [], T0))
    admitted = derive_status(training(queued), trainer_job(active=1), [RUNNING_POD.manifest()], T1)
    assert conditions_of(admitted)[c.CONDITION_QUEUED] == ("False", c.REASON_TRAINING)
    assert conditions_of(admitted)[c.CONDITION_RUNNING] == ("True", c.REASON_TRAINING)


def test_transitions_list_each_phase_change_once() -> None:
    job = finetunejob()
    first = derive_status(job, trainer_job(), [], T0)
    assert [(t.from_phase, t.to_phase, t.reason) for t in first.transitions] == [(None, "Pending", "JobCreated")]
    running = derive_status(training(apply(job, first)), trainer_job(active=1), [RUNNING_POD.manifest()], T1)
    assert [(t.from_phase, t.to_phase) for t in running.transitions] == [("Pending", "Running")]
    assert not running.transitions[0].is_warning
    failed_pod = PodState(phase="Failed", state=terminated("OOMKilled", 137)).manifest()
    failed = derive_status(
        apply(training(apply(job, first)), running), trainer_job(("Failed", "BackoffLimitExceeded")), [failed_pod], T2
    )
    assert [(t.from_phase, t.to_phase, t.reason) for t in failed.transitions] == [("Running", "Failed", "OOMKilled")]
    assert failed.transitions[0].is_warning


def test_the_pre_flight_is_validating_then_training_is_running_and_a_cancellation_is_a_warning() -> None:
    job = finetunejob(
        backend="openai", openai={"model": "gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "key"}}
    )
    first = apply(job, derive_status(job, trainer_job(), [], T0))
    validating = derive_status(first, trainer_job(active=1), [RUNNING_POD.manifest()], T0)
    assert [(t.from_phase, t.to_phase, t.reason) for t in validating.transitions] == [
        ("Pending", "Validating", c.REASON_VALIDATING)
    ]
    running = derive_status(training(apply(first, validating)), trainer_job(active=1), [RUNNING_POD.manifest()], T1)
    assert [(t.from_phase, t.to_phase) for t in running.transitions] == [("Validating", "Running")]
    cancelled_pod = PodState(
        phase="Failed", state=terminated("Error", 65, summary(outcome="Failed", reason="HostedJobCancelled"))
    ).manifest()
    cancelled = derive_status(
        apply(training(apply(first, validating)), running),
        trainer_job(("Failed", "PodFailurePolicy")),
        [cancelled_pod],
        T2,
    )
    assert [(t.from_phase, t.to_phase, t.reason) for t in cancelled.transitions] == [
        ("Running", "Cancelled", c.TRAINER_REASON_HOSTED_JOB_CANCELLED)
    ]
    assert cancelled.transitions[0].is_warning
    # Cancelled is terminal: a later look at a recreated Job changes nothing.
    assert derive_status(apply(first, cancelled), trainer_job(active=1), [RUNNING_POD.manifest()], T2).is_empty


@pytest.mark.parametrize(
    ("phase", "trainer"),
    [("Succeeded", None), ("Failed", None), ("Succeeded", trainer_job(active=1)), ("Failed", trainer_job())],
    ids=["succeeded, Job deleted by TTL", "failed, Job deleted", "succeeded, Job recreated", "failed, Job recreated"],
)
def test_a_finished_job_stays_finished(phase: str, trainer: dict[str, Any] | None) -> None:
    change = derive_status(finetunejob({"phase": phase}), trainer, [RUNNING_POD.manifest()], T2)
    assert change.is_empty
    assert change.status.phase == phase


def test_a_new_job_without_its_trainer_job_gets_no_status_yet() -> None:
    assert derive_status(finetunejob(), None, [], T0).is_empty


def test_attempts_never_decrease_when_finished_pods_are_gone() -> None:
    job = finetunejob({"phase": "Running", "trainer": {"jobName": "demo-trainer", "attempts": 3}})
    change = derive_status(job, trainer_job(active=1), [RUNNING_POD.manifest()], T2)
    assert change.status.trainer is not None
    assert change.status.trainer.attempts == 3


def test_attempts_count_every_pod_the_job_started() -> None:
    pods = [PodState(name="a", phase="Failed", state=terminated("Error", 1)).manifest(), RUNNING_POD.manifest()]
    change = derive_status(finetunejob(), trainer_job(active=1, failed=1), pods, T2)
    assert change.status.trainer is not None
    assert change.status.trainer.attempts == 2


def test_disruptions_are_counted_apart_from_failures_and_never_decrease() -> None:
    pods = [
        PodState(name="c", created=T2, phase="Running", state={"running": {"startedAt": T2}}).manifest(),
        PodState(name="b", created=T1, phase="Failed", state=terminated("Error", 137)).manifest(),
        PodState(
            name="a", phase="Failed", state=terminated("Error", 143), disruption="EvictionByEvictionAPI"
        ).manifest(),
    ]
    change = derive_status(finetunejob(), trainer_job(active=1, failed=1), pods, T2)
    later = derive_status(apply(finetunejob(), change), trainer_job(active=1, failed=1), pods[:1], T2)

    assert change.status.trainer is not None
    assert (change.status.trainer.attempts, change.status.trainer.disruptions) == (3, 1)
    assert "(attempt 3; the last one failed: the trainer exited with code 137)" in (change.status.message or "")
    assert later.status.trainer is not None
    assert later.status.trainer.disruptions == 1


def test_a_disrupted_pod_counts_as_an_attempt_after_the_cluster_deleted_it() -> None:
    evicted = PodState(name="a", phase="Failed", state=terminated("Error", 143), disruption="EvictionByEvictionAPI")
    seen = derive_status(finetunejob(), trainer_job(), [evicted.manifest()], T1)
    replaced = PodState(name="b", created=T1, phase="Running", state={"running": {"startedAt": T1}})

    later = derive_status(apply(finetunejob(), seen), trainer_job(active=1), [replaced.manifest()], T2)

    assert later.status.trainer is not None
    assert (later.status.trainer.attempts, later.status.trainer.disruptions) == (2, 1)


def test_every_disruption_counts_once_though_each_pod_is_gone_before_the_next() -> None:
    first = PodState(name="a", phase="Failed", state=terminated("Error", 143), disruption="EvictionByEvictionAPI")
    second = PodState(
        name="b", created=T1, phase="Failed", state=terminated("Error", 143), disruption="EvictionByEvictionAPI"
    )
    job = finetunejob()
    for pods in ([first], [first], [second], []):
        job = apply(job, derive_status(job, trainer_job(), [pod.manifest() for pod in pods], T2))

    assert job.status is not None and job.status.trainer is not None
    assert (job.status.trainer.disruptions, job.status.trainer.disrupted_pods) == (2, ["a", "b"])
    assert job.status.trainer.attempts == 2


def test_a_disrupted_pod_still_running_is_not_counted_twice() -> None:
    # Marked for preemption, not yet deleted: the Job still counts it as active.
    marked = replace(RUNNING_POD, disruption="PreemptionByScheduler")

    change = derive_status(finetunejob(), trainer_job(active=1), [marked.manifest()], T2)

    assert change.status.trainer is not None
    assert (change.status.trainer.attempts, change.status.trainer.disruptions) == (1, 1)


def test_observed_generation_follows_metadata_generation() -> None:
    change = derive_status(finetunejob(generation=4), trainer_job(), [], T0)
    assert change.patch["status"]["observedGeneration"] == 4
    assert {cond.observed_generation for cond in change.status.conditions} == {4}


def test_long_messages_are_cut_keeping_the_end() -> None:
    tail = "x" * 5000 + "\nthe real error"
    pod = PodState(phase="Failed", state=terminated("Error", 1, tail)).manifest()
    change = derive_status(finetunejob(), trainer_job(("Failed", "Unknown")), [pod], T2)
    message = change.status.message or ""
    assert len(message) <= 1024
    assert message.endswith("the real error")
    assert conditions_of(change)[c.CONDITION_FAILED] == ("True", "Unknown")


def test_a_failed_pod_without_a_summary_reports_its_exit_code() -> None:
    pod = PodState(phase="Failed", state=terminated("Error", 2, "")).manifest()
    change = derive_status(finetunejob(), trainer_job(("Failed", "SomethingElse")), [pod], T2)
    assert conditions_of(change)[c.CONDITION_FAILED] == ("True", "SomethingElse")
    assert change.status.message == "the trainer exited with code 2"
    assert c.REASON_JOB_FAILED not in (change.status.message or "")


def test_invalid_spec_fails_the_job_with_validated_false() -> None:
    change = invalid_spec_status(FineTuneJobStatus(), 2, "invalid FineTuneJob: spec.model: missing", T0)
    assert change.patch["status"]["phase"] == "Failed"
    assert conditions_of(change) == {
        c.CONDITION_VALIDATED: ("False", c.REASON_INVALID_SPEC),
        c.CONDITION_FAILED: ("True", c.REASON_INVALID_SPEC),
    }
    assert change.transitions[0].is_warning
    assert change.transitions[0].reason == c.REASON_INVALID_SPEC
    assert json.dumps(change.patch)  # a JSON-serialisable merge patch


def owned(job: dict[str, Any], owner_uid: str = "ftj-uid") -> dict[str, Any]:
    return {**job, "metadata": {**job["metadata"], "ownerReferences": [{"uid": owner_uid, "kind": "FineTuneJob"}]}}


@pytest.mark.parametrize(
    ("observed", "needed"),
    [
        (None, True),  # a new FineTuneJob, or its trainer Job deleted by hand
        (owned(trainer_job()), False),
        (owned(trainer_job(), owner_uid="an-earlier-ftj"), True),  # same name, left by a deleted FineTuneJob
        (trainer_job(), True),  # no owner at all: not ours
    ],
    ids=["none", "ours", "another-owner", "unowned"],
)
def test_the_trainer_is_created_unless_one_of_its_own_exists(observed: dict[str, Any] | None, needed: bool) -> None:
    assert needs_trainer("ftj-uid", observed) is needed


@pytest.mark.parametrize(
    ("run_policy", "queue", "observed", "change"),
    [
        ({"suspend": True}, None, trainer_job(), True),
        ({"suspend": True}, None, trainer_job(suspend=True), None),
        ({"suspend": False}, None, trainer_job(suspend=True), False),  # resumed, or suspended by hand: put back
        ({"suspend": False}, None, trainer_job(), None),
        ({"suspend": False}, "gpu-queue", trainer_job(suspend=True), None),  # Kueue admits by unsuspending
        ({"suspend": True}, "gpu-queue", trainer_job(), True),  # a queued job is suspended like any other
        ({"suspend": True}, None, trainer_job(("Complete", "CompletionsReached")), None),
        ({"suspend": True}, None, trainer_job(("Failed", "BackoffLimitExceeded")), None),
        ({"suspend": True}, None, None, None),  # created suspended already
    ],
    ids=[
        "suspend",
        "already-suspended",
        "resume",
        "already-running",
        "kueue-decides",
        "queued-suspend",
        "complete",
        "failed",
        "no-job-yet",
    ],
)
def test_the_trainer_job_mirrors_run_policy_suspend(
    run_policy: dict[str, Any], queue: str | None, observed: dict[str, Any] | None, change: bool | None
) -> None:
    spec: dict[str, Any] = {"runPolicy": run_policy}
    if queue is not None:
        spec["queueName"] = queue
    assert suspend_change(finetunejob(**spec), observed) == change
