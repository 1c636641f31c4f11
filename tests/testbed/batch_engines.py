"""The batch engines a shared GPU cluster runs beside kubetune: JobSet (multi-node groups of Jobs) and Kueue (quotas,
queues, preemption), as their own controllers built from Go modules, with their CRDs and admission webhooks.

Each controller runs on the host like the control plane. Its webhooks are registered by URL (https://127.0.0.1:PORT)
with a CA made here, where a cluster would use a Service and cert-manager or the controllers' own cert rotation;
what the webhooks do (default a JobSet, suspend a queued Job, validate Kueue's objects) is the same.
"""

from __future__ import annotations

import base64
import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import ManagedProcess, free_port, http_ok, testbed_binary, wait_for

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
KUEUE_API = "kueue.x-k8s.io/v1beta2"
# Kueue's integrations in use: kubetune's single-node trainer (batch/v1 Job) and its multi-node one (JobSet).
KUEUE_FRAMEWORKS = ("batch/job", "jobset.x-k8s.io/jobset")
# The resources whose webhooks Kueue serves with those integrations; the others' webhooks are left out, as a
# deployment without those frameworks (and their CRDs) would.
KUEUE_WEBHOOK_RESOURCES = frozenset(
    {"jobs", "jobsets", "workloads", "workloads/status", "clusterqueues", "cohorts", "resourceflavors"}
)
# JobSet's pod webhooks apply to its own pods only: the selector its kustomize overlay adds.
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
JOBSET_POD_SELECTOR = {"matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]}


@dataclass(frozen=True)
class WebhookCertificate:
    """The serving certificate of a host-run webhook server, and the CA the API server trusts it by."""

    cert_dir: Path
    ca_bundle: str


def write_webhook_certificate(directory: Path) -> WebhookCertificate:
    """A CA and a certificate for 127.0.0.1 signed by it, as tls.crt/tls.key (the names controller-runtime reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.crt", directory / "ca.key"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"]
    subprocess.run(
        ["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-subj", "/CN=webhook-ca",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "req", "-x509", *ec, "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt"),
         "-CA", str(ca_cert), "-CAkey", str(ca_key), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "extendedKeyUsage=serverAuth",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return WebhookCertificate(directory, base64.b64encode(ca_cert.read_bytes()).decode())


def webhook_resources(webhook: dict[str, Any]) -> set[str]:
    """The resources a webhook's rules name."""
    return {resource for rule in webhook.get("rules") or [] for resource in rule.get("resources") or []}


def url_webhooks(
    manifests: str, prefix: str, port: int, ca_bundle: str, keep: frozenset[str] | None = None
) -> list[dict[str, Any]]:
    """The controller's webhook configurations pointed at https://127.0.0.1:PORT instead of its in-cluster Service;
    named `<prefix>-…` (both projects call theirs mutating-webhook-configuration); with `keep`, only the webhooks of
    those resources."""
    configurations = []
    for document in yaml.safe_load_all(manifests):
        if not document:
            continue
        webhooks = []
        for webhook in document["webhooks"]:
            if keep is not None and not webhook_resources(webhook) <= keep:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
            if prefix == "jobset" and webhook_resources(webhook) == {"pods"}:
                webhook["objectSelector"] = JOBSET_POD_SELECTOR
            webhooks.append(webhook)
        document["metadata"] = {"name": f"{prefix}-{document['metadata']['name']}"}
        document["webhooks"] = webhooks
        configurations.append(document)
    return configurations


def bundled_file(name: str) -> str:
    """A manifest build-binaries.sh copied from the controller's module beside its binary."""
    return Path(testbed_binary(name)).read_text()


def install_crds(kube: ControlPlane, file_name: str) -> list[str]:
    """Apply the CRDs (server-side: Kueue's are too big for a last-applied annotation) and wait for them."""
    documents = [doc for doc in yaml.safe_load_all(bundled_file(file_name)) if doc]
    kube.apply("\n---\n".join(yaml.safe_dump(doc) for doc in documents))
    names = [doc["metadata"]["name"] for doc in documents]
    query = '{.status.conditions[?(@.type=="Established")].status}'

    def established(name: str) -> bool:
        # Not `kubectl wait`: it errs on a CRD whose status has no conditions yet instead of waiting.
        return kube.kubectl("get", f"crd/{name}", "-o", f"jsonpath={query}").stdout.strip() == "True"

    for name in names:
        wait_for(functools.partial(established, name), 60, f"CRD {name} from {file_name} to be established")
    return names


@dataclass
class BatchEngines:
    """The JobSet and Kueue controllers, running against one control plane."""

    kube: ControlPlane
    processes: tuple[ManagedProcess, ...] = ()

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def log_tails(self) -> str:
        """The controllers' log tails, for a failing test's report."""
        return "\n\n".join(f"== {p.name} ==\n{p.log_tail()}" for p in self.processes)


def start_controller(
    kube: ControlPlane,
    name: str,
    configuration: dict[str, Any],
    webhooks: list[dict[str, Any]],
    health_port: int,
    flags: tuple[str, ...] = (),
) -> ManagedProcess:
    """Write its configuration, start it, wait until it is ready, then register its webhooks (the API server calls
    them from then on)."""
    config_path = kube.work_dir / f"{name}-config.yaml"
    config_path.write_text(yaml.safe_dump(configuration))
    argv = [testbed_binary(name), f"--config={config_path}", f"--kubeconfig={kube.kubeconfig}", *flags]
    process = ManagedProcess(name, argv, kube.log_dir).start()
    wait_for(
        lambda: process.alive() and http_ok(f"http://127.0.0.1:{health_port}/readyz"),
        120,
        f"the {name} controller's /readyz",
    )
    for document in webhooks:
        kube.apply(document)
    return process


def manager_configuration(api_version: str, webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """The controller-runtime settings both controllers share: one replica, no metrics, our certificate."""
    return {
        "apiVersion": api_version,
        "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
    }


def start_jobset(kube: ControlPlane, certificate: WebhookCertificate) -> ManagedProcess:
    """JobSet's CRD, its controller and its webhooks (defaulting and validating JobSets and their pods)."""
    install_crds(kube, "jobset-crds.yaml")
    webhook_port, health_port = free_port(), free_port()
    configuration = manager_configuration(
        "config.jobset.x-k8s.io/v1alpha1", webhook_port, health_port, certificate.cert_dir
    )
    webhooks = url_webhooks(bundled_file("jobset-webhooks.yaml"), "jobset", webhook_port, certificate.ca_bundle)
    return start_controller(kube, "jobset", configuration, webhooks, health_port)


def start_kueue(kube: ControlPlane, certificate: WebhookCertificate) -> ManagedProcess:
    """Kueue's CRDs, its controller (managing batch/v1 Jobs and JobSets that name a LocalQueue) and its webhooks."""
    install_crds(kube, "kueue-crds.yaml")
    webhook_port, health_port = free_port(), free_port()
    configuration = manager_configuration(
        "config.kueue.x-k8s.io/v1beta2", webhook_port, health_port, certificate.cert_dir
    )
    configuration["integrations"] = {"frameworks": list(KUEUE_FRAMEWORKS)}
    # The test bed's namespaces are per test; Kueue manages only Jobs that name a LocalQueue anyway.
    configuration["manageJobsWithoutQueueName"] = False
    webhooks = url_webhooks(
        bundled_file("kueue-webhooks.yaml"), "kueue", webhook_port, certificate.ca_bundle, KUEUE_WEBHOOK_RESOURCES
    )
    install_kueue_metrics_certificate(certificate)
    # The visibility API (pending workloads by position) is served through the API server's aggregation layer, which
    # the test bed does not set up; on, it would only hold port 8082.
    flags = ("--feature-gates=VisibilityOnDemand=false",)
    return start_controller(kube, "kueue", configuration, webhooks, health_port, flags)


def install_kueue_metrics_certificate(certificate: WebhookCertificate) -> None:
    """Kueue reads its metrics certificate from a fixed path (where its Deployment mounts a Secret) whenever it manages
    no certificates itself, and stops without one; metrics are off here, so any valid pair will do."""
    KUEUE_METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        (KUEUE_METRICS_CERT_DIR / name).write_bytes((certificate.cert_dir / name).read_bytes())


def start_batch_engines(kube: ControlPlane) -> BatchEngines:
    """JobSet first: Kueue's JobSet integration needs the JobSet CRD at its start."""
    certificate = write_webhook_certificate(kube.work_dir / "webhook-pki")
    jobset = start_jobset(kube, certificate)
    try:
        kueue = start_kueue(kube, certificate)
    except BaseException:
        jobset.stop()
        raise
    return BatchEngines(kube, (jobset, kueue))


def gpu_cluster_queue(name: str, namespace: str, gpus: int) -> dict[str, Any]:
    """A ClusterQueue of `gpus` nvidia.com/gpu (flavor `gpu`) for one namespace, preempting lower priorities."""
    return {
        "apiVersion": KUEUE_API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": ["nvidia.com/gpu"],
                    "flavors": [{"name": "gpu", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}],
                }
            ],
        },
    }


def install_gpu_queue(kube: ControlPlane, cluster_queue: str, local_queue: str, namespace: str, gpus: int) -> None:
    """The `gpu` ResourceFlavor, a ClusterQueue of `gpus` GPUs and the namespace's LocalQueue pointing at it."""
    kube.apply({"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": "gpu"}})
    kube.apply(gpu_cluster_queue(cluster_queue, namespace, gpus))
    kube.apply(
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": local_queue, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue},
        }
    )


def install_priority_classes(kube: ControlPlane, values: dict[str, int]) -> None:
    """PriorityClasses by name and value (a pod's is its Workload's priority in Kueue)."""
    for name, value in values.items():
        kube.apply(
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value}
        )
