"""Debian's Prometheus on loopback, scraping given targets every second, queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.processes import ManagedProcess, free_port, http_ok, wait_for


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).exists():
        raise FileNotFoundError("prometheus is missing: `make testbed` installs Debian's prometheus package")
    return path


def scrape_config(jobs: dict[str, list[str]], interval: str = "1s") -> dict[str, Any]:
    """prometheus.yml scraping each job's host:port targets."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        # honor_labels as the chart's ServiceMonitor sets it: per-job series carry their own namespace/job labels.
        "scrape_configs": [
            {"job_name": name, "honor_labels": True, "static_configs": [{"targets": targets}]}
            for name, targets in sorted(jobs.items())
        ],
    }


@dataclass
class PrometheusServer:
    """A Prometheus process with its own config and TSDB under work_dir."""

    work_dir: Path
    jobs: dict[str, list[str]]
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(self.jobs)))
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
        if self.process:
            self.process.stop()
