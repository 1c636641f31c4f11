"""The Helm chart installed into a real kube-apiserver: every object accepted, the CRD Established, the operator's own
token allowed exactly what the operator needs, the CRD updated by `helm upgrade` and kept by `helm uninstall`."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator.rbac import operator_rbac_rules
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.trainer_identity import build_namespace_identity

from kubetune.crd import CRD_NAME
from tests.testbed.chart import CHART_DIR, CI_VALUES_DIR, ChartRelease, install_chart
from tests.testbed.controlplane import ControlPlane

pytestmark = pytest.mark.integration

CLUSTER_SCOPED = {"clusterkopfpeerings"}
PEERING_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def create_namespace(kube: ControlPlane, name: str) -> str:
    kube.kubectl("create", "namespace", name, check=True)
    return name


@pytest.fixture(scope="module")
def jobs_namespace(kube: ControlPlane) -> str:
    """A namespace where FineTuneJobs (and so the operator's children) would live."""
    return create_namespace(kube, unique("jobs"))


@pytest.fixture(scope="module")
def release(kube: ControlPlane) -> Iterator[ChartRelease]:
    """The chart with default values, installed cluster-wide; the last test of this module uninstalls it."""
    installed = install_chart(kube, unique("kt"), unique("kubetune-system"))
    yield installed
    if installed.is_installed():
        installed.uninstall()


@pytest.fixture(scope="module")
def operator_api(release: ChartRelease) -> Any:
    """An API client holding a real token of the chart's operator ServiceAccount."""
    return release.kube.api_client(release.operator_kubeconfig())


def access(api_client: Any, verb: str, resource: str, namespace: str = "", group: str = "", name: str = "") -> bool:
    """SelfSubjectAccessReview: whether the client's identity may do verb on group/resource[/subresource]."""
    from kubernetes import client

    plural, _, subresource = resource.partition("/")
    review = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=plural, subresource=subresource, namespace=namespace, name=name
            )
        )
    )
    return bool(client.AuthorizationV1Api(api_client).create_self_subject_access_review(review).status.allowed)


def needed_permissions(namespace: str) -> list[tuple[str, str, str, str]]:
    """(verb, group, resource, namespace) for every permission in operator_rbac_rules()."""
    return [
        (verb, group, resource, "" if resource in CLUSTER_SCOPED else namespace)
        for rule in operator_rbac_rules()
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]


# (verb, group, resource): what a compromised operator must not be able to do.
FORBIDDEN = [
    ("get", "", "secrets"),
    ("list", "", "secrets"),
    ("watch", "", "secrets"),
    ("create", "", "pods"),
    ("create", "", "pods/exec"),
    ("delete", "", "pods"),
    ("create", "", "configmaps"),
    ("delete", "", "configmaps"),
    ("update", "", "configmaps"),
    ("get", "", "serviceaccounts"),
    ("delete", "", "serviceaccounts"),
    ("delete", "batch", "jobs"),
    ("delete", "kubetune.io", "finetunejobs"),
    ("create", "kubetune.io", "finetunejobs"),
    ("update", "kubetune.io", "finetunejobs"),
    ("create", "rbac.authorization.k8s.io", "roles"),
    ("delete", "rbac.authorization.k8s.io", "roles"),
    ("delete", "rbac.authorization.k8s.io", "rolebindings"),
    ("escalate", "rbac.authorization.k8s.io", "roles"),
    ("bind", "rbac.authorization.k8s.io", "roles"),
    ("create", "", "serviceaccounts/token"),
]
FORBIDDEN_CLUSTER_WIDE = [
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("delete", "", "nodes"),
    ("list", "", "namespaces"),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("create", "admissionregistration.k8s.io", "validatingwebhookconfigurations"),
    ("delete", "admissionregistration.k8s.io", "validatingadmissionpolicies"),
    ("delete", "admissionregistration.k8s.io", "validatingadmissionpolicybindings"),
    ("bind", "rbac.authorization.k8s.io", "clusterroles"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Install


def test_every_rendered_object_is_in_the_cluster(release: ChartRelease, tmp_path: Path) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(release.objects))

    result = release.kube.kubectl("get", "-f", str(manifest), "-o", "name")

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == len(release.objects)


def test_crd_is_established(release: ChartRelease) -> None:
    result = release.kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")

    assert result.returncode == 0, result.stderr


def test_a_finetunejob_is_accepted_once_installed(release: ChartRelease, jobs_namespace: str) -> None:
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "chart-smoke", "namespace": jobs_namespace},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/chart-smoke"},
        },
    }

    release.kube.apply(job)

    stored = json.loads(release.kube.kubectl("get", "ftj", "chart-smoke", "-n", jobs_namespace, "-o", "json").stdout)
    assert stored["spec"]["method"] == "qlora"


# ---------------------------------------------------------------------------------------------------------------------
# The operator's token: allowed what it needs, refused the rest


def test_operator_token_may_do_everything_it_needs(operator_api: Any, jobs_namespace: str) -> None:
    denied = [p for p in needed_permissions(jobs_namespace) if not access(operator_api, p[0], p[2], p[3], p[1])]

    assert not denied


@pytest.mark.parametrize(("verb", "group", "resource"), FORBIDDEN)
def test_operator_token_is_refused_in_a_namespace(
    operator_api: Any, jobs_namespace: str, verb: str, group: str, resource: str
) -> None:
    assert not access(operator_api, verb, resource, jobs_namespace, group)


@pytest.mark.parametrize(("verb", "group", "resource"), FORBIDDEN_CLUSTER_WIDE)
def test_operator_token_is_refused_cluster_wide(operator_api: Any, verb: str, group: str, resource: str) -> None:
    assert not access(operator_api, verb, resource, "", group)


def chart_settings(release: ChartRelease) -> OperatorSettings:
    """The operator's settings as the release's Deployment gives them."""
    deployment = next(o for o in release.objects if o["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return OperatorSettings.from_env({item["name"]: item["value"] for item in container["env"]})


def test_operator_token_may_create_a_namespaces_trainer_identity(release: ChartRelease, operator_api: Any) -> None:
    from kubernetes import client

    # A namespace of its own: an operator started by another test may already have made the identity where jobs run.
    jobs_namespace = create_namespace(release.kube, unique("identity"))
    settings = chart_settings(release)
    account, binding = build_namespace_identity(jobs_namespace, settings)

    client.CoreV1Api(operator_api).create_namespaced_service_account(jobs_namespace, account)
    created = client.RbacAuthorizationV1Api(operator_api).create_namespaced_role_binding(jobs_namespace, binding)

    assert created.role_ref.name == settings.trainer_cluster_role
    trainer = f"system:serviceaccount:{jobs_namespace}:{settings.trainer_service_account}"
    may = release.kube.kubectl(
        "auth",
        "can-i",
        "patch",
        "finetunejobs.kubetune.io",
        "--subresource=status",
        "-n",
        jobs_namespace,
        f"--as={trainer}",
    )
    may_not = release.kube.kubectl(
        "auth", "can-i", "get", "finetunejobs.kubetune.io", "-n", jobs_namespace, f"--as={trainer}"
    )
    assert may.stdout.strip() == "yes"
    assert may_not.stdout.strip() == "no"


@pytest.mark.parametrize(
    "rules",
    [
        [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"], "verbs": ["delete"]}],
        [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
    ],
    ids=["read-secrets", "delete-finetunejobs", "everything"],
)
def test_operator_token_may_not_bind_more_than_it_holds(
    release: ChartRelease, operator_api: Any, jobs_namespace: str, rules: list[dict[str, Any]]
) -> None:
    from kubernetes import client

    name = unique("greedy")
    release.kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        }
    )
    greedy = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": jobs_namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": jobs_namespace}],
    }

    with pytest.raises(client.ApiException) as refused:
        client.RbacAuthorizationV1Api(operator_api).create_namespaced_role_binding(jobs_namespace, greedy)

    assert refused.value.status == 403
    assert "is attempting to grant RBAC permissions not currently held" in refused.value.body


# ---------------------------------------------------------------------------------------------------------------------
# Upgrade and uninstall (in this order: the last test uninstalls the module's release)


def crd_printer_columns(kube: ControlPlane) -> list[str]:
    crd = json.loads(kube.kubectl("get", "crd", CRD_NAME, "-o", "json", check=True).stdout)
    return [column["name"] for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]]


def chart_with_extra_printer_column(tmp_path: Path) -> Path:
    """A copy of the chart whose CRD has one more printer column, as a new kubetune version would."""
    chart = Path(shutil.copytree(CHART_DIR, tmp_path / "kubetune"))
    crd_file = chart / "files" / "crds" / "kubetune.io_finetunejobs.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    crd["spec"]["versions"][0]["additionalPrinterColumns"].append(
        {"name": "Stage", "type": "string", "jsonPath": ".status.progress.stage", "description": "Trainer stage."}
    )
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart


def test_upgrade_with_a_changed_crd_updates_it(release: ChartRelease, tmp_path: Path) -> None:
    before = crd_printer_columns(release.kube)
    try:
        release.upgrade(chart_dir=chart_with_extra_printer_column(tmp_path))
        upgraded = crd_printer_columns(release.kube)
    finally:
        # Back to the committed CRD: other tests share this control plane.
        release.upgrade()

    assert "Stage" not in before
    assert upgraded == [*before, "Stage"]
    assert crd_printer_columns(release.kube) == before


def test_uninstall_keeps_the_crd_and_its_finetunejobs(release: ChartRelease, jobs_namespace: str) -> None:
    release.uninstall()

    assert release.kube.kubectl("get", "crd", CRD_NAME).returncode == 0
    assert release.kube.kubectl("get", "ftj", "chart-smoke", "-n", jobs_namespace).returncode == 0
    assert release.kube.kubectl("get", "deployment", "-n", release.namespace, "-o", "name").stdout.strip() == ""
    assert release.kube.kubectl("get", "clusterrole", f"{release.name}-kubetune-operator").returncode != 0


# ---------------------------------------------------------------------------------------------------------------------
# Namespaced, highly available release: Roles in the watched namespaces only, kopf's peering CRDs


@pytest.fixture(scope="module")
def namespaced_release(kube: ControlPlane) -> Iterator[tuple[ChartRelease, str, str]]:
    """Two replicas watching one namespace; the CRD is left to the cluster-wide release. (release, watched, other)."""
    watched = create_namespace(kube, unique("team-a"))
    other = create_namespace(kube, unique("team-b"))
    installed = install_chart(
        kube,
        unique("kt-ns"),
        unique("kubetune-ns"),
        {"watchNamespaces": [watched], "crds": {"install": False}},
        values_files=[CI_VALUES_DIR / "ha-values.yaml"],
    )
    yield installed, watched, other
    installed.uninstall()


def test_namespaced_operator_may_act_in_its_namespace_only(namespaced_release: tuple[ChartRelease, str, str]) -> None:
    release, watched, other = namespaced_release
    api = release.kube.api_client(release.operator_kubeconfig())
    namespaced = [p for p in needed_permissions(watched) if p[3]]

    assert all(access(api, verb, resource, watched, group) for verb, group, resource, _ in namespaced)
    assert not any(access(api, verb, resource, other, group) for verb, group, resource, _ in namespaced)
    assert not access(api, "list", "finetunejobs", "", "kubetune.io")


def test_peering_crds_are_installed_and_established(namespaced_release: tuple[ChartRelease, str, str]) -> None:
    release, watched, _ = namespaced_release
    api = release.kube.api_client(release.operator_kubeconfig())

    for crd in PEERING_CRDS:
        result = release.kube.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        assert result.returncode == 0, result.stderr
    assert access(api, "create", "kopfpeerings", watched, "kopf.dev")
    assert access(api, "patch", "kopfpeerings", watched, "kopf.dev")
