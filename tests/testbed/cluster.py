"""The parts that turn a control plane into a cluster that runs what kubetune ships: node lifecycle, the local registry
holding the product's images, the cluster's DNS, and a real node pulling from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.testbed.cluster_dns import ClusterDns
from tests.testbed.controlplane import ControlPlane
from tests.testbed.images import ProductImages, publish_images
from tests.testbed.node import NODE_KIND_LABEL, RealNode
from tests.testbed.prometheus import PodDiscovery
from tests.testbed.registry import LocalRegistry
from tests.testbed.s3 import REGION, S3Server

ON_REAL_NODE = {NODE_KIND_LABEL: "real"}


@dataclass
class NodeParts:
    """The local registry, the product's images in it, and the real node pulling them."""

    registry: LocalRegistry
    node: RealNode
    images: ProductImages
    dns: ClusterDns

    def stop(self) -> None:
        self.node.stop()
        self.dns.stop()
        self.registry.stop()


def start_node_parts(kube: ControlPlane) -> NodeParts:
    """The registry (with the images `make images` built pushed to it) and a real node; node lifecycle must be on
    (ControlPlane.start_controllers(node_lifecycle=True)) for the node's failures to reach its pods."""
    registry = LocalRegistry(log_dir=kube.log_dir).start()
    dns = ClusterDns(kube)
    node = RealNode(kube, registry_endpoint=registry.endpoint, cluster_dns=dns.address)
    try:
        dns.start()
        images = publish_images(registry)
        node.start()
        node.keep_only_images([images.operator, images.trainer, images.llama_server])
    except BaseException:
        node.stop()
        dns.stop()
        registry.stop()
        raise
    return NodeParts(registry, node, images, dns)


def pod_discovery(kube: ControlPlane) -> PodDiscovery:
    """How Prometheus finds the operator and trainer pods: through this control plane, as admin."""
    return PodDiscovery(kubeconfig=kube.kubeconfig)


def product_values(s3: S3Server, images: ProductImages, progress_interval: float = 5) -> dict[str, Any]:
    """Chart values that run the operator and the trainers on the real node, from the test bed's registry (pinned by
    digest), with moto as S3."""
    operator_repository, operator_digest = images.repository_and_digest(images.operator)
    trainer_repository, trainer_digest = images.repository_and_digest(images.trainer)
    server_repository, server_digest = images.repository_and_digest(images.llama_server)
    return {
        "image": {"repository": operator_repository, "digest": operator_digest},
        "nodeSelector": ON_REAL_NODE,
        "s3": {"endpoint": s3.endpoint, "region": REGION, "credentialsSecret": "kubetune-s3"},
        "serving": {
            "llamaCpp": {"image": {"repository": server_repository, "digest": server_digest}},
            "vllm": {"image": {"repository": "docker.io/vllm/vllm-openai", "tag": "v0.11.0"}},
        },
        "trainer": {
            "image": {"repository": trainer_repository, "digest": trainer_digest},
            "gpuNodeSelector": ON_REAL_NODE,
            "gpuTolerations": [],
            "progressIntervalSeconds": progress_interval,
        },
    }
