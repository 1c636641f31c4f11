"""The example manifests against the real parts: accepted by kube-apiserver as written, and their data read from S3."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_trainer.storage import parse_s3_uri

from kubetune.api import FineTuneJobSpec
from kubetune.crd import CRD_NAME, render_crd_yaml
from tests.example_jobs import EXAMPLE_JOBS, ExampleJob, load_example, local_path
from tests.testbed.controlplane import ControlPlane
from tests.testbed.s3 import S3Server

pytestmark = pytest.mark.integration

JOB_IDS = [example.name for example in EXAMPLE_JOBS]


@pytest.fixture(scope="module")
def example_namespace(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A namespace to dry-run the examples in, once the generated CRD is installed and Established."""
    crd = tmp_path_factory.mktemp("crd") / "crd.yaml"
    crd.write_text(render_crd_yaml())
    installed = kube.kubectl("apply", "--server-side", "-f", str(crd))
    assert installed.returncode == 0, f"the API server refused the CRD:\n{installed.stderr}"
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)
    name = f"examples-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", name, check=True)
    return name


@pytest.fixture(scope="module")
def example_data_in_s3(s3_server: S3Server) -> list[str]:
    """Every data file the examples read, uploaded from its local copy to the URI the manifest names."""
    client = s3_server.client()
    datasets = [load_example(example).spec.dataset for example in EXAMPLE_JOBS]
    uris = sorted({uri for dataset in datasets for uri in (dataset.train, dataset.validation) if uri is not None})
    existing = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
    for bucket in sorted({parse_s3_uri(uri).bucket for uri in uris} - existing):
        client.create_bucket(Bucket=bucket)
    for uri in uris:
        location = parse_s3_uri(uri)
        client.put_object(Bucket=location.bucket, Key=location.key, Body=local_path(uri).read_bytes())
    return uris


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("example", EXAMPLE_JOBS, ids=JOB_IDS)
def test_server_accepts_the_example_with_the_typed_defaults(
    example: ExampleJob, kube: ControlPlane, example_namespace: str
) -> None:
    written = yaml.safe_load(example.path.read_text())

    # kubectl's default --validate=strict makes the server refuse unknown fields instead of pruning them.
    applied = kube.kubectl("apply", "--dry-run=server", "-n", example_namespace, "-f", str(example.path), "-o", "json")

    assert applied.returncode == 0, f"the API server refused {example.file}:\n{applied.stderr}"
    answer = json.loads(applied.stdout)
    assert answer["metadata"]["name"] == example.name
    # The defaults the server fills in from the CRD are the pydantic models' (both come from kubetune/api.py).
    assert answer["spec"] == FineTuneJobSpec.model_validate(written["spec"]).to_wire()
    # A server-side dry run stores nothing.
    stored = kube.kubectl("get", "finetunejob", example.name, "-n", example_namespace)
    assert stored.returncode != 0
    assert "NotFound" in stored.stderr


@pytest.mark.parametrize("example", EXAMPLE_JOBS, ids=JOB_IDS)
def test_example_data_passes_preflight_from_s3_within_max_length(
    example: ExampleJob, example_data_in_s3: list[str], s3_env: dict[str, str], smollm2_tokenizer: Any
) -> None:
    from kubetune_trainer.data.prepare import prepare_data

    job = load_example(example)

    # The manifest's own dataset spec, S3 URIs and all, read through the real S3 API.
    prepared = prepare_data(job.spec.dataset, job.spec.training.seed, smollm2_tokenizer)

    assert prepared.format == example.data_format
    assert (len(prepared.train), len(prepared.validation)) == (example.train_rows, example.validation_rows)
    max_length = job.spec.dataset.max_length
    if example.objective == "sequence-classification":
        # The head reads each row's text alone, so that is what maxLength must hold.
        lengths = [len(ids) for ids in smollm2_tokenizer([row.input_text for row in prepared.train])["input_ids"]]
        assert max(lengths) <= max_length
    else:
        assert prepared.stats is not None
        assert prepared.stats.truncated_fraction <= 0.01, prepared.stats
        assert prepared.stats.p95 <= max_length
