"""A local OCI registry (CNCF distribution) that the real node pulls from, and single-layer images written by hand."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.processes import (
    ManagedProcess,
    free_port,
    http_answers,
    http_ok,
    machine_dir,
    testbed_binary,
    wait_for,
)

# The name pods use for the local registry: containerd maps it to the registry's real address (see tests.testbed.node),
# so references stay the same whatever port the registry has this run. `.test` is reserved (RFC 6761): no DNS
# lookup of it can reach anything else.
REGISTRY_NAME = "registry.kubetune.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def htpasswd_line(username: str, password: str) -> str:
    """One htpasswd entry; distribution accepts bcrypt only."""
    import bcrypt

    return f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"


def registry_config(storage_dir: Path, address: str, port: int, htpasswd: Path | None = None) -> dict[str, Any]:
    """distribution's config.yml: filesystem storage, plain HTTP on address:port, quiet logs; with `htpasswd`, every
    request needs one of its users (HTTP Basic, as a registry behind a password)."""
    auth = {"auth": {"htpasswd": {"realm": "kubetune-testbed", "path": str(htpasswd)}}} if htpasswd else {}
    return {
        **auth,
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            # Uploads of a killed push stay until the next one reuses or replaces them; no purge pass at start.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # The secret signs upload state between requests; fixed, as one registry process serves this test bed.
        "http": {
            "addr": f"{address}:{port}",
            "secret": "kubetune-testbed",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }


@dataclass(frozen=True)
class ImageFile:
    """One file of a hand-written image: its path inside the image, its bytes, its mode."""

    path: str
    data: bytes
    mode: int = 0o755


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: list[ImageFile], directories: dict[str, int]) -> bytes:
    """An uncompressed, reproducible layer (fixed mtimes, root owner, sorted) with `directories` (path → mode)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parents = {str(Path(f.path).parent) for f in files} - {"."}
        for path in sorted(parents | set(directories)):
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, directories.get(path, 0o755)
            tar.addfile(info)
        for item in sorted(files, key=lambda f: f.path):
            info = tarfile.TarInfo(item.path)
            info.size, info.mode = len(item.data), item.mode
            tar.addfile(info, io.BytesIO(item.data))
    return buffer.getvalue()


def write_oci_layout(
    directory: Path,
    tag: str,
    files: list[ImageFile],
    entrypoint: list[str],
    directories: dict[str, int] | None = None,
    user: str = "",
) -> str:
    """A one-layer image as an OCI image layout (what `skopeo copy oci:DIR:TAG` and `ctr images import` read);
    byte-for-byte the same for the same input, so a registry keeps one copy of it. Returns the manifest digest."""
    layer = layer_tar(files, directories or {})
    compressed = gzip.compress(layer, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [_sha256(layer)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": _sha256(compressed), "size": len(compressed)}],
        },
        sort_keys=True,
    ).encode()
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in (compressed, config, manifest):
        (blobs / _sha256(blob).removeprefix("sha256:")).write_bytes(blob)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": _sha256(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return _sha256(manifest)


@dataclass
class LocalRegistry:
    """distribution's `registry serve` with its blobs in `storage_dir`, kept across runs so a push uploads only layers
    the registry lacks. Push with `push`; pods name images `image(name)` (REGISTRY_NAME/NAME...)."""

    log_dir: Path
    storage_dir: Path = field(default_factory=lambda: machine_dir() / "registry")
    address: str = "127.0.0.1"
    port: int = 0
    htpasswd: Path | None = None
    process: ManagedProcess | None = None
    last_push_seconds: float = 0.0

    @property
    def endpoint(self) -> str:
        """host:port where the registry serves plain HTTP."""
        return f"{self.address}:{self.port}"

    def start(self) -> LocalRegistry:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.address)
        config = self.log_dir / "registry-config.yml"
        config.write_text(yaml.safe_dump(registry_config(self.storage_dir, self.address, self.port, self.htpasswd)))
        # Blobs no tag reaches any more (an image pushed again under its tag leaves its old layers behind).
        subprocess.run(
            [testbed_binary("registry"), "garbage-collect", "--delete-untagged", str(config)],
            capture_output=True, check=False,
        )  # fmt: skip
        self.process = ManagedProcess("registry", [testbed_binary("registry"), "serve", str(config)], self.log_dir)
        self.process.start()
        process = self.process
        # /v2/ answers 401 behind a password: any answer means the registry is up.
        wait_for(lambda: process.alive() and http_answers(f"http://{self.endpoint}/v2/"), 30, "the registry's /v2/")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    @staticmethod
    def image(name: str) -> str:
        """The reference pods use for `name` (a repository with a :tag or @digest)."""
        return f"{REGISTRY_NAME}/{name}"

    def push(self, source: str, name: str) -> str:
        """Copy `source` (any skopeo transport: `containers-storage:IMAGE` for podman's and buildah's images,
        `oci:DIR:TAG`) to the registry as `name` (repository:tag). Blobs the registry has are not sent again.
        Returns the digest-pinned reference pods should use: `image(repository@sha256:...)`."""
        with tempfile.TemporaryDirectory() as scratch:
            digest_file = Path(scratch) / "digest"
            started = time.monotonic()
            result = subprocess.run(
                ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"--digestfile={digest_file}",
                 source, f"docker://{self.endpoint}/{name}"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"skopeo copy {source} → {name} failed: {result.stderr.strip()}")
            digest = digest_file.read_text().strip()
        self.last_push_seconds = time.monotonic() - started
        repository = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        return self.image(f"{repository}@{digest}")

    def push_layout(self, layout: Path, tag: str, name: str) -> str:
        """Push an OCI image layout written by `write_oci_layout`; see `push`."""
        return self.push(f"oci:{layout}:{tag}", name)

    def has_manifest(self, repository: str, reference: str, headers: dict[str, str] | None = None) -> bool:
        """Whether the registry serves repository:reference (a tag or a digest); `headers` for one behind a password."""
        accept = {"Accept": OCI_MANIFEST + ", application/vnd.docker.distribution.manifest.v2+json", **(headers or {})}
        return http_ok(f"http://{self.endpoint}/v2/{repository}/manifests/{reference}", headers=accept)


PROBE_SOURCE = Path(__file__).parent / "probe" / "main.go"


def push_probe_image(registry: LocalRegistry, tag: str = "latest") -> str:
    """Build tests/testbed/probe (a static Go binary: no libc in the image) into a scratch image with a 1777
    directory /writable and an empty /data, push it, and return its digest-pinned reference."""
    with tempfile.TemporaryDirectory() as scratch:
        binary = Path(scratch) / "probe"
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
        subprocess.run(
            ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(binary), str(PROBE_SOURCE)],
            check=True, capture_output=True, env=env, cwd=scratch,
        )  # fmt: skip
        layout = Path(scratch) / "layout"
        files = [ImageFile("probe", binary.read_bytes())]
        write_oci_layout(layout, tag, files, ["/probe"], directories={"writable": 0o1777, "data": 0o755})
        return registry.push_layout(layout, tag, f"kubetune-testbed/probe:{tag}")
