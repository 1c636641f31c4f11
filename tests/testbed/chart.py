"""The Helm chart on the test bed: render it with the built helm, install it into a control plane, get the operator's
ServiceAccount kubeconfig (to run the operator with exactly the chart's RBAC)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import REPO_ROOT, cache_dir, testbed_binary

CHART_DIR = REPO_ROOT / "charts" / "kubetune"
CI_VALUES_DIR = CHART_DIR / "ci"
HELM_TIMEOUT_SECONDS = 180


class HelmError(RuntimeError):
    """helm exited non-zero; the message holds the command and helm's stderr."""

    def __init__(self, args: Sequence[str], stderr: str) -> None:
        super().__init__(f"helm {' '.join(args)} failed:\n{stderr.strip()}")
        self.stderr = stderr


def helm_environment() -> dict[str, str]:
    """The environment for helm: its cache, config and data under the test-bed cache, never the user's home."""
    home = cache_dir() / "helm-home"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HELM_", "KUBECONFIG"))}
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return env


def run_helm(*args: str, kubeconfig: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the test bed's helm; HelmError with its stderr when it fails and check is set."""
    argv = [testbed_binary("helm"), *args]
    if kubeconfig:
        argv.append(f"--kubeconfig={kubeconfig}")
    result = subprocess.run(
        argv, capture_output=True, text=True, env=helm_environment(), timeout=HELM_TIMEOUT_SECONDS, check=False
    )
    if check and result.returncode != 0:
        raise HelmError(args, result.stderr)
    return result


def run_helm_with_values(
    *args: str,
    values_files: Iterable[Path] = (),
    values: Mapping[str, Any] | None = None,
    kubeconfig: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run helm with values files, then an inline values document (written to a file) that wins over them."""
    with tempfile.TemporaryDirectory(prefix="kubetune-values-") as scratch:
        files = [*values_files]
        if values:
            inline = Path(scratch) / "values.yaml"
            inline.write_text(yaml.safe_dump(dict(values)))
            files.append(inline)
        values_flags = [arg for path in files for arg in ("--values", str(path))]
        return run_helm(*args, *values_flags, kubeconfig=kubeconfig, check=check)


def render_chart(
    values_files: Iterable[Path] = (),
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "kubetune",
    namespace: str = "kubetune-system",
    api_versions: Iterable[str] = (),
    chart_dir: Path = CHART_DIR,
) -> list[dict[str, Any]]:
    """`helm template` of the chart as a list of objects (empty documents dropped)."""
    api_flags = [arg for version in api_versions for arg in ("--api-versions", version)]
    rendered = run_helm_with_values(
        "template",
        release,
        str(chart_dir),
        "--namespace",
        namespace,
        *api_flags,
        values_files=values_files,
        values=values,
    ).stdout
    return [document for document in yaml.safe_load_all(rendered) if document]


def find_object(objects: Iterable[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of that kind (and name); AssertionError listing what there is otherwise."""
    matches = [dict(o) for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(matches) != 1:
        present = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(matches)} among {present}")
    return matches[0]


def adopt_into_release(kube: ControlPlane, resource: str, name: str, release: str, namespace: str) -> bool:
    """Give an existing cluster-scoped object (e.g. a CRD applied by another test) Helm's ownership metadata, so
    that the release can take it over instead of refusing to install. False when the object does not exist."""
    if kube.kubectl("get", resource, name, "-o", "name").returncode != 0:
        return False
    kube.kubectl("label", "--overwrite", resource, name, "app.kubernetes.io/managed-by=Helm", check=True)
    kube.kubectl(
        "annotate",
        "--overwrite",
        resource,
        name,
        f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}",
        check=True,
    )
    return True


def rendered_crd_names(objects: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the CustomResourceDefinitions among rendered objects."""
    return [o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"]


@dataclass(frozen=True)
class ChartRelease:
    """An installed release of the chart on a test-bed control plane."""

    kube: ControlPlane
    name: str
    namespace: str
    objects: list[dict[str, Any]]

    @property
    def service_account(self) -> str:
        """Name of the operator's ServiceAccount."""
        deployment = find_object(self.objects, "Deployment")
        return str(deployment["spec"]["template"]["spec"]["serviceAccountName"])

    def operator_kubeconfig(self) -> str:
        """A kubeconfig with a real token of the operator's ServiceAccount: exactly the chart's RBAC."""
        return self.kube.service_account_kubeconfig(self.namespace, self.service_account)

    def operator_env(self) -> dict[str, str]:
        """The KUBETUNE_* environment the chart gives the operator container. To run the operator as a local process
        with it, also set KUBECONFIG to operator_kubeconfig() and free ports for the metrics and health endpoints."""
        deployment = find_object(self.objects, "Deployment")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return {item["name"]: item["value"] for item in container["env"]}

    def upgrade(
        self, values: Mapping[str, Any] | None = None, *, chart_dir: Path = CHART_DIR, values_files: Iterable[Path] = ()
    ) -> ChartRelease:
        """`helm upgrade` to this chart directory and values; the release as it now is."""
        objects = render_chart(values_files, values, release=self.name, namespace=self.namespace, chart_dir=chart_dir)
        run_helm_with_values(
            "upgrade",
            self.name,
            str(chart_dir),
            "--namespace",
            self.namespace,
            values_files=values_files,
            values=values,
            kubeconfig=self.kube.kubeconfig,
        )
        return ChartRelease(self.kube, self.name, self.namespace, objects)

    def is_installed(self) -> bool:
        """Whether helm still knows the release."""
        status = run_helm(
            "status", self.name, "--namespace", self.namespace, kubeconfig=self.kube.kubeconfig, check=False
        )
        return status.returncode == 0

    def uninstall(self) -> None:
        """`helm uninstall` (objects with helm.sh/resource-policy: keep stay)."""
        run_helm("uninstall", self.name, "--namespace", self.namespace, kubeconfig=self.kube.kubeconfig)


def install_chart(
    kube: ControlPlane,
    release: str,
    namespace: str,
    values: Mapping[str, Any] | None = None,
    *,
    values_files: Iterable[Path] = (),
    chart_dir: Path = CHART_DIR,
) -> ChartRelease:
    """`helm install` into the test bed (creating the namespace). CRDs that already exist, because another test
    applied them to this shared control plane, are adopted into the release first."""
    objects = render_chart(values_files, values, release=release, namespace=namespace, chart_dir=chart_dir)
    for crd in rendered_crd_names(objects):
        adopt_into_release(kube, "customresourcedefinition", crd, release, namespace)
    run_helm_with_values(
        "install",
        release,
        str(chart_dir),
        "--namespace",
        namespace,
        "--create-namespace",
        values_files=values_files,
        values=values,
        kubeconfig=kube.kubeconfig,
    )
    return ChartRelease(kube, release, namespace, objects)
