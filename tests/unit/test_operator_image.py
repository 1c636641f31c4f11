"""The operator image's inputs kept honest: a build context that holds what the Dockerfile copies, and requirements
pinned exactly as in requirements/dev.lock, covering everything the operator imports (the built image itself is
tested in tests/integration/test_images.py)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.testbed.processes import REPO_ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = REPO_ROOT / "operator" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / "operator" / "Dockerfile.dockerignore"
REQUIREMENTS = REPO_ROOT / "operator" / "requirements.txt"
ENTRY_PACKAGE = "kubetune_operator"
FIRST_PARTY = {"kubetune", "kubetune_operator"}


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    line: int
    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, arguments = " ".join(pending).partition(" ")
            instructions.append(Instruction(start, keyword.upper(), arguments.strip()))
            pending = []
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def of_kind(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [item for item in instructions if item.keyword == keyword]


def copies(instructions: list[Instruction]) -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context (flags such as --chown dropped)."""
    pairs = []
    for item in of_kind(instructions, "COPY"):
        parts = [part for part in item.arguments.split() if not part.startswith("--")]
        pairs.append((parts[0], parts[-1]))
    return pairs


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in of_kind(instructions, "ENV"):
        values.update(dict(re.findall(r"([A-Z_]+)=(\S+)", item.arguments)))
    return values


@pytest.fixture(scope="module")
def pinning() -> ModuleType:
    """operator/pin_requirements.py, a script beside the Dockerfile rather than part of an installed package."""
    spec = importlib.util.spec_from_file_location("pin_requirements", REPO_ROOT / "operator" / "pin_requirements.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requirement_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


# ---------------------------------------------------------------------------------------------------------------------
# The Dockerfile


def test_build_context_keeps_every_copied_source() -> None:
    patterns = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    sources = [source for source, _ in copies(parse_dockerfile(DOCKERFILE.read_text()))]

    assert patterns[0] == "*"
    assert all(f"!{source}" in patterns for source in sources)


# ---------------------------------------------------------------------------------------------------------------------
# requirements.txt against the lock


def test_requirements_file_is_what_the_generator_writes(pinning: ModuleType) -> None:
    assert REQUIREMENTS.read_text() == pinning.render_requirements(), (
        "operator/requirements.txt is stale: run `python operator/pin_requirements.py --write`"
    )


def test_every_pin_matches_the_lock(pinning: ModuleType) -> None:
    lock = pinning.read_lock_pins((REPO_ROOT / "requirements" / "dev.lock").read_text())

    mismatched = {
        name: (version, lock.get(name)) for name, version in requirement_pins().items() if lock.get(name) != version
    }

    assert requirement_pins()
    assert not mismatched


def test_every_operator_dependency_is_pinned(pinning: ModuleType) -> None:
    import tomllib

    roots = pinning.operator_root_requirements(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text()))
    needed = set(pinning.dependency_closure(roots))

    assert {"kopf", "kubernetes-asyncio", "prometheus-client", "pydantic", "pyyaml", "click"} <= needed
    assert "boto3" not in needed and "botocore" not in needed
    assert needed <= requirement_pins().keys()


def test_nothing_of_the_trainer_is_pinned() -> None:
    assert (
        not {
            "torch",
            "transformers",
            "peft",
            "trl",
            "bitsandbytes",
            "accelerate",
            "datasets",
            "moto",
            "boto3",
            "botocore",
        }
        & requirement_pins().keys()
    )


def imported_names(node: ast.AST) -> list[str]:
    """Absolute module names an import statement names; `from kubetune import api` names kubetune and kubetune.api."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        submodules = [f"{node.module}.{alias.name}" for alias in node.names] if node.module in FIRST_PARTY else []
        return [node.module, *submodules]
    return []


def reachable_imports(package_dirs: dict[str, Path]) -> set[str]:
    """Top-level modules imported by the entry package and, transitively, by the first-party modules it imports."""
    pending = [*package_dirs[ENTRY_PACKAGE].glob("*.py")]
    seen: set[Path] = set()
    third_party: set[str] = set()
    while pending:
        path = pending.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in imported_names(node):
                top, _, rest = name.partition(".")
                if top in FIRST_PARTY:
                    pending.append(package_dirs[top] / (f"{rest.split('.')[0]}.py" if rest else "__init__.py"))
                elif top not in sys.stdlib_module_names:
                    third_party.add(top)
    return third_party


def test_every_module_the_operator_can_import_comes_from_a_pinned_distribution() -> None:
    package_dirs = {"kubetune": REPO_ROOT / "kubetune", "kubetune_operator": REPO_ROOT / "operator" / ENTRY_PACKAGE}
    providers = importlib.metadata.packages_distributions()

    imported = reachable_imports(package_dirs)
    unpinned = {
        module: providers.get(module)
        for module in imported
        if not {canonicalize_name(d) for d in providers.get(module, [])} & requirement_pins().keys()
    }

    assert {"kopf", "kubernetes_asyncio", "prometheus_client", "pydantic"} <= imported
    assert not unpinned, f"imported by the operator but not in operator/requirements.txt: {unpinned}"


def test_a_bad_lock_line_is_named_by_number(pinning: ModuleType) -> None:
    with pytest.raises(pinning.PinningError, match=r"dev.lock:3: expected `name==version`, got 'kopf>=1'"):
        pinning.read_lock_pins("a==1\n    # via b\nkopf>=1\n")


def test_an_unpinned_dependency_is_refused(pinning: ModuleType) -> None:
    with pytest.raises(pinning.PinningError, match=r"not pinned in requirements/dev\.lock: left-pad"):
        pinning.pinned_requirements({"kopf", "left-pad"}, {"kopf": "1.45.2"})


def test_closure_follows_extras_only_when_asked(pinning: ModuleType) -> None:
    plain = pinning.dependency_closure([Requirement("moto")])
    server = pinning.dependency_closure([Requirement("moto[server]")])

    assert "flask" not in plain
    assert "flask" in server
    assert "boto3" in plain
