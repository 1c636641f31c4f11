"""The real node: pods from the local registry run in containers under runc, with the kubelet's and kernel's rules."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KwokCluster
from tests.testbed.controlplane import NODE_MONITOR_GRACE_SECONDS, ControlPlane
from tests.testbed.node import GPU_RESOURCE, NODE_KIND_LABEL, RealNode, node_is_ready
from tests.testbed.processes import wait_for
from tests.testbed.registry import LocalRegistry, push_probe_image

pytestmark = pytest.mark.integration

EVICTION_SECONDS = 10  # how long the probe pods tolerate an unreachable node (Kubernetes' default: 300)


@dataclass
class RealNodeBed:
    """The session's cluster with the probe image (tests/testbed/probe) in its registry."""

    kube: ControlPlane
    registry: LocalRegistry
    node: RealNode
    kwok_node: str
    probe_image: str  # digest-pinned reference

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.kube.api_client())


@pytest.fixture(scope="module")
def real_node_bed(kwok_cluster: KwokCluster) -> RealNodeBed:
    probe = push_probe_image(kwok_cluster.registry)
    cluster = kwok_cluster
    return RealNodeBed(cluster.kube, cluster.registry, cluster.node, cluster.kwok_node, probe)


@pytest.fixture
def node_namespace(real_node_bed: RealNodeBed) -> Iterator[str]:
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = real_node_bed.core()
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # The ServiceAccount controller creates `default` soon after; a pod created before it is refused.
    wait_for(lambda: core.read_namespaced_service_account("default", name) is not None, 30, "the default SA")
    yield name
    core.delete_namespace(name)


def probe_pod(name: str, image: str, mode: str, memory: str = "64Mi") -> dict[str, Any]:
    """A pod running the probe as uid 1000 with a read-only root filesystem, on the real node, asking for a GPU."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {NODE_KIND_LABEL: "real"},
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
            # A user's own toleration shortens the eviction from an unreachable node (the API server adds 300 s).
            "tolerations": [
                {
                    "key": f"node.kubernetes.io/{condition}",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": EVICTION_SECONDS,
                }
                for condition in ("unreachable", "not-ready")
            ],
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "args": [mode],
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"limits": {"memory": memory, GPU_RESOURCE: "1"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def run_pod(bed: RealNodeBed, namespace: str, manifest: dict[str, Any], timeout: float = 90) -> Any:
    """Create the pod and wait until it has ended (Succeeded or Failed); returns it."""
    core = bed.core()
    core.create_namespaced_pod(namespace, manifest)
    name = manifest["metadata"]["name"]
    wait_for(
        lambda: core.read_namespaced_pod(name, namespace).status.phase in ("Succeeded", "Failed"),
        timeout,
        f"pod {name} to end",
        interval=0.5,
    )
    return core.read_namespaced_pod(name, namespace)


def pod_logs(bed: RealNodeBed, namespace: str, name: str) -> str:
    """`kubectl logs`: the API server fetches them from the kubelet."""
    result = bed.kube.kubectl("logs", "-n", namespace, name)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_node_is_ready_with_its_labels_and_gpus(real_node_bed: RealNodeBed) -> None:
    node = real_node_bed.core().read_node(real_node_bed.node.name)
    assert node_is_ready(node)
    assert node.metadata.labels[NODE_KIND_LABEL] == "real"
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
    assert node.status.allocatable[GPU_RESOURCE] == "8"
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == [real_node_bed.kube.address]


def test_a_second_real_node_on_the_machine_is_refused_before_touching_anything(
    real_node_bed: RealNodeBed, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="another real test-bed node runs on this machine"):
        RealNode(real_node_bed.kube, name="kubetune-node-1", node_dir=tmp_path).start()
    assert node_is_ready(real_node_bed.core().read_node(real_node_bed.node.name))
    assert not list(tmp_path.iterdir())


def test_pod_runs_as_its_user_on_a_read_only_root(real_node_bed: RealNodeBed, node_namespace: str) -> None:
    pod = run_pod(real_node_bed, node_namespace, probe_pod("identity", real_node_bed.probe_image, "identity"))
    assert pod.status.phase == "Succeeded"
    assert pod.spec.node_name == real_node_bed.node.name
    logs = pod_logs(real_node_bed, node_namespace, "identity")
    assert "uid=1000 gid=1000" in logs
    # EROFS, not EACCES: /writable is mode 1777 in the image, so only the read-only mount refuses the write.
    assert "write /: open /probe-file: read-only file system" in logs
    assert "write /writable: open /writable/probe-file: read-only file system" in logs
    assert "write /data: ok" in logs  # the emptyDir volume is writable


def test_memory_limit_is_a_cgroup_limit_and_its_breach_is_oomkilled(
    real_node_bed: RealNodeBed, node_namespace: str
) -> None:
    pod = run_pod(real_node_bed, node_namespace, probe_pod("oom", real_node_bed.probe_image, "oom", memory="48Mi"))
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.reason, terminated.exit_code) == ("Failed", "OOMKilled", 137)
    allocated = [line for line in pod_logs(real_node_bed, node_namespace, "oom").splitlines() if "allocated" in line]
    assert allocated, "the probe printed nothing before it was killed"
    assert int(allocated[-1].split()[1]) <= 48


def test_missing_image_tag_is_err_image_pull(real_node_bed: RealNodeBed, node_namespace: str) -> None:
    core = real_node_bed.core()
    image = real_node_bed.registry.image("kubetune-testbed/probe:no-such-tag")
    core.create_namespaced_pod(node_namespace, probe_pod("missing", image, "identity"))

    def waiting_reason() -> str:
        statuses = core.read_namespaced_pod("missing", node_namespace).status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting else ""

    wait_for(lambda: waiting_reason() in ("ErrImagePull", "ImagePullBackOff"), 60, "the pull to fail")
    events = core.list_namespaced_event(node_namespace, field_selector="involvedObject.name=missing").items
    assert any("not found" in (event.message or "") for event in events if event.reason == "Failed")


def test_pod_reaches_the_api_server_through_the_kubernetes_service(
    real_node_bed: RealNodeBed, node_namespace: str
) -> None:
    pod = run_pod(real_node_bed, node_namespace, probe_pod("api", real_node_bed.probe_image, "api"))
    logs = pod_logs(real_node_bed, node_namespace, "api")
    assert pod.status.phase == "Succeeded", logs
    # 10.96.0.1 is the Service's ClusterIP: kube-proxy's iptables rules carry it to the API server.
    assert f"api 10.96.0.1 as system:serviceaccount:{node_namespace}:default" in logs


def test_termination_message_and_exit_code_are_reported(real_node_bed: RealNodeBed, node_namespace: str) -> None:
    pod = run_pod(real_node_bed, node_namespace, probe_pod("terminate", real_node_bed.probe_image, "terminate"))
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.exit_code, terminated.message) == ("Failed", 3, "probe says goodbye")


def test_stopped_kubelet_makes_the_node_unreachable_and_its_pod_evicted(
    real_node_bed: RealNodeBed, node_namespace: str
) -> None:
    bed, core = real_node_bed, real_node_bed.core()
    core.create_namespaced_pod(node_namespace, probe_pod("sleeper", bed.probe_image, "sleep"))
    wait_for(lambda: core.read_namespaced_pod("sleeper", node_namespace).status.phase == "Running", 60, "Running")
    bed.node.stop_kubelet()
    stopped = time.monotonic()
    try:

        def ready_status() -> str:
            conditions = core.read_node(bed.node.name).status.conditions or []
            return next(c.status for c in conditions if c.type == "Ready")

        wait_for(lambda: ready_status() == "Unknown", NODE_MONITOR_GRACE_SECONDS + 30, "the node to turn Unknown")
        taints = {t.key for t in core.read_node(bed.node.name).spec.taints or []}
        assert "node.kubernetes.io/unreachable" in taints
        wait_for(
            lambda: core.read_namespaced_pod("sleeper", node_namespace).metadata.deletion_timestamp is not None,
            EVICTION_SECONDS + 30,
            "the pod's eviction",
        )
        assert time.monotonic() - stopped >= NODE_MONITOR_GRACE_SECONDS
        # kwok renews its nodes' Leases: node lifecycle keeps them Ready.
        assert node_is_ready(core.read_node(bed.kwok_node))
    finally:
        bed.node.start_kubelet()
    assert node_is_ready(core.read_node(bed.node.name))

    def gone() -> bool:
        return not any(p.metadata.name == "sleeper" for p in core.list_namespaced_pod(node_namespace).items)

    wait_for(gone, 60, "the restarted kubelet to finish the evicted pod")
