"""Pure builders of spec.serving's endpoint: the server Deployment and its Service, and when a job may have them."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJob, FineTuneJobStatus, ServingStatus
from kubetune_operator.builders import (
    APP_NAME,
    GPU_RESOURCE,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGER,
    TRAINER_UID,
    s3_env,
    trainer_image,
)
from kubetune_operator.settings import OperatorSettings

COMPONENT_SERVING = "serving"
SERVING_SUFFIX = "-serve"
LABEL_SERVED_JOB = "kubetune.io/served-job"
PORT = 8080
MODELS_DIR = "/models"
# What the fetch step leaves for the server: the GGUF file, or the adapter folder (vLLM) and, for a base model in
# S3, the base model's folder.
GGUF_FILE = f"{MODELS_DIR}/model.gguf"
ADAPTER_DIR = f"{MODELS_DIR}/adapter"
BASE_DIR = f"{MODELS_DIR}/base"
# llama.cpp's context: SmolLM2-class models and the evaluation's prompts fit; a bigger model's server sets its own.
LLAMA_CPP_CONTEXT = 4096


def serving_name(job_name: str) -> str:
    """The Deployment and Service of a job's endpoint: <job>-serve (a job name has at most 49 characters)."""
    return f"{job_name}{SERVING_SUFFIX}"


def serving_labels(job_name: str) -> dict[str, str]:
    """The endpoint's labels. Not the trainer's job-name label: the operator's pod watch takes every pod with it
    for a trainer pod."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_COMPONENT: COMPONENT_SERVING,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_SERVED_JOB: job_name,
    }


def serving_metadata(job: FineTuneJob) -> dict[str, Any]:
    return {
        "name": serving_name(job.metadata.name),
        "namespace": job.metadata.namespace,
        "labels": serving_labels(job.metadata.name),
    }


def serving_url(job: FineTuneJob) -> str:
    """The OpenAI-compatible base URL of the endpoint's Service, as pods of the cluster reach it."""
    return f"http://{serving_name(job.metadata.name)}.{job.metadata.namespace or 'default'}.svc:{PORT}/v1"


def serving_decision(job: FineTuneJob, status: FineTuneJobStatus) -> tuple[bool, str | None]:
    """Whether the succeeded job gets its endpoint, and if not why (only a failed gate holds it back)."""
    serving = job.spec.serving
    if serving is None or status.phase != "Succeeded":
        return False, None
    gate = status.evaluation.gate if status.evaluation else None
    if gate is not None and gate.passed is False and not serving.when_gate_fails:
        return False, "not served: the evaluation gate failed (set serving.whenGateFails to serve anyway)"
    artifacts = status.artifacts
    if serving.runtime == "llamaCpp" and (artifacts is None or not artifacts.gguf):
        return False, "not served: the run published no GGUF file (status.artifacts.gguf)"
    if serving.runtime == "vllm" and (artifacts is None or not artifacts.adapter):
        return False, "not served: the run published no adapter (status.artifacts.adapter)"
    return True, None


def serving_status(job: FineTuneJob, status: FineTuneJobStatus) -> ServingStatus | None:
    """status.serving as the decision makes it: the URL and model once serving, else the reason (ready replicas
    come from the Deployment)."""
    serve, reason = serving_decision(job, status)
    if serve:
        return ServingStatus(url=serving_url(job), model=job.metadata.name, deployment=serving_name(job.metadata.name))
    return ServingStatus(message=reason) if reason else None


def fetch_container(job: FineTuneJob, settings: OperatorSettings, source: str, target: str) -> dict[str, Any]:
    """An init container (the trainer image) copying one artifact from S3 into the models volume."""
    return {
        "name": f"fetch-{target.rsplit('/', 1)[-1].split('.', 1)[0]}",
        "image": trainer_image(job, settings),
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "kubetune_trainer", "fetch", source, target],
        "env": s3_env(job, settings),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }


def container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def llama_cpp_server(job: FineTuneJob) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on the fetched GGUF, the model named after the job."""
    return [
        *("python", "-m", "llama_cpp.server", "--model", GGUF_FILE, "--model_alias", job.metadata.name),
        *("--host", "0.0.0.0", "--port", str(PORT), "--n_ctx", str(LLAMA_CPP_CONTEXT)),
    ]


def vllm_server(job: FineTuneJob) -> list[str]:
    """vLLM on the base model with the adapter loaded under the job's name (requests name `model: <job>`)."""
    spec = job.spec
    base = spec.model.name if spec.model.name else BASE_DIR
    command = ["vllm", "serve", base, "--host", "0.0.0.0", "--port", str(PORT), "--enable-lora"]
    command += ["--lora-modules", f"{job.metadata.name}={ADAPTER_DIR}"]
    if spec.model.revision and spec.model.name:
        command += ["--revision", spec.model.revision]
    return command


def server_resources(job: FineTuneJob) -> dict[str, Any]:
    serving = job.spec.serving
    assert serving is not None
    gpus = serving.gpus if serving.gpus is not None else (1 if serving.runtime == "vllm" else 0)
    requests = {name: value for name, value in (("cpu", serving.cpu), ("memory", serving.memory)) if value}
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = dict(requests)
    if gpus:
        resources.setdefault("requests", {})[GPU_RESOURCE] = str(gpus)
        resources["limits"] = {GPU_RESOURCE: str(gpus)}
    return resources


def build_serving_deployment(job: FineTuneJob, status: FineTuneJobStatus, settings: OperatorSettings) -> dict[str, Any]:
    """The server Deployment: an init container fetches the artifact from S3, the server answers on PORT."""
    serving = job.spec.serving
    artifacts = status.artifacts
    assert serving is not None and artifacts is not None
    name = job.metadata.name
    if serving.runtime == "llamaCpp":
        assert artifacts.gguf is not None, "a llamaCpp endpoint serves the GGUF export"
        fetches = [fetch_container(job, settings, artifacts.gguf, GGUF_FILE)]
        command = llama_cpp_server(job)
        image = serving.image or settings.llama_cpp_image
    else:
        assert artifacts.adapter is not None
        fetches = [fetch_container(job, settings, artifacts.adapter, ADAPTER_DIR)]
        if job.spec.model.uri:
            fetches.append(fetch_container(job, settings, job.spec.model.uri, BASE_DIR))
        command = vllm_server(job)
        image = serving.image or settings.vllm_image
    server = {
        "name": "server",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/v1/models", "port": "http"}, "periodSeconds": 5},
        "resources": server_resources(job),
        "securityContext": {**container_security(), "readOnlyRootFilesystem": False},
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True}],
    }
    labels = serving_labels(name)
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            # The server needs no API access; the fetch reads S3 with the job's own S3 credentials.
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": TRAINER_UID,
                "runAsGroup": TRAINER_UID,
                "fsGroup": TRAINER_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": fetches,
            "containers": [server],
            "volumes": [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": serving_metadata(job),
        "spec": {"replicas": serving.replicas, "selector": {"matchLabels": labels}, "template": pod},
    }


def build_serving_service(job: FineTuneJob) -> dict[str, Any]:
    """A ClusterIP Service in front of the server pods: the URL in status.serving."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": serving_metadata(job),
        "spec": {
            "selector": serving_labels(job.metadata.name),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_serving(job: FineTuneJob, status: FineTuneJobStatus, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The endpoint's objects, in creation order."""
    return [build_serving_deployment(job, status, settings), build_serving_service(job)]
