"""The objects built per FineTuneJob and per namespace: names, labels, the trainer Job with its resolved manifest, the
namespace's trainer identity; and the operator's own RBAC rules."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubetune_operator.builders import (
    JOBSET_API_VERSION,
    LABEL_JOB_NAME,
    LABEL_KUEUE_QUEUE,
    build_children,
    build_trainer_job,
    desired_job_suspend,
    total_gpus,
    trainer_labels,
    trainer_resource_name,
)
from kubetune_operator.rbac import operator_rbac_rules
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.trainer_identity import build_namespace_identity
from pydantic import ValidationError

from kubetune import contract
from kubetune.api import MAX_JOB_NAME_LENGTH, MAX_MULTI_NODE_JOB_NAME_LENGTH, MAX_NODES, FineTuneJob, Toleration
from kubetune.trainer_policy import trainer_rbac_rules

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings(
    trainer_image="registry.local/trainer:1.0",
    s3_endpoint="http://minio.storage:9000",
    s3_region="eu-west-1",
    s3_credentials_secret="default-s3",
    progress_interval_seconds=10,
    trainer_metrics_port=9090,
)


def finetunejob(name: str = "demo", **spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "team", "uid": "ftj-uid", "generation": 3},
            "spec": {
                "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://out/demo"},
                **spec,
            },
        }
    )


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# Names and labels


@pytest.mark.parametrize(
    ("job_name", "expected"),
    [
        ("demo", "demo-trainer"),
        ("a" * MAX_JOB_NAME_LENGTH, "a" * MAX_JOB_NAME_LENGTH + "-trainer"),
    ],
)
def test_names_get_the_trainer_suffix(job_name: str, expected: str) -> None:
    assert trainer_resource_name(job_name) == expected


def test_the_longest_name_leaves_room_for_the_pods_generated_suffix() -> None:
    # generateName keeps at most 58 characters of `<job>-trainer-` before its 5 random ones.
    assert len(trainer_resource_name("a" * MAX_JOB_NAME_LENGTH) + "-") <= 58


def test_a_name_the_crd_refuses_is_refused_here_too() -> None:
    with pytest.raises(ValueError, match="longer than 49 characters"):
        trainer_resource_name("a" * (MAX_JOB_NAME_LENGTH + 1))


def test_children_carry_the_follow_labels() -> None:
    assert trainer_labels("demo") == {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.io/job-name": "demo",
    }
    for child in build_children(finetunejob(), SETTINGS):
        assert child["metadata"]["name"] == "demo-trainer"
        assert child["metadata"]["namespace"] == "team"
        assert child["metadata"]["labels"][LABEL_JOB_NAME] == "demo"


def test_a_job_owns_its_trainer_job_only() -> None:
    kinds = [child["kind"] for child in build_children(finetunejob(), SETTINGS)]
    assert kinds == ["Job"]


# ---------------------------------------------------------------------------------------------------------------------
# The resolved manifest, in the trainer's environment


def manifest_of(job: FineTuneJob) -> str:
    text: str = env_of(build_trainer_job(job, SETTINGS))[contract.ENV_JOB_MANIFEST]
    return text


def test_the_environment_holds_the_resolved_manifest_without_status() -> None:
    job = finetunejob(method="qlora", s3={"region": "us-east-2"})
    manifest = yaml.safe_load(manifest_of(job))
    assert manifest["apiVersion"] == "kubetune.io/v1alpha1"
    assert manifest["kind"] == "FineTuneJob"
    assert manifest["metadata"] == {"name": "demo", "namespace": "team", "uid": "ftj-uid", "generation": 3}
    assert "status" not in manifest
    spec = manifest["spec"]
    assert spec["image"] == "registry.local/trainer:1.0"
    # The job's own region wins; the operator fills in what the job left out.
    assert spec["s3"] == {
        "endpoint": "http://minio.storage:9000",
        "region": "us-east-2",
        "credentialsSecretRef": "default-s3",
    }
    assert spec["quantization"] == {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}
    assert spec["lora"]["r"] == 16
    assert spec["training"]["completionOnlyLoss"] is True
    assert FineTuneJob.model_validate(manifest).spec.image == "registry.local/trainer:1.0"


def test_the_manifest_has_secret_references_only() -> None:
    job = finetunejob(
        evaluation={
            "metrics": ["judge"],
            "judge": {"model": "gpt-judge", "apiKeySecretRef": {"name": "judge-key", "key": "token"}},
        },
        s3={"credentialsSecretRef": "team-s3"},
    )
    text = manifest_of(job)
    spec = yaml.safe_load(text)["spec"]
    assert spec["evaluation"]["judge"]["apiKeySecretRef"] == {"name": "judge-key", "key": "token"}
    assert spec["s3"]["credentialsSecretRef"] == "team-s3"
    assert "AWS_SECRET_ACCESS_KEY" not in text


def test_full_fine_tuning_resolves_no_lora_and_no_quantization() -> None:
    spec = yaml.safe_load(manifest_of(finetunejob(method="full")))["spec"]
    assert "lora" not in spec
    assert "quantization" not in spec


# ---------------------------------------------------------------------------------------------------------------------
# The namespace's trainer identity


def test_the_namespace_identity_binds_the_trainer_cluster_role_to_the_trainer_account() -> None:
    settings = OperatorSettings(trainer_service_account="ml-trainer", trainer_cluster_role="kt-kubetune-trainer")
    account, binding = build_namespace_identity("team", settings)

    assert (account["kind"], account["metadata"]["name"], account["metadata"]["namespace"]) == (
        "ServiceAccount",
        "ml-trainer",
        "team",
    )
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kt-kubetune-trainer",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-trainer", "namespace": "team"}]
    # Shared by the namespace's jobs: no job owns it, and the operator's job-name label is absent.
    assert all("ownerReferences" not in o["metadata"] for o in (account, binding))
    assert all(LABEL_JOB_NAME not in o["metadata"]["labels"] for o in (account, binding))


# ---------------------------------------------------------------------------------------------------------------------
# The trainer Job


def test_job_runs_once_with_the_run_policy() -> None:
    job = build_trainer_job(
        finetunejob(runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600}),
        SETTINGS,
    )
    spec = job["spec"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 5)
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (3600, 600)
    assert spec["suspend"] is False
    assert [rule["action"] for rule in spec["podFailurePolicy"]["rules"]] == ["Ignore", "FailJob"]
    assert spec["template"]["metadata"]["labels"] == trainer_labels("demo")
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "kubetune-trainer"
    assert pod["automountServiceAccountToken"] is True  # the kubelet's projected token, bound to this pod


def test_deadline_and_ttl_are_left_out_when_unset() -> None:
    spec = build_trainer_job(finetunejob(), SETTINGS)["spec"]
    assert "activeDeadlineSeconds" not in spec
    assert "ttlSecondsAfterFinished" not in spec
    assert spec["backoffLimit"] == 2


@pytest.mark.parametrize(
    ("spec", "suspended", "queue_label", "desired_after_change"),
    [
        ({}, False, None, False),
        ({"runPolicy": {"suspend": True}}, True, None, True),
        ({"queueName": "gpu"}, True, "gpu", None),
        ({"queueName": "gpu", "runPolicy": {"suspend": True}}, True, "gpu", True),
    ],
    ids=["runs", "suspended by the user", "queued for Kueue", "queued and suspended"],
)
def test_suspension_and_kueue(
    spec: dict[str, Any], suspended: bool, queue_label: str | None, desired_after_change: bool | None
) -> None:
    job = finetunejob(**spec)
    built = build_trainer_job(job, SETTINGS)
    assert built["spec"]["suspend"] is suspended
    assert built["metadata"]["labels"].get(LABEL_KUEUE_QUEUE) == queue_label
    assert desired_job_suspend(job) is desired_after_change


def test_image_is_the_jobs_own_or_the_operator_default() -> None:
    default = pod_spec(build_trainer_job(finetunejob(), SETTINGS))["containers"][0]
    assert default["image"] == "registry.local/trainer:1.0"
    override = pod_spec(build_trainer_job(finetunejob(image="mine/trainer:dev"), SETTINGS))["containers"][0]
    assert override["image"] == "mine/trainer:dev"


@pytest.mark.parametrize(
    ("spec", "image"),
    [({}, "registry.local/trainer:1.0"), ({"image": "mine/trainer:dev"}, "mine/trainer:dev")],
    ids=["operator default", "spec.image"],
)
def test_trainer_is_told_the_image_it_runs_in(spec: dict[str, Any], image: str) -> None:
    built = build_trainer_job(finetunejob(**spec), SETTINGS)
    container = pod_spec(built)["containers"][0]
    # The trainer records this in manifest.json: it must be the container's image, not a guess.
    assert env_of(built)[contract.ENV_IMAGE] == container["image"] == image


@pytest.mark.parametrize("gpus", [0, 1, 2, 8])
def test_command_comes_from_the_contract(gpus: int) -> None:
    container = pod_spec(build_trainer_job(finetunejob(resources={"gpus": gpus}), SETTINGS))["containers"][0]
    assert container["command"] == contract.trainer_command(gpus)
    launcher = "kubetune_trainer" if gpus <= 1 else "kubetune_trainer.launch"
    assert container["command"][:3] == ["python", "-m", launcher]


def test_env_follows_the_contract() -> None:
    env = env_of(build_trainer_job(finetunejob(), SETTINGS))
    assert yaml.safe_load(env[contract.ENV_JOB_MANIFEST])["metadata"]["name"] == "demo"
    assert env[contract.ENV_JOB_NAME] == "demo"
    assert env[contract.ENV_JOB_NAMESPACE] == "team"
    assert env[contract.ENV_METRICS_PORT] == "9090"
    assert env[contract.ENV_PROGRESS_INTERVAL] == "10"
    assert env[contract.ENV_TERMINATION_MESSAGE_PATH] == "/dev/termination-log"
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert env["AWS_REGION"] == "eu-west-1"
    assert env["HF_HOME"].startswith("/tmp/")


@pytest.mark.parametrize(
    ("settings_secret", "spec_s3", "expected_secret"),
    [
        ("default-s3", None, "default-s3"),
        ("default-s3", {"credentialsSecretRef": "team-s3"}, "team-s3"),
        (None, {"credentialsSecretRef": "team-s3"}, "team-s3"),
        (None, None, None),
    ],
    ids=["operator default", "job overrides", "job only", "none: pod identity"],
)
def test_s3_credentials_are_secret_references(
    settings_secret: str | None, spec_s3: dict[str, str] | None, expected_secret: str | None
) -> None:
    settings = SETTINGS.model_copy(update={"s3_credentials_secret": settings_secret})
    spec: dict[str, Any] = {"s3": spec_s3} if spec_s3 else {}
    job = finetunejob(**spec)
    env = env_of(build_trainer_job(job, settings))
    if expected_secret is None:
        assert "AWS_ACCESS_KEY_ID" not in env
        assert "AWS_SECRET_ACCESS_KEY" not in env
        return
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"secretKeyRef": {"name": expected_secret, "key": key}}


def test_endpoint_and_region_are_omitted_when_nobody_sets_them() -> None:
    env = env_of(build_trainer_job(finetunejob(), OperatorSettings()))
    assert "AWS_ENDPOINT_URL" not in env
    assert "AWS_REGION" not in env


def test_judge_key_comes_from_its_secret() -> None:
    job = finetunejob(
        evaluation={
            "metrics": ["judge"],
            "judge": {"model": "gpt-judge", "apiKeySecretRef": {"name": "judge-key", "key": "token"}},
        }
    )
    env = env_of(build_trainer_job(job, SETTINGS))
    assert env[contract.ENV_JUDGE_API_KEY] == {"secretKeyRef": {"name": "judge-key", "key": "token"}}
    assert contract.ENV_OPENAI_API_KEY not in env


def test_each_contenders_key_comes_from_its_own_secret_and_a_keyless_one_gets_none() -> None:
    job = finetunejob(
        evaluation={
            "contenders": [
                {"name": "big", "model": "gpt-4o", "apiKeySecretRef": {"name": "openai", "key": "api-key"}},
                {"name": "local", "model": "llama", "baseUrl": "http://llama:8080/v1"},
                {"name": "other", "model": "m", "apiKeySecretRef": {"name": "other", "key": "k"}},
            ]
        }
    )
    env = env_of(build_trainer_job(job, SETTINGS))
    assert env[contract.contender_api_key_env(0)] == {"secretKeyRef": {"name": "openai", "key": "api-key"}}
    assert contract.contender_api_key_env(1) not in env
    assert env[contract.contender_api_key_env(2)] == {"secretKeyRef": {"name": "other", "key": "k"}}


@pytest.mark.parametrize(
    ("resources", "requests", "limits"),
    [
        ({"gpus": 0}, None, None),
        ({"gpus": 0, "cpu": "2"}, {"cpu": "2"}, None),
        ({"gpus": 1}, {"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"}),
        (
            {"gpus": 4, "cpu": "16", "memory": "64Gi"},
            {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"},
            {"nvidia.com/gpu": "4", "memory": "64Gi"},
        ),
    ],
    ids=["cpu-only, nothing asked", "cpu request", "one gpu", "four gpus, cpu, memory"],
)
def test_resources(resources: dict[str, Any], requests: dict[str, str] | None, limits: dict[str, str] | None) -> None:
    container = pod_spec(build_trainer_job(finetunejob(resources=resources), SETTINGS))["containers"][0]
    assert container["resources"].get("requests") == requests
    assert container["resources"].get("limits") == limits


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
TEAM_TOLERATION = {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("resources", "node_selector", "tolerations"),
    [
        ({"gpus": 0}, None, None),
        ({"gpus": 1}, {"nvidia.com/gpu.present": "true"}, [GPU_TOLERATION]),
        (
            {"gpus": 1, "nodeSelector": {"nvidia.com/gpu.present": "false", "pool": "a100"}},
            {"nvidia.com/gpu.present": "false", "pool": "a100"},
            [GPU_TOLERATION],
        ),
        (
            {"gpus": 1, "tolerations": [TEAM_TOLERATION, GPU_TOLERATION]},
            {"nvidia.com/gpu.present": "true"},
            [TEAM_TOLERATION, GPU_TOLERATION],
        ),
        (
            {"gpus": 0, "tolerations": [TEAM_TOLERATION], "nodeSelector": {"pool": "cpu"}},
            {"pool": "cpu"},
            [TEAM_TOLERATION],
        ),
    ],
    ids=["cpu job: no defaults", "gpu defaults", "job selector wins", "no duplicate toleration", "cpu job, own"],
)
def test_placement(
    resources: dict[str, Any], node_selector: dict[str, str] | None, tolerations: list[dict[str, Any]] | None
) -> None:
    pod = pod_spec(build_trainer_job(finetunejob(resources=resources), SETTINGS))
    assert pod.get("nodeSelector") == node_selector
    assert pod.get("tolerations") == tolerations


def test_operator_gpu_defaults_can_be_emptied() -> None:
    settings = OperatorSettings(gpu_node_selector={}, gpu_tolerations=())
    pod = pod_spec(build_trainer_job(finetunejob(resources={"gpus": 1}), settings))
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod


def test_operator_gpu_tolerations_are_configurable() -> None:
    settings = OperatorSettings(gpu_tolerations=(Toleration(key="gpu", operator="Exists"),))
    pod = pod_spec(build_trainer_job(finetunejob(resources={"gpus": 1}), settings))
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_priority_class_is_passed_on() -> None:
    pod = pod_spec(build_trainer_job(finetunejob(resources={"priorityClassName": "training-low"}), SETTINGS))
    assert pod["priorityClassName"] == "training-low"
    assert "priorityClassName" not in pod_spec(build_trainer_job(finetunejob(), SETTINGS))


def test_pod_is_hardened_with_writable_tmp_and_hf_cache() -> None:
    pod = pod_spec(build_trainer_job(finetunejob(resources={"gpus": 1}), SETTINGS))
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    env = env_of(build_trainer_job(finetunejob(), SETTINGS))
    assert mounts["/tmp"] == "tmp"
    assert mounts[env["HF_HOME"]] == "hf-cache"
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert volumes["hf-cache"] == {"name": "hf-cache", "emptyDir": {}}
    assert "/dev/shm" not in mounts
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]


def test_multi_gpu_pods_get_shared_memory() -> None:
    pod = pod_spec(build_trainer_job(finetunejob(resources={"gpus": 2}), SETTINGS))
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_no_metrics_port_when_the_trainer_metrics_are_off() -> None:
    settings = SETTINGS.model_copy(update={"trainer_metrics_port": 0})
    container = pod_spec(build_trainer_job(finetunejob(), settings))["containers"][0]
    assert "ports" not in container
    assert env_of(build_trainer_job(finetunejob(), settings))[contract.ENV_METRICS_PORT] == "0"


# ---------------------------------------------------------------------------------------------------------------------
# The operator's RBAC


def rules_by_resource() -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in operator_rbac_rules():
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


@pytest.mark.parametrize(
    ("group", "resource", "verbs"),
    [
        ("kubetune.io", "finetunejobs", {"get", "list", "watch", "patch"}),
        ("kubetune.io", "finetunejobs/status", {"patch"}),
        ("kubetune.io", "finetunejobs/finalizers", {"update"}),
        ("batch", "jobs", {"get", "list", "watch", "create", "patch"}),
        ("", "pods", {"list", "watch"}),
        ("", "serviceaccounts", {"list", "watch", "create"}),
        ("rbac.authorization.k8s.io", "rolebindings", {"list", "watch", "create"}),
        ("apps", "deployments", {"get", "list", "watch", "create"}),
        ("", "services", {"get", "create"}),
        ("", "events", {"create"}),
        ("kopf.dev", "clusterkopfpeerings", {"get", "list", "watch", "patch", "create"}),
        ("kopf.dev", "kopfpeerings", {"get", "list", "watch", "patch", "create"}),
        ("jobset.x-k8s.io", "jobsets", {"get", "list", "watch", "create", "patch"}),
        ("kueue.x-k8s.io", "workloads", {"list", "watch"}),
    ],
)
def test_operator_rbac_grants_exactly(group: str, resource: str, verbs: set[str]) -> None:
    assert rules_by_resource()[group, resource] == verbs


def test_operator_rbac_has_no_secrets_deletes_or_wildcards() -> None:
    table = rules_by_resource()
    assert len(table) == 14
    assert not any(resource == "secrets" for _, resource in table)
    assert not any({"delete", "deletecollection", "*", "escalate", "bind"} & verbs for verbs in table.values())
    assert not any("*" in (group, resource) for group, resource in table)


def test_operator_rbac_covers_what_the_trainer_role_grants() -> None:
    # RBAC refuses to bind a role granting more than the binder holds.
    table = rules_by_resource()
    for rule in trainer_rbac_rules():
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= table[group, resource]


def test_a_hosted_job_runs_its_driver_without_gpus() -> None:
    job = finetunejob(
        backend="openai",
        resources={"gpus": 4},
        openai={"model": "gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "api-key"}},
    )
    pod = build_trainer_job(job, SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]

    assert container["command"] == ["python", *contract.HOSTED_TRAINER_ENTRY]
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert env_of(build_trainer_job(job, SETTINGS))["OPENAI_API_KEY"] == {
        "secretKeyRef": {"name": "openai", "key": "api-key"}
    }


def test_a_permanent_trainer_failure_fails_the_job_without_retries() -> None:
    rules = build_trainer_job(finetunejob(), SETTINGS)["spec"]["podFailurePolicy"]["rules"]

    fail_job = [rule for rule in rules if rule["action"] == "FailJob"]
    assert fail_job == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [contract.EXIT_CODE_PERMANENT]},
        }
    ]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules


def test_registry_credentials_are_mounted_as_a_docker_config_only_when_named() -> None:
    registry = {"repository": "registry.example.com/team/adapters", "credentialsSecretRef": "push-creds"}
    output = {"uri": "s3://out/demo", "registry": registry}
    pod = pod_spec(build_trainer_job(finetunejob(output=output), SETTINGS))
    volume = {volume["name"]: volume for volume in pod["volumes"]}["registry-credentials"]
    assert volume["secret"] == {
        "secretName": "push-creds",
        "items": [{"key": ".dockerconfigjson", "path": contract.REGISTRY_CONFIG_FILE}],
        "defaultMode": 0o440,
    }
    mount = {"name": "registry-credentials", "mountPath": contract.REGISTRY_CONFIG_DIR, "readOnly": True}
    assert mount in pod["containers"][0]["volumeMounts"]
    # An open registry (no Secret named) mounts nothing; the password never enters the environment either way.
    open_pod = pod_spec(
        build_trainer_job(
            finetunejob(output={**output, "registry": {**registry, "credentialsSecretRef": None}}), SETTINGS
        )
    )
    assert "registry-credentials" not in {volume["name"] for volume in open_pod["volumes"]}
    assert all(
        "registry" not in name.lower() for name in env_of(build_trainer_job(finetunejob(output=output), SETTINGS))
    )


# ----------------------------------------------------------------------------------------------------------------------
# Several nodes: a JobSet


def test_a_multi_node_job_runs_as_one_jobset_of_an_indexed_job_with_a_pod_per_node() -> None:
    job = finetunejob(resources={"nodes": 3, "gpus": 2}, queueName="gpu-queue", runPolicy={"backoffLimit": 4})

    (jobset,) = build_children(job, SETTINGS)

    assert (jobset["apiVersion"], jobset["kind"], jobset["metadata"]["name"]) == (
        JOBSET_API_VERSION,
        "JobSet",
        "demo-trainer",
    )
    assert jobset["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "gpu-queue"
    spec = jobset["spec"]
    assert spec["suspend"] is True, "Kueue admits it as one unit"
    assert spec["failurePolicy"]["maxRestarts"] == 4
    network = {"enableDNSHostnames": True, "subdomain": "demo-trainer", "publishNotReadyAddresses": True}
    assert spec["network"] == network
    (replicated,) = spec["replicatedJobs"]
    assert (replicated["name"], replicated["replicas"]) == ("node", 1)
    node_job = replicated["template"]["spec"]
    assert (node_job["completions"], node_job["parallelism"], node_job["completionMode"]) == (3, 3, "Indexed")
    assert node_job["backoffLimit"] == 0, "one rank failing restarts the whole group, through JobSet"
    assert not replicated["template"]["metadata"].get("labels"), "JobSet's child Jobs must not read as trainer Jobs"
    assert node_job["template"]["metadata"]["labels"][LABEL_JOB_NAME] == "demo"
    container = node_job["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2", "gpus is per node"
    command = container["command"]
    assert command[command.index("--num_processes") + 1] == "6"
    assert command[command.index("--num_machines") + 1] == "3"
    assert command[command.index("--machine_rank") + 1] == "$(KUBETUNE_NODE_RANK)"
    assert command[command.index("--main_process_ip") + 1] == "$(KUBETUNE_MAIN_ADDRESS)"
    env = env_of(replicated["template"])
    assert env[contract.ENV_NODE_RANK] == {
        "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}
    }
    assert env[contract.ENV_MAIN_ADDRESS] == "demo-trainer-node-0-0.demo-trainer"


def test_gpus_are_per_node_and_a_hosted_job_holds_none() -> None:
    assert total_gpus(finetunejob(resources={"nodes": 3, "gpus": 2})) == 6
    assert total_gpus(finetunejob(resources={"gpus": 2})) == 2
    hosted = finetunejob(
        backend="openai", openai={"model": "gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "api-key"}}
    )
    assert total_gpus(hosted) == 0


def test_a_single_node_job_stays_a_plain_batch_job_without_rendezvous() -> None:
    (trainer,) = build_children(finetunejob(resources={"nodes": 1, "gpus": 2}), SETTINGS)

    assert trainer["kind"] == "Job"
    env = env_of(trainer)
    assert contract.ENV_NODE_RANK not in env and contract.ENV_MAIN_ADDRESS not in env
    assert "--machine_rank" not in trainer["spec"]["template"]["spec"]["containers"][0]["command"]


def test_a_multi_node_name_leaves_room_for_the_node_index_in_pod_names() -> None:
    longest = "a" * MAX_MULTI_NODE_JOB_NAME_LENGTH
    finetunejob(longest, resources={"nodes": MAX_NODES})
    with pytest.raises(ValidationError, match=r"at most 39 characters when resources\.nodes > 1"):
        finetunejob(longest + "a", resources={"nodes": 2})
    finetunejob(longest + "a", resources={"nodes": 1})

    pod_name = f"{longest}-trainer-node-0-{MAX_NODES - 1}-xxxxx"
    assert len(pod_name) <= 63
