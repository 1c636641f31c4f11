"""The generated CRD in a real kube-apiserver: installed as is, refusing bad specs itself, defaulting, immutable."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJobSpec
from kubetune.crd import CRD_NAME, build_crd, render_crd_yaml
from tests.invalid_manifests import INVALID_MANIFESTS, VALID_MANIFESTS, InvalidManifest
from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.integration

MINIMAL = VALID_MANIFESTS["minimal"]


class ServerRefusedError(Exception):
    """The API server refused a request; `message` is its Status message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@pytest.fixture(scope="module")
def crd_install(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    """kubectl's output from installing the committed CRD, once it is Established."""
    path = tmp_path_factory.mktemp("crd") / "crd.yaml"
    path.write_text(render_crd_yaml())
    result = kube.kubectl("apply", "--server-side", "-f", str(path))
    assert result.returncode == 0, f"the API server refused the CRD:\n{result.stderr}"
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def job_namespace(kube: ControlPlane, crd_install: str) -> Iterator[str]:
    """One namespace for this module's FineTuneJobs. They go with it: an operator started later in the session (the
    chart's, in the e2e tests) would otherwise run their trainers on the real node. Deleted by name first, as no
    namespace controller may be running to empty the namespace."""
    name = f"crd-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", name, check=True)
    yield name
    kube.kubectl("delete", "finetunejobs", "--all", "-n", name, "--wait=false")
    kube.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def custom_objects(kube: ControlPlane) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(kube.api_client())


class FineTuneJobs:
    """FineTuneJob calls against the API server, with refusals turned into ServerRefusedError."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def _call(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            result: dict[str, Any] = getattr(self.api, method)(GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs)
        except ApiException as error:
            raise ServerRefusedError(error.status, json.loads(error.body).get("message", error.body)) from error
        return result

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        # Strict is what kubectl asks for by default: unknown fields are errors, not silently pruned.
        return self._call("create_namespaced_custom_object", body, field_validation="Strict")

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get_namespaced_custom_object", name)

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call("patch_namespaced_custom_object", name, patch, field_validation="Strict")

    def patch_status(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call("patch_namespaced_custom_object_status", name, patch, field_validation="Strict")


@pytest.fixture
def jobs(custom_objects: Any, job_namespace: str) -> FineTuneJobs:
    return FineTuneJobs(custom_objects, job_namespace)


def manifest(text: str) -> dict[str, Any]:
    """The manifest as a request body, under a fresh name so that tests never collide."""
    body: dict[str, Any] = yaml.safe_load(text)
    body["metadata"]["name"] = f"{body['metadata']['name']}-{uuid.uuid4().hex[:6]}"
    return body


def refusal(call: Any, *args: Any) -> ServerRefusedError:
    with pytest.raises(ServerRefusedError) as caught:
        call(*args)
    return caught.value


def test_the_server_stores_the_crd_exactly_as_generated(kube: ControlPlane, crd_install: str) -> None:
    stored = json.loads(kube.kubectl("get", "crd", CRD_NAME, "-o", "json", check=True).stdout)

    assert "Warning" not in crd_install, crd_install
    # Anything the server dropped or rewrote (an unknown keyword, a non-structural part) would show up here.
    assert stored["spec"]["versions"] == build_crd()["spec"]["versions"]
    assert stored["spec"]["names"] == build_crd()["spec"]["names"]
    assert stored["spec"]["scope"] == "Namespaced"


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda case: case.name)
def test_invalid_manifest_is_refused_by_the_api_server(case: InvalidManifest, jobs: FineTuneJobs) -> None:
    refused = refusal(jobs.create, case.data)

    assert case.server_field in refused.message, refused.message
    assert case.server_message in refused.message, refused.message


@pytest.mark.parametrize("name", list(VALID_MANIFESTS))
def test_valid_manifest_is_accepted_with_the_typed_defaults(name: str, jobs: FineTuneJobs) -> None:
    body = manifest(VALID_MANIFESTS[name])

    created = jobs.create(body)

    # The server fills in the same defaults as the pydantic models: both come from kubetune/api.py.
    assert created["spec"] == FineTuneJobSpec.model_validate(body["spec"]).to_wire()
    assert jobs.get(body["metadata"]["name"])["spec"] == created["spec"]


def test_defaults_fill_in_nested_objects(jobs: FineTuneJobs) -> None:
    spec = jobs.create(manifest(MINIMAL))["spec"]

    assert spec["method"] == "qlora"
    assert spec["backend"] == "local"
    assert spec["training"]["learningRate"] == pytest.approx(2e-4)
    assert spec["training"]["completionOnlyLoss"] is True
    assert spec["evaluation"]["baselines"] == ["zeroShot", "fewShot"]
    assert spec["runPolicy"] == {"backoffLimit": 2, "suspend": False}
    assert spec["resources"]["gpus"] == 1
    assert "lora" not in spec
    assert "quantization" not in spec


IMMUTABLE_CHANGES = [
    ("model", {"model": {"name": "HuggingFaceTB/SmolLM2-360M-Instruct"}}, "model is immutable"),
    ("dataset", {"dataset": {"train": "s3://kubetune-data/other.jsonl"}}, "dataset is immutable"),
    ("method", {"method": "lora"}, "method is immutable"),
    ("training", {"training": {"learningRate": 0.001}}, "training is immutable"),
    ("evaluation", {"evaluation": {"maxSamples": 10}}, "evaluation is immutable"),
    ("output.uri", {"output": {"uri": "s3://kubetune-out/elsewhere"}}, "output is immutable"),
    ("output.mergeAdapter", {"output": {"mergeAdapter": True}}, "output is immutable"),
    ("adding lora", {"lora": {"r": 8}}, "optional spec fields cannot be added or removed after creation"),
    ("adding image", {"image": "example.com/trainer:2"}, "optional spec fields cannot be added or removed"),
    ("resources", {"resources": {"gpus": 4}}, "resources is immutable"),
    ("backend", {"backend": "openai"}, "backend is immutable"),
    ("runPolicy.backoffLimit", {"runPolicy": {"backoffLimit": 5}}, "runPolicy.backoffLimit is immutable"),
]


@pytest.mark.parametrize(("what", "change", "message"), IMMUTABLE_CHANGES, ids=[c[0] for c in IMMUTABLE_CHANGES])
def test_spec_is_immutable(what: str, change: dict[str, Any], message: str, jobs: FineTuneJobs) -> None:
    name = jobs.create(manifest(MINIMAL))["metadata"]["name"]

    refused = refusal(jobs.patch, name, {"spec": change})

    assert message in refused.message, refused.message
    assert jobs.get(name)["metadata"]["generation"] == 1


def test_run_policy_suspend_stays_mutable(jobs: FineTuneJobs) -> None:
    name = jobs.create(manifest(MINIMAL))["metadata"]["name"]

    suspended = jobs.patch(name, {"spec": {"runPolicy": {"suspend": True}}})
    resumed = jobs.patch(name, {"spec": {"runPolicy": {"suspend": False}}})

    assert suspended["spec"]["runPolicy"]["suspend"] is True
    assert suspended["metadata"]["generation"] == 2
    assert resumed["spec"]["runPolicy"]["suspend"] is False


STATUS = {
    "phase": "Running",
    "message": "step 12/40",
    "observedGeneration": 1,
    "conditions": [
        {"type": "Running", "status": "True", "reason": "TrainerStarted", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    ],
    "model": "SmolLM2-135M-Instruct",
    "progress": {
        "step": 12,
        "totalSteps": 40,
        "percent": 30.5,
        "loss": 1.25,
        "learningRate": 0.0002,
        "summary": "train 30% (12/40 steps)",
    },
    "metrics": {"trainLoss": 1.25},
    "evaluation": {"metric": "accuracy", "tuned": 0.875, "baselines": {"zeroShot": 0.125}, "lift": {"zeroShot": 0.75}},
    "kopf": {"progress": {"on_create": {"started": "2025-01-01T00:00:00Z", "retries": 0}}},
}


def test_status_subresource_stores_status_apart_from_spec(jobs: FineTuneJobs) -> None:
    created = jobs.create(manifest(MINIMAL))
    name = created["metadata"]["name"]

    patched = jobs.patch_status(name, {"status": STATUS})
    ignored = jobs.patch(name, {"status": {"phase": "Failed"}, "spec": {"runPolicy": {"suspend": True}}})

    assert patched["status"] == STATUS
    assert patched["metadata"]["generation"] == 1
    assert patched["spec"] == created["spec"]
    # The main resource ignores status: only the status subresource writes it.
    assert ignored["status"]["phase"] == "Running"


def test_status_is_validated_too(jobs: FineTuneJobs) -> None:
    name = jobs.create(manifest(MINIMAL))["metadata"]["name"]

    refused = refusal(jobs.patch_status, name, {"status": {"phase": "Exploded"}})

    assert "status.phase" in refused.message
    assert 'Unsupported value: "Exploded"' in refused.message


def table_columns(output: str, names: list[str]) -> dict[str, str]:
    """The first row of a `kubectl get` table, cut at the header's column starts (names may hold spaces)."""
    header, row = output.splitlines()[:2]
    starts: list[int] = []
    for name in names:
        starts.append(header.index(name, starts[-1] if starts else 0))
    ends = [*starts[1:], len(row)]
    return {name: row[start:end].strip() for name, start, end in zip(names, starts, ends, strict=True)}


NARROW_COLUMNS = ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "METRIC", "SCORE", "AGE"]


def test_printer_columns(kube: ControlPlane, jobs: FineTuneJobs) -> None:
    name = jobs.create(manifest(MINIMAL))["metadata"]["name"]
    jobs.patch_status(name, {"status": STATUS})

    narrow = kube.kubectl("get", "ftj", name, "-n", jobs.namespace, check=True).stdout
    wide = kube.kubectl("get", "ftj", name, "-n", jobs.namespace, "-o", "wide", check=True).stdout

    assert narrow.splitlines()[0].split() == NARROW_COLUMNS
    shown = table_columns(narrow, NARROW_COLUMNS)
    assert shown.pop("AGE").endswith("s")
    assert shown == {
        "NAME": name,
        "PHASE": "Running",
        "MODEL": "SmolLM2-135M-Instruct",
        "PROGRESS": "train 30% (12/40 steps)",
        "LOSS": "1.25",
        "METRIC": "accuracy",
        "SCORE": "0.875",
    }
    wide_only = table_columns(wide, [*NARROW_COLUMNS, "MODEL URI", "BACKEND", "MESSAGE"])
    assert {key: wide_only[key] for key in ("MODEL URI", "BACKEND", "MESSAGE")} == {
        "MODEL URI": "",  # a hub model has no URI
        "BACKEND": "local",
        "MESSAGE": "step 12/40",
    }


def explain(kube: ControlPlane, field: str) -> str:
    """kubectl explain output, waiting for the server to publish the CRD's OpenAPI document first."""
    outputs: list[str] = []

    def published() -> bool:
        result = kube.kubectl("explain", field)
        outputs.append(result.stdout + result.stderr)
        return result.returncode == 0

    wait_for(published, 60, f"kubectl explain {field}", interval=1)
    return outputs[-1]


def test_kubectl_explain_documents_every_training_field(kube: ControlPlane, crd_install: str) -> None:
    text = explain(kube, "finetunejob.spec.training")

    assert "Optimisation settings." in text
    assert "training is immutable" not in text  # rules are not descriptions
    for field, schema in FineTuneJobSpec.model_json_schema(by_alias=True)["$defs"]["TrainingSpec"][
        "properties"
    ].items():
        assert field in text, field
        assert schema["description"].split(";")[0][:40] in " ".join(text.split()), field


def test_kubectl_explain_documents_the_status(kube: ControlPlane, crd_install: str) -> None:
    text = explain(kube, "ftj.status.progress")

    assert "Live training progress" in text
    assert "percent" in text
    assert "Training progress 0-100." in text
