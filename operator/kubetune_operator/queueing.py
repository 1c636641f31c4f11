"""Kueue's word on a queued trainer, read from the Workload Kueue keeps for it: pure functions over API dicts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.contract import TRAINER_JOB_SUFFIX

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
# The kinds of trainer Kueue admits: a single-node trainer's Job, a multi-node one's JobSet.
TRAINER_OWNER_KINDS = frozenset({("batch/v1", "Job"), ("jobset.x-k8s.io/v1alpha2", "JobSet")})


@dataclass(frozen=True)
class QueueState:
    """Where Kueue has a trainer: admitted or not, and why not (its QuotaReserved or Evicted condition)."""

    owner_uid: str
    admitted: bool
    reason: str = ""
    message: str = ""
    evicted: bool = False


def workload_condition(workload: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    """A Workload condition by type, whatever its status."""
    for condition in (workload.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type:
            return condition
    return None


def trainer_owner(workload: Mapping[str, Any]) -> tuple[str, str] | None:
    """(FineTuneJob name, trainer uid) of a Workload whose owner is a trainer Job or JobSet (`<job>-trainer`)."""
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        name = str(ref.get("name") or "")
        if (ref.get("apiVersion"), ref.get("kind")) in TRAINER_OWNER_KINDS and name.endswith(TRAINER_JOB_SUFFIX):
            return name[: -len(TRAINER_JOB_SUFFIX)], str(ref.get("uid") or "")
    return None


def queue_state_of(workload: Mapping[str, Any], owner_uid: str) -> QueueState:
    """Admitted when Kueue says so; otherwise the newest word on why not: an eviction (preemption, a deactivated
    workload) before a quota it could not reserve, which stays False long after the eviction."""
    admitted = workload_condition(workload, "Admitted")
    if admitted is not None and admitted.get("status") == "True":
        return QueueState(owner_uid, True)
    evicted = workload_condition(workload, "Evicted")
    if evicted is not None and evicted.get("status") == "True":
        return QueueState(owner_uid, False, str(evicted.get("reason") or ""), str(evicted.get("message") or ""), True)
    reserved = workload_condition(workload, "QuotaReserved")
    if reserved is not None and reserved.get("status") == "False":
        return QueueState(owner_uid, False, str(reserved.get("reason") or ""), str(reserved.get("message") or ""))
    return QueueState(owner_uid, False)
