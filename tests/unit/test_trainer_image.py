"""The trainer image's pins kept honest (exactly the lock's, exactly what the trainer needs) and its entry point's help
cheap; the built image itself is tested in tests/integration/test_images.py."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "trainer-image" / "requirements.txt"
LOCK = REPO / "requirements" / "dev.lock"
PYPROJECT = REPO / "pyproject.toml"
# Beyond the trainer extra: the progress channel patches status.progress with the Kubernetes client.
EXTRA_TRAINER_DEPENDENCIES = ("kubernetes",)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==(\S+)$")


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line (comments and `# via` lines skipped)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def pyproject() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())


def trainer_roots() -> list[Requirement]:
    """What the image must satisfy: kubetune's base dependencies, its trainer extra, and the extra ones above."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    names = [*project["dependencies"], *project["optional-dependencies"]["trainer"], *EXTRA_TRAINER_DEPENDENCIES]
    return [Requirement(name) for name in names]


def dependency_closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots need on this platform (Linux, Python 3.11), from the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(root, frozenset(root.extras)) for root in roots]
    while stack:
        requirement, extras = stack.pop()
        key = (canonicalize_name(requirement.name), extras)
        if key in seen:
            continue
        seen.add(key)
        for text in importlib.metadata.distribution(requirement.name).requires or []:
            dependency = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                stack.append((dependency, frozenset(dependency.extras)))
    return {name for name, _ in seen}


def test_every_pin_matches_the_lock() -> None:
    lock = pins(LOCK)
    required = pins(REQUIREMENTS)

    mismatched = {name: (version, lock.get(name)) for name, version in required.items() if lock.get(name) != version}

    assert required, "requirements.txt pins nothing"
    assert mismatched == {}, f"pins that differ from requirements/dev.lock (ours, lock's): {mismatched}"


def test_every_trainer_dependency_of_pyproject_is_pinned() -> None:
    required = pins(REQUIREMENTS)

    missing = [str(root) for root in trainer_roots() if canonicalize_name(root.name) not in required]

    assert missing == []


def test_the_pins_are_exactly_what_the_trainer_needs() -> None:
    # The image installs with --no-deps, so the set must be closed; nothing beyond it (no operator or test tools).
    needed = dependency_closure(trainer_roots())
    required = set(pins(REQUIREMENTS))

    assert sorted(needed - required) == [], "needed but not pinned"
    assert sorted(required - needed) == [], "pinned but not needed"
    assert not {"kopf", "moto", "pytest", "ruff", "mypy"} & required


def test_help_exits_zero_without_importing_torch() -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['kubetune_trainer', '--help']\n"
        "try:\n"
        "    runpy.run_module('kubetune_trainer', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    code = done.code\n"
        "print('RESULT', code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)

    assert "Usage: python -m kubetune_trainer" in result.stdout, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "RESULT 0 False False"


def test_python_m_kubetune_trainer_help_exits_zero() -> None:
    command = [sys.executable, "-m", "kubetune_trainer", "run", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    assert "--config FILE" in result.stdout
