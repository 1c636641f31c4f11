"""Pure derivation of a FineTuneJob's status from its trainer Job and that Job's pods: phase, conditions, results."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune import conditions as c
from kubetune import contract
from kubetune.api import (
    TERMINAL_PHASES,
    Condition,
    FineTuneJob,
    FineTuneJobStatus,
    ProgressStatus,
    ServingStatus,
    TrainerStatus,
)
from kubetune.contract import TrainerSummary
from kubetune_operator.builders import CONTAINER_NAME, desired_job_suspend, trainer_resource_name
from kubetune_operator.queueing import QueueState
from kubetune_operator.serving import serving_status

# Conditions whose True status describes where the run is now; one that no longer holds is turned False.
LIFECYCLE_CONDITIONS = (
    c.CONDITION_QUEUED,
    c.CONDITION_RUNNING,
    c.CONDITION_SUSPENDED,
    c.CONDITION_SUCCEEDED,
    c.CONDITION_FAILED,
)
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
STARTING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})
# metav1.Condition.reason must match this; a trainer that reports anything else is shown as InternalError.
CONDITION_REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
MESSAGE_LIMIT = 1024
STAGE_DATA = "data"
STAGE_EVALUATE = "evaluate"
STAGE_PUBLISH = "publish"


@dataclass(frozen=True)
class DesiredCondition:
    """A condition as this pass sees it, before merging with what the status already holds."""

    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    """Where the run is: the phase with its headline reason and message, and the conditions that say so."""

    phase: str
    reason: str
    message: str
    conditions: tuple[DesiredCondition, ...] = ()
    summary: TrainerSummary | None = None


@dataclass(frozen=True)
class PhaseTransition:
    """One change of status.phase, for an Event and the transitions counter."""

    from_phase: str | None
    to_phase: str
    reason: str
    message: str

    @property
    def is_warning(self) -> bool:
        """Failures and cancellations are Warning events; everything else is Normal."""
        return self.to_phase in ("Failed", "Cancelled")


@dataclass(frozen=True)
class StatusChange:
    """What one pass decided: the merge patch for the status subresource, the phase transitions, the new status."""

    patch: dict[str, Any]
    transitions: tuple[PhaseTransition, ...]
    status: FineTuneJobStatus

    @property
    def is_empty(self) -> bool:
        """Nothing to write."""
        return not self.patch


# ---------------------------------------------------------------------------------------------------------------------
# Reading the Job and its pods (raw API dicts, camelCase).


def job_condition(trainer_job: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    """The Job condition of that type when its status is True."""
    for condition in (trainer_job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type and condition.get("status") == "True":
            return condition
    return None


# JobSet's Failed reasons → the Job's (the status derivation reads a Job's); the others are kept as they are.
JOBSET_FAILURE_REASONS = {"ReachedMaxRestarts": c.REASON_BACKOFF_LIMIT_EXCEEDED}
LABEL_JOBSET_UID = "jobset.sigs.k8s.io/jobset-uid"


def jobset_as_job(jobset: Mapping[str, Any]) -> dict[str, Any]:
    """A multi-node trainer's JobSet as the trainer Job the status derivation reads: its metadata and suspend, and its
    Completed and Failed conditions under a Job's names (Complete, Failed with a Job's reasons)."""
    conditions = []
    for condition in (jobset.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Completed":
            conditions.append({**condition, "type": "Complete"})
        elif condition.get("type") == "Failed":
            reason = str(condition.get("reason") or "")
            conditions.append({**condition, "reason": JOBSET_FAILURE_REASONS.get(reason, reason)})
    return {
        "apiVersion": jobset.get("apiVersion"),
        "kind": "JobSet",
        "metadata": jobset.get("metadata") or {},
        "spec": {"suspend": bool((jobset.get("spec") or {}).get("suspend"))},
        "status": {"conditions": conditions, "restarts": int((jobset.get("status") or {}).get("restarts") or 0)},
    }


def is_pod_of(pod: Mapping[str, Any], trainer: Mapping[str, Any]) -> bool:
    """Whether the pod belongs to this trainer: owned by its Job, or labelled with its JobSet's uid (a JobSet's pods
    are owned by its child Jobs)."""
    uid = (trainer.get("metadata") or {}).get("uid")
    metadata = pod.get("metadata") or {}
    if trainer.get("kind") == "JobSet":
        return bool(uid) and (metadata.get("labels") or {}).get(LABEL_JOBSET_UID) == uid
    return any(ref.get("uid") == uid for ref in metadata.get("ownerReferences") or [])


def is_owned_by(child: Mapping[str, Any], owner_uid: str) -> bool:
    """Whether the object's owner references name this uid."""
    return any(ref.get("uid") == owner_uid for ref in (child.get("metadata") or {}).get("ownerReferences") or [])


def needs_trainer(owner_uid: str, trainer_job: Mapping[str, Any] | None) -> bool:
    """Whether the FineTuneJob's children must be created: no trainer Job of its own is known (none yet, deleted by
    hand, or one of the same name left by an earlier FineTuneJob)."""
    return trainer_job is None or not is_owned_by(trainer_job, owner_uid)


def suspend_change(job: FineTuneJob, trainer_job: Mapping[str, Any] | None) -> bool | None:
    """The spec.suspend to set on the trainer Job so that it mirrors runPolicy.suspend; None when nothing is to
    change: no Job yet (it is created as it should be), Kueue decides (a queued job's resume is its admission), the
    Job finished, or it already is as it should be. Level-triggered: a Job suspended or resumed by hand is put back."""
    desired = desired_job_suspend(job)
    if trainer_job is None or desired is None:
        return None
    if job_condition(trainer_job, "Complete") or job_condition(trainer_job, "Failed"):
        return None
    if bool((trainer_job.get("spec") or {}).get("suspend")) == desired:
        return None
    return desired


def pods_newest_first(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods ordered by creation, newest first (RFC 3339 UTC timestamps sort as text)."""
    return sorted(
        pods,
        key=lambda pod: (pod["metadata"].get("creationTimestamp") or "", pod["metadata"].get("name") or ""),
        reverse=True,
    )


def pod_phase(pod: Mapping[str, Any]) -> str:
    """status.phase, Pending when not yet reported."""
    return str((pod.get("status") or {}).get("phase") or "Pending")


def is_pod_finished(pod: Mapping[str, Any]) -> bool:
    """Succeeded or Failed."""
    return pod_phase(pod) in ("Succeeded", "Failed")


def trainer_container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The trainer container's status (the first one when the name is unknown), or an empty mapping."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return status
    return statuses[0] if statuses else {}


def container_state(pod: Mapping[str, Any], state: str) -> Mapping[str, Any] | None:
    """The trainer container's `waiting`, `running` or `terminated` state, when it is in that state."""
    value = (trainer_container_status(pod).get("state") or {}).get(state)
    return value if isinstance(value, Mapping) else None


def pod_condition(pod: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    """A pod condition by type, whatever its status."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type:
            return condition
    return None


def pod_summary(pod: Mapping[str, Any]) -> TrainerSummary | None:
    """The trainer's summary from the pod's termination message; None for a log tail or no message."""
    terminated = container_state(pod, "terminated")
    if not terminated or not terminated.get("message"):
        return None
    return TrainerSummary.from_termination_message(str(terminated["message"]))


# DisruptionTarget reasons (Kubernetes' own) → (condition reason, why the pod was stopped).
DISRUPTIONS: dict[str, tuple[str, str]] = {
    "DeletionByTaintManager": (c.REASON_NODE_LOST, "its node stopped responding"),
    "DeletionByPodGC": (c.REASON_NODE_LOST, "its node is gone"),
    "EvictionByEvictionAPI": (c.REASON_EVICTED, "it was evicted (the Eviction API: a node drain or an autoscaler)"),
    "TerminationByKubelet": (c.REASON_EVICTED, "its node ran short of a resource and the kubelet evicted it"),
    "PreemptionByScheduler": (c.REASON_PREEMPTED, "a pod of higher priority preempted it"),
}


RECORDED_DISRUPTED_PODS = 20  # status.trainer.disruptedPods keeps the newest names only


def disruption_of(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(condition reason, why) when the cluster stopped the pod (its DisruptionTarget condition is True)."""
    condition = pod_condition(pod, "DisruptionTarget")
    if not condition or condition.get("status") != "True":
        return None
    return DISRUPTIONS.get(str(condition.get("reason")), (c.REASON_DISRUPTED, "the cluster stopped it"))


def observe_disrupted(pod: Mapping[str, Any]) -> Observation:
    """The newest pod was stopped by the cluster and no new one runs yet: waiting for the Job's next pod."""
    disruption = disruption_of(pod)
    assert disruption is not None
    reason, why = disruption
    name, node = pod["metadata"].get("name"), (pod.get("spec") or {}).get("nodeName") or "its node"
    message = f"trainer pod {name} on {node} was stopped because {why}: not a failure; a new pod resumes from the "
    message += "newest checkpoint"
    if reason == c.REASON_NODE_LOST and pod["metadata"].get("deletionTimestamp") and not is_pod_finished(pod):
        # The Job replaces the pod only once it is known to have stopped: a lost node's kubelet cannot say so.
        message += (
            f" once {node}'s kubelet confirms the pod stopped, or an administrator marks the node out of service "
            "(taint node.kubernetes.io/out-of-service)"
        )
    return _pending(reason, message)


def container_started_at(pod: Mapping[str, Any]) -> str | None:
    """When the trainer container (else the pod) started, RFC 3339 UTC."""
    running = container_state(pod, "running")
    started = (running or {}).get("startedAt") or (pod.get("status") or {}).get("startTime")
    return str(started) if started else None


def fresh_progress(job: FineTuneJob, pod: Mapping[str, Any]) -> ProgressStatus | None:
    """status.progress when this pod's trainer reported it; None when it predates the pod (an earlier attempt's).

    Both timestamps have one-second resolution: a report in the second the container started counts as fresh.
    """
    progress = job.status.progress if job.status else None
    if progress is None:
        return None
    started = container_started_at(pod)
    if started and progress.updated_at and progress.updated_at < started:
        return None
    return progress


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """At most `limit` characters, keeping the end (where a log tail has the error)."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def condition_reason(reason: str, fallback: str = c.TRAINER_REASON_INTERNAL_ERROR) -> str:
    """`reason` when it is a valid metav1.Condition reason, else the fallback."""
    return reason if CONDITION_REASON_PATTERN.match(reason) else fallback


# ---------------------------------------------------------------------------------------------------------------------
# Observations, one per situation of the trainer Job.


def observe(
    job: FineTuneJob,
    trainer_job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    queue: QueueState | None = None,
) -> Observation:
    """Where the run is, from the trainer Job and its pods (and Kueue's word, while it queues the Job)."""
    job_name = trainer_resource_name(job.metadata.name)
    if trainer_job is None:
        message = f"trainer Job {job_name} does not exist"
        return Observation(
            "Pending",
            c.REASON_TRAINER_JOB_MISSING,
            message,
            (DesiredCondition(c.CONDITION_RUNNING, "False", c.REASON_TRAINER_JOB_MISSING, message),),
        )
    ordered = pods_newest_first(pods)
    validated = DesiredCondition(
        c.CONDITION_VALIDATED, "True", c.REASON_JOB_CREATED, f"spec accepted; trainer Job {job_name} created"
    )
    if job_condition(trainer_job, "Complete"):
        observation = observe_completed(job, ordered)
    elif failed := job_condition(trainer_job, "Failed"):
        observation = observe_failed(job, failed, ordered)
    elif (trainer_job.get("spec") or {}).get("suspend"):
        observation = observe_suspended(job, queue)
    elif ordered and failed_permanently(ordered[0]):
        # The Job controller is about to fail the Job (podFailurePolicy FailJob): say so now rather than "Pending".
        observation = observe_failed(job, {"reason": c.REASON_POD_FAILURE_POLICY}, ordered)
    else:
        observation = observe_active(job, job_name, ordered)
    return Observation(
        observation.phase,
        observation.reason,
        observation.message,
        (validated, *observation.conditions),
        observation.summary,
    )


def describe_evaluation(summary: TrainerSummary | None) -> str:
    """`tuned accuracy 0.880 vs zeroShot 0.080, fewShot 0.310`, or empty without an evaluation."""
    evaluation = summary.evaluation if summary else None
    if evaluation is None or evaluation.tuned is None:
        return ""
    text = f"tuned {evaluation.metric or 'score'} {evaluation.tuned:.3f}"
    if evaluation.baselines:
        text += " vs " + ", ".join(f"{name} {value:.3f}" for name, value in evaluation.baselines.items())
    return text


def gate_condition(job: FineTuneJob, summary: TrainerSummary | None) -> DesiredCondition | None:
    """EvalPassed from the trainer's gate result, when the spec has a gate and the trainer judged it."""
    gate = summary.evaluation.gate if summary and summary.evaluation else None
    if job.spec.evaluation.gate is None or gate is None or gate.passed is None:
        return None
    reason = c.REASON_GATE_PASSED if gate.passed else c.REASON_GATE_FAILED
    default = "the tuned adapter met evaluation.gate" if gate.passed else "the tuned adapter missed evaluation.gate"
    status = "True" if gate.passed else "False"
    return DesiredCondition(c.CONDITION_EVAL_PASSED, status, reason, gate.message or default)


def scored_condition(summary: TrainerSummary | None) -> DesiredCondition | None:
    """Scored=False when part of the evaluation scored too little to mean anything; a job that passed its gate (or has
    none) must not read as a clean success then."""
    problems = summary.evaluation.problems if summary and summary.evaluation else []
    if not problems:
        return None
    return DesiredCondition(c.CONDITION_SCORED, "False", c.REASON_TOO_FEW_SCORED, shorten("; ".join(problems)))


def observe_completed(job: FineTuneJob, pods: Sequence[Mapping[str, Any]]) -> Observation:
    """The Job completed: Succeeded, or Failed when the gate failed and gate.failJob is set."""
    succeeded = [pod for pod in pods if pod_phase(pod) == "Succeeded"]
    summary = next((s for s in map(pod_summary, succeeded) if s is not None), None)
    gate = gate_condition(job, summary)
    scored = scored_condition(summary)
    spec_gate = job.spec.evaluation.gate
    extra = tuple(condition for condition in (gate, scored) if condition is not None)
    if gate is not None and gate.status == "False" and spec_gate is not None and spec_gate.fail_job:
        message = shorten(f"evaluation gate failed: {gate.message}")
        return Observation(
            "Failed",
            c.REASON_GATE_FAILED,
            message,
            (
                DesiredCondition(c.CONDITION_FAILED, "True", c.REASON_GATE_FAILED, message),
                DesiredCondition(c.CONDITION_RUNNING, "False", c.REASON_GATE_FAILED, message),
                *extra,
            ),
            summary,
        )
    if summary is None:
        message = "the trainer finished without a summary in its termination message"
    else:
        message = describe_evaluation(summary) or summary.message or "training and evaluation finished"
    if scored is not None:
        message += f"; but {scored.message}"
    message = shorten(message)
    return Observation(
        "Succeeded",
        c.REASON_COMPLETED,
        message,
        (
            DesiredCondition(c.CONDITION_SUCCEEDED, "True", c.REASON_COMPLETED, message),
            DesiredCondition(c.CONDITION_RUNNING, "False", c.REASON_COMPLETED, message),
            *extra,
        ),
        summary,
    )


def failed_permanently(pod: Mapping[str, Any]) -> bool:
    """The trainer exited with the permanent-failure code: no retry will follow."""
    terminated = container_state(pod, "terminated")
    return (
        pod_phase(pod) == "Failed"
        and terminated is not None
        and terminated.get("exitCode") == contract.EXIT_CODE_PERMANENT
    )


def failure_of_pod(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a failed trainer pod: the trainer's own reason, OOMKilled, or the exit code and log."""
    summary = pod_summary(pod)
    if summary is not None and summary.outcome == "Failed":
        return condition_reason(summary.reason), summary.message or summary.reason
    terminated = container_state(pod, "terminated")
    if terminated is None:
        return None
    if terminated.get("reason") == c.REASON_OOM_KILLED:
        return c.REASON_OOM_KILLED, "the trainer ran out of memory (OOMKilled); raise resources.memory"
    tail = str(terminated.get("message") or "").strip().splitlines()[-3:]
    detail = f": {' | '.join(tail)}" if tail else ""
    return c.REASON_JOB_FAILED, f"the trainer exited with code {terminated.get('exitCode')}{detail}"


def observe_failed(
    job: FineTuneJob, failed_condition: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]
) -> Observation:
    """The Job failed: the deadline, else the newest pod's own failure, else the Job's reason."""
    job_reason = str(failed_condition.get("reason") or c.REASON_JOB_FAILED)
    job_message = str(failed_condition.get("message") or "")
    # A pod the cluster stopped (evicted, preempted, its node lost) is not the trainer's failure and not an attempt the
    # Job counted against backoffLimit.
    failed_pods = [pod for pod in pods if pod_phase(pod) == "Failed" and disruption_of(pod) is None]
    pod_failure = next((f for f in map(failure_of_pod, failed_pods) if f is not None), None)
    summary = next((s for s in map(pod_summary, failed_pods) if s is not None), None)
    attempts = len(failed_pods)
    if job_reason == c.REASON_DEADLINE_EXCEEDED:
        limit = job.spec.run_policy.active_deadline_seconds
        reason, message = c.REASON_DEADLINE_EXCEEDED, f"the trainer ran past runPolicy.activeDeadlineSeconds ({limit}s)"
    elif pod_failure is not None and pod_failure[0] != c.REASON_JOB_FAILED:
        reason, message = pod_failure
        if job_reason == c.REASON_BACKOFF_LIMIT_EXCEEDED:
            message = f"{message} (after {attempts} attempt{'s' if attempts != 1 else ''})"
    elif job_reason == c.REASON_BACKOFF_LIMIT_EXCEEDED:
        last = f"; last: {pod_failure[1]}" if pod_failure else ""
        reason = c.REASON_BACKOFF_LIMIT_EXCEEDED
        message = f"the trainer failed {attempts} time{'s' if attempts != 1 else ''} (runPolicy.backoffLimit " + (
            f"{job.spec.run_policy.backoff_limit}){last}"
        )
    else:
        reason = condition_reason(job_reason, c.REASON_JOB_FAILED)
        message = pod_failure[1] if pod_failure else (job_message or "the trainer Job failed")
    message = shorten(message)
    # backend openai: someone cancelled the hosted job outside kubetune. The run ended without a result, so Failed
    # stays True for anything waiting on it; the phase says what happened.
    phase = "Cancelled" if reason == c.TRAINER_REASON_HOSTED_JOB_CANCELLED else "Failed"
    return Observation(
        phase,
        reason,
        message,
        (
            DesiredCondition(c.CONDITION_FAILED, "True", reason, message),
            DesiredCondition(c.CONDITION_RUNNING, "False", reason, message),
        ),
        summary,
    )


def observe_suspended(job: FineTuneJob, queue: QueueState | None = None) -> Observation:
    """The Job is suspended: by the user (runPolicy.suspend), or waiting for Kueue to admit it."""
    if job.spec.run_policy.suspend:
        message = "suspended by spec.runPolicy.suspend; the trainer resumes from its newest checkpoint when unset"
        return Observation(
            "Pending",
            c.REASON_SUSPENDED_BY_USER,
            message,
            (
                DesiredCondition(c.CONDITION_SUSPENDED, "True", c.REASON_SUSPENDED_BY_USER, message),
                DesiredCondition(c.CONDITION_RUNNING, "False", c.REASON_SUSPENDED_BY_USER, message),
            ),
        )
    if job.spec.queue_name:
        reason, message = queued_reason(job.spec.queue_name, queue)
        return Observation(
            "Queued",
            reason,
            message,
            (
                DesiredCondition(c.CONDITION_QUEUED, "True", reason, message),
                DesiredCondition(c.CONDITION_RUNNING, "False", reason, message),
            ),
        )
    message = "spec.runPolicy.suspend was unset; resuming the trainer Job"
    return Observation(
        "Pending",
        c.REASON_RESUMING,
        message,
        (DesiredCondition(c.CONDITION_RUNNING, "False", c.REASON_RESUMING, message),),
    )


def queued_reason(queue_name: str, queue: QueueState | None) -> tuple[str, str]:
    """Why a queued trainer waits, in Kueue's words when its Workload has some: still waiting for quota, or evicted
    (preempted by a job of higher priority) and waiting to be admitted again."""
    waiting = f"waiting for Kueue to admit the trainer from LocalQueue {queue_name}"
    if queue is None or queue.admitted or not queue.message:
        return c.REASON_WAITING_FOR_QUEUE, waiting
    if queue.evicted:
        reason = c.REASON_PREEMPTED if queue.reason == "Preempted" else c.REASON_WAITING_FOR_QUEUE
        message = f"Kueue evicted the trainer ({queue.reason}: {queue.message}); it resumes from its newest checkpoint "
        return reason, shorten(message + f"once admitted again from LocalQueue {queue_name}")
    return c.REASON_WAITING_FOR_QUEUE, shorten(f"{waiting}; Kueue: {queue.message}")


def _pending(reason: str, message: str) -> Observation:
    message = shorten(message)
    return Observation("Pending", reason, message, (DesiredCondition(c.CONDITION_RUNNING, "False", reason, message),))


def observe_finishing(job: FineTuneJob) -> Observation:
    """The trainer pod succeeded but the Job controller has not marked the Job Complete yet: still running."""
    current = job.status.phase if job.status else None
    phase, reason = ("Evaluating", c.REASON_EVALUATING) if current == "Evaluating" else ("Running", c.REASON_TRAINING)
    message = "the trainer finished; waiting for its Job to complete"
    return Observation(phase, reason, message, (DesiredCondition(c.CONDITION_RUNNING, "True", reason, message),))


def observe_active(job: FineTuneJob, job_name: str, pods: Sequence[Mapping[str, Any]]) -> Observation:
    """The Job runs: the newest live pod says whether it is stuck, starting, training or evaluating."""
    live = [pod for pod in pods if not is_pod_finished(pod) and not pod["metadata"].get("deletionTimestamp")]
    failed = [pod for pod in pods if pod_phase(pod) == "Failed" and disruption_of(pod) is None]
    retry = ""
    if failed:
        last_failure = failure_of_pod(failed[0])
        # This pod's attempt, or the next one's: one more than the pods that ended (failed, or stopped by the cluster).
        attempt = 1 + sum(1 for pod in pods if is_pod_finished(pod) or pod["metadata"].get("deletionTimestamp"))
        retry = f" (attempt {attempt}; the last one failed: {last_failure[1] if last_failure else 'unknown'})"
    if not live and any(pod_phase(pod) == "Succeeded" for pod in pods):
        return observe_finishing(job)
    if not live and pods and disruption_of(pods[0]):
        return observe_disrupted(pods[0])
    if not live:
        return _pending(c.REASON_JOB_CREATED, f"trainer Job {job_name} created; waiting for its pod{retry}")
    pod = live[0]
    pod_name = pod["metadata"].get("name")
    scheduled = pod_condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == c.REASON_UNSCHEDULABLE:
        detail = scheduled.get("message") or "no node fits"
        return _pending(c.REASON_UNSCHEDULABLE, f"trainer pod {pod_name} cannot be scheduled: {detail}")
    waiting = container_state(pod, "waiting")
    if waiting and waiting.get("reason") in IMAGE_PULL_REASONS:
        image = trainer_container_status(pod).get("image") or job.spec.image or "the trainer image"
        detail = waiting.get("message") or waiting.get("reason")
        return _pending(c.REASON_IMAGE_PULL_BACKOFF, f"cannot pull {image}: {detail}")
    if waiting and waiting.get("reason") and waiting.get("reason") not in STARTING_REASONS:
        reason = condition_reason(str(waiting["reason"]), c.REASON_JOB_FAILED)
        return _pending(reason, f"trainer pod {pod_name} cannot start: {waiting.get('message') or reason}")
    if pod_phase(pod) != "Running":
        return _pending(c.REASON_JOB_CREATED, f"trainer pod {pod_name} is starting{retry}")
    progress = fresh_progress(job, pod)
    if progress is None or progress.stage in (None, STAGE_DATA):
        # The trainer's pre-flight: it reads its spec, fetches the data and checks every row before any model load
        # (backend openai: the service validates the uploaded files). Until this pod's trainer reports, it is there.
        phase, reason, message = "Validating", c.REASON_VALIDATING, "checking the spec and every dataset row"
    elif progress.stage == STAGE_EVALUATE:
        phase, reason, message = "Evaluating", c.REASON_EVALUATING, "evaluating the tuned adapter and the baselines"
    elif progress.stage == STAGE_PUBLISH and spec_evaluates(job):
        # Publishing follows the evaluation: going back to Running there would read as a second training pass.
        phase, reason, message = "Evaluating", c.REASON_EVALUATING, "publishing the adapter and the evaluation report"
    else:
        # No step counts here: status.progress has them, and a message that changes every report would double the
        # status writes.
        phase, reason, message = "Running", c.REASON_TRAINING, "training"
    message = shorten(message + retry)
    return Observation(phase, reason, message, (DesiredCondition(c.CONDITION_RUNNING, "True", reason, message),))


# ---------------------------------------------------------------------------------------------------------------------
# Merging into the status.


def merge_conditions(
    existing: Sequence[Condition],
    desired: Sequence[DesiredCondition],
    observation: Observation,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Conditions after this pass: desired ones set (lastTransitionTime kept while the status holds), lifecycle
    conditions that were True and are no longer desired turned False with the headline reason."""
    wanted = {condition.type: condition for condition in desired}
    for old in existing:
        if old.type in LIFECYCLE_CONDITIONS and old.type not in wanted and old.status == "True":
            wanted[old.type] = DesiredCondition(old.type, "False", observation.reason, observation.message)
    merged: list[Condition] = []
    seen: set[str] = set()
    for old in existing:
        seen.add(old.type)
        new = wanted.get(old.type)
        if new is None:
            merged.append(old)
            continue
        transition = old.last_transition_time if old.status == new.status and old.last_transition_time else now
        merged.append(_condition(new, transition, generation))
    merged.extend(_condition(new, now, generation) for kind, new in wanted.items() if kind not in seen)
    return merged


def _condition(desired: DesiredCondition, transition: str, generation: int | None) -> Condition:
    return Condition.model_validate(
        {
            "type": desired.type,
            "status": desired.status,
            "reason": desired.reason,
            "message": desired.message,
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
    )


def trainer_status(
    job_name: str,
    trainer_job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    previous: TrainerStatus | None,
) -> TrainerStatus:
    """status.trainer: the Job's name, pods started and pods the cluster stopped (neither decreasing: finished pods may
    be gone), start and end."""
    previous = previous or TrainerStatus()
    job_status: Mapping[str, Any] = (trainer_job or {}).get("status") or {}
    # Disrupted pods are deleted once they end, so each is remembered by name when first seen.
    disrupted = [pod for pod in pods if disruption_of(pod)]
    recorded = set(previous.disrupted_pods or ())
    new = [str(pod["metadata"]["name"]) for pod in disrupted if pod["metadata"]["name"] not in recorded]
    disruptions = (previous.disruptions or 0) + len(new)
    # The Job counts no pod its failure policy ignored, except as active while one still runs.
    still_active = sum(
        1 for pod in disrupted if not is_pod_finished(pod) and not pod["metadata"].get("deletionTimestamp")
    )
    start = job_status.get("startTime")
    if (trainer_job or {}).get("kind") == "JobSet":
        # A JobSet's attempt is the whole group: its first start, then one more per restart.
        attempts = max(int(job_status.get("restarts") or 0) + 1, previous.attempts or 0)
        start = min(
            (str(p["status"]["startTime"]) for p in pods if (p.get("status") or {}).get("startTime")), default=None
        )
    else:
        counted = sum(int(job_status.get(key) or 0) for key in ("active", "failed", "succeeded"))
        attempts = max(counted + disruptions - still_active, len(pods), previous.attempts or 0)
    completion = job_status.get("completionTime")
    if completion is None and trainer_job is not None:
        failed = job_condition(trainer_job, "Failed")
        completion = failed.get("lastTransitionTime") if failed else None
    return TrainerStatus(
        job_name=job_name,
        attempts=attempts or None,
        disruptions=disruptions or None,
        disrupted_pods=[*(previous.disrupted_pods or ()), *new][-RECORDED_DISRUPTED_PODS:] or None,
        start_time=start,
        completion_time=completion or previous.completion_time,
    )


def _wire(status: FineTuneJobStatus) -> dict[str, Any]:
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def status_from_observation(
    job: FineTuneJob,
    observation: Observation,
    trainer: TrainerStatus | None,
    now: str,
) -> FineTuneJobStatus:
    """The whole new status: phase, message, conditions, trainer, and the results the trainer summarised."""
    current = job.status or FineTuneJobStatus()
    generation = metadata_generation(job)
    update: dict[str, Any] = {
        "phase": observation.phase,
        "message": observation.message,
        "model": job.spec.model.short_name,
        "observed_generation": generation,
        "conditions": merge_conditions(current.conditions, observation.conditions, observation, now, generation),
    }
    if trainer is not None:
        update["trainer"] = trainer
    summary = observation.summary
    if summary is not None:
        if summary.metrics:
            update["metrics"] = {**current.metrics, **summary.metrics}
        for name in ("dataset", "evaluation", "artifacts", "usage", "fine_tuned_model"):
            value = getattr(summary, name)
            if value is not None:
                update[name] = value
    status = current.model_copy(update=update)
    served = serving_status(job, status)
    if served is None:
        return status
    # Ready replicas are the Deployment's to report and the check its pod's; the rest follows from the spec and the
    # outcome.
    observed = current.serving or ServingStatus()
    return status.model_copy(
        update={
            "serving": served.model_copy(update={"ready_replicas": observed.ready_replicas, "check": observed.check})
        }
    )


def spec_evaluates(job: FineTuneJob) -> bool:
    """Whether the job evaluates after training (and so passes through Evaluating)."""
    return job.spec.evaluation.enabled


def metadata_generation(job: FineTuneJob) -> int | None:
    """metadata.generation, when the API server set it."""
    value = (job.metadata.model_extra or {}).get("generation")
    return int(value) if value is not None else None


def status_patch(current: FineTuneJobStatus | None, new: FineTuneJobStatus) -> dict[str, Any]:
    """Merge-patch body for the status subresource with the top-level fields that changed; progress is the
    trainer's and never written here."""
    old = _wire(current or FineTuneJobStatus())
    fresh = _wire(new)
    changed = {key: value for key, value in fresh.items() if key != "progress" and old.get(key) != value}
    return {"status": changed} if changed else {}


def change_between(current: FineTuneJobStatus | None, new: FineTuneJobStatus) -> StatusChange:
    """The patch and phase transition from the current status to `new`."""
    patch = status_patch(current, new)
    old_phase = current.phase if current else None
    transitions: tuple[PhaseTransition, ...] = ()
    if new.phase and new.phase != old_phase:
        transitions = (PhaseTransition(old_phase, new.phase, _headline_reason(new), new.message or ""),)
    return StatusChange(patch, transitions, new)


def _headline_reason(status: FineTuneJobStatus) -> str:
    """The reason of the condition that explains the phase (Failed, Succeeded, Running...), for the Event."""
    by_type = {condition.type: condition for condition in status.conditions}
    preferred = {
        "Failed": c.CONDITION_FAILED,
        "Cancelled": c.CONDITION_FAILED,
        "Succeeded": c.CONDITION_SUCCEEDED,
        "Queued": c.CONDITION_QUEUED,
    }.get(status.phase or "", c.CONDITION_RUNNING)
    condition = by_type.get(preferred) or by_type.get(c.CONDITION_RUNNING)
    return condition.reason if condition else (status.phase or "Unknown")


def derive_status(
    job: FineTuneJob,
    trainer_job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    now: str,
    queue: QueueState | None = None,
) -> StatusChange:
    """The status change one look at the trainer Job and its pods calls for.

    A brand-new job without a trainer Job gets no status yet. A finished FineTuneJob stays finished: once the phase
    is terminal, only a finished trainer Job can refine it
    (its Job may be gone after ttlSecondsAfterFinished, or recreated by hand; neither reopens the run).
    """
    current = job.status or FineTuneJobStatus()
    job_name = trainer_resource_name(job.metadata.name)
    finished = trainer_job is not None and (
        job_condition(trainer_job, "Complete") is not None or job_condition(trainer_job, "Failed") is not None
    )
    if current.phase in TERMINAL_PHASES and not finished:
        return StatusChange({}, (), current)
    if trainer_job is None and current.phase is None:
        # Nothing created yet: the create handler is at work and writes the first status itself.
        return StatusChange({}, (), current)
    observation = observe(job, trainer_job, pods, queue)
    trainer = trainer_status(job_name, trainer_job, pods, current.trainer) if trainer_job is not None else None
    return change_between(job.status, status_from_observation(job, observation, trainer, now))


def jobset_missing_message(job: FineTuneJob) -> str:
    """What to do when a multi-node job meets a cluster without JobSet."""
    return (
        f"resources.nodes is {job.spec.resources.nodes}: a multi-node trainer runs as a JobSet "
        "(jobset.x-k8s.io/v1alpha2), which this cluster does not serve. Install JobSet "
        "(https://jobset.sigs.k8s.io), then restart the kubetune operator so that it watches JobSets; until then the "
        "job waits"
    )


def jobset_missing_status(job: FineTuneJob, now: str) -> StatusChange:
    """Pending with Running=False/JobSetMissing: the job waits, and says what the cluster lacks."""
    previous = job.status or FineTuneJobStatus()
    generation = (job.metadata.model_extra or {}).get("generation")
    message = jobset_missing_message(job)
    observation = _pending(c.REASON_JOBSET_MISSING, message)
    new = previous.model_copy(
        update={
            "phase": "Pending",
            "message": observation.message,
            "observed_generation": generation,
            "conditions": merge_conditions(previous.conditions, observation.conditions, observation, now, generation),
        }
    )
    return change_between(job.status, new)


def invalid_spec_status(
    current: FineTuneJobStatus | None, generation: int | None, message: str, now: str
) -> StatusChange:
    """Failed with Validated=False/InvalidSpec, for a spec the operator refuses (the API server let it through)."""
    previous = current or FineTuneJobStatus()
    message = shorten(message)
    observation = Observation(
        "Failed",
        c.REASON_INVALID_SPEC,
        message,
        (
            DesiredCondition(c.CONDITION_VALIDATED, "False", c.REASON_INVALID_SPEC, message),
            DesiredCondition(c.CONDITION_FAILED, "True", c.REASON_INVALID_SPEC, message),
        ),
    )
    new = previous.model_copy(
        update={
            "phase": "Failed",
            "message": message,
            "observed_generation": generation,
            "conditions": merge_conditions(previous.conditions, observation.conditions, observation, now, generation),
        }
    )
    return change_between(current, new)
