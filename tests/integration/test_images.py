"""The images `make images` built, run as a pod runs them: user, entry point, installed set, a read-only root."""

from __future__ import annotations

import json
import tomllib

import pytest
from packaging.utils import canonicalize_name

from tests.testbed.images import LLAMA_SERVER, OPERATOR, TRAINER, image_config, image_exists, run_in_image
from tests.testbed.processes import REPO_ROOT

pytestmark = pytest.mark.integration

# Every installed distribution as {canonical name: version}, printed as JSON by the image's own Python.
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


@pytest.fixture(scope="module", autouse=True)
def built_images() -> None:
    missing = [recipe.tag for recipe in (OPERATOR, TRAINER, LLAMA_SERVER) if not image_exists(recipe.tag)]
    assert not missing, f"{missing} not built: run `make images`"


def pinned(requirements: str) -> dict[str, str]:
    """{canonical name: version} of a requirements file's `name==version` lines."""
    pins: dict[str, str] = {}
    for line in (REPO_ROOT / requirements).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed(image: str) -> dict[str, str]:
    result = run_in_image(image, ["-c", LIST_DISTRIBUTIONS], entrypoint="python")
    assert result.returncode == 0, result.stderr
    return {canonicalize_name(name): version for name, version in json.loads(result.stdout).items()}


def python_in(image: str, code: str) -> str:
    result = run_in_image(image, ["-c", code], entrypoint="python")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    "tag", [OPERATOR.tag, TRAINER.tag, LLAMA_SERVER.tag], ids=["operator", "trainer", "llama-server"]
)
def test_the_image_runs_as_uid_1000_not_root(tag: str) -> None:
    assert image_config(tag)["User"].split(":")[0] == "1000"
    assert python_in(tag, "import os; print(os.getuid(), os.getgid())") == "1000 1000"


def test_operator_installs_exactly_its_pins_and_nothing_of_the_trainer() -> None:
    found = installed(OPERATOR.tag)

    assert found == pinned("operator/requirements.txt")
    assert not {"torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "boto3", "botocore"} & found.keys()


def test_operator_entrypoint_starts_the_operator_and_refuses_bad_settings_on_a_read_only_root() -> None:
    config = image_config(OPERATOR.tag)
    # No cluster is reachable from the container: a bad setting must be refused before anything connects.
    refused = run_in_image(OPERATOR.tag, env={"KUBETUNE_METRICS_PORT": "seventy"})

    assert config["Entrypoint"] == ["python", "-m", "kubetune_operator"]
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "KUBETUNE_METRICS_PORT" in refused.stderr


def test_operator_imports_every_module_of_its_package() -> None:
    code = (
        "import pkgutil, importlib, kubetune_operator; "
        "names = [m.name for m in pkgutil.iter_modules(kubetune_operator.__path__)]; "
        "[importlib.import_module('kubetune_operator.' + n) for n in names]; print(len(names))"
    )

    assert int(python_in(OPERATOR.tag, code)) >= 5


def test_trainer_installs_exactly_its_pins() -> None:
    assert installed(TRAINER.tag) == pinned("trainer-image/requirements.txt")


def test_trainer_entrypoint_and_help_on_a_read_only_root() -> None:
    config = image_config(TRAINER.tag)
    help_text = run_in_image(TRAINER.tag, ["--help"])
    run_help = run_in_image(TRAINER.tag, ["run", "--help"])

    assert config["Entrypoint"] == ["python", "-m", "kubetune_trainer"]
    assert config["Cmd"] == ["run"]
    assert help_text.returncode == 0, help_text.stderr
    assert "Usage: python -m kubetune_trainer" in help_text.stdout
    assert run_help.returncode == 0, run_help.stderr
    assert "--config FILE" in run_help.stdout


def test_the_operator_image_cannot_import_s3_or_the_ml_stack() -> None:
    absent = python_in(
        OPERATOR.tag,
        "import importlib.util as u; "
        "print(sorted(m for m in ('boto3', 'torch', 'transformers', 'peft', 'trl', 'datasets') if not u.find_spec(m)))",
    )

    assert absent == "['boto3', 'datasets', 'peft', 'torch', 'transformers', 'trl']"


def test_trainer_records_the_kubetune_version_of_pyproject() -> None:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]

    assert f"KUBETUNE_VERSION={version}" in image_config(TRAINER.tag)["Env"]


def test_trainer_stack_imports_and_quantizes_4bit_on_the_cpu_in_the_image() -> None:
    code = (
        "import torch, bitsandbytes as bnb, peft, trl, transformers, boto3, kubernetes\n"
        "import kubetune_trainer.backends.local\n"
        "layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type='nf4')\n"
        "layer = layer.to('cpu')\n"
        "print(torch.__version__.split('+')[0], tuple(layer(torch.ones(2, 64)).shape))"
    )

    torch_version = pinned("trainer-image/requirements.txt")["torch"]

    assert python_in(TRAINER.tag, code).splitlines()[-1] == f"{torch_version} (2, 64)"


def test_the_trainer_stack_writes_nothing_outside_tmp_on_a_read_only_root() -> None:
    # The report's chart imports matplotlib, whose cache defaults to the (read-only) home: it must go to /tmp.
    code = "import matplotlib, matplotlib.pyplot; print(matplotlib.get_configdir(), matplotlib.get_cachedir())"
    result = run_in_image(TRAINER.tag, ["-c", code], entrypoint="python")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["/tmp/matplotlib", "/tmp/matplotlib"]
    assert "Read-only file system" not in result.stderr


def test_the_llama_server_image_loads_llama_cpp_and_serves_from_its_entrypoint() -> None:
    # The compiled library loads on the image's own libc (built there, not taken from a host's cache).
    assert python_in(LLAMA_SERVER.tag, "import llama_cpp; print(llama_cpp.__version__)") == "0.3.36"
    assert image_config(LLAMA_SERVER.tag)["Entrypoint"] == ["python", "-m", "llama_cpp.server"]
    result = run_in_image(LLAMA_SERVER.tag, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--model_alias" in result.stdout and "--n_ctx" in result.stdout
