"""A kubelet stand-in for tests and the demo: runs the pods bound to its nodes as local processes.

Never shipped in the operator. For each pod scheduled onto one of its nodes it resolves the container's environment
(values, ConfigMap and Secret references, the downward API), hands the process a kubeconfig with a real token of the
pod's ServiceAccount (what the projected token volume gives a real pod), runs the container's own command, keeps its
log, and writes the pod status back: Running, then Succeeded/Failed with the exit code and the termination message.
Deleting a pod sends SIGTERM, then SIGKILL after the grace period, like a kubelet. Two kubelet failures happen for real:
an image from a registry that cannot resolve (any host under the reserved `.invalid` TLD; the stand-in pulls nothing
else, it runs local processes) stays Waiting in ErrImagePull/ImagePullBackOff, and a container whose processes
together use more memory than its limit is killed with SIGKILL and reported OOMKilled (exit 137), as the kernel's
cgroup OOM killer does. It also serves the one kubelet API
the API server needs for `kubectl logs` (GET /containerLogs/..., over HTTPS with a self-signed certificate, which the
API server accepts when it is not given a kubelet CA), so `pods/log` works for its pods.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.testbed.controlplane import ControlPlane, kubeconfig_document

STANDIN_LABEL = "kubetune.io/testbed-kubelet"
TERMINATION_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gpu_node_manifest(name: str, kubelet: str, gpus: int = 8) -> dict[str, Any]:
    """A fake GPU node; `kubelet` is `standin` (pods really run) or `kwok` (kwok fakes the pods)."""
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {
            STANDIN_LABEL: kubelet,
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "nvidia.com/gpu.present": "true",
        },
    }
    if kubelet == "kwok":
        metadata["annotations"] = {"kwok.x-k8s.io/node": "fake"}
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": metadata,
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources},
    }


def ready_node_status(manifest: dict[str, Any], kubelet_port: int | None = None) -> dict[str, Any]:
    """The status a healthy kubelet reports, for a stand-in node; `kubelet_port` is where it serves pod logs."""
    now = now_rfc3339()
    daemon_endpoints = {"kubeletEndpoint": {"Port": kubelet_port}} if kubelet_port else {}
    return {
        "daemonEndpoints": daemon_endpoints,
        "capacity": manifest["status"]["capacity"],
        "allocatable": manifest["status"]["allocatable"],
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet stand-in is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": "v0.0.0-standin",
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "local-process://1",
            "osImage": "kubetune test bed",
            "kernelVersion": "",
            "bootID": "",
            "machineID": "",
            "systemUUID": "",
        },
    }


def resolve_env(container: dict[str, Any], pod: dict[str, Any], core: Any) -> dict[str, str]:
    """The container's environment as a kubelet would build it (value, configMapKeyRef, secretKeyRef, fieldRef)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = item.get("value", "")
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = core.read_namespaced_config_map(ref["name"], namespace).data[ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = core.read_namespaced_secret(ref["name"], namespace)
            env[item["name"]] = base64.b64decode(secret.data[ref["key"]]).decode()
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[item["name"]] = {
                "metadata.name": pod["metadata"]["name"],
                "metadata.namespace": namespace,
                "spec.nodeName": pod["spec"].get("nodeName", ""),
                "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            }.get(path, "")
    return env


UNRESOLVABLE_REGISTRY_SUFFIX = ".invalid"  # RFC 6761: never resolves, so a pull from it always fails
QUANTITY_FACTORS = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
}  # fmt: skip


def image_registry(image: str) -> str | None:
    """The registry host of an image reference, None for Docker Hub short names (`name:tag`, `org/name`)."""
    first, sep, _ = image.partition("/")
    if not sep:
        return None
    return first if ("." in first or ":" in first or first == "localhost") else None


def cannot_pull(image: str) -> bool:
    """Whether pulling the image fails here: its registry host is under the reserved `.invalid` TLD."""
    registry = image_registry(image)
    return registry is not None and registry.split(":")[0].endswith(UNRESOLVABLE_REGISTRY_SUFFIX)


def memory_limit_bytes(container: dict[str, Any]) -> int | None:
    """The container's memory limit in bytes (resources.limits.memory), None without one."""
    text = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if not text:
        return None
    for suffix, factor in sorted(QUANTITY_FACTORS.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def process_group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the group (the container's processes), from /proc."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of stat: the process group
                total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total


def exit_status(returncode: int) -> int:
    """Popen's return code as a container runtime reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def local_argv(container: dict[str, Any]) -> list[str]:
    """The container's command and args; `python` means this interpreter (the image's Python, locally)."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise ValueError(f"container {container['name']} has no command: the stand-in cannot run image entrypoints")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif shutil.which(argv[0]) is None and (Path(sys.executable).parent / argv[0]).exists():
        argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


def write_serving_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as a kubelet's own serving certificate (bootstrap mode) is."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not cert.exists() or not key.exists():
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=kubelet-standin", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return cert, key


LOG_FOLLOW_POLL_SECONDS = 0.2
LOG_CHUNK_BYTES = 64 * 1024


class ContainerLogHandler(BaseHTTPRequestHandler):
    """GET /containerLogs/{namespace}/{pod}/{container}: the pod's log, with the kubelet's follow, tailLines and
    limitBytes. A stand-in pod runs once (restartPolicy Never), so there is never a `previous` container."""

    server: LogServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(HTTPStatus.NOT_FOUND, "the stand-in serves /containerLogs only")
            return
        _, namespace, pod, container = parts
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        if query.get("previous") == "true":
            self._plain(HTTPStatus.BAD_REQUEST, f'previous terminated container "{container}" in pod "{pod}" not found')
            return
        path = self.server.standin.log_path(namespace, pod)
        if not path.exists():
            self._plain(HTTPStatus.NOT_FOUND, f'container "{container}" in pod "{pod}" has no log')
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        with open(path, "rb") as log:
            data = log.read()
            if "tailLines" in query:
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-int(query["tailLines"]) :]) if int(query["tailLines"]) > 0 else b""
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
            sent = self._write(data[:limit] if limit is not None else data)
            while query.get("follow") == "true" and (limit is None or sent < limit):
                running = self.server.standin.is_running(namespace, pod)
                chunk = log.read(LOG_CHUNK_BYTES)
                if chunk:
                    sent += self._write(chunk[: limit - sent] if limit is not None else chunk)
                elif not running:
                    break  # the process is gone and its log fully read
                else:
                    time.sleep(LOG_FOLLOW_POLL_SECONDS)

    def _write(self, data: bytes) -> int:
        self.wfile.write(data)
        self.wfile.flush()
        return len(data)

    def _plain(self, status: HTTPStatus, message: str) -> None:
        body = message.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the API server's log requests are not news


class LogServer(ThreadingHTTPServer):
    """The stand-in's kubelet port: HTTPS on loopback, a free port."""

    daemon_threads = True

    def __init__(self, standin: KubeletStandin, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), ContainerLogHandler)
        self.standin = standin
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@dataclass
class RunningPod:
    """A pod's process and where its log and termination message go."""

    process: subprocess.Popen[bytes]
    log_path: Path
    termination_path: Path
    started_at: str
    deleting_since: float | None = None
    memory_limit: int | None = None
    oom_killed: bool = False


@dataclass
class KubeletStandin:
    """Watches pods on its nodes and runs them; `extra_env` is laid over every pod's environment."""

    control_plane: ControlPlane
    nodes: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)
    poll_seconds: float = 0.5
    running: dict[str, RunningPod] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _log_server: LogServer | None = None

    @property
    def pod_dir(self) -> Path:
        return self.control_plane.work_dir / "standin-pods"

    def log_path(self, namespace: str, pod: str) -> Path:
        return self.pod_dir / f"{namespace}_{pod}.log"

    def is_running(self, namespace: str, pod: str) -> bool:
        """Whether a process of that pod is still running here."""
        prefix = f"{namespace}/{pod}/"
        return any(key.startswith(prefix) for key in list(self.running))

    def register_nodes(self, gpus: int = 8) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.control_plane.api_client())
        port = self._log_server.port if self._log_server else None
        for name in self.nodes:
            manifest = gpu_node_manifest(name, "standin", gpus)
            self.control_plane.apply(manifest)
            core.patch_node_status(name, {"status": ready_node_status(manifest, port)})

    def start(self) -> KubeletStandin:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        cert, key = write_serving_certificate(self.control_plane.work_dir / "standin-certs")
        self._log_server = LogServer(self, cert, key)
        threading.Thread(target=self._log_server.serve_forever, name="kubelet-standin-logs", daemon=True).start()
        self.register_nodes()
        self._thread = threading.Thread(target=self._loop, name="kubelet-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._log_server:
            self._log_server.shutdown()
            self._log_server.server_close()
        if self._thread:
            self._thread.join(timeout=10)
        for pod in self.running.values():
            if pod.process.poll() is None:
                os.killpg(pod.process.pid, signal.SIGKILL)

    def _loop(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.control_plane.api_client())
        while not self._stop.is_set():
            try:
                self._sync(core)
            except Exception as error:
                print(f"kubelet stand-in: {error}", file=sys.stderr)
            self._stop.wait(self.poll_seconds)

    def _sync(self, core: Any) -> None:
        from kubernetes import client

        api = client.ApiClient()
        for node in self.nodes:
            pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
            for pod_obj in pods:
                pod = api.sanitize_for_serialization(pod_obj)
                key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}/{pod['metadata']['uid']}"
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete(core, pod, key)
                elif key not in self.running and key not in self.finished:
                    self._launch(core, pod, key)
                elif key in self.running:
                    self._reap(core, pod, key)

    def _launch(self, core: Any, pod: dict[str, Any], key: str) -> None:
        container = pod["spec"]["containers"][0]
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        log_path = self.log_path(namespace, name)
        termination_path = self.pod_dir / f"{namespace}_{name}.termination"
        termination_path.unlink(missing_ok=True)
        if cannot_pull(container.get("image", "")):
            self.finished.add(key)  # reported once: the pull never succeeds here
            self._write_waiting(core, pod, container)
            return
        try:
            env = {**self._base_env(), **resolve_env(container, pod, core), **self.extra_env}
            env["KUBECONFIG"] = self._pod_kubeconfig(pod)
            env[TERMINATION_ENV] = str(termination_path)
            argv = local_argv(container)
        except Exception as error:
            self.finished.add(key)
            self._write_terminated(core, pod, 128, "CreateContainerConfigError", str(error), now_rfc3339())
            return
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.pod_dir),
                start_new_session=True,
            )
        started = now_rfc3339()
        self.running[key] = RunningPod(
            process, log_path, termination_path, started, memory_limit=memory_limit_bytes(container)
        )
        status = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                {"type": "Ready", "status": "True", "lastTransitionTime": started},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": started},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        }
        core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def _write_waiting(self, core: Any, pod: dict[str, Any], container: dict[str, Any]) -> None:
        """The pod stays Pending with its container waiting on the image, as a kubelet reports a failing pull
        (ErrImagePull once, then ImagePullBackOff between retries; this stand-in never succeeds, so the latter)."""
        image = container.get("image", "")
        registry = image_registry(image)
        status = {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": image,
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": f'Back-off pulling image "{image}": dial tcp: lookup {registry}: no such host',
                        }
                    },
                }
            ],
        }
        core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"], {"status": status})

    def _enforce_memory_limit(self, running: RunningPod) -> None:
        """SIGKILL the container's processes once together they use more than the memory limit (the cgroup OOM
        killer's verdict)."""
        if running.memory_limit is None or running.oom_killed or running.process.poll() is not None:
            return
        if process_group_rss_bytes(running.process.pid) > running.memory_limit:
            running.oom_killed = True
            os.killpg(running.process.pid, signal.SIGKILL)

    def _reap(self, core: Any, pod: dict[str, Any], key: str) -> None:
        running = self.running[key]
        self._enforce_memory_limit(running)
        returncode = running.process.poll()
        if returncode is None:
            return
        code = exit_status(returncode)
        del self.running[key]
        self.finished.add(key)
        message = ""
        if running.termination_path.exists():
            message = running.termination_path.read_text(errors="replace")[:4096]
        if not message and code != 0:
            # terminationMessagePolicy FallbackToLogsOnError: the log tail stands in for the message.
            message = "\n".join(running.log_path.read_text(errors="replace").splitlines()[-80:])[-2048:]
        reason = "Completed" if code == 0 else ("OOMKilled" if running.oom_killed else "Error")
        self._write_terminated(core, pod, code, reason, message, running.started_at)

    def _write_terminated(
        self, core: Any, pod: dict[str, Any], code: int, reason: str, message: str, started: str
    ) -> None:
        container = pod["spec"]["containers"][0]
        finished = now_rfc3339()
        not_ready = {"status": "False", "reason": "PodCompleted", "lastTransitionTime": finished}
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": "Ready", **not_ready}, {"type": "ContainersReady", **not_ready}],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": reason,
                            "message": message,
                            "startedAt": started,
                            "finishedAt": finished,
                        }
                    },
                }
            ],
        }
        core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"], {"status": status})

    def _delete(self, core: Any, pod: dict[str, Any], key: str) -> None:
        from kubernetes import client

        running = self.running.get(key)
        grace = pod["metadata"].get("deletionGracePeriodSeconds") or 30
        if running and running.process.poll() is None:
            if running.deleting_since is None:
                running.deleting_since = time.monotonic()
                os.killpg(running.process.pid, signal.SIGTERM)
                return
            if time.monotonic() - running.deleting_since < grace:
                return
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(timeout=10)
        self.running.pop(key, None)
        self.finished.add(key)
        # The kubelet's final word: remove the object once the container is gone.
        try:
            core.delete_namespaced_pod(
                pod["metadata"]["name"],
                pod["metadata"]["namespace"],
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": pod["metadata"]["uid"]}),
            )
        except client.ApiException as error:
            if error.status not in (404, 409):
                raise

    def _pod_kubeconfig(self, pod: dict[str, Any]) -> str:
        """What the projected service-account token gives a real pod, as a kubeconfig file."""
        from kubernetes import client

        core = client.CoreV1Api(self.control_plane.api_client())
        namespace = pod["metadata"]["namespace"]
        account = pod["spec"].get("serviceAccountName") or "default"
        # Bound to the pod, as the kubelet's projected token is: the API server then names the pod in the token's
        # user info (authentication.kubernetes.io/pod-name), which the trainer admission policy checks.
        bound_to = client.V1BoundObjectReference(
            api_version="v1", kind="Pod", name=pod["metadata"]["name"], uid=pod["metadata"]["uid"]
        )
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[self.control_plane.server], expiration_seconds=7200, bound_object_ref=bound_to
            )
        )
        token = core.create_namespaced_service_account_token(account, namespace, request).status.token
        path = self.pod_dir / f"{namespace}_{pod['metadata']['name']}.kubeconfig"
        plane = self.control_plane
        path.write_text(yaml.safe_dump(kubeconfig_document(plane.server, token, plane.ca_file, account, namespace)))
        return str(path)

    @staticmethod
    def _base_env() -> dict[str, str]:
        """What a container image provides: PATH, HOME and Python's locale; nothing from the test process."""
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        return {key: os.environ[key] for key in keep if key in os.environ}


def main(argv: list[str] | None = None) -> None:
    """Run the stand-in as its own process (the demo keeps it alive after `make demo` returns)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work-dir", required=True, type=Path, help="control-plane work dir (kubeconfig, pod logs)")
    parser.add_argument("--server", required=True, help="API server URL")
    parser.add_argument("--node", action="append", required=True, help="node to serve (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE laid over every pod's environment")
    args = parser.parse_args(argv)
    plane = ControlPlane(work_dir=args.work_dir, server=args.server, kubeconfig=str(args.work_dir / "admin.kubeconfig"))
    extra_env = dict(item.split("=", 1) for item in args.env)
    standin = KubeletStandin(plane, args.node, extra_env=extra_env).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    standin.stop()


if __name__ == "__main__":
    main()
