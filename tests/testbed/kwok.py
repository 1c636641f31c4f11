"""kwok's fake GPU nodes: Ready nodes whose pods kwok completes at once, for scheduling and scale tests."""

from __future__ import annotations

from typing import Any

from tests.testbed.node import GPU_RESOURCE, NODE_KIND_LABEL

KWOK_NODE = "kwok-gpu-0"


def gpu_node_manifest(name: str, gpus: int = 8) -> dict[str, Any]:
    """A fake GPU node that the kwok controller keeps Ready (nodes annotated kwok.x-k8s.io/node=fake)."""
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                NODE_KIND_LABEL: "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources},
    }
