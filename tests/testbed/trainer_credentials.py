"""A trainer pod's credentials on a control plane without a kubelet: the trainer policy, the namespace's trainer
identity, a Pod object named like the job's trainer pod, and a token bound to that pod (as the kubelet projects it)."""

from __future__ import annotations

import time
from typing import Any

from kubetune_operator.builders import trainer_resource_name
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.trainer_identity import build_namespace_identity

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.trainer_policy import (
    build_trainer_policy,
    build_trainer_policy_binding,
    trainer_rbac_rules,
)
from tests.testbed.controlplane import ControlPlane

# Not the chart's names (release kubetune would make kubetune-trainer and kubetune-trainer-own-job): the e2e test
# installs the chart into the same control plane. The ServiceAccount is the default one, which both policies match.
POLICY_NAME = "testbed-trainer-own-job"
SETTINGS = OperatorSettings(trainer_cluster_role="testbed-trainer")
PROBE_JOB = "policy-probe"
POLICY_WAIT_SECONDS = 30.0


def trainer_cluster_role() -> dict[str, Any]:
    """The chart's trainer ClusterRole, under the settings' default name."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": SETTINGS.trainer_cluster_role},
        "rules": trainer_rbac_rules(),
    }


def trainer_pod(namespace: str, job_name: str, suffix: str = "t3st0") -> dict[str, Any]:
    """A Pod object named as the Job controller names the job's trainer pods; nothing runs it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{trainer_resource_name(job_name)}-{suffix}", "namespace": namespace},
        "spec": {
            "serviceAccountName": SETTINGS.trainer_service_account,
            "automountServiceAccountToken": False,
            "containers": [{"name": "trainer", "image": "kubetune-trainer:test"}],
        },
    }


def pod_bound_kubeconfig(plane: ControlPlane, pod: dict[str, Any]) -> str:
    """A kubeconfig with a token of the pod's ServiceAccount bound to that pod (the API server names the pod in it)."""
    from kubernetes import client

    core = client.CoreV1Api(plane.api_client())
    metadata = pod["metadata"]
    created = client.ApiClient().sanitize_for_serialization(
        core.read_namespaced_pod(metadata["name"], metadata["namespace"])
    )
    return plane.service_account_kubeconfig(
        metadata["namespace"],
        pod["spec"]["serviceAccountName"],
        bound_pod=(metadata["name"], created["metadata"]["uid"]),
    )


def install_trainer_rbac(plane: ControlPlane) -> None:
    """What the chart installs for trainers, under the settings' default names: the ClusterRole the operator binds
    in each job namespace, the admission policy and its binding (idempotent)."""
    for manifest in (
        trainer_cluster_role(),
        build_trainer_policy(POLICY_NAME, SETTINGS.trainer_service_account),
        build_trainer_policy_binding(POLICY_NAME),
    ):
        plane.apply(manifest)


def install_trainer_policy(plane: ControlPlane, namespace: str) -> None:
    """The chart's trainer ClusterRole, policy and binding (idempotent), then wait until the policy is in force: a
    trainer pod's token is refused on another job's status."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    install_trainer_rbac(plane)
    ensure_namespace_identity(plane, namespace)
    target = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": PROBE_JOB, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/probe"},
            "dataset": {"train": "s3://data/probe.jsonl"},
            "output": {"uri": "s3://runs/probe"},
        },
    }
    plane.apply(target)
    pod = trainer_pod(namespace, "someone-else")
    plane.apply(pod)
    api = client.CustomObjectsApi(plane.api_client(pod_bound_kubeconfig(plane, pod)))
    deadline = time.monotonic() + POLICY_WAIT_SECONDS
    while True:
        try:
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, PROBE_JOB, {"status": {"progress": {"step": 1}}}
            )
        except ApiException as error:
            if error.status in (403, 422) and "trainer pod" in str(error.body):
                return
            if error.status != 403:  # 403 without the policy's words: RBAC not in force yet
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the trainer policy was not in force after {POLICY_WAIT_SECONDS:.0f} s")
        time.sleep(0.5)


def ensure_namespace_identity(plane: ControlPlane, namespace: str) -> None:
    """The namespace's trainer ServiceAccount and RoleBinding, as the operator creates them."""
    for manifest in build_namespace_identity(namespace, SETTINGS):
        plane.apply(manifest)


def trainer_kubeconfig(plane: ControlPlane, namespace: str, job_name: str, suffix: str = "t3st0") -> str:
    """What the trainer pod of `job_name` holds: a token bound to a pod named like its trainer pod."""
    install_trainer_policy(plane, namespace)
    pod = trainer_pod(namespace, job_name, suffix)
    plane.apply(pod)
    return pod_bound_kubeconfig(plane, pod)
