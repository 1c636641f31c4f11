"""Starting, waiting on and stopping the local processes of the test bed, with logs kept per process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """The git-ignored cache of built binaries and converted models (KUBETUNE_CACHE overrides it)."""
    return Path(os.environ.get("KUBETUNE_CACHE", REPO_ROOT / ".cache")).resolve()


def machine_dir() -> Path:
    """What the test bed keeps per machine rather than per checkout (KUBETUNE_MACHINE_DIR overrides it): the real
    node's image store and the registry's blobs. The node is machine-wide anyway (one per machine), and every clone of
    the repository then pulls and pushes only the layers that changed instead of gigabytes again."""
    return Path(os.environ.get("KUBETUNE_MACHINE_DIR", "/var/lib/kubetune-testbed")).resolve()


def testbed_binary(name: str) -> str:
    """Path of a test-bed binary built by `make testbed`; a clear error when it is missing."""
    path = cache_dir() / "testbed" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make testbed` (tests/testbed/build-binaries.sh) first")
    return str(path)


def free_port(address: str = "127.0.0.1") -> int:
    """A free TCP port on `address` (loopback by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class ProcessExitedError(RuntimeError):
    """A test-bed process died: waiting on it any longer is pointless."""


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `check` until it is true; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessExitedError:
            raise
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(url: str, insecure_tls: bool = False, headers: dict[str, str] | None = None) -> bool:
    """True when GET url answers 2xx."""
    import ssl

    context = ssl._create_unverified_context() if insecure_tls else None
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def http_answers(url: str) -> bool:
    """True when GET url gets any HTTP answer (an error status included): something serves HTTP there."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ManagedProcess:
    """One background process with its log file; stopped with SIGTERM, then SIGKILL."""

    name: str
    argv: Sequence[str]
    log_dir: Path
    env: dict[str, str] | None = None
    pass_fds: tuple[int, ...] = ()  # open files the process inherits (e.g. a lock it must hold while it lives)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session so that stopping the test bed also stops the process's children.
            self.process = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                pass_fds=self.pass_fds,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def alive(self) -> bool:
        """True while running; raises with the log tail once it has exited, so waits on it end at once."""
        if not self.running():
            raise ProcessExitedError(f"{self.name} exited early; last log lines:\n{self.log_tail()}")
        return True

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
