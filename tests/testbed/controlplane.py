"""A real Kubernetes control plane on loopback: etcd and kube-apiserver, optionally controllers, scheduler and kwok."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.processes import ManagedProcess, free_port, http_ok, testbed_binary, wait_for

ADMIN_TOKEN = "kubetune-testbed-admin"  # loopback-only test credential, never used outside the test bed
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"


def kubeconfig_document(
    server: str, token: str, ca_file: Path, user: str = "admin", namespace: str = "default"
) -> dict[str, Any]:
    """A kubeconfig for `server` authenticating with a bearer token, trusting the API server's self-signed cert."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user, "namespace": namespace}}],
        "current-context": "testbed",
    }


def write_service_account_key(path: Path) -> None:
    """An RSA key pair that signs and verifies service-account tokens (one key for both, as kwok does)."""
    subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver with RBAC, token auth and service-account signing; `start_controllers` adds the rest."""

    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kubetune-testbed-")))
    processes: list[ManagedProcess] = field(default_factory=list)
    server: str = ""
    kubeconfig: str = ""

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def ca_file(self) -> Path:
        """The API server's self-signed serving certificate (it includes IP SAN 127.0.0.1), as a trust anchor."""
        return self.work_dir / "certs" / "apiserver.crt"

    def start(self) -> ControlPlane:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd = self._spawn(
            "etcd",
            [
                testbed_binary("etcd"),
                f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync=true",  # test data: durability costs seconds per test on slow disks
                "--log-level=warn",
            ],
        )
        wait_for(lambda: etcd.alive() and http_ok(f"http://127.0.0.1:{etcd_port}/health"), 60, "etcd /health")

        sa_key = self.work_dir / "sa.key"
        write_service_account_key(sa_key)
        tokens = self.work_dir / "tokens.csv"
        tokens.write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self.server = f"https://127.0.0.1:{api_port}"
        apiserver = self._spawn(
            "kube-apiserver",
            [
                testbed_binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--cert-dir={self.work_dir / 'certs'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--allow-privileged=true",
                # New nodes get a not-ready taint that only node lifecycle (off here: no kubelet heartbeats) lifts.
                "--disable-admission-plugins=TaintNodesByCondition",
                "--enable-priority-and-fairness=false",  # one client at a time here; APF only costs CPU
                "--profiling=false",
                "--v=1",
            ],
        )
        token_header = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        wait_for(
            lambda: apiserver.alive() and http_ok(f"{self.server}/readyz", True, token_header),
            120,
            "kube-apiserver /readyz",
        )
        kubeconfig_path = self.work_dir / "admin.kubeconfig"
        kubeconfig_path.write_text(yaml.safe_dump(kubeconfig_document(self.server, ADMIN_TOKEN, self.ca_file)))
        self.kubeconfig = str(kubeconfig_path)
        return self

    def start_controllers(self) -> None:
        """kube-controller-manager (Jobs → Pods, GC, service accounts) and kube-scheduler."""
        sa_key = self.work_dir / "sa.key"
        self._spawn(
            "kube-controller-manager",
            [
                testbed_binary("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                # No kubelets heartbeat here: node lifecycle would taint every fake node NotReady and evict its pods.
                "--controllers=*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=false",
                "--secure-port=0",
                "--concurrent-job-syncs=20",
                "--concurrent-gc-syncs=20",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                testbed_binary("kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
        )
        # The default ServiceAccount appears once the controller-manager runs: a sign that it is working.
        wait_for(
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default").returncode == 0,
            90,
            "the controller-manager to create the default ServiceAccount",
        )

    def start_kwok(self) -> None:
        """The kwok controller, managing nodes annotated kwok.x-k8s.io/node=fake and the pods bound to them."""
        self._spawn(
            "kwok",
            [
                testbed_binary("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--config={testbed_binary('kwok-stages.yaml')}",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.0/16",
            ],
        )

    def kubectl(
        self, *args: str, input_text: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane as admin."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise FileNotFoundError("kubectl is not on PATH")
        return subprocess.run(
            [kubectl, f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def api_client(self, kubeconfig: str | None = None) -> Any:
        """A kubernetes.client.ApiClient (admin unless another kubeconfig is given)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=kubeconfig or self.kubeconfig)

    def service_account_kubeconfig(
        self, namespace: str, name: str, expiration_seconds: int = 7200, bound_pod: tuple[str, str] | None = None
    ) -> str:
        """A kubeconfig holding a real token of that ServiceAccount, to act with exactly its RBAC; with `bound_pod`
        (name, uid) the token is bound to that pod, as a kubelet-projected one is."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        bound_to = (
            client.V1BoundObjectReference(api_version="v1", kind="Pod", name=bound_pod[0], uid=bound_pod[1])
            if bound_pod
            else None
        )
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[self.server], expiration_seconds=expiration_seconds, bound_object_ref=bound_to
            )
        )
        token = core.create_namespaced_service_account_token(name, namespace, request).status.token
        suffix = f"-{bound_pod[0]}" if bound_pod else ""
        path = self.work_dir / f"sa-{namespace}-{name}{suffix}.kubeconfig"
        document = kubeconfig_document(
            self.server, token, self.ca_file, user=f"{namespace}-{name}", namespace=namespace
        )
        path.write_text(yaml.safe_dump(document))
        return str(path)

    def apply(self, manifest: dict[str, Any] | str) -> str:
        """kubectl apply (server-side) of one manifest; returns kubectl's output, raising with its stderr."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        result = self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=text)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl apply failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def failed_process_logs(self) -> str:
        """Log tails of processes that died, for a failing test's report."""
        return "\n\n".join(f"== {p.name} ==\n{p.log_tail()}" for p in self.processes if not p.running())

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        env = {key: value for key, value in os.environ.items() if not key.startswith("KUBECONFIG")}
        process = ManagedProcess(name, argv, self.log_dir, env=env).start()
        self.processes.append(process)
        return process


def decode_secret_value(value: str) -> str:
    return base64.b64decode(value).decode()
