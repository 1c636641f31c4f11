"""Pure builders of spec.serving's endpoint: the server Deployment, its Service, the check Job that scores its answers,
and when a job may have each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune import contract
from kubetune.api import EndpointCheckStatus, FineTuneJob, FineTuneJobStatus, ServingStatus
from kubetune_operator.builders import (
    APP_NAME,
    GPU_RESOURCE,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGER,
    TRAINER_UID,
    manifest_text,
    s3_env,
    trainer_image,
)
from kubetune_operator.settings import OperatorSettings

COMPONENT_SERVING = "serving"
COMPONENT_ENDPOINT_CHECK = "endpoint-check"
SERVING_SUFFIX = "-serve"
CHECK_SUFFIX = "-check"
CHECK_CONTAINER = "check"
# The check asks a few hundred rows at most; past this the endpoint is stuck, and the check says so.
CHECK_DEADLINE_SECONDS = 1800
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


def check_name(job_name: str) -> str:
    """The endpoint check's Job: <job>-check (its pods' names stay within 63 characters)."""
    return f"{job_name}{CHECK_SUFFIX}"


def check_labels(job_name: str) -> dict[str, str]:
    """The check Job's and pods' labels: the served job's, under a component of their own."""
    return {**serving_labels(job_name), LABEL_COMPONENT: COMPONENT_ENDPOINT_CHECK}


def needs_check(job: FineTuneJob, ready_replicas: int) -> bool:
    """Whether the endpoint is ready to be checked and no check was started yet (spec.serving.check, the default)."""
    serving = job.spec.serving
    status = job.status or FineTuneJobStatus()
    started = status.serving is not None and status.serving.check is not None
    return serving is not None and serving.check and ready_replicas > 0 and not started


def check_base_url(job: FineTuneJob, service: Mapping[str, Any] | None) -> str:
    """Where the check asks: the Service's cluster IP, which needs no cluster DNS (not every cluster runs one), else
    its DNS name."""
    cluster_ip = ((service or {}).get("spec") or {}).get("clusterIP")
    if cluster_ip and cluster_ip != "None":
        host = f"[{cluster_ip}]" if ":" in cluster_ip else cluster_ip
        return f"http://{host}:{PORT}/v1"
    return serving_url(job)


def build_check_job(job: FineTuneJob, settings: OperatorSettings, base_url: str) -> dict[str, Any]:
    """A run-once Job of the trainer image asking the endpoint's Service the evaluated rows (`check-endpoint`); its
    result comes back in the pod's termination message. It needs no API access, only S3 to read the evaluation."""
    name = job.metadata.name
    container = {
        "name": CHECK_CONTAINER,
        "image": trainer_image(job, settings),
        "imagePullPolicy": "IfNotPresent",
        "command": [
            *("python", "-m", "kubetune_trainer", "check-endpoint"),
            *("--base-url", base_url, "--model", name),
        ],
        "env": [
            {"name": contract.ENV_JOB_MANIFEST, "value": manifest_text(job, settings)},
            {"name": contract.ENV_TERMINATION_MESSAGE_PATH, "value": contract.DEFAULT_TERMINATION_MESSAGE_PATH},
            {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
            *s3_env(job, settings),
        ],
        "terminationMessagePath": contract.DEFAULT_TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod = {
        "metadata": {"labels": check_labels(name)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": TRAINER_UID,
                "runAsGroup": TRAINER_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": check_name(name), "namespace": job.metadata.namespace, "labels": check_labels(name)},
        # One try: the check retries its requests itself; a second pod would only ask the same endpoint again.
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": CHECK_DEADLINE_SECONDS, "template": pod},
    }


def check_result(pod: Mapping[str, Any]) -> EndpointCheckStatus | None:
    """The finished check pod's result (its termination message); None while it runs. A pod that died without one
    (killed, out of memory, past its deadline) is a failed check saying how it ended."""
    phase = (pod.get("status") or {}).get("phase")
    if phase not in ("Succeeded", "Failed"):
        return None
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    terminated = next(
        ((s.get("state") or {}).get("terminated") for s in statuses if s.get("name") == CHECK_CONTAINER), None
    )
    message = str((terminated or {}).get("message") or "").strip()
    parsed = contract.parse_termination_message(EndpointCheckStatus, message) if message else None
    if parsed is not None:
        return parsed
    reason = (terminated or {}).get("reason") or (pod.get("status") or {}).get("reason") or phase
    tail = f": {message[-400:]}" if message else ""
    return EndpointCheckStatus(state="Failed", message=f"the check pod ended ({reason}) without a result{tail}")
