"""The least-privilege ClusterRole rules of the operator; the Helm chart's ClusterRole must match them exactly."""

from __future__ import annotations

from typing import Any

from kubetune.api import GROUP, PLURAL

KOPF_PEERING_GROUP = "kopf.dev"


def operator_rbac_rules() -> list[dict[str, Any]]:
    """ClusterRole rules, one per reason. No Secrets (they are passed by reference), no CRDs or namespaces (kopf's
    scanning is disabled, see handlers.configure_kopf), no delete (children go by owner-reference GC)."""
    return [
        # kopf lists and watches FineTuneJobs; handlers read one when the watch has not brought it (a trainer Job
        # deleted by hand); kopf patches metadata.annotations to keep handler progress and the last handled spec
        # (kubetune.io/... annotations).
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
        # phase, conditions and results go through the status subresource. Holding patch here is also what lets the
        # operator bind the chart's trainer ClusterRole (patch on this) in a namespace: RBAC refuses to grant what
        # one lacks.
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
        # kopf.adopt sets blockOwnerDeletion on children; the OwnerReferencesPermissionEnforcement admission plugin
        # allows that only to who may update the owner's finalizers (the operator never sets finalizers itself).
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
        # The trainer Job: created once, watched for its conditions, patched for spec.suspend.
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
        # A multi-node trainer's JobSet, the same way (JobSet itself creates its Jobs and pods).
        {
            "apiGroups": ["jobset.x-k8s.io"],
            "resources": ["jobsets"],
            "verbs": ["get", "list", "watch", "create", "patch"],
        },
        # Kueue's Workloads are only read: why a queued trainer waits, or that it was preempted.
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list", "watch"]},
        # Trainer pods are only read (kopf's index keeps them in memory): scheduling, image-pull and OOM failures, and
        # the termination-message summary.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        # The trainer identity, once per namespace (kubetune_operator.trainer_identity): the ServiceAccount trainer
        # pods run as. Created (an existing one is success) and watched, by its labels, so that one deleted is
        # created again.
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["list", "watch", "create"]},
        # ... and its RoleBinding to the chart's trainer ClusterRole, the same way.
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["rolebindings"],
            "verbs": ["list", "watch", "create"],
        },
        # spec.serving's endpoint, once the job succeeded: its Deployment, read back when it exists and watched for
        # its ready replicas and its deletion.
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create"]},
        # ... and the Service in front of it (read back when it exists).
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
        # Events on FineTuneJobs for every phase transition, and kopf's own handler reports.
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        # kopf peering: replicas find each other and keep alive through these objects' status; the operator
        # creates its peering object at start when the chart did not.
        {
            "apiGroups": [KOPF_PEERING_GROUP],
            "resources": ["clusterkopfpeerings", "kopfpeerings"],
            "verbs": ["get", "list", "watch", "patch", "create"],
        },
    ]
