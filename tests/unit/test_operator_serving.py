"""spec.serving's endpoint as the operator builds it: when a job gets one, the server Deployment of each runtime, its
Service and status.serving."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune_operator.lifecycle import Observation, status_from_observation
from kubetune_operator.serving import (
    build_check_job,
    build_serving,
    check_base_url,
    check_result,
    needs_check,
    serving_decision,
    serving_status,
)
from kubetune_operator.settings import OperatorSettings

from kubetune.api import (
    ArtifactsStatus,
    EndpointCheckStatus,
    EvaluationStatus,
    FineTuneJob,
    FineTuneJobStatus,
    GateStatus,
    ServingStatus,
)
from kubetune.contract import check_termination_message

SETTINGS = OperatorSettings(trainer_image="registry.example.com/kubetune/trainer:1")
GGUF = "s3://out/demo/gguf/model-q8_0.gguf"
ADAPTER = "s3://out/demo/adapter"


def job(serving: dict[str, Any] | None, **spec: Any) -> FineTuneJob:
    output = {"uri": "s3://out/demo", "gguf": {"quantization": "q8_0"}}
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "team", "uid": "ftj-uid"},
            "spec": {
                "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": output,
                "s3": {"endpoint": "http://minio:9000", "credentialsSecretRef": "s3-creds"},
                **({"serving": serving} if serving else {}),
                **spec,
            },
        }
    )


def succeeded(gate_passed: bool | None = None, gguf: str | None = GGUF) -> FineTuneJobStatus:
    gate = GateStatus(metric="accuracy", passed=gate_passed) if gate_passed is not None else None
    return FineTuneJobStatus(
        phase="Succeeded",
        artifacts=ArtifactsStatus(adapter=ADAPTER, gguf=gguf),
        evaluation=EvaluationStatus(metric="accuracy", gate=gate),
    )


@pytest.mark.parametrize(
    ("serving", "status", "expected"),
    [
        (None, succeeded(), (False, None)),
        ({"runtime": "llamaCpp"}, FineTuneJobStatus(phase="Running"), (False, None)),
        ({"runtime": "llamaCpp"}, succeeded(), (True, None)),
        ({"runtime": "llamaCpp"}, succeeded(gate_passed=True), (True, None)),
        (
            {"runtime": "llamaCpp"},
            succeeded(gate_passed=False),
            (False, "not served: the evaluation gate failed (set serving.whenGateFails to serve anyway)"),
        ),
        ({"runtime": "llamaCpp", "whenGateFails": True}, succeeded(gate_passed=False), (True, None)),
        (
            {"runtime": "llamaCpp"},
            succeeded(gguf=None),
            (False, "not served: the run published no GGUF file (status.artifacts.gguf)"),
        ),
        ({"runtime": "vllm"}, succeeded(gguf=None), (True, None)),
    ],
)
def test_a_succeeded_job_is_served_unless_its_gate_failed_or_its_artifact_is_missing(
    serving: dict[str, Any] | None, status: FineTuneJobStatus, expected: tuple[bool, str | None]
) -> None:
    assert serving_decision(job(serving), status) == expected


def test_status_serving_names_the_service_url_and_the_model_or_why_not() -> None:
    served = serving_status(job({"runtime": "llamaCpp"}), succeeded())
    assert served == ServingStatus(url="http://demo-serve.team.svc:8080/v1", model="demo", deployment="demo-serve")
    held = serving_status(job({"runtime": "llamaCpp"}), succeeded(gate_passed=False))
    assert held is not None and held.url is None and "gate failed" in (held.message or "")
    assert serving_status(job(None), succeeded()) is None


def test_the_status_derivation_keeps_the_ready_replicas_the_deployment_reported() -> None:
    current = succeeded().model_copy(update={"serving": ServingStatus(url="x", ready_replicas=2)})
    ftj = job({"runtime": "llamaCpp"}).model_copy(update={"status": current})
    observation = Observation(phase="Succeeded", reason="Completed", message="done", conditions=())
    status = status_from_observation(ftj, observation, None, "2026-12-05T00:00:00Z")
    assert status.serving == ServingStatus(
        url="http://demo-serve.team.svc:8080/v1", model="demo", deployment="demo-serve", ready_replicas=2
    )


def test_llama_cpp_serves_the_gguf_fetched_by_the_trainer_image() -> None:
    deployment, service = build_serving(
        job({"runtime": "llamaCpp", "cpu": "2", "memory": "2Gi"}), succeeded(), SETTINGS
    )
    assert (deployment["kind"], deployment["metadata"]["name"], deployment["metadata"]["namespace"]) == (
        "Deployment",
        "demo-serve",
        "team",
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == SETTINGS.trainer_image
    assert fetch["command"] == ["python", "-m", "kubetune_trainer", "fetch", GGUF, "/models/model.gguf"]
    env = {item["name"]: item for item in fetch["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    (server,) = pod["containers"]
    assert server["image"] == SETTINGS.llama_cpp_image
    assert server["command"][:5] == ["python", "-m", "llama_cpp.server", "--model", "/models/model.gguf"]
    assert server["command"][5:7] == ["--model_alias", "demo"]
    assert server["readinessProbe"]["httpGet"] == {"path": "/v1/models", "port": "http"}
    assert server["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    # Not the trainer's job-name label: the operator's trainer-pod watch would take server pods for trainers.
    assert "kubetune.io/job-name" not in labels
    assert labels["kubetune.io/served-job"] == "demo"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]


def test_vllm_loads_the_adapter_on_its_base_with_a_gpu_and_a_base_from_s3_is_fetched_too() -> None:
    deployment, _ = build_serving(job({"runtime": "vllm", "replicas": 2}), succeeded(gguf=None), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert [c["command"][-2:] for c in pod["initContainers"]] == [[ADAPTER, "/models/adapter"]]
    (server,) = pod["containers"]
    assert server["image"] == SETTINGS.vllm_image
    assert server["command"] == [
        *("vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "--host", "0.0.0.0", "--port", "8080"),
        *("--enable-lora", "--lora-modules", "demo=/models/adapter"),
    ]
    assert server["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}

    from_s3 = job({"runtime": "vllm", "image": "registry.example.com/vllm:pinned"}, model={"uri": "s3://models/base"})
    deployment, _ = build_serving(from_s3, succeeded(gguf=None), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    assert [c["command"][-2:] for c in pod["initContainers"]] == [
        [ADAPTER, "/models/adapter"],
        ["s3://models/base", "/models/base"],
    ]
    assert pod["containers"][0]["command"][2] == "/models/base"
    assert pod["containers"][0]["image"] == "registry.example.com/vllm:pinned"


def test_the_status_derivation_keeps_the_check_its_pod_reported() -> None:
    check = EndpointCheckStatus(state="Succeeded", job="demo-check", metric="accuracy", score=0.8)
    current = succeeded().model_copy(update={"serving": ServingStatus(url="x", ready_replicas=1, check=check)})
    ftj = job({"runtime": "llamaCpp"}).model_copy(update={"status": current})
    observation = Observation(phase="Succeeded", reason="Completed", message="done", conditions=())
    status = status_from_observation(ftj, observation, None, "2026-12-05T00:00:00Z")
    assert status.serving is not None and status.serving.check == check


def with_check(state: str | None) -> FineTuneJobStatus:
    check = EndpointCheckStatus(state=state) if state else None  # type: ignore[arg-type]
    return succeeded().model_copy(update={"serving": ServingStatus(url="x", check=check)})


@pytest.mark.parametrize(
    ("serving", "status", "ready", "expected"),
    [
        ({"runtime": "llamaCpp"}, with_check(None), 1, True),
        ({"runtime": "llamaCpp"}, succeeded(), 2, True),
        ({"runtime": "llamaCpp"}, with_check(None), 0, False),
        ({"runtime": "llamaCpp", "check": False}, with_check(None), 1, False),
        ({"runtime": "llamaCpp"}, with_check("Running"), 1, False),
        ({"runtime": "llamaCpp"}, with_check("Failed"), 1, False),
        (None, with_check(None), 1, False),
    ],
)
def test_the_check_starts_once_when_the_endpoint_is_ready_unless_turned_off(
    serving: dict[str, Any] | None, status: FineTuneJobStatus, ready: int, expected: bool
) -> None:
    assert needs_check(job(serving).model_copy(update={"status": status}), ready) is expected


def test_the_check_job_asks_the_service_from_the_trainer_image_with_no_api_access() -> None:
    ftj = job({"runtime": "llamaCpp"})
    service = {"spec": {"clusterIP": "10.96.0.12"}}
    assert check_base_url(ftj, service) == "http://10.96.0.12:8080/v1"
    assert check_base_url(ftj, {"spec": {"clusterIP": "fd00::12"}}) == "http://[fd00::12]:8080/v1"
    assert check_base_url(ftj, None) == "http://demo-serve.team.svc:8080/v1"
    check_job = build_check_job(ftj, SETTINGS, check_base_url(ftj, service))
    assert check_job["metadata"]["name"] == "demo-check"
    assert check_job["metadata"]["labels"]["app.kubernetes.io/component"] == "endpoint-check"
    assert check_job["metadata"]["labels"]["kubetune.io/served-job"] == "demo"
    assert "kubetune.io/job-name" not in check_job["metadata"]["labels"]
    assert check_job["spec"]["backoffLimit"] == 0
    pod = check_job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == SETTINGS.trainer_image
    assert container["command"] == [
        *("python", "-m", "kubetune_trainer", "check-endpoint"),
        *("--base-url", "http://10.96.0.12:8080/v1", "--model", "demo"),
    ]
    env = {item["name"]: item for item in container["env"]}
    assert '"name":"demo"' in env["KUBETUNE_JOB_MANIFEST"]["value"]
    assert env["KUBETUNE_TERMINATION_MESSAGE_PATH"]["value"] == container["terminationMessagePath"]
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def check_pod(phase: str, terminated: dict[str, Any] | None = None) -> dict[str, Any]:
    state = {"terminated": terminated} if terminated is not None else {"running": {}}
    return {"status": {"phase": phase, "containerStatuses": [{"name": "check", "state": state}]}}


def test_a_finished_check_pod_gives_its_result_or_how_it_ended() -> None:
    result = EndpointCheckStatus(state="Succeeded", metric="accuracy", score=0.84, in_process_score=0.85)
    assert check_result(check_pod("Running")) is None
    assert check_result(check_pod("Succeeded", {"exitCode": 0, "message": check_termination_message(result)})) == result
    tail = check_result(check_pod("Failed", {"exitCode": 1, "reason": "Error", "message": "ConnectionError: refused"}))
    assert tail == EndpointCheckStatus(
        state="Failed", message="the check pod ended (Error) without a result: ConnectionError: refused"
    )
    killed = check_result(check_pod("Failed", {"exitCode": 137, "reason": "OOMKilled"}))
    assert killed == EndpointCheckStatus(state="Failed", message="the check pod ended (OOMKilled) without a result")
