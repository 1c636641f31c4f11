"""A real Kubernetes control plane: etcd and kube-apiserver, optionally controllers, scheduler and kwok."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.processes import ManagedProcess, free_port, http_ok, testbed_binary, wait_for

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# How long a node may miss heartbeats before node lifecycle marks it Unknown (Kubernetes' default: 40 s).
NODE_MONITOR_GRACE_SECONDS = 20
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"  # the API server's identity towards kubelets (logs, exec)


def kubeconfig_document(
    server: str,
    token: str | None,
    ca_file: Path,
    user: str = "admin",
    namespace: str = "default",
    client_certificate: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """A kubeconfig for `server` authenticating with a bearer token or a client (certificate, key), trusting the API
    server's self-signed cert."""
    credentials: dict[str, str] = {"token": token} if token else {}
    if client_certificate:
        credentials = {"client-certificate": str(client_certificate[0]), "client-key": str(client_certificate[1])}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user, "namespace": namespace}}],
        "current-context": "testbed",
    }


def write_service_account_key(path: Path) -> None:
    """An RSA key pair that signs and verifies service-account tokens (one key for both, as kwok does)."""
    subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True)


def certificate_subject(user: str, groups: tuple[str, ...] = ()) -> str:
    """An openssl -subj for a Kubernetes client identity: the API server reads CN as the user, each O as a group."""
    return "".join(f"/O={group}" for group in groups) + f"/CN={user}"


def write_client_ca(directory: Path) -> tuple[Path, Path]:
    """A CA (EC P-256: instant to generate) whose certificates the API server and kubelets accept as identities."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "client-ca.crt", directory / "client-ca.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", "/CN=kubetune-testbed-client-ca"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def issue_client_certificate(
    ca: tuple[Path, Path], directory: Path, user: str, groups: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A client certificate and key for `user` in `groups`, signed by the client CA `ca` (certificate, key)."""
    stem = user.replace(":", "_")
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "30", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-subj", certificate_subject(user, groups), "-addext", "extendedKeyUsage=clientAuth",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class ControlPlane:
    """etcd + kube-apiserver with Node and RBAC authorization, token and client-certificate auth and service-account
    signing; `start_controllers` adds the rest.

    `address` is where the API server listens and what it advertises as the `kubernetes` Service's endpoint: loopback
    by default; the test-bed host address (tests.testbed.hostnet) when pods of a real node must reach it.
    """

    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kubetune-testbed-")))
    address: str = "127.0.0.1"
    # A new one per control plane: the API server listens where every pod of the real node reaches it.
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    processes: list[ManagedProcess] = field(default_factory=list)
    server: str = ""
    kubeconfig: str = ""
    node_lifecycle: bool = False

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def ca_file(self) -> Path:
        """The API server's self-signed serving certificate, as a trust anchor. The API server generates it with IP SANs
        for its address and the `kubernetes` Service IP (10.96.0.1) and DNS SANs kubernetes.default.svc and the like."""
        return self.work_dir / "certs" / "apiserver.crt"

    @property
    def client_ca(self) -> tuple[Path, Path]:
        """The CA (certificate, key) of client certificates: nodes and kube-proxy to the API server, it to kubelets."""
        return self.work_dir / "pki" / "client-ca.crt", self.work_dir / "pki" / "client-ca.key"

    def start(self) -> ControlPlane:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port = free_port(), free_port()
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
        tokens.write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        client_ca = write_client_ca(self.work_dir / "pki")
        kubelet_client = issue_client_certificate(
            client_ca, self.work_dir / "pki", KUBELET_CLIENT_USER, ("system:masters",)
        )
        api_port = free_port(self.address)
        self.server = f"https://{self.address}:{api_port}"
        apiserver = self._spawn(
            "kube-apiserver",
            [
                testbed_binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--cert-dir={self.work_dir / 'certs'}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={api_port}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # Node: a kubelet (user system:node:NAME) may touch only its node and the pods bound to it.
                "--authorization-mode=Node,RBAC",
                f"--token-auth-file={tokens}",
                f"--client-ca-file={client_ca[0]}",
                # `kubectl logs` and the like: the API server calls the kubelet at the node's InternalIP (a real
                # node's hostname need not resolve) and proves who it is with this certificate.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client[0]}",
                f"--kubelet-client-key={kubelet_client[1]}",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--allow-privileged=true",
                # New nodes get a not-ready taint that only node lifecycle lifts, and it is off unless asked for.
                "--disable-admission-plugins=TaintNodesByCondition",
                "--enable-priority-and-fairness=false",  # one client at a time here; APF only costs CPU
                "--profiling=false",
                "--v=1",
            ],
        )
        token_header = {"Authorization": f"Bearer {self.admin_token}"}
        wait_for(
            lambda: apiserver.alive() and http_ok(f"{self.server}/readyz", True, token_header),
            120,
            "kube-apiserver /readyz",
        )
        kubeconfig_path = self.work_dir / "admin.kubeconfig"
        kubeconfig_path.write_text(yaml.safe_dump(kubeconfig_document(self.server, self.admin_token, self.ca_file)))
        self.kubeconfig = str(kubeconfig_path)
        return self

    def start_controllers(
        self, node_lifecycle: bool = False, node_monitor_grace_seconds: int = NODE_MONITOR_GRACE_SECONDS
    ) -> None:
        """kube-controller-manager (Jobs → Pods, GC, service accounts) and kube-scheduler.

        With `node_lifecycle`, a node whose kubelet stops heartbeating (its Lease and Ready condition) for
        `node_monitor_grace_seconds` turns Ready=Unknown, is tainted unreachable, and its pods are evicted once their
        toleration of the taint runs out (300 s unless the pod says otherwise), as in a real cluster. Real kubelets
        heartbeat and kwok then renews its nodes' Leases (see `start_kwok`); off by default, so that the scale benches'
        many kwok nodes renew no Leases. It evicts only while some node is Ready: with every node unhealthy it assumes
        the control plane lost them ("master disruption mode") and evicts nothing, so a test stopping the only real
        kubelet needs another Ready node, e.g. a kwok one.
        """
        sa_key = self.work_dir / "sa.key"
        self.node_lifecycle = node_lifecycle
        lifecycle_flags = [
            # Kubernetes' default is 40s+: a test waiting on a stopped kubelet need not wait that long.
            f"--node-monitor-grace-period={node_monitor_grace_seconds}s",
            "--node-monitor-period=2s",
        ]
        disabled = "-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route"
        self._spawn(
            "kube-controller-manager",
            [
                testbed_binary("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                *(
                    [f"--controllers=*,{disabled}", *lifecycle_flags]
                    if node_lifecycle
                    else [f"--controllers=*,-nodelifecycle,{disabled}"]
                ),
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
        # Without Leases node lifecycle would find kwok's nodes silent: they would flap Unknown (kwok's stages set
        # them Ready again) and with all nodes unhealthy it would stop evicting anywhere. Off otherwise: the scale
        # benches' hundreds of nodes would renew a Lease each every 10s for nothing.
        leases = ["--node-lease-duration-seconds=40"] if self.node_lifecycle else []
        self._spawn(
            "kwok",
            [
                testbed_binary("kwok"),
                *leases,
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--config={testbed_binary('kwok-stages.yaml')}",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.0/16",
            ],
        )

    def client_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> str:
        """A kubeconfig with a client certificate for `user` in `groups` (e.g. a node: system:node:NAME in
        system:nodes, or kube-proxy: system:kube-proxy), to act with exactly that identity's permissions."""
        directory = self.work_dir / "pki"
        cert_and_key = issue_client_certificate(self.client_ca, directory, user, groups)
        path = directory / f"{user.replace(':', '_')}.kubeconfig"
        path.write_text(
            yaml.safe_dump(kubeconfig_document(self.server, None, self.ca_file, user, client_certificate=cert_and_key))
        )
        return str(path)

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

    def restart_apiserver(self, down_seconds: float = 0) -> None:
        """Stop kube-apiserver, wait `down_seconds`, start it again on the same port, certificates and etcd; returns
        once it is ready. Every client's watches and requests in between fail, as in an upgrade of the control plane."""
        import time

        (apiserver,) = [process for process in self.processes if process.name == "kube-apiserver"]
        apiserver.stop()
        time.sleep(down_seconds)
        apiserver.start()
        token_header = {"Authorization": f"Bearer {self.admin_token}"}
        wait_for(
            lambda: apiserver.alive() and http_ok(f"{self.server}/readyz", True, token_header),
            120,
            "kube-apiserver /readyz after its restart",
        )

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
