"""Pure builders of the objects the operator creates per FineTuneJob: plain dicts, no kopf or API calls."""

from __future__ import annotations

import json
from typing import Any

from kubetune import contract
from kubetune.api import API_VERSION, KIND, MAX_JOB_NAME_LENGTH, FineTuneJob, S3Spec, Toleration
from kubetune_operator.settings import OperatorSettings

TRAINER_SUFFIX = contract.TRAINER_JOB_SUFFIX

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_NAME = contract.LABEL_JOB_NAME
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# Set by the Job controller on every pod of an Indexed Job: the multi-node trainer's node rank.
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
# The JobSet's one replicated Job: its pods are <job>-trainer-node-0-<node index>-xxxxx.
JOBSET_REPLICATED_JOB = "node"
APP_NAME = "kubetune"
COMPONENT_TRAINER = "trainer"
MANAGER = "kubetune"

CONTAINER_NAME = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
TRAINER_UID = 1000
TMP_DIR = "/tmp"
# The model cache: an emptyDir of its own, as the root filesystem is read-only.
HF_CACHE_DIR = "/tmp/hf-cache"
SHM_DIR = "/dev/shm"
# Long enough for the trainer to write a checkpoint to S3 after SIGTERM (suspend, preemption, deletion).
TERMINATION_GRACE_SECONDS = 120
AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"


def trainer_resource_name(job_name: str) -> str:
    """`<job>-trainer`: the trainer Job's name (its pods are `<job>-trainer-xxxxx`)."""
    if len(job_name) > MAX_JOB_NAME_LENGTH:
        # The CRD refuses such names; a longer one would cut the pod names the trainer policy relies on.
        raise ValueError(f"FineTuneJob name {job_name!r} is longer than {MAX_JOB_NAME_LENGTH} characters")
    return f"{job_name}{TRAINER_SUFFIX}"


def trainer_labels(job_name: str) -> dict[str, str]:
    """Labels on every child, by which the operator follows them back to their FineTuneJob."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_COMPONENT: COMPONENT_TRAINER,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB_NAME: job_name,
    }


def trainer_image(job: FineTuneJob, settings: OperatorSettings) -> str:
    """spec.image, or the operator's default trainer image."""
    return job.spec.image or settings.trainer_image


def resolved_s3(job: FineTuneJob, settings: OperatorSettings) -> S3Spec:
    """The S3 endpoint, region and credentials Secret in effect: the spec's, else the operator's defaults."""
    spec = job.spec.s3 or S3Spec()
    return S3Spec(
        endpoint=spec.endpoint or settings.s3_endpoint,
        region=spec.region or settings.s3_region,
        credentials_secret_ref=spec.credentials_secret_ref or settings.s3_credentials_secret,
    )


def resolved_manifest(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The FineTuneJob as the trainer should run it: defaults filled in, image and S3 resolved, no status.

    Secrets appear only as references (names and keys), never values.
    """
    spec = job.spec.model_copy(
        update={
            "image": trainer_image(job, settings),
            "s3": resolved_s3(job, settings),
            "lora": job.spec.resolved_lora(),
            "quantization": job.spec.resolved_quantization(),
        }
    )
    metadata: dict[str, Any] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    extra = job.metadata.model_extra or {}
    for key in ("uid", "generation"):
        if key in extra:
            metadata[key] = extra[key]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec.to_wire()}


def child_metadata(job: FineTuneJob, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Name, namespace and labels shared by all children of one FineTuneJob."""
    return {
        "name": trainer_resource_name(job.metadata.name),
        "namespace": job.metadata.namespace,
        "labels": {**trainer_labels(job.metadata.name), **(extra_labels or {})},
    }


def manifest_text(job: FineTuneJob, settings: OperatorSettings) -> str:
    """The resolved FineTuneJob, handed to the trainer in KUBETUNE_JOB_MANIFEST: compact JSON (which is YAML too,
    as the trainer reads it), a few KB, in the environment rather than a ConfigMap, which would cost one more API
    write per job. JSON, not YAML: the json module's C encoder costs a fraction of PyYAML's pure-Python emitter,
    once per job on the operator's hot path."""
    return json.dumps(resolved_manifest(job, settings), separators=(",", ":"))


def _value(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_key(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def s3_env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The standard AWS variables of the job's S3 endpoint, its credentials as secretKeyRef."""
    s3 = resolved_s3(job, settings)
    env = []
    if s3.endpoint:
        env.append(_value("AWS_ENDPOINT_URL", s3.endpoint))
    if s3.region:
        env.append(_value("AWS_REGION", s3.region))
    if s3.credentials_secret_ref:
        env.append(_secret_key(AWS_ACCESS_KEY_ID, s3.credentials_secret_ref, AWS_ACCESS_KEY_ID))
        env.append(_secret_key(AWS_SECRET_ACCESS_KEY, s3.credentials_secret_ref, AWS_SECRET_ACCESS_KEY))
    return env


def trainer_env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The trainer container's environment per kubetune.contract; secrets only as secretKeyRef."""
    env = [
        _value(contract.ENV_JOB_MANIFEST, manifest_text(job, settings)),
        _value(contract.ENV_JOB_NAME, job.metadata.name),
        _value(contract.ENV_JOB_NAMESPACE, job.metadata.namespace or ""),
        _value(contract.ENV_METRICS_PORT, str(settings.trainer_metrics_port)),
        _value(contract.ENV_PROGRESS_INTERVAL, f"{settings.progress_interval_seconds:g}"),
        _value(contract.ENV_TERMINATION_MESSAGE_PATH, contract.DEFAULT_TERMINATION_MESSAGE_PATH),
        # The container's own image (spec.image or the operator's default), for manifest.json and the report.
        _value(contract.ENV_IMAGE, trainer_image(job, settings)),
        _value("HF_HOME", HF_CACHE_DIR),
        # Libraries that cache under ~ (torch, triton) need a writable place on a read-only root filesystem.
        _value("XDG_CACHE_HOME", f"{TMP_DIR}/.cache"),
    ]
    # Before anything that refers to them: the kubelet expands $(VAR) in the command from the variables listed.
    env.extend(rendezvous_env(job))
    env.extend(s3_env(job, settings))
    judge = job.spec.evaluation.judge
    if judge is not None:
        ref = judge.api_key_secret_ref
        env.append(_secret_key(contract.ENV_JUDGE_API_KEY, ref.name, ref.key))
    for index, contender in enumerate(job.spec.evaluation.contenders):
        if contender.api_key_secret_ref is not None:
            ref = contender.api_key_secret_ref
            env.append(_secret_key(contract.contender_api_key_env(index), ref.name, ref.key))
    if job.spec.openai is not None:
        ref = job.spec.openai.api_key_secret_ref
        env.append(_secret_key(contract.ENV_OPENAI_API_KEY, ref.name, ref.key))
    return env


def trainer_gpus(job: FineTuneJob) -> int:
    """GPUs the trainer pod asks for: none for backend openai, whose pod only drives the hosted job."""
    return 0 if job.spec.backend == "openai" else job.spec.resources.gpus


def total_gpus(job: FineTuneJob) -> int:
    """GPUs the whole trainer holds: per node times nodes (what the GPU-seconds metric counts)."""
    return trainer_gpus(job) * job.spec.resources.nodes


def trainer_command(job: FineTuneJob) -> list[str]:
    """The trainer's argv: local training (one process per GPU, on every node), or the hosted-job driver."""
    if job.spec.backend == "openai":
        return contract.trainer_command(0, entry=contract.HOSTED_TRAINER_ENTRY)
    return contract.trainer_command(job.spec.resources.gpus, nodes=job.spec.resources.nodes)


def is_multi_node(job: FineTuneJob) -> bool:
    """Whether the trainer spans several pods (a JobSet) rather than one (a batch/v1 Job)."""
    return job.spec.resources.nodes > 1


def trainer_kind(job: FineTuneJob) -> str:
    """The kind of the trainer object: JobSet for several nodes, else Job."""
    return "JobSet" if is_multi_node(job) else "Job"


def main_address(job: FineTuneJob) -> str:
    """Rank 0's pod by name: the hostname JobSet gives it within the JobSet's headless Service (its subdomain)."""
    name = trainer_resource_name(job.metadata.name)
    return f"{name}-{JOBSET_REPLICATED_JOB}-0-0.{name}"


def rendezvous_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """A multi-node pod's rank (from its completion index) and rank 0's address; none for a single node."""
    if not is_multi_node(job):
        return []
    rank_source = {"fieldRef": {"fieldPath": f"metadata.labels['{LABEL_COMPLETION_INDEX}']"}}
    return [
        {"name": contract.ENV_NODE_RANK, "valueFrom": rank_source},
        _value(contract.ENV_MAIN_ADDRESS, main_address(job)),
    ]


def container_resources(job: FineTuneJob) -> dict[str, Any]:
    """Requests and limits: GPUs requests=limits (omitted at 0), CPU requested, memory requested and capped."""
    spec = job.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    gpus = trainer_gpus(job)
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    if spec.cpu:
        requests["cpu"] = spec.cpu
    if spec.memory:
        # A limit equal to the request turns memory exhaustion into OOMKilled on this pod, not node pressure.
        requests["memory"] = limits["memory"] = spec.memory
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def node_selector(job: FineTuneJob, settings: OperatorSettings) -> dict[str, str]:
    """The operator's GPU node labels (for GPU jobs) overlaid with the job's own nodeSelector."""
    defaults = settings.gpu_node_selector if trainer_gpus(job) > 0 else {}
    return {**defaults, **job.spec.resources.node_selector}


def tolerations(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The job's tolerations plus the operator's GPU tolerations (for GPU jobs), without duplicates."""
    items: list[Toleration] = list(job.spec.resources.tolerations)
    if trainer_gpus(job) > 0:
        items.extend(settings.gpu_tolerations)
    unique: list[dict[str, Any]] = []
    for item in items:
        wire = item.to_wire()
        if wire not in unique:
            unique.append(wire)
    return unique


def is_created_suspended(job: FineTuneJob) -> bool:
    """The Job starts suspended when the user paused it or when Kueue must admit it first."""
    return job.spec.run_policy.suspend or job.spec.queue_name is not None


def desired_job_suspend(job: FineTuneJob) -> bool | None:
    """The trainer Job's spec.suspend after a change of runPolicy.suspend; None leaves it to Kueue.

    A queued job is suspended by the user like any other, but only Kueue may unsuspend it (that is its admission).
    """
    if job.spec.run_policy.suspend:
        return True
    return None if job.spec.queue_name else False


def _volumes(job: FineTuneJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "hf-cache", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "hf-cache", "mountPath": HF_CACHE_DIR},
    ]
    if trainer_gpus(job) > 1:
        # NCCL exchanges tensors between the per-GPU processes through shared memory; the default 64 MiB is too small.
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "shm", "mountPath": SHM_DIR})
    registry = job.spec.output.registry
    if registry is not None and registry.credentials_secret_ref:
        # The dockerconfigjson Secret as the file a docker client reads; readable by the pod's fsGroup (the trainer).
        volumes.append(
            {
                "name": "registry-credentials",
                "secret": {
                    "secretName": registry.credentials_secret_ref,
                    "items": [{"key": ".dockerconfigjson", "path": contract.REGISTRY_CONFIG_FILE}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "registry-credentials", "mountPath": contract.REGISTRY_CONFIG_DIR, "readOnly": True})
    return volumes, mounts


def build_trainer_container(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The single trainer container: image, command, env, resources and a locked-down security context."""
    _, mounts = _volumes(job)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(job, settings),
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(job),
        "env": trainer_env(job, settings),
        "resources": container_resources(job),
        "terminationMessagePath": contract.DEFAULT_TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if settings.trainer_metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}]
    return container


def build_trainer_pod_spec(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer pod: one container, the namespace's trainer ServiceAccount (its token bound to this pod, which the
    trainer policy checks), placement and a hardened pod security context."""
    volumes, _ = _volumes(job)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [build_trainer_container(job, settings)],
        "volumes": volumes,
    }
    selector = node_selector(job, settings)
    if selector:
        spec["nodeSelector"] = selector
    tolerated = tolerations(job, settings)
    if tolerated:
        spec["tolerations"] = tolerated
    if job.spec.resources.priority_class_name:
        spec["priorityClassName"] = job.spec.resources.priority_class_name
    return spec


def queue_labels(job: FineTuneJob) -> dict[str, str]:
    """The LocalQueue label Kueue admits the trainer by, when the job names one."""
    return {LABEL_KUEUE_QUEUE: job.spec.queue_name} if job.spec.queue_name else {}


def pod_failure_policy() -> dict[str, Any]:
    """Which pod failures count: not the cluster's disruptions, and a permanent failure ends the run at once."""
    return {
        "rules": [
            # Preemption and node drains are not the trainer's fault: they must not use up its retries.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            # A permanent failure (bad data, bad config, a hosted job the service refused) fails the same way
            # on every retry; for backend openai a retry could even start a second paid hosted job.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [contract.EXIT_CODE_PERMANENT],
                },
            },
        ]
    }


def build_trainer_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job running the trainer once (retried up to backoffLimit, resuming from checkpoints)."""
    policy = job.spec.run_policy
    spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": policy.backoff_limit,
        "suspend": is_created_suspended(job),
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": trainer_labels(job.metadata.name)},
            "spec": build_trainer_pod_spec(job, settings),
        },
    }
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": child_metadata(job, queue_labels(job)), "spec": spec}


def build_trainer_jobset(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The JobSet running a multi-node trainer: one Indexed Job of `nodes` pods that start together and find rank 0
    by its hostname. Any pod's failure fails that Job, and JobSet restarts the whole group (up to backoffLimit times)
    from the newest checkpoint: a distributed run cannot go on without one of its ranks. Kueue admits it as one unit.
    """
    policy = job.spec.run_policy
    nodes = job.spec.resources.nodes
    name = trainer_resource_name(job.metadata.name)
    node_job: dict[str, Any] = {
        "completions": nodes,
        "parallelism": nodes,
        "completionMode": "Indexed",
        "backoffLimit": 0,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": trainer_labels(job.metadata.name)},
            "spec": build_trainer_pod_spec(job, settings),
        },
    }
    spec: dict[str, Any] = {
        "suspend": is_created_suspended(job),
        # Every pod is reachable as <pod hostname>.<subdomain> from its start: rank 0 listens before it is Ready.
        "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
        "failurePolicy": {
            "maxRestarts": policy.backoff_limit,
            # A permanent failure (bad data, bad config) fails the same way on every restart.
            "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
        },
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [JOBSET_REPLICATED_JOB]},
        "replicatedJobs": [
            {
                "name": JOBSET_REPLICATED_JOB,
                "replicas": 1,
                # No trainer labels on the child Job: the operator's Job watch would read it as a trainer Job.
                "template": {"metadata": {}, "spec": node_job},
            }
        ],
    }
    if policy.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    if policy.active_deadline_seconds is not None:
        node_job["activeDeadlineSeconds"] = policy.active_deadline_seconds
    metadata = child_metadata(job, queue_labels(job))
    return {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet", "metadata": metadata, "spec": spec}


def build_trainer(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer object: a JobSet across several nodes, else a batch/v1 Job."""
    return build_trainer_jobset(job, settings) if is_multi_node(job) else build_trainer_job(job, settings)


def build_children(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Every object owned by the FineTuneJob, in creation order: the trainer alone (the manifest travels in its
    environment; the trainer's identity is per namespace, kubetune_operator.trainer_identity)."""
    return [build_trainer(job, settings)]
