"""The trainer image's recipe kept honest without a Docker engine: pins, sources, entry point, user."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer-image" / "Dockerfile"
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


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


INSTRUCTIONS = dockerfile_instructions(DOCKERFILE.read_text())


def instruction_values(name: str) -> list[str]:
    return [arguments for instruction, arguments in INSTRUCTIONS if instruction == name]


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


def test_copy_sources_exist_in_the_repository() -> None:
    sources: list[str] = []
    for arguments in instruction_values("COPY"):
        words = shlex.split(arguments)
        if any(word.startswith("--from") for word in words):
            continue
        sources.extend(word for word in words[:-1] if not word.startswith("--"))

    assert {"kubetune/", "trainer-image/kubetune_trainer/", "trainer-image/requirements.txt"} <= set(sources)
    assert [source for source in sources if not (REPO / source).exists()] == []


def test_the_image_installs_the_pinned_requirements_without_resolving_others() -> None:
    runs = " ".join(instruction_values("RUN"))

    assert "--no-deps -r /opt/kubetune/requirements.txt" in runs


def test_entrypoint_runs_the_trainer_module_which_exists() -> None:
    assert [json.loads(value) for value in instruction_values("ENTRYPOINT")] == [["python", "-m", "kubetune_trainer"]]
    assert [json.loads(value) for value in instruction_values("CMD")] == [["run"]]
    assert (REPO / "trainer-image" / "kubetune_trainer" / "__main__.py").is_file()


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


def test_the_image_runs_as_the_non_root_uid_1000() -> None:
    users = instruction_values("USER")
    runs = " ".join(instruction_values("RUN"))

    assert users, "no USER instruction: the image would run as root"
    assert users[-1] == "1000"
    assert "useradd --uid 1000" in runs


def test_the_image_records_the_kubetune_version_of_pyproject() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)

    assert f"KUBETUNE_VERSION={project['version']}" in instruction_values("ARG")


def test_the_image_is_on_a_cuda_base_with_python_3_11() -> None:
    arguments = instruction_values("ARG")
    base = next(value.split("=", 1)[1] for value in arguments if value.startswith("BASE_IMAGE="))
    runs = " ".join(instruction_values("RUN"))

    assert base.startswith("nvidia/cuda:13.")
    assert "uv python install 3.11" in runs
