"""Session fixtures of the local test bed: a real control plane, kwok GPU nodes, a real node with the product's images
in a local registry, S3 and Prometheus."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.testbed.batch_engines import start_batch_engines
from tests.testbed.cluster import start_node_parts
from tests.testbed.controlplane import ControlPlane
from tests.testbed.hostnet import ensure_host_address
from tests.testbed.images import ProductImages
from tests.testbed.kwok import KWOK_NODE, gpu_node_manifest
from tests.testbed.llama_server import LlamaServer
from tests.testbed.node import RealNode, footprint_left, machine_footprint
from tests.testbed.processes import cache_dir, wait_for
from tests.testbed.prometheus import PodDiscovery, PrometheusServer
from tests.testbed.registry import LocalRegistry
from tests.testbed.s3 import S3Server

_failed_tests: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed_tests.append(report.nodeid)


@pytest.fixture(scope="session")
def testbed_dir() -> Iterator[Path]:
    """Where test-bed processes keep their data and logs; kept (and named) when a test failed."""
    root = cache_dir() / "test-runs" / time.strftime("%Y%m%d-%H%M%S")
    root = root.with_name(f"{root.name}-{uuid.uuid4().hex[:6]}")
    root.mkdir(parents=True)
    yield root
    if _failed_tests:
        print(f"\ntest-bed logs kept in {root} ({len(_failed_tests)} failed test(s))")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def kube(testbed_dir: Path) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver (RBAC, token auth, service-account signing) with an admin kubeconfig, listening on
    the test bed's host address, where pods on the real node reach it."""
    plane = ControlPlane(work_dir=testbed_dir / "control-plane", address=ensure_host_address())
    try:
        plane.start()
    except Exception:
        plane.stop()
        raise
    yield plane
    plane.stop()


@dataclass
class KwokCluster:
    """The control plane plus controllers, scheduler and two kinds of GPU node: kwok's fake one, whose pods kwok
    completes at once, and a real node (kubelet, containerd, runc), whose pods run the product's images."""

    kube: ControlPlane
    node: RealNode
    registry: LocalRegistry
    images: ProductImages
    kwok_node: str = KWOK_NODE

    @property
    def kubeconfig(self) -> str:
        return self.kube.kubeconfig

    @property
    def node_name(self) -> str:
        return self.node.name


@pytest.fixture(scope="session")
def kwok_cluster(kube: ControlPlane) -> Iterator[KwokCluster]:
    """Jobs get Pods on GPU nodes: `kwok-gpu-0` (kwok fakes its pods) and the real node (pods run in containers);
    the JobSet and Kueue controllers run beside them."""
    from kubernetes import client

    # Node lifecycle is on, as in a cluster: a node whose kubelet stops is tainted and its pods are evicted.
    kube.start_controllers(node_lifecycle=True)
    kube.start_kwok()
    kube.apply(gpu_node_manifest(KWOK_NODE))
    core = client.CoreV1Api(kube.api_client())

    def kwok_node_ready() -> bool:
        conditions = core.read_node(KWOK_NODE).status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    wait_for(kwok_node_ready, 60, f"kwok to mark {KWOK_NODE} Ready")
    # Before any operator starts: it finds the JobSet and Kueue APIs at its start.
    engines = start_batch_engines(kube)
    try:
        parts = start_node_parts(kube)
    except BaseException:
        engines.stop()
        raise
    yield KwokCluster(kube=kube, node=parts.node, registry=parts.registry, images=parts.images)
    parts.stop()
    engines.stop()
    left = footprint_left(parts.node.clean_footprint, machine_footprint())
    assert not left, f"the stopped node left something behind on this machine: {left}"


@pytest.fixture
def namespace(kube: ControlPlane) -> Iterator[str]:
    """A fresh namespace per test, deleted after it."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube.api_client())
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server(testbed_dir: Path) -> Iterator[S3Server]:
    """moto's S3 server on the test bed's host address; use `.client()` or `.env` with real boto3."""
    server = S3Server(log_dir=testbed_dir / "s3", host=ensure_host_address()).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test's S3 clients at moto through the standard AWS environment variables."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.env


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh bucket per test."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prometheus(testbed_dir: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Start Prometheus scraping the given {job: [host:port]} targets, and kubetune's pods where `pods` says, every
    second."""
    servers: list[PrometheusServer] = []

    def start(jobs: dict[str, list[str]], pods: PodDiscovery | None = None) -> PrometheusServer:
        work_dir = testbed_dir / f"prometheus-{uuid.uuid4().hex[:6]}"
        server = PrometheusServer(work_dir=work_dir, jobs=jobs, pods=pods).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(testbed_dir: Path) -> Iterator[LlamaServer]:
    """llama.cpp's OpenAI-compatible server on loopback serving SmolLM2-135M-Instruct, behind an API key."""
    server = LlamaServer(log_dir=testbed_dir / "llama-server").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors directory (converted from the wheel's GGUF once, then cached)."""
    from tests.testbed.smollm2 import convert_smollm2

    return convert_smollm2()


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing may reach a model hub from tests; a hub lookup must fail fast instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # llama.cpp's GGUF converter, where `make venv` unpacks it (the Makefile exports the same path).
    os.environ.setdefault("KUBETUNE_GGUF_CONVERTER", str(cache_dir() / "gguf-converter"))
