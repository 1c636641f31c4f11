"""kubetune installed on the test bed as it ships, shared by the e2e tests: the chart with the operator image, the
trainer image for every job, moto S3 with a tiny model and AG News rows, Prometheus finding the pods."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KwokCluster
from tests.testbed.chart import ChartRelease, install_chart
from tests.testbed.cluster import pod_discovery, product_values
from tests.testbed.controlplane import ControlPlane
from tests.testbed.demo import create_s3_secret, wait_for_operator_pod
from tests.testbed.hostnet import ensure_host_address
from tests.testbed.llama_server import LlamaServer
from tests.testbed.prometheus import PrometheusServer
from tests.testbed.s3 import S3Server
from tests.testbed.shared_data import shared_sample
from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

OPERATOR_NAMESPACE = "kubetune-e2e"
JOBS_NAMESPACE = "e2e-jobs"
# The contender of the e2e job: SmolLM2 served by llama.cpp, its key in this Secret.
CONTENDER = "smollm2"
LLAMA_SECRET = "llama-key"


@dataclass
class Product:
    """kubetune installed on the test bed, with its inputs in S3 and Prometheus scraping it."""

    kube: ControlPlane
    s3: S3Server
    release: ChartRelease
    values: dict[str, Any]
    prometheus: PrometheusServer
    bucket: str
    llama: LlamaServer
    seen_phases: dict[str, list[str]] = field(default_factory=dict)

    def apply(self, manifest: dict[str, Any]) -> None:
        result = self.kube.kubectl("apply", "-n", JOBS_NAMESPACE, "-f", "-", input_text=json.dumps(manifest))
        assert result.returncode == 0, result.stderr

    def get(self, name: str) -> dict[str, Any]:
        result = self.kube.kubectl("get", "finetunejob", name, "-n", JOBS_NAMESPACE, "-o", "json", check=True)
        return dict(json.loads(result.stdout))

    def wait_for_phase(self, name: str, phases: set[str], timeout: float = 420) -> dict[str, Any]:
        """Poll until the job reaches one of `phases`, recording every phase seen on the way."""
        seen = self.seen_phases.setdefault(name, [])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(name)
            phase = (job.get("status") or {}).get("phase")
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
            if phase in phases:
                return job
            time.sleep(0.5)
        logs = self.kube.log_dir / "pods"
        raise TimeoutError(f"{name} stayed in {seen} for {timeout}s; pod logs in {logs}")

    def describe(self, log_lines: int = 25) -> str:
        """What a failed e2e test leaves to read once the test bed is gone (CI keeps only the output): the pods of
        both namespaces, the trainer Jobs and JobSets, the newest events, and the tail of every live pod's log."""
        parts = []
        for title, args in (
            ("pods", ["get", "pods", "-A", "-o", "wide"]),
            ("jobs, jobsets, deployments", ["get", "jobs,jobsets,deployments", "-A", "-o", "wide"]),
            ("events", ["get", "events", "-A", "--sort-by=.lastTimestamp"]),
        ):
            result = self.kube.kubectl(*args)
            text = (result.stdout or result.stderr).splitlines()
            parts.append(f"--- {title}\n" + "\n".join(text[-40:] if title == "events" else text))
        for namespace in (OPERATOR_NAMESPACE, JOBS_NAMESPACE):
            names = self.kube.kubectl("get", "pods", "-n", namespace, "-o", "jsonpath={.items[*].metadata.name}")
            for pod in names.stdout.split():
                logs = self.kube.kubectl("logs", "-n", namespace, pod, "--all-containers", f"--tail={log_lines}")
                parts.append(f"--- log of {namespace}/{pod}\n{logs.stdout or logs.stderr}")
        return "\n".join(parts)

    def s3_object(self, uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return bytes(self.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def upload_tiny_model(s3: S3Server, bucket: str, work: Path) -> str:
    tokenizer = build_tiny_tokenizer(work / "tokenizer")
    model = build_tiny_llama(work / "model", tokenizer)
    for path in sorted(Path(model).iterdir()):
        if path.is_file():
            s3.client().upload_file(str(path), bucket, f"models/tiny/{path.name}")
    return f"s3://{bucket}/models/tiny/"


def upload_dataset(s3: S3Server, bucket: str) -> tuple[str, str]:
    rows = shared_sample("ag_news").read_text().splitlines()
    s3.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body="\n".join(rows[:48]).encode())
    s3.client().put_object(Bucket=bucket, Key="data/bad.jsonl", Body=b'{"text": "ok", "label": "World"}\n{"text": \n')
    return f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/data/bad.jsonl"


def finetunejob(name: str, model_uri: str, train_uri: str, output_uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": model_uri},
            # The tiny test tokenizer spends many tokens on the label instruction: room for it.
            "dataset": {"train": train_uri, "format": "classification", "validationSplit": 0.25, "maxLength": 512},
            "method": "qlora",
            "training": {"maxSteps": 6, "batchSize": 4, "checkpointEvery": 3, "learningRate": 1e-3, "loggingSteps": 1},
            "evaluation": {
                "maxSamples": 6,
                "fewShotK": 2,
                "maxNewTokens": 4,
                "gate": {"metric": "accuracy", "threshold": 0.0},
            },
            "output": {"uri": output_uri},
            "s3": {"credentialsSecretRef": "kubetune-s3"},
        },
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed e2e test (a timeout included) reports the test bed's state with it."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    product = getattr(item, "funcargs", {}).get("product")
    if report.when == "call" and report.failed and isinstance(product, Product):
        try:
            report.sections.append(("test bed at the failure", product.describe()))
        except Exception as error:  # the state is a help to read the failure, never a second one
            report.sections.append(("test bed at the failure", f"could not be read: {error!r}"))


@pytest.fixture(scope="package")
def product(
    kwok_cluster: KwokCluster,
    s3_server: S3Server,
    prometheus: Callable[..., PrometheusServer],
) -> Iterator[Product]:
    kube = kwok_cluster.kube
    values = product_values(s3_server, kwok_cluster.images, progress_interval=1)
    release = install_chart(kube, "kubetune", OPERATOR_NAMESPACE, values)
    kube.kubectl("create", "namespace", JOBS_NAMESPACE, check=True)
    create_s3_secret(kube, JOBS_NAMESPACE)
    wait_for_operator_pod(kube, OPERATOR_NAMESPACE)
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    server = prometheus({}, pods=pod_discovery(kube))
    # A real OpenAI-compatible server where the trainer pods reach it (the host address, like S3), behind a key.
    llama = LlamaServer(log_dir=kube.log_dir / "llama-server", host=ensure_host_address()).start()
    kube.kubectl(
        "create", "secret", "generic", LLAMA_SECRET, "-n", JOBS_NAMESPACE, f"--from-literal=api-key={llama.api_key}",
        check=True,
    )  # fmt: skip
    yield Product(kube, s3_server, release, values, server, bucket, llama)
    llama.stop()
    kube.kubectl("delete", "namespace", JOBS_NAMESPACE, "--wait=false")
    release.uninstall()


@pytest.fixture(scope="package")
def inputs(product: Product, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    model_uri = upload_tiny_model(product.s3, product.bucket, tmp_path_factory.mktemp("tiny"))
    train_uri, bad_uri = upload_dataset(product.s3, product.bucket)
    return {"model": model_uri, "train": train_uri, "bad": bad_uri}
