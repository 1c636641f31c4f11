"""The Helm chart rendered by the real helm: lint, objects per scenario, hardened defaults, CRD and RBAC parity with
their sources, settings the operator accepts, monitoring gates, documented values and a schema that refuses bad ones."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator import builders
from kubetune_operator.rbac import operator_rbac_rules
from kubetune_operator.settings import (
    DEFAULT_GPU_NODE_SELECTOR,
    DEFAULT_GPU_TOLERATIONS,
    DEFAULT_TRAINER_IMAGE,
    OperatorSettings,
    env_name,
)

from kubetune.api import FineTuneJob
from kubetune.crd import build_crd
from kubetune.trainer_policy import build_trainer_policy, build_trainer_policy_binding, trainer_rbac_rules
from tests.testbed.chart import CHART_DIR, CI_VALUES_DIR, HelmError, find_object, render_chart, run_helm
from tools.crds import PEERING_FILE, check_chart_crd_copies, write_chart_crd_copies

pytestmark = pytest.mark.integration  # runs the helm binary built by `make testbed`

Objects = list[dict[str, Any]]
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"
FULLNAME = "kubetune"  # the release name holds the chart name, so the prefix is the release name alone
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
POD_MONITOR_API = "monitoring.coreos.com/v1/PodMonitor"
HELM_METADATA = ("labels", "annotations")
SCENARIOS = sorted(path.stem.removesuffix("-values") for path in CI_VALUES_DIR.glob("*-values.yaml"))


def scenario_file(scenario: str) -> Path:
    return CI_VALUES_DIR / f"{scenario}-values.yaml"


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    """Every ci/ scenario rendered once: {scenario: objects}."""
    return {scenario: render_chart([scenario_file(scenario)], release=RELEASE) for scenario in SCENARIOS}


def kinds_and_names(objects: Objects) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


def operator_pod_spec(objects: Objects) -> dict[str, Any]:
    spec: dict[str, Any] = find_object(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def operator_container(objects: Objects) -> dict[str, Any]:
    (container,) = operator_pod_spec(objects)["containers"]
    return dict(container)


def operator_env(objects: Objects) -> dict[str, str]:
    return {item["name"]: item["value"] for item in operator_container(objects)["env"]}


def without_helm_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: value for key, value in obj["metadata"].items() if key not in HELM_METADATA}
    return {**obj, "metadata": metadata}


# ---------------------------------------------------------------------------------------------------------------------
# Lint and the objects of each scenario.


def test_every_scenario_is_named() -> None:
    assert set(SCENARIOS) >= {"default", "namespaced", "monitoring", "ha"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict_passes(scenario: str) -> None:
    result = run_helm("lint", "--strict", str(CHART_DIR), "--values", str(scenario_file(scenario)), check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


COMMON_OBJECTS = {
    ("ServiceAccount", FULLNAME),
    ("Deployment", FULLNAME),
    ("Service", f"{FULLNAME}-metrics"),
    ("ConfigMap", f"{FULLNAME}-dashboard"),
    ("CustomResourceDefinition", "finetunejobs.kubetune.io"),
    ("ClusterRole", f"{FULLNAME}-edit"),
    ("ClusterRole", f"{FULLNAME}-view"),
    ("ClusterRole", f"{FULLNAME}-trainer"),
    ("ValidatingAdmissionPolicy", f"{FULLNAME}-trainer-own-job"),
    ("ValidatingAdmissionPolicyBinding", f"{FULLNAME}-trainer-own-job"),
}
CLUSTER_RBAC = {("ClusterRole", f"{FULLNAME}-operator"), ("ClusterRoleBinding", f"{FULLNAME}-operator")}
NAMESPACED_RBAC = {("Role", f"{FULLNAME}-operator"), ("RoleBinding", f"{FULLNAME}-operator")}
PEERING_CRDS = {
    ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
    ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
}
MONITORS = {("ServiceMonitor", f"{FULLNAME}-operator"), ("PodMonitor", f"{FULLNAME}-trainers")}
PDB = {("PodDisruptionBudget", FULLNAME)}

EXPECTED_OBJECTS = {
    "default": COMMON_OBJECTS | CLUSTER_RBAC,
    "namespaced": COMMON_OBJECTS | NAMESPACED_RBAC,
    "monitoring": COMMON_OBJECTS | CLUSTER_RBAC | MONITORS,
    "ha": COMMON_OBJECTS | CLUSTER_RBAC | PEERING_CRDS | PDB,
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED_OBJECTS))
def test_scenario_renders_exactly_its_objects(rendered: dict[str, Objects], scenario: str) -> None:
    objects = rendered[scenario]

    assert kinds_and_names(objects) == EXPECTED_OBJECTS[scenario]
    assert all(
        o["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        for o in objects
        if o["kind"] not in ("Role", "RoleBinding")
    )


def test_namespaced_scenario_puts_a_role_and_binding_in_each_watched_namespace(rendered: dict[str, Objects]) -> None:
    objects = rendered["namespaced"]
    watched = yaml.safe_load(scenario_file("namespaced").read_text())["watchNamespaces"]

    for kind in ("Role", "RoleBinding"):
        assert sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == kind) == sorted(watched)


# ---------------------------------------------------------------------------------------------------------------------
# Hardened defaults of the operator Deployment.


def test_pod_runs_as_non_root_with_runtime_default_seccomp(rendered: dict[str, Objects]) -> None:
    pod = operator_pod_spec(rendered["default"])

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_container_is_locked_down(rendered: dict[str, Objects]) -> None:
    context = operator_container(rendered["default"])["securityContext"]

    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_tmp_is_a_writable_empty_dir_on_the_read_only_root(rendered: dict[str, Objects]) -> None:
    objects = rendered["default"]
    mounts = {m["name"]: m["mountPath"] for m in operator_container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in operator_pod_spec(objects)["volumes"]}

    assert mounts == {"tmp": "/tmp"}
    assert "emptyDir" in volumes["tmp"]


def test_probes_hit_the_health_endpoint_the_operator_serves(rendered: dict[str, Objects]) -> None:
    container = operator_container(rendered["default"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    settings = OperatorSettings.from_env(operator_env(rendered["default"]))

    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ports["health"] == settings.health_port
    assert settings.liveness_endpoint is not None
    assert settings.liveness_endpoint.endswith(f":{ports['health']}/healthz")


def test_resources_and_image_are_set(rendered: dict[str, Objects]) -> None:
    container = operator_container(rendered["default"])

    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_image_digests_pin_both_images_over_their_tags() -> None:
    operator_digest, trainer_digest = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    values = {
        "image": {"repository": "registry.example/kubetune/operator", "tag": "1.0", "digest": operator_digest},
        "trainer": {"image": {"repository": "registry.example/kubetune/trainer", "digest": trainer_digest}},
    }

    objects = render_chart(values=values, release=RELEASE)

    assert operator_container(objects)["image"] == f"registry.example/kubetune/operator@{operator_digest}"
    assert operator_env(objects)["KUBETUNE_TRAINER_IMAGE"] == f"registry.example/kubetune/trainer@{trainer_digest}"


def test_a_digest_that_is_not_sha256_is_refused_by_the_values_schema() -> None:
    with pytest.raises(HelmError, match="digest"):
        render_chart(values={"image": {"repository": "r", "digest": "latest"}}, release=RELEASE)


def test_placement_values_reach_the_operator_pod() -> None:
    placement = {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "priorityClassName": "system-cluster-critical",
    }

    pod = operator_pod_spec(render_chart(values=placement, release=RELEASE))

    for key, value in placement.items():
        assert pod[key] == value


def test_standalone_operator_is_replaced_not_rolled(rendered: dict[str, Objects]) -> None:
    deployment = find_object(rendered["default"], "Deployment")

    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert operator_env(rendered["default"])["KUBETUNE_STANDALONE"] == "true"


def test_ha_operator_peers_and_rolls(rendered: dict[str, Objects]) -> None:
    deployment = find_object(rendered["ha"], "Deployment")
    settings = OperatorSettings.from_env(operator_env(rendered["ha"]))

    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert settings.standalone is False
    assert settings.peering_name == "kubetune-ha"
    assert find_object(rendered["ha"], "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_peering_can_be_asked_for_with_one_replica() -> None:
    objects = render_chart(values={"peering": {"enabled": True}}, release=RELEASE)

    assert OperatorSettings.from_env(operator_env(objects)).standalone is False
    assert kinds_and_names(objects) >= PEERING_CRDS
    assert not any(o["kind"] == "PodDisruptionBudget" for o in objects)


def test_selector_keeps_trainer_pods_out() -> None:
    objects = render_chart(release=RELEASE)
    selector = find_object(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    trainer_pod_labels = builders.trainer_labels("some-job")

    assert not all(trainer_pod_labels.get(key) == value for key, value in selector.items())
    assert find_object(objects, "Service")["spec"]["selector"] == selector


# ---------------------------------------------------------------------------------------------------------------------
# Settings: what the Deployment tells the operator must be what the operator accepts and means.


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_accepts_its_environment(rendered: dict[str, Objects], scenario: str) -> None:
    OperatorSettings.from_env(operator_env(rendered[scenario]))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_variable_is_an_operator_setting(rendered: dict[str, Objects], scenario: str) -> None:
    known = {env_name(name) for name in OperatorSettings.model_fields}

    unknown = sorted(set(operator_env(rendered[scenario])) - known)

    assert not unknown, f"the chart sets {unknown}, which operator/kubetune_operator/settings.py does not read"


def test_default_values_mean_the_operator_defaults(rendered: dict[str, Objects]) -> None:
    settings = OperatorSettings.from_env(operator_env(rendered["default"]))

    assert settings.trainer_image == DEFAULT_TRAINER_IMAGE
    assert settings.gpu_node_selector == DEFAULT_GPU_NODE_SELECTOR
    assert [t.to_wire() for t in settings.gpu_tolerations] == DEFAULT_GPU_TOLERATIONS
    assert settings.clusterwide
    assert settings.metrics_port == 8080
    assert settings.s3_endpoint is None
    assert settings.s3_credentials_secret is None


def test_namespaced_values_reach_the_operator(rendered: dict[str, Objects]) -> None:
    settings = OperatorSettings.from_env(operator_env(rendered["namespaced"]))

    assert settings.namespaces == ("team-a", "team-b")
    assert settings.s3_endpoint == "http://minio.storage.svc:9000"
    assert settings.s3_region == "us-east-1"
    assert settings.s3_credentials_secret == "s3-credentials"


def test_trainer_values_reach_the_operator() -> None:
    trainer = {
        "image": {"repository": "registry.local/trainer", "tag": "dev"},
        "gpuNodeSelector": {"pool": "a100"},
        "gpuTolerations": [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute"}],
        "metricsPort": 9400,
        "progressIntervalSeconds": 30,
    }

    settings = OperatorSettings.from_env(operator_env(render_chart(values={"trainer": trainer}, release=RELEASE)))

    assert settings.trainer_image == "registry.local/trainer:dev"
    # Helm merges maps with the defaults; null removes a default key, as documented in the README.
    assert settings.gpu_node_selector == {**DEFAULT_GPU_NODE_SELECTOR, "pool": "a100"}
    assert [t.to_wire() for t in settings.gpu_tolerations] == trainer["gpuTolerations"]
    assert settings.trainer_metrics_port == 9400
    assert settings.progress_interval_seconds == 30


def test_metrics_off_turns_off_the_endpoint_and_its_service() -> None:
    objects = render_chart(values={"metrics": {"enabled": False}}, release=RELEASE)

    assert OperatorSettings.from_env(operator_env(objects)).metrics_port == 0
    assert not any(o["kind"] == "Service" for o in objects)
    assert "metrics" not in {port["name"] for port in operator_container(objects)["ports"]}


def test_metrics_and_health_ports_must_differ() -> None:
    with pytest.raises(HelmError, match=r"metrics\.port and healthPort are both 9000"):
        render_chart(values={"metrics": {"port": 9000}, "healthPort": 9000}, release=RELEASE)


def test_metrics_service_targets_the_metrics_port(rendered: dict[str, Objects]) -> None:
    service = find_object(rendered["default"], "Service")
    ports = {port["name"]: port["containerPort"] for port in operator_container(rendered["default"])["ports"]}

    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics"
    assert port["targetPort"] == "metrics"
    assert ports["metrics"] == OperatorSettings.from_env(operator_env(rendered["default"])).metrics_port


# ---------------------------------------------------------------------------------------------------------------------
# CRDs: one source, copied into the chart, rendered unchanged apart from Helm's metadata.


def test_chart_crd_copies_match_their_sources() -> None:
    assert check_chart_crd_copies() == []


def test_copy_check_reports_missing_and_stale_copies_and_write_fixes_them(tmp_path: Path) -> None:
    missing = check_chart_crd_copies(tmp_path)
    written = write_chart_crd_copies(tmp_path)
    fresh = check_chart_crd_copies(tmp_path)
    (tmp_path / "crds" / "kopf.dev_peerings.yaml").write_text("# edited by hand\n")
    stale = check_chart_crd_copies(tmp_path)

    assert len(missing) == 3
    assert all("does not exist; run `make crds`" in problem for problem in missing)
    assert sorted(str(path.relative_to(tmp_path)) for path in written) == [
        "crds/kopf.dev_peerings.yaml",
        "crds/kubetune.io_finetunejobs.yaml",
        "trainer-policy.yaml",
    ]
    assert fresh == []
    assert len(stale) == 1
    assert "kopf.dev_peerings.yaml differs from its source" in stale[0]


def test_rendered_crd_is_the_generated_crd(rendered: dict[str, Objects]) -> None:
    crd = find_object(rendered["default"], "CustomResourceDefinition", "finetunejobs.kubetune.io")

    assert without_helm_metadata(crd) == build_crd()
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crd_keep_can_be_turned_off() -> None:
    objects = render_chart(values={"crds": {"keep": False}}, release=RELEASE)

    crd = find_object(objects, "CustomResourceDefinition", "finetunejobs.kubetune.io")
    assert "annotations" not in crd["metadata"]


def test_crd_install_can_be_turned_off() -> None:
    objects = render_chart(values={"crds": {"install": False}}, release=RELEASE)

    assert not any(o["kind"] == "CustomResourceDefinition" for o in objects)


def test_peering_crds_are_kopfs_and_kept(rendered: dict[str, Objects]) -> None:
    expected = [doc for doc in yaml.safe_load_all(PEERING_FILE.read_text()) if doc]
    crds = [o for o in rendered["ha"] if o["metadata"]["name"].endswith(".kopf.dev")]

    assert [without_helm_metadata(crd) for crd in crds] == expected
    assert all(crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"} for crd in crds)


def test_peering_crds_can_be_left_to_another_release() -> None:
    objects = render_chart(values={"replicas": 2, "peering": {"installCrds": False}}, release=RELEASE)

    assert not kinds_and_names(objects) & PEERING_CRDS
    assert OperatorSettings.from_env(operator_env(objects)).standalone is False


def test_a_missing_crd_copy_fails_the_render(tmp_path: Path) -> None:
    chart = copy_chart(tmp_path)
    (chart / "files" / "crds" / "kubetune.io_finetunejobs.yaml").unlink()

    with pytest.raises(HelmError, match=r"files/crds/kubetune.io_finetunejobs.yaml is missing .*make crds"):
        render_chart(chart_dir=chart)


def copy_chart(tmp_path: Path) -> Path:
    return Path(shutil.copytree(CHART_DIR, tmp_path / "kubetune"))


# ---------------------------------------------------------------------------------------------------------------------
# RBAC: exactly operator_rbac_rules(), each rule with a comment saying why.


def test_cluster_role_rules_equal_the_operators_own(rendered: dict[str, Objects]) -> None:
    role = find_object(rendered["default"], "ClusterRole", f"{FULLNAME}-operator")

    assert role["rules"] == operator_rbac_rules()


def test_cluster_role_is_bound_to_the_operator_service_account(rendered: dict[str, Objects]) -> None:
    binding = find_object(rendered["default"], "ClusterRoleBinding")

    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": f"{FULLNAME}-operator",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert operator_pod_spec(rendered["default"])["serviceAccountName"] == FULLNAME


def test_each_namespace_role_has_the_operators_rules_and_nothing_is_cluster_wide(
    rendered: dict[str, Objects],
) -> None:
    objects = rendered["namespaced"]
    roles = [o for o in objects if o["kind"] == "Role"]
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]

    assert roles
    assert all(role["rules"] == operator_rbac_rules() for role in roles)
    assert all(
        b["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}] for b in bindings
    )
    assert all(b["roleRef"]["kind"] == "Role" for b in bindings)
    assert not any(o["kind"] == "ClusterRoleBinding" for o in objects)


# ---------------------------------------------------------------------------------------------------------------------
# The trainers' identity: the ClusterRole the operator binds per namespace and the policy narrowing it per pod.


@pytest.mark.parametrize("scenario", ["default", "namespaced"])
def test_trainer_role_and_policy_match_their_python_source(rendered: dict[str, Objects], scenario: str) -> None:
    objects = rendered[scenario]
    settings = OperatorSettings.from_env(operator_env(objects))
    role = find_object(objects, "ClusterRole", f"{FULLNAME}-trainer")
    policy = find_object(objects, "ValidatingAdmissionPolicy")
    binding = find_object(objects, "ValidatingAdmissionPolicyBinding")

    assert role["rules"] == trainer_rbac_rules()
    assert settings.trainer_cluster_role == role["metadata"]["name"]
    assert settings.trainer_service_account == "kubetune-trainer"
    assert without_helm_metadata(policy) == build_trainer_policy(
        f"{FULLNAME}-trainer-own-job", settings.trainer_service_account
    )
    assert without_helm_metadata(binding) == build_trainer_policy_binding(f"{FULLNAME}-trainer-own-job")


def test_trainer_service_account_value_reaches_the_operator_and_the_policy() -> None:
    objects = render_chart(values={"trainer": {"serviceAccountName": "ml-trainer"}}, release=RELEASE)
    settings = OperatorSettings.from_env(operator_env(objects))

    assert settings.trainer_service_account == "ml-trainer"
    assert (
        find_object(objects, "ValidatingAdmissionPolicy")["spec"]
        == build_trainer_policy("unused", "ml-trainer")["spec"]
    )


def test_every_operator_rule_carries_a_comment() -> None:
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('{{- define "kubetune.operatorRules" -}}', 1)[1].split("{{- end }}", 1)[0]
    lines = block.strip().splitlines()

    rule_starts = [number for number, line in enumerate(lines) if line.startswith("- apiGroups:")]
    assert len(rule_starts) == len(operator_rbac_rules())
    assert all(lines[number - 1].startswith("# ") for number in rule_starts)


def test_user_roles_aggregate_into_the_built_in_roles(rendered: dict[str, Objects]) -> None:
    edit = find_object(rendered["default"], "ClusterRole", f"{FULLNAME}-edit")
    view = find_object(rendered["default"], "ClusterRole", f"{FULLNAME}-view")

    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert not any("patch" in rule["verbs"] for rule in edit["rules"] if "finetunejobs/status" in rule["resources"])


# ---------------------------------------------------------------------------------------------------------------------
# Monitoring: gated by values and by the monitoring.coreos.com API.


MONITORS_ON = {"monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}


def test_monitors_need_the_prometheus_operator_api() -> None:
    without_api = render_chart(values=MONITORS_ON, release=RELEASE)
    with_api = render_chart(values=MONITORS_ON, release=RELEASE, api_versions=[SERVICE_MONITOR_API, POD_MONITOR_API])

    assert not kinds_and_names(without_api) & MONITORS
    assert kinds_and_names(with_api) >= MONITORS


def test_monitors_stay_off_unless_enabled() -> None:
    objects = render_chart(release=RELEASE, api_versions=[SERVICE_MONITOR_API, POD_MONITOR_API])

    assert not kinds_and_names(objects) & MONITORS


def test_service_monitor_scrapes_the_metrics_service_keeping_job_labels(rendered: dict[str, Objects]) -> None:
    objects = rendered["monitoring"]
    monitor = find_object(objects, "ServiceMonitor")
    service = find_object(objects, "Service")

    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["honorLabels"] is True
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def finetunejob(name: str = "demo") -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {
                "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://out/demo"},
            },
        }
    )


def test_pod_monitor_selects_the_trainer_pods_the_operator_builds(rendered: dict[str, Objects]) -> None:
    objects = rendered["monitoring"]
    monitor = find_object(objects, "PodMonitor")
    settings = OperatorSettings.from_env(operator_env(objects))

    pod_template = builders.build_trainer_job(finetunejob(), settings)["spec"]["template"]
    (container,) = pod_template["spec"]["containers"]

    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_template["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {port["name"] for port in container["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_pod_monitor_watches_only_the_watched_namespaces() -> None:
    values = {**MONITORS_ON, "watchNamespaces": ["team-a"]}

    objects = render_chart(values=values, release=RELEASE, api_versions=[POD_MONITOR_API])

    assert find_object(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_pod_monitor_goes_when_trainers_serve_no_metrics() -> None:
    values = {**MONITORS_ON, "trainer": {"metricsPort": 0}}

    objects = render_chart(values=values, release=RELEASE, api_versions=[POD_MONITOR_API])

    assert not any(o["kind"] == "PodMonitor" for o in objects)


def test_dashboard_config_map_carries_the_dashboard_and_sidecar_label(rendered: dict[str, Objects]) -> None:
    config_map = find_object(rendered["monitoring"], "ConfigMap")

    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert config_map["data"]["kubetune.json"] == (CHART_DIR / "dashboards" / "kubetune.json").read_text().rstrip("\n")


def test_dashboard_label_and_namespace_are_configurable() -> None:
    values = {"dashboards": {"label": "grafana.io/dashboard", "labelValue": "kubetune", "namespace": "monitoring"}}

    config_map = find_object(render_chart(values=values, release=RELEASE), "ConfigMap")

    assert config_map["metadata"]["labels"]["grafana.io/dashboard"] == "kubetune"
    assert config_map["metadata"]["namespace"] == "monitoring"


# ---------------------------------------------------------------------------------------------------------------------
# values.yaml documentation and values.schema.json.


def value_lines(text: str) -> Iterator[tuple[int, list[str], bool]]:
    """(line number, key path, documented) for each key in a block-style values.yaml. A key is documented when a
    `# --` comment block stands right above it, or above one of its ancestors."""
    parents: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment_block: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        match = re.match(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/\"]+):(\s|$)", line)
        if match is None:
            comment_block = [] if not stripped else comment_block
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        documented = any(c.startswith("# --") for c in comment_block) or any(p[2] for p in parents)
        path = [*(p[1] for p in parents), match["key"].strip('"')]
        yield number, path, documented
        parents.append((indent, match["key"].strip('"'), documented))
        comment_block = []


def leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return {path for key, item in value.items() for path in leaf_paths(item, (*prefix, key))}
    return {prefix}


def test_every_value_has_a_helm_docs_comment() -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    leaves = leaf_paths(yaml.safe_load(text))

    seen = {tuple(path): (number, documented) for number, path, documented in value_lines(text)}
    undocumented = sorted(f"line {seen[leaf][0]}: {'.'.join(leaf)}" for leaf in leaves if not seen[leaf][1])

    assert leaves <= seen.keys(), f"value lines not recognised: {sorted(leaves - seen.keys())}"
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_the_comment_check_notices_an_undocumented_value() -> None:
    text = "image:\n  # -- Repository.\n  repository: x\n  tag: y\n"

    documented = {".".join(path): flag for _, path, flag in value_lines(text)}

    assert documented == {"image": False, "image.repository": True, "image.tag": False}


def schema_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    properties = schema.get("properties")
    if not properties:
        return {prefix}
    return {path for key, sub in properties.items() for path in schema_paths(sub, (*prefix, key))}


def test_schema_covers_every_value() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    covered = schema_paths(schema)

    uncovered = [leaf for leaf in leaf_paths(values) if not any(leaf[: len(path)] == path for path in covered)]

    assert not uncovered


BAD_VALUES = [
    pytest.param({"replicas": "two"}, "/replicas", "want integer", id="replicas-string"),
    pytest.param({"replicas": 0}, "/replicas", "minimum", id="replicas-zero"),
    pytest.param({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0", "does not match pattern", id="namespace-name"),
    pytest.param({"metrics": {"port": 70000}}, "/metrics/port", "maximum", id="metrics-port"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "value must be one of", id="pull"),
    pytest.param({"s3": {"endpoint": "minio:9000"}}, "/s3/endpoint", "does not match pattern", id="s3-endpoint"),
    pytest.param({"replica": 2}, "additional properties 'replica' not allowed", "", id="typo"),
    pytest.param(
        {"trainer": {"gpuTolerations": [{"effect": "Sometimes"}]}}, "/trainer/gpuTolerations/0/effect", "", id="tol"
    ),
]


@pytest.mark.parametrize(("values", "where", "what"), BAD_VALUES)
def test_schema_refuses_bad_values_naming_where(values: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(HelmError) as refused:
        render_chart(values=values, release=RELEASE)

    assert "values don't meet the specifications of the schema" in refused.value.stderr
    assert where in refused.value.stderr
    assert what in refused.value.stderr


# ---------------------------------------------------------------------------------------------------------------------
# NOTES.txt


def render_notes(tmp_path: Path, values: dict[str, Any] | None = None) -> str:
    """NOTES.txt as `helm install` prints it. `helm template` skips NOTES.txt and `helm install --dry-run` needs a
    cluster, so a copy of the chart renders the same file through `tpl` into a ConfigMap."""
    chart = copy_chart(tmp_path)
    (chart / "files" / "notes.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-preview.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/notes.txt") . | quote }}\n'
    )
    objects = render_chart(values=values, release=RELEASE, chart_dir=chart)
    return str(find_object(objects, "ConfigMap", "notes")["data"]["notes"])


def test_notes_tell_the_user_what_to_do_next(tmp_path: Path) -> None:
    notes = render_notes(tmp_path)

    assert f"rollout status deployment/{FULLNAME}" in notes
    assert "kubectl -n <namespace> get ftj -w" in notes
    assert f"service/{FULLNAME}-metrics" in notes
    assert "every namespace" in notes


def test_notes_explain_a_monitor_that_was_skipped(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, {"monitoring": {"serviceMonitor": {"enabled": True}}})

    assert "no\n   ServiceMonitor was created" in notes
    assert "monitoring.skipCapabilityCheck=true" in notes
