"""How `make images` calls buildah and debootstrap: local bases, no downloads of Python, the host's caches mounted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.testbed.images import (
    BUILD_CA_PATH,
    LOCAL_BASE,
    OPERATOR,
    TRAINER,
    UV_CACHE_IN_BUILD,
    ImageRecipe,
    build_command,
    debootstrap_command,
)

pytestmark = pytest.mark.unit


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == flag]


@pytest.mark.parametrize("recipe", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_build_swaps_the_production_bases_for_local_ones(recipe: ImageRecipe) -> None:
    argv = build_command(recipe, "localhost/kubetune/uv:0.13.8", Path("/uv-cache"), None)

    assert argv[:2] == ["buildah", "bud"]
    assert "--layers" in argv
    assert set(flag_values(argv, "--build-arg")) == {
        f"BASE_IMAGE={LOCAL_BASE}",
        "UV_IMAGE=localhost/kubetune/uv:0.13.8",
        "UV_PYTHON_DOWNLOADS=never",
    }
    assert flag_values(argv, "--volume") == [f"/uv-cache:{UV_CACHE_IN_BUILD}"]
    assert flag_values(argv, "-f") == [str(recipe.dockerfile)]
    assert flag_values(argv, "-t") == [recipe.tag]


def test_a_host_ca_bundle_is_mounted_read_only_and_named_to_the_build() -> None:
    argv = build_command(TRAINER, "uv", Path("/c"), Path("/etc/ssl/certs/ca-certificates.crt"))

    assert f"/etc/ssl/certs/ca-certificates.crt:{BUILD_CA_PATH}:ro" in flag_values(argv, "--volume")
    assert f"SSL_CERT_FILE={BUILD_CA_PATH}" in flag_values(argv, "--build-arg")


def test_the_base_is_a_minimal_debian_with_python_from_debians_mirror() -> None:
    argv = debootstrap_command(Path("/tmp/rootfs"))

    assert argv[:2] == ["debootstrap", "--variant=minbase"]
    assert "--include=python3,python3-venv,ca-certificates" in argv
    assert argv[-3:] == ["bookworm", "/tmp/rootfs", "http://deb.debian.org/debian"]
