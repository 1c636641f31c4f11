"""One look at a FineTuneJob and the children the watches hold, as what it calls for: the objects to create, the
trainer Job's suspend to set, the status change. Pure: the handlers read the cluster, call it and write the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api import TERMINAL_PHASES, FineTuneJob, FineTuneJobStatus
from kubetune_operator.builders import build_children
from kubetune_operator.lifecycle import StatusChange, derive_status, needs_trainer, suspend_change
from kubetune_operator.queueing import QueueState
from kubetune_operator.serving import build_serving, serving_decision
from kubetune_operator.settings import OperatorSettings

TRAINER_KINDS = ("Job", "JobSet")


@dataclass(frozen=True)
class Observed:
    """What the operator knows of a FineTuneJob's children: its trainer Job (or a multi-node trainer's JobSet, as a
    Job view) and its pods (kopf's indexes), whether this replica has created the trainer (its watch event may not
    have come yet), whether its endpoint exists, and what Kueue says of a queued trainer."""

    trainer_job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    trainer_created: bool = False
    serving: bool = False
    queue: QueueState | None = None


@dataclass(frozen=True)
class ChildChanges:
    """The children to create (in order) and the trainer Job's spec.suspend to set (None: leave it)."""

    create: tuple[dict[str, Any], ...] = ()
    suspend: bool | None = None

    @property
    def creates_trainer(self) -> bool:
        """Whether the trainer Job is among the objects to create."""
        return any(child["kind"] in TRAINER_KINDS for child in self.create)


@dataclass(frozen=True)
class Reconciliation:
    """Everything one look calls for."""

    children: ChildChanges
    status: StatusChange


def job_uid(job: FineTuneJob) -> str:
    """metadata.uid, which the API server sets ("" before it has)."""
    return str((job.metadata.model_extra or {}).get("uid") or "")


def is_deleting(job: FineTuneJob) -> bool:
    """Whether the FineTuneJob is being deleted: nothing is created for it any more."""
    return bool((job.metadata.model_extra or {}).get("deletionTimestamp"))


def child_changes(job: FineTuneJob, observed: Observed, settings: OperatorSettings) -> ChildChanges:
    """The children the job lacks and the suspend its trainer Job must mirror.

    A running job gets its trainer Job when none of its own exists (never made, deleted by hand, or a Job of the same
    name left by an earlier FineTuneJob); otherwise its Job follows runPolicy.suspend. A succeeded job gets its endpoint
    when it asks for one and the gate allows it. A finished or deleted run is never restarted.
    """
    if is_deleting(job):
        return ChildChanges()
    status = job.status or FineTuneJobStatus()
    if status.phase == "Succeeded":
        serve, _ = serving_decision(job, status)
        wanted = serve and not observed.serving
        return ChildChanges(tuple(build_serving(job, status, settings))) if wanted else ChildChanges()
    if status.phase in TERMINAL_PHASES:
        return ChildChanges()
    if needs_trainer(job_uid(job), observed.trainer_job) and not observed.trainer_created:
        return ChildChanges(tuple(build_children(job, settings)))
    return ChildChanges(suspend=suspend_change(job, observed.trainer_job))


def status_change(job: FineTuneJob, observed: Observed, now: str) -> StatusChange:
    """The status the job's own trainer Job and its pods call for; a Job of the same name that another FineTuneJob
    left behind is no trainer of this one."""
    own = None if needs_trainer(job_uid(job), observed.trainer_job) else observed.trainer_job
    if own is None:
        return derive_status(job, None, (), now)
    return derive_status(job, own, observed.pods, now, observed.queue)


def reconcile(job: FineTuneJob, observed: Observed, settings: OperatorSettings, now: str) -> Reconciliation:
    """The children to create, the suspend to set and the status change one look at the job and its children calls
    for. The handlers apply the two halves at different moments (children on the event, the status once the watches
    have caught up), each through the function named here."""
    return Reconciliation(child_changes(job, observed, settings), status_change(job, observed, now))
