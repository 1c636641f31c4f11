"""moto's S3 server over HTTP on this machine, used through real boto3 clients."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.testbed.processes import ManagedProcess, free_port, http_ok, wait_for

# moto accepts any credentials; these exist so that the code under test goes through its normal credential path.
ACCESS_KEY_ID = "testbed-access-key"
SECRET_ACCESS_KEY = "testbed-secret-key"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A moto S3 server process; `env` is what a client needs to reach it."""

    log_dir: Path
    host: str = "127.0.0.1"  # the test bed's host address when pods on the real node must reach it
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self) -> S3Server:
        self.port = self.port or free_port(self.host)
        argv = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self.process = ManagedProcess("moto-s3", argv, self.log_dir).start()
        process = self.process
        wait_for(lambda: process.alive() and http_ok(f"{self.endpoint}/moto-api/"), 60, "moto S3 server")
        return self

    @contextmanager
    def refusing_connections(self) -> Iterator[None]:
        """While inside, S3's port answers every new connection with a TCP reset, as a stopped server's does (moto
        keeps its objects in memory, so it is not stopped: a restart would lose them). Needs root (iptables)."""
        rule = ["INPUT", "-p", "tcp", "-d", self.host, "--dport", str(self.port), "-j", "REJECT",
                "--reject-with", "tcp-reset"]  # fmt: skip
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["iptables", "-D", *rule], check=True, capture_output=True)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        )

    def stop(self) -> None:
        if self.process:
            self.process.stop()
