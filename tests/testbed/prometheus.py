"""Debian's Prometheus on loopback, scraping given targets or kubetune's pods every second, queried over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.processes import REPO_ROOT, ManagedProcess, free_port, http_ok, wait_for


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).exists():
        raise FileNotFoundError("prometheus is missing: `make testbed` installs Debian's prometheus package")
    return path


@dataclass(frozen=True)
class PodDiscovery:
    """Where kubetune's pods are found: a kubeconfig that may list pods, and the components to scrape."""

    kubeconfig: str
    components: tuple[str, ...] = ("operator", "trainer")


COMPONENT_LABEL = "app.kubernetes.io/component"
DISCOVERY_SECONDS = 1.0


def pod_scrape_jobs(discovery: PodDiscovery, targets_dir: Path) -> list[dict[str, Any]]:
    """One job per kubetune component (`kubetune-operator`, `kubetune-trainer`), its targets read from a file that
    `discover_pods` keeps current. Debian's Prometheus is built without Kubernetes discovery, so file discovery (a
    standard Prometheus mechanism) carries what `kubernetes_sd_configs` would find: running pods' `metrics` ports."""
    return [
        {
            "job_name": f"kubetune-{component}",
            "honor_labels": True,
            "file_sd_configs": [{"files": [str(targets_dir / f"{component}.json")], "refresh_interval": "1s"}],
        }
        for component in discovery.components
    ]


def pod_targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """File-discovery entries for the running pods' container ports named `metrics` (podIP:port)."""
    targets = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if (pod.get("status") or {}).get("phase") != "Running" or not ip:
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    # The pod's namespace and name, as a PodMonitor labels its targets (honor_labels: a series'
                    # own namespace, e.g. a FineTuneJob's on the operator's per-job series, wins).
                    labels = {"namespace": pod["metadata"]["namespace"], "pod": pod["metadata"]["name"]}
                    targets.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return targets


def discover_pods(discovery: PodDiscovery, targets_dir: Path, stop_after: float | None = None) -> None:
    """Write each component's targets file every second (atomically: Prometheus may read it at any time)."""
    import time

    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=discovery.kubeconfig))
    sanitize = client.ApiClient().sanitize_for_serialization
    deadline = None if stop_after is None else time.monotonic() + stop_after
    targets_dir.mkdir(parents=True, exist_ok=True)
    while deadline is None or time.monotonic() < deadline:
        for component in discovery.components:
            try:
                listed = core.list_pod_for_all_namespaces(label_selector=f"{COMPONENT_LABEL}={component}")
            except Exception:  # the API server restarting: keep the last targets, try again
                continue
            entries = pod_targets([sanitize(pod) for pod in listed.items])
            scratch = targets_dir / f".{component}.json"
            scratch.write_text(json.dumps(entries))
            scratch.replace(targets_dir / f"{component}.json")
        time.sleep(DISCOVERY_SECONDS)


def scrape_config(
    jobs: dict[str, list[str]], interval: str = "1s", pods: PodDiscovery | None = None, targets_dir: Path = Path(".")
) -> dict[str, Any]:
    """prometheus.yml scraping each job's host:port targets, and kubetune's pods when `pods` says where they are."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        # honor_labels as the chart's ServiceMonitor sets it: per-job series carry their own namespace/job labels.
        "scrape_configs": [
            *({"job_name": name, "honor_labels": True, "static_configs": [{"targets": targets}]}
              for name, targets in sorted(jobs.items())),
            *(pod_scrape_jobs(pods, targets_dir) if pods else []),
        ],
    }  # fmt: skip


@dataclass
class PrometheusServer:
    """A Prometheus process with its own config and TSDB under work_dir."""

    work_dir: Path
    jobs: dict[str, list[str]]
    pods: PodDiscovery | None = None
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None
    discovery: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        targets_dir = self.work_dir / "targets"
        config.write_text(yaml.safe_dump(scrape_config(self.jobs, pods=self.pods, targets_dir=targets_dir)))
        if self.pods is not None:
            argv = [sys.executable, "-m", "tests.testbed.prometheus", self.pods.kubeconfig, str(targets_dir)]
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            self.discovery = ManagedProcess("prometheus-pod-discovery", argv, self.work_dir, env=env).start()
        argv = [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]
        self.process = ManagedProcess("prometheus", argv, self.work_dir).start()
        process = self.process
        wait_for(lambda: process.alive() and http_ok(f"{self.url}/-/ready"), 60, "prometheus /-/ready")
        return self

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise ValueError(f"PromQL {promql!r} failed: {body.get('error')}")
        return list(body["data"]["result"])

    def targets_up(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            active = json.load(response)["data"]["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)

    def stop(self) -> None:
        for process in (self.process, self.discovery):
            if process:
                process.stop()


def main() -> None:
    """`python -m tests.testbed.prometheus KUBECONFIG TARGETS_DIR`: keep the pod targets current until stopped."""
    discover_pods(PodDiscovery(kubeconfig=sys.argv[1]), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
