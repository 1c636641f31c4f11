"""`make images`: the operator and trainer images built from their Dockerfiles with buildah, on a Debian base made here.

No registry is reachable from this machine, so the Dockerfiles' production bases (python:3.11-slim, the CUDA base, uv's
image) cannot be pulled. Build arguments swap them for local ones: a Python 3.11 root filesystem from Debian's packages
(`debootstrap`, imported with podman) and an image holding the uv binary the Makefile installed. Everything else comes
from the package indexes; wheels come from the host's uv cache, and buildah's layer cache keeps a rebuild after a code
change to the layers that copy code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.testbed.processes import REPO_ROOT, cache_dir
from tests.testbed.registry import LocalRegistry

LOCAL_BASE = "localhost/kubetune/debian-python:bookworm"
# The label of a Dockerfile's build stage (llama-server-image/Dockerfile): its cached layers are not pruned.
BUILD_STAGE_LABEL = "io.kubetune.stage=build"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Where a build step sees the host's CA bundle (a TLS-inspecting proxy between this machine and the package index).
BUILD_CA_PATH = "/run/kubetune-host-ca.crt"
UV_CACHE_IN_BUILD = "/root/.cache/uv"


@dataclass(frozen=True)
class ImageRecipe:
    """One of the product's images: its Dockerfile and the local tag `make images` gives it."""

    name: str
    dockerfile: Path
    tag: str


OPERATOR = ImageRecipe("operator", REPO_ROOT / "operator" / "Dockerfile", "localhost/kubetune/operator:dev")
TRAINER = ImageRecipe("trainer", REPO_ROOT / "trainer-image" / "Dockerfile", "localhost/kubetune/trainer:dev")
LLAMA_SERVER = ImageRecipe(
    "llama-server", REPO_ROOT / "llama-server-image" / "Dockerfile", "localhost/kubetune/llama-server:dev"
)
RECIPES = {recipe.name: recipe for recipe in (OPERATOR, TRAINER, LLAMA_SERVER)}


class ImageBuildError(RuntimeError):
    """A build step failed; the message names the step and the tail of its output."""


def uv_binary() -> Path:
    """The uv the Makefile installed (`.cache/uv/bin/uv`), or the one on PATH."""
    local = cache_dir() / "uv" / "bin" / "uv"
    found = local if local.exists() else (Path(p) if (p := shutil.which("uv")) else None)
    if found is None:
        raise FileNotFoundError(f"{local} is missing: `make venv` installs uv there")
    return found


def uv_version(uv: Path) -> str:
    """`uv --version` is `uv 0.13.8 (...)`: the version alone."""
    return run([str(uv), "--version"]).split()[1]


def local_uv_image(version: str) -> str:
    return f"localhost/kubetune/uv:{version}"


def run(argv: Sequence[str], *, stdin: bytes | None = None) -> str:
    """Run a build step; its stdout, or ImageBuildError naming the command with the tail of its output."""
    result = subprocess.run(list(argv), input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        raise ImageBuildError(f"{' '.join(argv[:3])} failed (exit {result.returncode}):\n{tail}")
    return result.stdout.decode(errors="replace")


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0


def debootstrap_command(target: Path) -> list[str]:
    """A minimal Debian with Python 3.11 into `target`, from Debian's mirror (an index this machine reaches)."""
    return [
        "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
        DEBIAN_SUITE, str(target), DEBIAN_MIRROR,
    ]  # fmt: skip


def build_local_base() -> None:
    """What replaces python:3.11-slim and the CUDA base here: Debian bookworm's own Python 3.11, as a podman image."""
    with tempfile.TemporaryDirectory(prefix="kubetune-base-", dir=cache_dir()) as scratch:
        rootfs = Path(scratch) / "rootfs"
        run(debootstrap_command(rootfs))
        # Package downloads and indexes are build leftovers, not part of a base.
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
        run(["podman", "import", "--change", 'CMD ["python3"]', "-", LOCAL_BASE], stdin=tar)


def build_local_uv(uv: Path, tag: str) -> None:
    """An image holding only /uv, like uv's own image, from the uv binary the Makefile installed."""
    container = run(["buildah", "from", "scratch"]).strip()
    try:
        run(["buildah", "copy", container, str(uv), "/uv"])
        run(["buildah", "commit", "-q", container, tag])
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def build_command(
    recipe: ImageRecipe, uv_image: str, uv_cache: Path, ca_bundle: Path | None, context: Path = REPO_ROOT
) -> list[str]:
    """buildah bud of one Dockerfile on the local bases; the host's uv cache (and CA bundle) mounted in RUN steps."""
    argv = [
        "buildah", "bud", "--layers", "--isolation", "chroot",
        "-f", str(recipe.dockerfile), "-t", recipe.tag,
        "--build-arg", f"BASE_IMAGE={LOCAL_BASE}",
        "--build-arg", f"UV_IMAGE={uv_image}",
        "--build-arg", "UV_PYTHON_DOWNLOADS=never",
        "--volume", f"{uv_cache}:{UV_CACHE_IN_BUILD}",
    ]  # fmt: skip
    if ca_bundle is not None:
        argv += ["--volume", f"{ca_bundle}:{BUILD_CA_PATH}:ro", "--build-arg", f"SSL_CERT_FILE={BUILD_CA_PATH}"]
    return [*argv, str(context)]


def host_uv_cache(uv: Path) -> Path:
    """The host's uv cache (where `make venv` left every wheel the images need)."""
    return Path(run([str(uv), "cache", "dir"]).strip())


def image_size_bytes(name: str) -> int:
    return int(json.loads(run(["podman", "image", "inspect", name]))[0]["Size"])


def build_images(names: Sequence[str], log: Path | None = None) -> dict[str, float]:
    """Build the named images (bases first, each only when missing); seconds per step."""
    seconds: dict[str, float] = {}
    uv = uv_binary()
    uv_image = local_uv_image(uv_version(uv))
    for tag, make in ((LOCAL_BASE, build_local_base), (uv_image, lambda: build_local_uv(uv, uv_image))):
        if not image_exists(tag):
            started = time.monotonic()
            say(f"building {tag}")
            make()
            seconds[tag] = time.monotonic() - started
    ca_bundle = HOST_CA_BUNDLE if HOST_CA_BUNDLE.exists() else None
    for name in names:
        recipe = RECIPES[name]
        started = time.monotonic()
        say(f"building {recipe.tag} from {recipe.dockerfile.relative_to(REPO_ROOT)}")
        output = run(build_command(recipe, uv_image, host_uv_cache(uv), ca_bundle))
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.with_name(f"{log.stem}-{name}.log").write_text(output)
        seconds[recipe.tag] = time.monotonic() - started
        say(f"{recipe.tag}: {image_size_bytes(recipe.tag) / 1e9:.2f} GB in {seconds[recipe.tag]:.0f}s")
    # Earlier builds that no tag reaches any more (gigabytes each for the trainer); the layer cache of the current
    # ones stays, as their images are parents of the tagged ones. A build stage's layers are parents of no tagged
    # image: its label keeps them, or llama.cpp would be compiled again on every `make images`.
    run(["podman", "image", "prune", "--force", "--filter", f"label!={BUILD_STAGE_LABEL}"])
    return seconds


# podman here: runc (crun fails on this kernel's hybrid cgroups), cgroupfs, and ulimits within the hard limits (its
# defaults fail setrlimit).
PODMAN_RUN = [
    "podman", "--cgroup-manager=cgroupfs", "run", "--rm", "--runtime", "runc",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "none",
]  # fmt: skip


def run_in_image(
    image: str, args: Sequence[str] = (), *, entrypoint: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the image as it would run in a pod (its own user, no network, a read-only root with an empty /tmp)."""
    flags = ["--read-only", "--tmpfs", "/tmp"]
    if entrypoint is not None:
        flags += ["--entrypoint", entrypoint]
    for key, value in (env or {}).items():
        flags += ["--env", f"{key}={value}"]
    return subprocess.run([*PODMAN_RUN, *flags, image, *args], capture_output=True, text=True, timeout=300, check=False)


def image_config(image: str) -> dict[str, Any]:
    """The image's OCI config (User, Entrypoint, Cmd, Env, ...)."""
    return dict(json.loads(run(["podman", "image", "inspect", image]))[0]["Config"])


@dataclass(frozen=True)
class ProductImages:
    """Digest-pinned references of the product's images in the test bed's registry, as pods name them."""

    operator: str
    trainer: str
    llama_server: str

    @staticmethod
    def repository_and_digest(reference: str) -> tuple[str, str]:
        repository, _, digest = reference.partition("@")
        return repository, digest


def publish_images(registry: LocalRegistry) -> ProductImages:
    """Push what `make images` built to the registry (only layers it lacks travel); their pinned references."""
    missing = [recipe.tag for recipe in RECIPES.values() if not image_exists(recipe.tag)]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not built: run `make images`")
    pushed = {
        name: registry.push(f"containers-storage:{recipe.tag}", recipe.tag.removeprefix("localhost/"))
        for name, recipe in RECIPES.items()
    }
    return ProductImages(operator=pushed["operator"], trainer=pushed["trainer"], llama_server=pushed["llama-server"])


def say(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build kubetune's images on a local Debian base (buildah).")
    parser.add_argument(
        "images", nargs="*", metavar="IMAGE", help=f"which to build: {', '.join(RECIPES)} (default all)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.images) - set(RECIPES))
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}: choose from {', '.join(RECIPES)}")
    try:
        build_images(args.images or list(RECIPES), log=cache_dir() / "images" / "build.log")
    except ImageBuildError as error:
        sys.exit(f"make images: {error}")


if __name__ == "__main__":
    main()
