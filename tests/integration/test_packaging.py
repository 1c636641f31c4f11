"""The package as a user installs it, in a fresh venv: each extra gives working commands, and no more than they need."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api import GROUP, PLURAL, VERSION
from tests.testbed.controlplane import ControlPlane
from tests.testbed.images import uv_binary
from tests.testbed.processes import REPO_ROOT

pytestmark = pytest.mark.integration

EXAMPLE = REPO_ROOT / "examples" / "agnews-qlora.yaml"
CRD_FILE = REPO_ROOT / "crds" / f"{GROUP}_{PLURAL}.yaml"
HEAVY_MODULES = ("boto3", "torch", "transformers", "peft", "trl", "datasets", "kopf")
# What the package's build reads (pyproject's package-dir): copied, so that setuptools' build/ never reaches the tree.
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "kubetune", "kubetune_cli", "operator", "trainer-image")


def uv_install(venv: Path, requirement: str) -> None:
    """Install from uv's cache (the dev venv's sync filled it): the same wheels a user would get from PyPI."""
    environment = {**os.environ, "VIRTUAL_ENV": str(venv)}
    result = subprocess.run(
        [str(uv_binary()), "pip", "install", "-q", "--offline", "--reinstall-package", "kubetune", requirement],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def kubetune(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Outside the repository, so that nothing imports the working tree instead of what was installed.
    return subprocess.run(
        [str(venv / "bin" / "kubetune"), *args], cwd=venv, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's sources as a release would hold them."""
    root = tmp_path_factory.mktemp("source")
    ignored = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PACKAGE_SOURCES:
        origin = REPO_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, root / name, ignore=ignored)
        else:
            shutil.copy2(origin, root / name)
    return root


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("user") / "venv"
    result = subprocess.run(
        [str(uv_binary()), "venv", "-q", "--python", "3.11", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    yield path


def test_the_bare_package_names_the_cli_extra_instead_of_a_traceback(venv: Path, source: Path) -> None:
    uv_install(venv, str(source))

    result = kubetune(venv, "validate", "-f", str(EXAMPLE))

    assert result.returncode == 1
    assert "kubetune: the command line needs click: pip install 'kubetune[cli]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_extra_validates_reads_status_and_logs_from_a_real_api_server_without_s3_or_ml(
    venv: Path, source: Path, kube: ControlPlane, namespace: str
) -> None:
    uv_install(venv, f"{source}[cli]")
    applied = kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    assert applied.returncode == 0, applied.stderr
    kube.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s", check=True)
    kube.apply(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": "packaged", "namespace": namespace},
            "spec": {
                "model": {"uri": "s3://models/tiny"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://runs/packaged"},
            },
        }
    )

    validated = kubetune(venv, "validate", "-f", str(EXAMPLE))
    status = kubetune(venv, "status", "packaged", "-n", namespace, "--kubeconfig", kube.kubeconfig)
    logs = kubetune(venv, "logs", "packaged", "-n", namespace, "--kubeconfig", kube.kubeconfig)
    importable = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            f"import importlib.util as u; print(sorted(m for m in {HEAVY_MODULES!r} if u.find_spec(m)))",
        ],
        cwd=venv,
        capture_output=True,
        text=True,
        check=True,
    )

    assert validated.returncode == 0, validated.stderr
    assert validated.stdout.strip() == f"{EXAMPLE}: 1 FineTuneJob(s) valid"
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"FineTuneJob {namespace}/packaged"
    assert logs.returncode == 1
    assert f"FineTuneJob {namespace}/packaged: no trainer Job yet" in logs.stderr
    assert importable.stdout.strip() == "[]"


def test_train_without_the_trainer_extra_names_it(venv: Path, source: Path) -> None:
    uv_install(venv, f"{source}[cli]")

    result = kubetune(venv, "train", "-f", str(EXAMPLE))

    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: `kubetune train` needs torch, transformers, peft, trl, datasets, boto3, not installed here: "
        "pip install 'kubetune[trainer]'"
    )
    checked = kubetune(venv, "check-endpoint", "-f", str(EXAMPLE), "--base-url", "http://x/v1", "--model", "m")
    assert checked.returncode == 1
    assert "`kubetune check-endpoint` needs torch" in checked.stderr
    assert "pip install 'kubetune[trainer]'" in checked.stderr
