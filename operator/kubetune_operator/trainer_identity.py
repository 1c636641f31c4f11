"""The trainer's identity in each namespace: the ServiceAccount trainer pods run as, bound to the chart's trainer
ClusterRole; the admission policy in kubetune.trainer_policy narrows each pod to its own FineTuneJob.

Why not a ServiceAccount and Role per job (resourceNames: [the job])? That costs four API writes per job, two of them
(Role, RoleBinding) paying the API server's RBAC escalation check, which walks the namespace's RoleBindings, so a
burst of jobs would wait on them more than on its trainer Jobs (docs/decisions/0005-trainer-identity-per-namespace.md).
Per namespace it is two writes, and the policy is narrower than that Role would be: a trainer may change only
status.progress and status.dataset, where the Role let it write any status field of its job. The identity's objects
are watched: one deleted is created again (handlers.on_identity_event).
"""

from __future__ import annotations

from typing import Any

from kubetune_operator.builders import APP_NAME, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_NAME, MANAGER
from kubetune_operator.settings import OperatorSettings

COMPONENT_TRAINER_IDENTITY = "trainer-identity"
# The watches of the identity objects ask the API server for these only, not every ServiceAccount of the cluster.
IDENTITY_SELECTOR = f"{LABEL_COMPONENT}={COMPONENT_TRAINER_IDENTITY},{LABEL_MANAGED_BY}={MANAGER}"


def identity_labels() -> dict[str, str]:
    """Labels of the per-namespace ServiceAccount and RoleBinding (not owned by any one FineTuneJob)."""
    return {LABEL_NAME: APP_NAME, LABEL_COMPONENT: COMPONENT_TRAINER_IDENTITY, LABEL_MANAGED_BY: MANAGER}


def build_trainer_service_account(namespace: str, settings: OperatorSettings) -> dict[str, Any]:
    """The ServiceAccount every trainer pod of the namespace runs as."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": settings.trainer_service_account, "namespace": namespace, "labels": identity_labels()},
    }


def build_trainer_role_binding(namespace: str, settings: OperatorSettings) -> dict[str, Any]:
    """Binds the chart's trainer ClusterRole to the namespace's trainer ServiceAccount, in that namespace only."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": settings.trainer_service_account, "namespace": namespace, "labels": identity_labels()},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": settings.trainer_cluster_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": settings.trainer_service_account, "namespace": namespace}],
    }


def build_namespace_identity(namespace: str, settings: OperatorSettings) -> list[dict[str, Any]]:
    """What the operator creates once per namespace before that namespace's first trainer Job."""
    return [build_trainer_service_account(namespace, settings), build_trainer_role_binding(namespace, settings)]
