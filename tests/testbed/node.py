"""A real Kubernetes node on this machine: containerd, runc, CNI bridge networking, a kubelet and kube-proxy."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import yaml

from tests.testbed.cluster_dns import CLUSTER_DOMAIN
from tests.testbed.controlplane import ControlPlane
from tests.testbed.hostnet import POD_CIDR
from tests.testbed.processes import ManagedProcess, cache_dir, free_port, http_ok, machine_dir, testbed_binary, wait_for
from tests.testbed.registry import REGISTRY_NAME, ImageFile, write_oci_layout

NODE_NAME = "kubetune-node-0"
NODE_KIND_LABEL = "kubetune.io/testbed-kubelet"  # `real` here; `kwok` on kwok's fake nodes
GPU_RESOURCE = "nvidia.com/gpu"
POD_BRIDGE = "kubetune-pods"
CNI_NETWORK = "kubetune"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps pods' containers and images in
# One real node per machine: its pod bridge, its iptables chains (KUBE-*) and cgroups (kubepods) are machine-wide.
MACHINE_LOCK = Path("/run/lock/kubetune-real-node.lock")
# containerd's state and sockets: a short path, as unix socket paths are limited to 108 bytes.
RUN_DIR = Path("/run/kubetune-node")
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBEPODS = "kubepods"  # the cgroup the kubelet (cgroupfs driver, cgroup root /) puts every pod under
# Paths the kubelet, containerd's shims and libcni use whatever their settings; the sweep removes this node's files.
KUBELET_DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
CNI_RESULTS = Path("/var/lib/cni/results")
SHIM_SOCKETS = Path("/run/containerd/s")
# Machine-wide sysctls the node changes, saved before it starts and restored when it stops: its own (pods' Service
# traffic through iptables, forwarding) and those the kubelet sets to its liking at start with no setting to leave
# them (overcommit, panic on oops, ...).
NODE_SYSCTLS = (
    "net/bridge/bridge-nf-call-iptables",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
GC_TRIGGER_IMAGE = f"{REGISTRY_NAME}/kubetune-testbed/gc-trigger:latest"  # a name for the pause image, deleted at once


def toml_text(document: dict[str, Any]) -> str:
    """TOML for nested tables of strings, booleans, integers and lists of them (enough for containerd's config)."""

    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int):
            return str(item)
        if isinstance(item, str):
            return json.dumps(item)  # a JSON string is a valid TOML basic string
        if isinstance(item, list):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"no TOML for {item!r}")

    lines: list[str] = []

    def table(body: dict[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if path and (scalars or not body):
            lines.extend(["", "[" + ".".join(key(part) for part in path) + "]"])
        lines.extend(f"{key(k)} = {value(v)}" for k, v in scalars.items())
        for name, sub in body.items():
            if isinstance(sub, dict):
                table(sub, [*path, name])

    table(document, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def containerd_config(
    root: Path, state: Path, socket: Path, cni_conf_dir: Path, registry_hosts_dir: Path, sandbox_image: str
) -> dict[str, Any]:
    """containerd 1.6's config (version 2): its own root (images, kept across runs), state and socket, the CRI plugin
    with runc under cgroupfs and CNI from `cni_conf_dir`."""
    return {
        "version": 2,
        "root": str(root),
        "state": str(state),
        "grpc": {"address": str(socket)},
        "ttrpc": {"address": f"{socket}.ttrpc"},
        "plugins": {
            "io.containerd.grpc.v1.cri": {
                "sandbox_image": sandbox_image,
                # In this VM runc fails with "can't get final child's PID from pipe" unless the CRI plugin leaves
                # oom_score_adj within the range of its own and sets no unprivileged port/ICMP sysctls.
                "restrict_oom_score_adj": True,
                "enable_unprivileged_ports": False,
                "enable_unprivileged_icmp": False,
                # Pods' network namespaces under `state`, so a stopped node leaves none in /var/run/netns.
                "netns_mounts_under_state_dir": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "cni": {"bin_dir": str(CNI_BIN_DIR), "conf_dir": str(cni_conf_dir), "max_conf_num": 1},
                "containerd": {
                    "snapshotter": "overlayfs",
                    "default_runtime_name": "runc",
                    "runtimes": {
                        "runc": {
                            "runtime_type": "io.containerd.runc.v2",
                            # runc's container state under `state` too, not in the machine's /run/containerd/runc.
                            "options": {"SystemdCgroup": False, "Root": str(state / "runc")},
                        }
                    },
                },
                "registry": {"config_path": str(registry_hosts_dir)},
            },
            "io.containerd.internal.v1.opt": {"path": str(root / "opt")},
        },
    }


def registry_hosts_toml(endpoint: str) -> dict[str, Any]:
    """containerd's hosts.toml sending pulls of a registry name to the local registry at `endpoint`, in plain HTTP."""
    server = f"http://{endpoint}"
    return {"server": server, "host": {server: {"capabilities": ["pull", "resolve"]}}}


def cni_config(bridge: str, pod_cidr: str, ipam_dir: Path) -> dict[str, Any]:
    """The pod network: a Linux bridge whose address is the pods' gateway, with host-local IP allocation.

    No IP masquerade: pod traffic is for this machine only (the API server, the registry and S3 on the host address,
    other pods), and without NAT the bridge plugin adds no per-pod iptables rules that a killed node would leave.
    """
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,  # a pod reaching a Service whose endpoint is itself
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),  # per run: no address stays allocated to a pod of an earlier run
                },
            }
        ],
    }


def kubelet_config(
    address: str,
    port: int,
    healthz_port: int,
    runtime_socket: Path,
    client_ca: Path,
    pod_logs_dir: Path,
    cluster_dns: str | None = None,
) -> dict[str, Any]:
    """The KubeletConfiguration of a test-bed node: cgroupfs, cgroup v1 allowed, no swap check, API server clients
    authenticated by the client CA and authorized by the API server, no image GC and near-zero disk eviction; pods
    resolve cluster names at `cluster_dns` (CoreDNS) when the test bed runs one."""
    dns = {"clusterDNS": [cluster_dns], "clusterDomain": CLUSTER_DOMAIN} if cluster_dns else {}
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",  # containerd's runc runs with SystemdCgroup = false; no systemd here
        "failCgroupV1": False,  # this VM mounts cgroup v1 (hybrid)
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{runtime_socket}",
        "podLogsDir": str(pod_logs_dir),
        # Pulled images are the point of the persistent image store; the test bed's disk is not the kubelet's to
        # manage, so no image GC and eviction only when the disk is truly full.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "serializeImagePulls": False,
        # No upstream resolver: pods get the cluster DNS alone (or nothing), so a lookup outside the cluster fails at
        # once instead of timing out on the machine's resolver, which pod traffic cannot reach.
        "resolvConf": "",
        **dns,
        "nodeStatusUpdateFrequency": "5s",
    }


def kube_proxy_config(
    node_name: str, kubeconfig: str, cluster_cidr: str, node_address: str, healthz_port: int, metrics_port: int
) -> dict[str, Any]:
    """kube-proxy in iptables mode; conntrack tables left as the machine has them (they are machine-wide)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "hostnameOverride": node_name,
        "clientConnection": {"kubeconfig": kubeconfig},
        "clusterCIDR": cluster_cidr,
        "nodePortAddresses": [f"{node_address}/32"],
        "bindAddress": node_address,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
    }


def gpu_capacity_patch(gpus: int) -> list[dict[str, Any]]:
    """A JSON patch of node status advertising `gpus` of the extended resource nvidia.com/gpu (no device plugin:
    the kubelet keeps an extended resource it does not manage and admits pods requesting it)."""
    path = GPU_RESOURCE.replace("~", "~0").replace("/", "~1")
    return [
        {"op": "add", "path": f"/status/capacity/{path}", "value": str(gpus)},
        {"op": "add", "path": f"/status/allocatable/{path}", "value": str(gpus)},
    ]


def kube_iptables_cleanup(rules: str) -> list[list[str]]:
    """Arguments to `iptables -t TABLE` removing the KUBE-* chains of kube-proxy and the kubelet, given that table's
    `iptables -S`: first every rule jumping to one of them from another chain, then the chains themselves."""
    jumps: list[list[str]] = []
    chains: list[str] = []
    for line in rules.splitlines():
        parts = shlex.split(line)
        if len(parts) >= 2 and parts[0] == "-N" and parts[1].startswith("KUBE-"):
            chains.append(parts[1])
        elif (
            len(parts) >= 2
            and parts[0] == "-A"
            and not parts[1].startswith("KUBE-")
            and any(a == "-j" and b.startswith("KUBE-") for a, b in itertools.pairwise(parts))
        ):
            jumps.append(["-D", *parts[1:]])
    return [*jumps, *(["-F", chain] for chain in chains), *(["-X", chain] for chain in chains)]


def mounts_under(mountinfo: str, directory: Path) -> list[str]:
    """Mount points at or below `directory` in /proc/self/mountinfo's text, deepest first (the unmount order)."""
    prefix = str(directory).rstrip("/")
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def shim_socket(containerd_socket: Path, namespace: str, container: str) -> Path:
    """Where containerd 1.6's runc shim of a pod sandbox listens: a hash of containerd's address, the namespace and
    the sandbox's id, under the machine-wide /run/containerd/s (a SIGKILLed shim leaves it behind)."""
    digest = hashlib.sha256(f"{containerd_socket}/{namespace}/{container}".encode()).hexdigest()
    return SHIM_SOCKETS / digest


def pause_image_name(pause_binary: bytes) -> str:
    """The sandbox image's name; its tag follows the binary, so a new pause build is imported afresh."""
    return f"{REGISTRY_NAME}/kubetune-testbed/pause:{hashlib.sha256(pause_binary).hexdigest()[:12]}"


def node_is_ready(node: Any, heartbeat_since: datetime | None = None) -> bool:
    """Whether a Node (kubernetes client object) is Ready, by a heartbeat at or after `heartbeat_since` if given."""
    conditions = (node.status.conditions or []) if node.status else []
    return any(
        c.type == "Ready"
        and c.status == "True"
        and (
            heartbeat_since is None or (c.last_heartbeat_time is not None and c.last_heartbeat_time >= heartbeat_since)
        )
        for c in conditions
    )


@dataclass
class RealNode:
    """A node whose pods run in containers: containerd (runc, overlayfs, CNI bridge), a kubelet and kube-proxy.

    The control plane must listen on the test-bed host address (ControlPlane(address=ensure_host_address())): that
    is the node's IP, where the API server reaches the kubelet and pods reach the API server (`kubernetes` Service).
    Images come from the local registry (`use_registry`) under REGISTRY_NAME and stay in `node_dir` across runs.
    The node is labelled kubetune.io/testbed-kubelet=real and nvidia.com/gpu.present=true and advertises `gpus` of
    nvidia.com/gpu (no devices behind them). Needs root; one real node per machine.
    """

    control_plane: ControlPlane
    name: str = NODE_NAME
    gpus: int = 8
    node_dir: Path = field(default_factory=lambda: machine_dir() / "node")
    run_dir: Path = RUN_DIR
    pod_cidr: str = POD_CIDR
    ready_timeout: float = 120
    registry_endpoint: str | None = None
    # The nameserver of the node's pods (ClusterDns on the host address); None: pods resolve nothing.
    cluster_dns: str | None = None
    containerd: ManagedProcess | None = None
    kubelet: ManagedProcess | None = None
    kube_proxy: ManagedProcess | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # The machine as start() found it once an earlier, killed node's leftovers were swept: what stop() must restore.
    clean_footprint: dict[str, Any] = field(default_factory=dict)
    _kubeconfigs: dict[str, str] = field(default_factory=dict)
    _lock: IO[str] | None = None

    @property
    def address(self) -> str:
        return self.control_plane.address

    @property
    def containerd_root(self) -> Path:
        return self.node_dir / "containerd"

    @property
    def kubelet_dir(self) -> Path:
        return self.node_dir / "kubelet"

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def registry_hosts_dir(self) -> Path:
        return self.run_dir / "certs.d"

    @property
    def log_dir(self) -> Path:
        return self.control_plane.log_dir

    def start(self) -> RealNode:
        """containerd, then the kubelet (until the node is Ready with its GPUs), then kube-proxy."""
        if self.address.startswith("127."):
            raise ValueError(
                "a real node needs the control plane on the test-bed host address, where pods can reach it: "
                "ControlPlane(address=tests.testbed.hostnet.ensure_host_address())"
            )
        if os.geteuid() != 0:
            raise PermissionError("a real node needs root (containerd, runc, CNI, iptables, cgroups)")
        self._take_machine_lock()
        started = time.monotonic()
        try:
            self._sweep()  # what a killed earlier run left behind
            self.clean_footprint = machine_footprint()
            self._save_sysctls()
            self._prepare_host()
            self._start_containerd()
            self._remove_all_containers()
            self._import_pause_image()
            self.timings["containerd"] = time.monotonic() - started
            self.start_kubelet()
            self._start_kube_proxy()
        except Exception:
            self.stop()
            raise
        self.timings["start_to_ready"] = time.monotonic() - started
        return self

    def use_registry(self, endpoint: str) -> None:
        """Pull images named REGISTRY_NAME/... (and endpoint/...) from the local registry at `endpoint` over plain
        HTTP; containerd reads its hosts files at each pull, so this works before and after start."""
        self.registry_endpoint = endpoint
        if self.containerd:
            self._write_registry_hosts()

    def _write_registry_hosts(self) -> None:
        if not self.registry_endpoint:
            return
        for host in (REGISTRY_NAME, self.registry_endpoint):
            directory = self.registry_hosts_dir / host
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts.toml").write_text(toml_text(registry_hosts_toml(self.registry_endpoint)))

    def start_kubelet(self) -> None:
        """Start the kubelet (again) and wait until the node is Ready and advertises its GPUs."""
        started = time.monotonic()
        # Heartbeat times have whole seconds; an older Ready may be a stopped kubelet's, not yet noticed.
        since = datetime.now(UTC).replace(microsecond=0)
        self.kubelet = self._spawn(
            "kubelet",
            [
                testbed_binary("kubelet"),
                f"--config={self.run_dir / 'kubelet-config.yaml'}",
                f"--kubeconfig={self._kubeconfigs['kubelet']}",
                f"--root-dir={self.kubelet_dir}",
                f"--cert-dir={self.kubelet_dir / 'pki'}",  # its self-signed serving certificate
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                f"--node-labels={NODE_KIND_LABEL}=real,nvidia.com/gpu.present=true",
                "--v=1",
            ],
        )
        from kubernetes import client

        core = client.CoreV1Api(self.control_plane.api_client())
        kubelet = self.kubelet
        wait_for(
            lambda: kubelet.alive() and node_is_ready(core.read_node(self.name), since),
            self.ready_timeout,
            f"node {self.name} to be Ready",
            interval=0.5,
        )
        self.timings["kubelet_to_ready"] = time.monotonic() - started
        # Registration may zero extended resources the kubelet does not manage: advertise them after it.
        core.patch_node_status(self.name, gpu_capacity_patch(self.gpus))
        wait_for(
            lambda: (core.read_node(self.name).status.allocatable or {}).get(GPU_RESOURCE) == str(self.gpus),
            30,
            f"node {self.name} to advertise {self.gpus} {GPU_RESOURCE}",
        )

    def stop_kubelet(self) -> None:
        """Stop the kubelet alone, as a crashed one: pods keep running, the node stops heartbeating."""
        if self.kubelet:
            self.kubelet.stop()

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr` against this node's containerd, in the CRI's namespace."""
        return subprocess.run(
            ["ctr", f"--address={self.socket}", f"--namespace={CRI_NAMESPACE}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def stop(self) -> None:
        """Stop kube-proxy and the kubelet, kill every pod's containers, stop containerd and remove what the node set
        up on the machine (iptables chains, the pod bridge, cgroups, mounts, network namespaces); keeps the images."""
        for process in (self.kube_proxy, self.kubelet):
            if process:
                process.stop()
        if self.containerd and self.containerd.running():
            with contextlib.suppress(Exception):
                self._remove_all_containers()
            self.containerd.stop(timeout=20)
        if self._lock:  # without the lock, what is on the machine may be another node's
            self._sweep()
            self._lock.close()
            self._lock = None

    def failed_process_logs(self) -> str:
        processes = [p for p in (self.containerd, self.kubelet, self.kube_proxy) if p]
        return "\n\n".join(f"== {p.name} ==\n{p.log_tail()}" for p in processes)

    def _take_machine_lock(self) -> None:
        MACHINE_LOCK.parent.mkdir(parents=True, exist_ok=True)
        lock = open(MACHINE_LOCK, "a+")  # noqa: SIM115 - held open for the node's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise RuntimeError(
                f"another real test-bed node runs on this machine ({MACHINE_LOCK} is held by {holder}): "
                "only one can, as the pod bridge, the KUBE-* iptables chains and the kubepods cgroups are "
                "machine-wide and the image store in its node dir is containerd's alone"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}, node dir {self.node_dir}\n")
        lock.flush()
        self._lock = lock

    def _prepare_host(self) -> None:
        # Built into some kernels (this VM's has no modules), modules elsewhere.
        if not Path("/proc/sys/net/bridge").exists():
            subprocess.run(["modprobe", "br_netfilter"], capture_output=True, check=False)
        if not Path("/proc/sys/net/bridge").exists():
            raise RuntimeError("the kernel has no br_netfilter (net.bridge.* sysctls): `modprobe br_netfilter`")
        # Service traffic between pods on the bridge must pass iptables for kube-proxy's DNAT; the bridge plugin's
        # gateway forwards.
        for key, value in (("net/bridge/bridge-nf-call-iptables", "1"), ("net/ipv4/ip_forward", "1")):
            Path("/proc/sys", key).write_text(value)
        for directory in (self.run_dir, self.containerd_root, self.kubelet_dir, self.registry_hosts_dir):
            directory.mkdir(parents=True, exist_ok=True)
        pause = Path(testbed_binary("pause")).read_bytes()
        cni_dir = self.run_dir / "cni" / "net.d"
        cni_dir.mkdir(parents=True, exist_ok=True)
        (cni_dir / "10-kubetune.conflist").write_text(
            json.dumps(cni_config(POD_BRIDGE, self.pod_cidr, self.run_dir / "cni" / "ipam"), indent=2)
        )
        config = containerd_config(
            self.containerd_root,
            self.run_dir / "state",
            self.socket,
            cni_dir,
            self.registry_hosts_dir,
            pause_image_name(pause),
        )
        (self.run_dir / "containerd.toml").write_text(toml_text(config))
        self._write_registry_hosts()
        plane = self.control_plane
        # The Node authorizer knows a kubelet by this identity; RBAC's system:node-proxier binds system:kube-proxy.
        self._kubeconfigs = {
            "kubelet": plane.client_kubeconfig(f"system:node:{self.name}", ("system:nodes",)),
            "kube-proxy": plane.client_kubeconfig("system:kube-proxy"),
        }
        pod_logs = self.log_dir / "pods"
        pod_logs.mkdir(parents=True, exist_ok=True)
        kubelet = kubelet_config(
            self.address,
            free_port(self.address),
            free_port(),
            self.socket,
            plane.client_ca[0],
            pod_logs,
            cluster_dns=self.cluster_dns,
        )
        (self.run_dir / "kubelet-config.yaml").write_text(yaml.safe_dump(kubelet))

    def _start_containerd(self) -> None:
        self.containerd = self._spawn(
            "containerd", ["containerd", f"--config={self.run_dir / 'containerd.toml'}", "--log-level=info"]
        )
        containerd = self.containerd
        wait_for(
            lambda: containerd.alive() and self.ctr("version", check=False).returncode == 0,
            60,
            "containerd to answer on its socket",
        )

    def _import_pause_image(self) -> None:
        pause = Path(testbed_binary("pause")).read_bytes()
        name = pause_image_name(pause)
        if name in self.ctr("images", "list", "--quiet").stdout.split():
            return
        repository, tag = name.rsplit(":", 1)
        with tempfile.TemporaryDirectory() as scratch:
            layout = Path(scratch) / "layout"
            write_oci_layout(layout, tag, [ImageFile("pause", pause)], ["/pause"], user="65535:65535")
            archive = Path(scratch) / "pause.tar"
            with tarfile.open(archive, "w") as tar:
                for item in sorted(layout.iterdir()):
                    tar.add(item, arcname=item.name)
            self.ctr("images", "import", f"--base-name={repository}", str(archive))

    def keep_only_images(self, references: list[str]) -> None:
        """Delete every image but the pause image and `references` (digest-pinned), and their blobs: the image store
        lives on across runs, and each rebuild of the trainer image would otherwise leave gigabytes behind."""
        listed = self.ctr("images", "list").stdout.splitlines()[1:]
        digests = {ref: fields[2] for line in listed if len(fields := line.split()) > 2 for ref in [fields[0]]}
        keep = {digests[name] for name in (*references, pause_image_name(Path(testbed_binary("pause")).read_bytes()))
                if name in digests}  # fmt: skip
        stale = [name for name, digest in digests.items() if digest not in keep]
        if stale:
            self.ctr("images", "delete", "--sync", *stale, check=False)

    def _remove_all_containers(self) -> None:
        """Kill and delete every container (pods' and their sandboxes') with its task and writable snapshot."""
        ids = self.ctr("containers", "list", "--quiet").stdout.split()
        for container in ids:
            self.ctr("tasks", "delete", "--force", container, check=False)
        for container in ids:
            self.ctr("containers", "delete", container, check=False)
            shim_socket(self.socket, CRI_NAMESPACE, container).unlink(missing_ok=True)
        # containerd removes the snapshots' directories in a later garbage collection, and forgets them if it stops
        # first: they would stay in the image store for good. Deleting an image synchronously runs that collection
        # now (and sweeps every snapshot directory nothing refers to).
        pause = pause_image_name(Path(testbed_binary("pause")).read_bytes())
        if self.ctr("images", "tag", "--force", pause, GC_TRIGGER_IMAGE, check=False).returncode == 0:
            self.ctr("images", "delete", "--sync", GC_TRIGGER_IMAGE, check=False)

    def _start_kube_proxy(self) -> None:
        port = free_port()
        config = kube_proxy_config(
            self.name, self._kubeconfigs["kube-proxy"], self.pod_cidr, self.address, port, free_port()
        )
        path = self.run_dir / "kube-proxy-config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.kube_proxy = self._spawn("kube-proxy", [testbed_binary("kube-proxy"), f"--config={path}", "--v=1"])
        proxy = self.kube_proxy
        wait_for(lambda: proxy.alive() and http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "kube-proxy /healthz")

    def _sweep(self) -> None:
        """Remove what a node leaves on the machine, whether it stopped or was killed; images stay."""
        self._kill_leftover_processes()
        for directory in (self.run_dir, self.kubelet_dir):
            mountinfo = Path("/proc/self/mountinfo").read_text()
            for point in mounts_under(mountinfo, directory):
                if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                    subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
            shutil.rmtree(directory, ignore_errors=True)
        for binary in ("iptables", "ip6tables"):
            for table in ("nat", "filter", "mangle"):
                listed = subprocess.run([binary, "-t", table, "-S"], capture_output=True, text=True, check=False)
                for args in kube_iptables_cleanup(listed.stdout if listed.returncode == 0 else ""):
                    subprocess.run([binary, "-t", table, *args], capture_output=True, check=False)
        if Path("/sys/class/net", POD_BRIDGE).exists():
            subprocess.run(["ip", "link", "delete", POD_BRIDGE], capture_output=True, check=False)
        for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.exists() else []:
            kubepods = hierarchy / KUBEPODS
            if kubepods.is_dir() and not kubepods.is_symlink():
                for directory in sorted(kubepods.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if directory.is_dir():
                        with contextlib.suppress(OSError):
                            directory.rmdir()
                with contextlib.suppress(OSError):
                    kubepods.rmdir()
        # The CRI plugin's per-pod files in the image store's root (hostname, resolv.conf, ...): only for pods now gone.
        for kind in ("sandboxes", "containers"):
            shutil.rmtree(self.containerd_root / "io.containerd.grpc.v1.cri" / kind, ignore_errors=True)
        self._sweep_fixed_paths()
        self._restore_sysctls()

    @property
    def _saved_sysctls(self) -> Path:
        return self.node_dir / "sysctls-before-node.json"

    def _save_sysctls(self) -> None:
        paths = {key: Path("/proc/sys", key) for key in NODE_SYSCTLS}
        values = {key: path.read_text().strip() for key, path in paths.items() if path.exists()}
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self._saved_sysctls.write_text(json.dumps(values, indent=1))

    def _restore_sysctls(self) -> None:
        if not self._saved_sysctls.exists():
            return
        for key, value in json.loads(self._saved_sysctls.read_text()).items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", key).write_text(value)
        self._saved_sysctls.unlink()

    def _sweep_fixed_paths(self) -> None:
        """What the kubelet, containerd's shims and CNI keep at paths no setting moves, for this node's pods only."""
        # The kubelet's device-plugin socket and checkpoint (always /var/lib/kubelet/device-plugins).
        for path in (KUBELET_DEVICE_PLUGINS / "kubelet.sock", KUBELET_DEVICE_PLUGINS / "kubelet_internal_checkpoint"):
            path.unlink(missing_ok=True)
        # The kubelet's /var/log/containers links to pod logs: ours point into our log dir or the cache; dangling ones
        # are of no use to anyone.
        ours = (str(self.log_dir / "pods"), str(cache_dir()))
        for link in CONTAINER_LOG_LINKS.glob("*.log") if CONTAINER_LOG_LINKS.is_dir() else []:
            if link.is_symlink() and (os.readlink(link).startswith(ours) or not link.exists()):
                link.unlink(missing_ok=True)
        # CNI's result cache (always /var/lib/cni/results) for attachments of our network, which a forced stop never
        # deleted through CNI, and their loopback ones.
        results = CNI_RESULTS.glob(f"{CNI_NETWORK}-*") if CNI_RESULTS.is_dir() else []
        for result in list(results):
            container = result.name.removeprefix(f"{CNI_NETWORK}-").rsplit("-", 1)[0]
            result.unlink(missing_ok=True)
            (CNI_RESULTS / f"cni-loopback-{container}-lo").unlink(missing_ok=True)
        # Directories the node created there, if nothing else uses them.
        leftovers = (KUBELET_DEVICE_PLUGINS, KUBELET_DEVICE_PLUGINS.parent, CONTAINER_LOG_LINKS, SHIM_SOCKETS)
        for directory in (*leftovers, SHIM_SOCKETS.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def _kill_leftover_processes(self) -> None:
        """SIGKILL the containers' processes (everything in the kubepods cgroups) and this node's own processes,
        a killed test run's included: containerd, its shims, the kubelet and kube-proxy all name a file of run_dir."""
        marker = f"{self.run_dir}/".encode()
        victims: set[int] = set()
        for procs in CGROUP_ROOT.glob(f"*/{KUBEPODS}/**/cgroup.procs"):
            with contextlib.suppress(OSError):
                victims.update(int(pid) for pid in procs.read_text().split())
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                if marker in cmdline.read_bytes():
                    victims.add(int(cmdline.parent.name))
        for pid in victims - {os.getpid()}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path("/proc", str(pid)).exists() for pid in victims):
            time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        env = {key: value for key, value in os.environ.items() if not key.startswith("KUBECONFIG")}
        # The node's processes share the machine lock, so it stays held while they run, even after the process that
        # started them has exited (`make demo` leaves its node up).
        lock = (self._lock.fileno(),) if self._lock else ()
        return ManagedProcess(name, argv, self.log_dir, env=env, pass_fds=lock).start()

    def clean_up_after(self) -> None:
        """Once a node's processes were stopped from outside (`make demo-down`): take the machine lock and remove
        what the node left on the machine, as stop() would have."""
        # The node's processes hold the machine lock (containerd's shims too, having inherited it), so they go first;
        # but only when the process that started the node is gone, or they may be another live test bed's.
        holder = lock_holder_pid(MACHINE_LOCK.read_text() if MACHINE_LOCK.exists() else "")
        if holder is not None and holder != os.getpid() and Path("/proc", str(holder)).exists():
            raise RuntimeError(f"the real node on this machine is still in use by pid {holder}: not cleaning it up")
        self._kill_leftover_processes()
        self._take_machine_lock()
        if (self.run_dir / "containerd.toml").exists():
            # containerd deletes what it knows of the pods (tasks, containers, shim sockets, snapshots) only itself.
            self._start_containerd()
            with contextlib.suppress(Exception):
                self._remove_all_containers()
            if self.containerd:
                self.containerd.stop(timeout=20)
        self._sweep()
        if self._lock:
            self._lock.close()
            self._lock = None


def lock_holder_pid(text: str) -> int | None:
    """The pid the machine lock file names (`pid N, node dir ...`), None when it names none."""
    match = re.match(r"pid (\d+)", text.strip())
    return int(match.group(1)) if match else None


def footprint_left(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What `after` (a machine_footprint) holds that `before` did not (for settings, those whose value changed)."""
    left: dict[str, Any] = {}
    for key, now in after.items():
        then = before.get(key)
        if isinstance(now, list):
            extra = sorted(set(now) - set(then or []))
            if extra:
                left[key] = extra
        elif isinstance(now, dict):
            changed = {name: value for name, value in now.items() if value != (then or {}).get(name)}
            if changed:
                left[key] = changed
        elif now != then and (not isinstance(now, bool) or now):
            left[key] = now
    return left


def machine_footprint() -> dict[str, Any]:
    """What a real node changes on this machine while it runs, and must put back when it stops."""
    iptables = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return {
        "kube iptables chains": sorted(
            {line.split()[0] for line in iptables.splitlines() if line.startswith(":KUBE-")}
        ),
        "pod bridge": Path("/sys/class/net", POD_BRIDGE).exists(),
        "kubepods cgroups": sorted(str(p) for p in CGROUP_ROOT.glob(f"*/{KUBEPODS}")),
        "mounts": [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(RUN_DIR) in line],
        "sysctls": {key: Path("/proc/sys", key).read_text() for key in NODE_SYSCTLS},
        "shim sockets": sorted(p.name for p in SHIM_SOCKETS.glob("*")),
    }
