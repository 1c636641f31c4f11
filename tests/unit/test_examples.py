"""The example manifests stay valid, and their datasets pass the trainer's pre-flight in the format they declare."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from kubetune_trainer.data.prepare import prepare_data
from kubetune_trainer.evaluate.scoring import default_metrics, json_fields

from kubetune.manifests import load_finetunejobs_text
from kubetune_cli.cli import main
from tests.example_jobs import EXAMPLE_JOBS, EXAMPLES_DIR, REPO_ROOT, ExampleJob, load_example, local_dataset
from tests.testbed.shared_data import SHARED_DATA_DIR

pytestmark = pytest.mark.unit

JOB_IDS = [example.name for example in EXAMPLE_JOBS]
TICKET_LINE = re.compile(r"\nTicket: [a-z-]+ \| \S.*$")


def uncommented(text: str, key: str) -> str:
    """The manifest with the commented-out block that starts at `# key:` turned back into YAML.

    The block is that line and the comment lines after it that are indented deeper behind the `#`.
    """
    lines = text.splitlines()
    start = next((index for index, line in enumerate(lines) if line.strip().startswith(f"# {key}:")), None)
    assert start is not None, f"no commented-out `{key}:` block"
    indent = lines[start].index("#")
    prefix = " " * indent + "# "
    end = start + 1
    while end < len(lines) and lines[end].startswith(prefix + " "):
        end += 1
    block = [" " * indent + line[len(prefix) :] for line in lines[start:end]]
    return "\n".join([*lines[:start], *block, *lines[end:]]) + "\n"


def test_every_manifest_in_examples_is_covered() -> None:
    on_disk = sorted(path.name for path in EXAMPLES_DIR.glob("*.yaml"))

    assert on_disk == sorted(example.file for example in EXAMPLE_JOBS)


@pytest.mark.parametrize("example", EXAMPLE_JOBS, ids=JOB_IDS)
def test_manifest_loads_with_what_it_claims(example: ExampleJob) -> None:
    job = load_example(example)

    assert job.metadata.name == example.name
    assert job.spec.dataset.format == example.data_format
    assert job.spec.training.objective == example.objective
    assert job.spec.output.uri == f"s3://kubetune-artifacts/{example.name}/"
    assert job.spec.s3 is not None
    assert job.spec.s3.credentials_secret_ref == "kubetune-s3"


def test_kubetune_validate_accepts_every_example() -> None:
    arguments = [argument for example in EXAMPLE_JOBS for argument in ("-f", str(example.path))]

    result = CliRunner().invoke(main, ["validate", *arguments])

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{example.path}: 1 FineTuneJob(s) valid" for example in EXAMPLE_JOBS]


@pytest.mark.parametrize("example", EXAMPLE_JOBS, ids=JOB_IDS)
def test_example_data_passes_preflight_in_the_declared_format(example: ExampleJob) -> None:
    job = load_example(example)

    prepared = prepare_data(local_dataset(job.spec.dataset), job.spec.training.seed)

    assert prepared.format == example.data_format
    assert len(prepared.train) == example.train_rows
    assert len(prepared.validation) == example.validation_rows
    if example.labels is None:
        assert prepared.labels is None
    else:
        assert prepared.labels is not None
        assert len(prepared.labels) == example.labels
    # The few-shot baseline draws its shots from train.
    assert job.spec.evaluation.few_shot_k <= len(prepared.train)


def test_support_chat_replies_end_with_a_ticket_line() -> None:
    job = load_example(next(example for example in EXAMPLE_JOBS if example.file == "chat-messages.yaml"))
    prepared = prepare_data(local_dataset(job.spec.dataset), job.spec.training.seed)

    replies = [example.completion for example in prepared.train + prepared.validation]

    assert len(replies) == 30
    assert [reply for reply in replies if not TICKET_LINE.search(reply)] == []
    # Two or three sentences before the ticket line: the "short reply" half of the style the adapter learns.
    assert all(reply.split("\nTicket: ")[0].count(". ") <= 2 for reply in replies)


def test_triples_completions_are_json_arrays_of_triples() -> None:
    job = load_example(next(example for example in EXAMPLE_JOBS if example.file == "extraction-json.yaml"))
    prepared = prepare_data(local_dataset(job.spec.dataset), job.spec.training.seed)
    completions = [example.completion for example in prepared.train + prepared.validation]

    for completion in completions:
        triples = json.loads(completion)
        assert isinstance(triples, list)
        assert triples
        assert all(set(item) == {"subject", "relation", "object"} for item in triples), completion
        # The json metric reads each item as one (subject, relation, object) field, not as three loose leaves.
        assert sum(json_fields(triples).values()) == len(triples)
    # The metrics the manifest names are the ones evaluation would infer from these references.
    assert default_metrics(prepared.format, completions) == job.spec.evaluation.metrics


def test_commented_out_judge_block_is_valid_once_uncommented() -> None:
    text = (EXAMPLES_DIR / "extraction-json.yaml").read_text()
    enabled = uncommented(text, "judge").replace("metrics: [loss, json]", "metrics: [loss, json, judge]")

    (job,) = load_finetunejobs_text(enabled, "extraction-json.yaml (judge enabled)")

    assert job.spec.evaluation.judge is not None
    assert job.spec.evaluation.judge.api_key_secret_ref.name == "judge-api-key"
    assert "judge" in job.spec.evaluation.metrics


def test_commented_out_s3_endpoint_is_valid_once_uncommented() -> None:
    text = (EXAMPLES_DIR / "agnews-qlora.yaml").read_text()

    (job,) = load_finetunejobs_text(uncommented(text, "endpoint"), "agnews-qlora.yaml (endpoint set)")

    assert job.spec.s3 is not None
    assert job.spec.s3.endpoint == "http://minio.storage.svc:9000"


def test_readme_has_a_section_for_every_example() -> None:
    readme = (EXAMPLES_DIR / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("## ")]

    assert [example.file for example in EXAMPLE_JOBS if not any(example.file in line for line in headings)] == []


def readme_local_substitutions() -> list[tuple[str, str]]:
    """The (S3 prefix, local path) pairs of the README's `sed` recipe for running an example locally."""
    readme = (EXAMPLES_DIR / "README.md").read_text()
    return re.findall(r"-e 's#([^#]+)#([^#]*)#'", readme)


def checkout_path(path: str) -> Path:
    """A recipe path as the README runs it from the checkout; its ../shared/data is wherever the samples are here."""
    readme_shared = "../shared/data/"
    return SHARED_DATA_DIR / path[len(readme_shared) :] if path.startswith(readme_shared) else REPO_ROOT / path


@pytest.mark.parametrize("example", EXAMPLE_JOBS, ids=JOB_IDS)
def test_readme_local_recipe_turns_the_example_into_local_paths(example: ExampleJob) -> None:
    text = example.path.read_text()
    for s3_prefix, local_prefix in readme_local_substitutions():
        text = text.replace(s3_prefix, local_prefix)

    (job,) = load_finetunejobs_text(text, f"my-jobs/{example.file}")

    assert "s3://" not in json.dumps(job.spec.to_wire())
    # The recipe's paths are relative to the checkout, where the README runs it.
    data_files = [job.spec.dataset.train, job.spec.dataset.validation]
    assert [path for path in data_files if path is not None and not checkout_path(path).is_file()] == []
    assert job.spec.model.uri == ".cache/models/smollm2-135m-instruct"
    assert job.spec.output.uri == f"runs/{example.name}/"
