"""From adapter to endpoint on the real node: SmolLM2 tuned by the trainer pod, exported as GGUF and its adapter pushed
to a password-protected registry, served by the operator's llama.cpp Deployment behind its Service, checked against
the in-process evaluation, removed with the job."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import JOBS_NAMESPACE, Product
from tests.testbed.hostnet import ensure_host_address
from tests.testbed.processes import wait_for
from tests.testbed.registry import LocalRegistry, htpasswd_line
from tests.testbed.shared_data import shared_sample
from tests.testbed.smollm2 import LEARNS_LABELS_LORA, LEARNS_LABELS_TRAINING

pytestmark = pytest.mark.e2e

NAME = "served"
ROWS = 24
PUSHER, PASSWORD = "adapter-pusher", "pw-e2e-never-logged"
PUSH_SECRET = "registry-push"


@pytest.fixture
def password_registry(product: Product, tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry behind a password on the host address (trainer pods reach it there, like S3), and the
    dockerconfigjson Secret `kubectl create secret docker-registry` makes for it."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(htpasswd_line(PUSHER, PASSWORD))
    registry = LocalRegistry(
        log_dir=tmp_path / "registry-logs",
        storage_dir=tmp_path / "registry",
        address=ensure_host_address(),
        htpasswd=htpasswd,
    ).start()
    product.kube.kubectl(
        "create", "secret", "docker-registry", PUSH_SECRET, "-n", JOBS_NAMESPACE,
        f"--docker-server={registry.endpoint}", f"--docker-username={PUSHER}", f"--docker-password={PASSWORD}",
        check=True,
    )  # fmt: skip
    yield registry
    product.kube.kubectl("delete", "secret", PUSH_SECRET, "-n", JOBS_NAMESPACE)
    registry.stop()


def upload_smollm2(product: Product, model_dir: Path) -> str:
    client = product.s3.client()
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            client.upload_file(str(path), product.bucket, f"models/smollm2/{path.name}")
    return f"s3://{product.bucket}/models/smollm2/"


def upload_news(product: Product, rows: int) -> str:
    lines = shared_sample("ag_news").read_text().splitlines()[:rows]
    body = "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in map(json.loads, lines))
    product.s3.client().put_object(Bucket=product.bucket, Key="data/news-served.jsonl", Body=body.encode())
    return f"s3://{product.bucket}/data/news-served.jsonl"


def served_job(model: str, train: str, output: str, registry: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": model},
            "dataset": {"train": train, "format": "classification", "maxLength": 256, "validationSplit": 0.1},
            "method": "lora",
            "lora": LEARNS_LABELS_LORA,
            "training": LEARNS_LABELS_TRAINING,
            "evaluation": {"baselines": [], "metrics": ["accuracy"], "maxSamples": ROWS, "maxNewTokens": 6},
            "output": {
                "uri": output,
                "gguf": {"quantization": "q8_0"},
                "registry": {
                    "repository": f"{registry}/team/adapters",
                    "credentialsSecretRef": PUSH_SECRET,
                    "insecure": True,
                },
            },
            "serving": {"runtime": "llamaCpp"},
            "s3": {"credentialsSecretRef": "kubetune-s3"},
        },
    }


def kubectl_json(product: Product, *args: str) -> dict[str, Any] | None:
    result = product.kube.kubectl(*args, "-n", JOBS_NAMESPACE, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.mark.timeout(2400)
def test_the_served_gguf_answers_through_its_service_as_evaluated_and_goes_with_the_job(
    product: Product, smollm2_dir: Path, password_registry: LocalRegistry
) -> None:
    output = f"s3://{product.bucket}/runs/{NAME}"
    manifest = served_job(
        upload_smollm2(product, smollm2_dir), upload_news(product, 240), output, password_registry.endpoint
    )
    product.apply(manifest)
    done = product.wait_for_phase(NAME, {"Succeeded", "Failed"}, timeout=1500)
    assert done["status"]["phase"] == "Succeeded", done["status"].get("message")
    artifacts = done["status"]["artifacts"]
    assert artifacts["gguf"] == f"{output}/gguf/model-q8_0.gguf"
    # The trainer pod pushed the adapter with the mounted Secret; the registry serves that very manifest.
    repository, _, digest = artifacts["adapterImage"].partition("@")
    assert repository == f"{password_registry.endpoint}/team/adapters:{NAME}"
    auth = base64.b64encode(f"{PUSHER}:{PASSWORD}".encode()).decode()
    assert password_registry.has_manifest("team/adapters", digest, headers={"Authorization": f"Basic {auth}"})
    assert PASSWORD not in json.dumps(done)

    # Once its server is ready, the operator's check Job asks it the evaluated rows through the Service.
    def serving_status() -> dict[str, Any]:
        return dict((product.get(NAME).get("status") or {}).get("serving") or {})

    def checked() -> bool:
        return (serving_status().get("check") or {}).get("state") in ("Succeeded", "Failed")

    wait_for(checked, 900, "the endpoint check to finish")
    serving = serving_status()
    assert serving["url"] == f"http://{NAME}-serve.{JOBS_NAMESPACE}.svc:8080/v1"
    assert serving["model"] == NAME and serving["readyReplicas"] == 1
    check = serving["check"]
    assert check["state"] == "Succeeded", check
    tuned = done["status"]["metrics"]["eval.tuned.accuracy"]
    assert tuned >= 0.5, "24 steps teach SmolLM2 the four labels (chance is 0.25)"
    assert (check["job"], check["metric"], check["rows"], check["failedRequests"]) == (
        f"{NAME}-check",
        "accuracy",
        ROWS,
        0,
    )
    assert check["inProcessScore"] == tuned
    assert check["agreement"] >= 0.8, check
    assert abs(check["score"] - tuned) <= 0.15, check
    assert check["latencyP50Seconds"] > 0 and check["promptTokensMean"] > 0
    assert check["uri"] == f"{output}/eval/endpoint.json"

    # The check's figures are in eval/endpoint.json and the report, whose new hashes manifest.json records.
    endpoint = json.loads(product.s3_object(f"{output}/eval/endpoint.json"))
    assert endpoint["agreement"] == check["agreement"] and endpoint["scores"]["accuracy"] == check["score"]
    report_md = product.s3_object(f"{output}/eval/report.md")
    assert f"| accuracy | {tuned:.4f} | {check['score']:.4f} |" in report_md.decode()
    assert json.loads(product.s3_object(f"{output}/eval/report.json"))["endpoint"] == endpoint
    hashes = json.loads(product.s3_object(f"{output}/manifest.json"))["artifacts"]
    for name in ("report.md", "report.json", "endpoint.json"):
        assert hashes[f"eval/{name}"] == hashlib.sha256(product.s3_object(f"{output}/eval/{name}")).hexdigest()
    events = product.kube.kubectl(
        "get", "events", "-n", JOBS_NAMESPACE, "--field-selector", f"involvedObject.name={NAME},reason=EndpointChecked"
    )
    assert "served vs" in events.stdout, events.stdout

    product.kube.kubectl("delete", "finetunejob", NAME, "-n", JOBS_NAMESPACE, check=True)
    wait_for(
        lambda: (
            kubectl_json(product, "get", "deployment", f"{NAME}-serve") is None
            and kubectl_json(product, "get", "service", f"{NAME}-serve") is None
        ),
        120,
        "the endpoint to go with its job",
    )
