"""The admission policy that keeps each trainer pod to the progress fields of its own FineTuneJob.

Trainer pods run as one ServiceAccount per namespace (kubetune_operator.trainer_identity), bound to a ClusterRole that
may `patch` any FineTuneJob's status there. This ValidatingAdmissionPolicy narrows that per pod: a status update by
that ServiceAccount is refused unless its token is bound to the job's own trainer pod (`<job>-trainer-xxxxx`, or a
multi-node trainer's rank 0, `<job>-trainer-node-0-0-xxxxx`; read from the token's
`authentication.kubernetes.io/pod-name`, which the API server sets for every pod-bound token, the kubelet's projected
ones included) and every status field but `progress` and `dataset` stays as it was. A trainer can neither touch
another job nor forge its phase, conditions, results or artifacts.

`make crds` writes the rules into the chart (files/trainer-policy.yaml); the chart adds the ServiceAccount match.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import GROUP, MAX_JOB_NAME_LENGTH, MAX_MULTI_NODE_JOB_NAME_LENGTH, PLURAL
from kubetune.contract import TRAINER_JOB_SUFFIX
from kubetune.crd import status_schema

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
# The Job controller names a pod `<job>-` plus 5 random characters (the API server's generateName).
GENERATED_SUFFIX_LENGTH = 5
TRAINER_POD_INFIX = f"{TRAINER_JOB_SUFFIX}-"
# Rank 0 of a multi-node trainer: pod 0 of the JobSet's Job <job>-trainer-node-0 (kubetune_operator.builders).
MULTI_NODE_RANK_ZERO_INFIX = f"{TRAINER_JOB_SUFFIX}-node-0-0-"
# What a trainer reports (kubetune_trainer.progress.reporter.StatusPatcher); every other status field is the operator's.
TRAINER_STATUS_FIELDS = ("progress", "dataset")
DNS_LABEL_LENGTH = 63


def trainer_rbac_rules() -> list[dict[str, Any]]:
    """The trainer ClusterRole's rules: patch FineTuneJob status (narrowed per pod by the policy), nothing else.

    No reads: a trainer that needs its job (the hosted driver on SIGTERM) reads the answer of an empty patch, which
    the policy allows for its own job only; a `get` could not be narrowed that way."""
    return [{"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]}]


def operator_status_fields() -> list[str]:
    """The status fields a trainer must leave alone: every property of the CRD's status schema but its own (so a
    field added later is the operator's until said otherwise)."""
    return [name for name in status_schema()["properties"] if name not in TRAINER_STATUS_FIELDS]


def _unchanged(field_name: str) -> str:
    return f"object.?status.?{field_name} == oldObject.?status.?{field_name}"


def policy_rules() -> dict[str, Any]:
    """The policy's variables and validations: CEL that needs no chart value."""
    infix_length = len(TRAINER_POD_INFIX) + GENERATED_SUFFIX_LENGTH
    if MAX_JOB_NAME_LENGTH + infix_length > DNS_LABEL_LENGTH:
        raise AssertionError("trainer pod names would be cut by generateName; the policy relies on them whole")
    pod_name = (
        f"has(request.userInfo.extra) && '{POD_NAME_EXTRA}' in request.userInfo.extra"
        f" && size(request.userInfo.extra['{POD_NAME_EXTRA}']) == 1"
        f" ? request.userInfo.extra['{POD_NAME_EXTRA}'][0] : ''"
    )
    # A multi-node trainer's rank 0 (node 0 of the JobSet's Indexed Job) reports for all nodes; the others may not.
    rank_zero_length = len(MULTI_NODE_RANK_ZERO_INFIX) + GENERATED_SUFFIX_LENGTH
    if MAX_MULTI_NODE_JOB_NAME_LENGTH + rank_zero_length > DNS_LABEL_LENGTH:
        raise AssertionError("multi-node trainer pod names would be cut by generateName; the policy relies on them")
    own_pod = (
        f"(variables.podName.startsWith(object.metadata.name + '{TRAINER_POD_INFIX}')"
        f" && size(variables.podName) == size(object.metadata.name) + {infix_length})"
        f" || (variables.podName.startsWith(object.metadata.name + '{MULTI_NODE_RANK_ZERO_INFIX}')"
        f" && size(variables.podName) == size(object.metadata.name) + {rank_zero_length})"
    )
    own_pod_message = (
        "'the trainer ServiceAccount may patch only its own FineTuneJob\\'s status, from that job\\'s trainer pod: '"
        " + (variables.podName == '' ? 'this token is not bound to a pod'"
        " : 'pod ' + variables.podName + ' is not a trainer pod of FineTuneJob ' + object.metadata.name)"
    )
    return {
        "variables": [{"name": "podName", "expression": pod_name}],
        "validations": [
            {"expression": own_pod, "messageExpression": own_pod_message, "reason": "Forbidden"},
            {
                "expression": " && ".join(_unchanged(name) for name in operator_status_fields()),
                "message": "a trainer may write status."
                + " and status.".join(TRAINER_STATUS_FIELDS)
                + " only; the other status fields are the operator's",
                "reason": "Forbidden",
            },
        ],
    }


def match_conditions(service_account: str) -> list[dict[str, Any]]:
    """The policy applies to the namespace's trainer ServiceAccount only (not to the operator or to users)."""
    return [
        {
            "name": "trainer-service-account",
            "expression": f"request.userInfo.username == 'system:serviceaccount:' + request.namespace + "
            f"':{service_account}'",
        }
    ]


def trainer_policy_spec(service_account: str) -> dict[str, Any]:
    """The whole ValidatingAdmissionPolicy spec, as the chart renders it."""
    return {
        # An error evaluating the policy refuses the request: a trainer never gets more than its own job.
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": [GROUP],
                    "apiVersions": ["*"],
                    "operations": ["UPDATE"],
                    "resources": [f"{PLURAL}/status"],
                }
            ]
        },
        "matchConditions": match_conditions(service_account),
        **policy_rules(),
    }


def build_trainer_policy(name: str, service_account: str) -> dict[str, Any]:
    """The ValidatingAdmissionPolicy object."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": trainer_policy_spec(service_account),
    }


def build_trainer_policy_binding(name: str) -> dict[str, Any]:
    """Binds the policy in every namespace (its match condition limits it to trainer ServiceAccounts)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
