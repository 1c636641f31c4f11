"""Loading FineTuneJob manifests: every defect refused with FILE:LINE:COL and the field's wire path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import FineTuneJob
from kubetune.manifests import ManifestError, dump_manifest, load_finetunejobs, load_finetunejobs_text, wire_path
from tests.invalid_manifests import BASE_SPEC, ERROR_MARK, INVALID_MANIFESTS, VALID_MANIFESTS, InvalidManifest, job

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def line_of(text: str, content: str) -> int:
    """1-based number of the one line whose content (indentation aside) is `content`."""
    (number,) = [number for number, line in enumerate(text.splitlines(), 1) if line.strip() == content]
    return number


def refused(text: str, file: str = "job.yaml") -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        load_finetunejobs_text(text, file)
    return caught.value


def test_the_table_covers_at_least_fifteen_defects() -> None:
    assert len(INVALID_MANIFESTS) >= 15
    assert len({case.name for case in INVALID_MANIFESTS}) == len(INVALID_MANIFESTS)


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda case: case.name)
def test_invalid_manifest_is_refused_naming_field_and_line(case: InvalidManifest, tmp_path: Path) -> None:
    path = tmp_path / f"{case.name}.yaml"
    path.write_text(case.text)

    with pytest.raises(ManifestError) as caught:
        load_finetunejobs(path)

    problems = caught.value.problems
    assert [(p.field, p.line) for p in problems] == [(case.field, case.error_line)], str(caught.value)
    assert case.message in problems[0].message
    assert str(caught.value).startswith(f"{path}:{case.error_line}:{problems[0].column}: {case.field}: ")


@pytest.mark.parametrize(
    ("name", "text"),
    [*VALID_MANIFESTS.items(), *((f"examples/{p.name}", p.read_text()) for p in EXAMPLES)],
    ids=lambda value: value if "\n" not in value else "",
)
def test_valid_manifest_is_accepted(name: str, text: str) -> None:
    jobs = load_finetunejobs_text(text, name)

    assert jobs
    assert all(isinstance(loaded, FineTuneJob) for loaded in jobs)


def test_valid_manifest_keeps_its_values() -> None:
    (loaded,) = load_finetunejobs_text(VALID_MANIFESTS["everything"], "everything.yaml")

    assert loaded.metadata.name == "everything"
    assert loaded.spec.training.learning_rate == pytest.approx(3e-4)
    assert loaded.spec.resources.node_selector == {"kubetune.io/gpu": "a100"}
    assert loaded.spec.evaluation.judge is not None
    assert loaded.spec.evaluation.judge.api_key_secret_ref.name == "judge-key"


def test_multi_document_file_skips_empty_documents(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("---\n" + "\n---\n\n---\n".join(VALID_MANIFESTS.values()) + "---\n")

    jobs = load_finetunejobs(path)

    assert [loaded.metadata.name for loaded in jobs] == list(VALID_MANIFESTS)


def test_error_in_a_later_document_points_at_its_own_line() -> None:
    first = VALID_MANIFESTS["minimal"]
    second = job(BASE_SPEC + f"training:\n  learningRate: 5  {ERROR_MARK}")
    text = first + "---\n" + second

    error = refused(text)

    # The first document's lines, then the `---` separator, then the line inside the second document.
    expected_line = first.count("\n") + 1 + line_of(second, f"learningRate: 5  {ERROR_MARK}")
    assert [(p.field, p.line, p.column) for p in error.problems] == [("spec.training.learningRate", expected_line, 5)]


def test_document_of_another_kind_names_its_index() -> None:
    text = VALID_MANIFESTS["minimal"] + "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"

    error = refused(text)

    (problem,) = error.problems
    assert problem.field == "kind"
    assert "document 2" in problem.message
    assert "'ConfigMap'" in problem.message
    assert problem.line == VALID_MANIFESTS["minimal"].count("\n") + 3


def test_every_problem_is_listed_in_source_order() -> None:
    text = job(
        "model:\n  name: HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "dataset:\n  train: s3://kubetune-data/train.jsonl\n  format: csv\n"
        "training:\n  batchSize: 0\n  scheduler: step\n",
    )

    error = refused(text, "many.yaml")

    assert [(p.field, p.line) for p in error.problems] == [
        ("spec.dataset.format", 10),
        ("spec.training.batchSize", 12),
        ("spec.training.scheduler", 13),
        ("spec.output", 5),
    ]
    assert str(error).splitlines()[0].startswith("many.yaml:10:5: spec.dataset.format: Input should be")


def test_missing_nested_field_points_at_its_parent() -> None:
    text = job(BASE_SPEC + "evaluation:\n  metrics: [judge]\n  judge:\n    model: judge-model\n")

    (problem,) = refused(text).problems

    assert problem.field == "spec.evaluation.judge.apiKeySecretRef"
    assert problem.message == "Field required"
    assert (problem.line, problem.column) == (line_of(text, "judge:"), 5)


def test_list_items_are_located_by_index() -> None:
    text = job(BASE_SPEC + "resources:\n  tolerations:\n    - key: a\n    - key: b\n      operator: Near\n")

    (problem,) = refused(text).problems

    assert problem.field == "spec.resources.tolerations[1].operator"
    assert problem.line == line_of(text, "operator: Near")


def test_flow_style_mappings_are_located_too() -> None:
    text = job(BASE_SPEC + "lora: {r: 8, alpha: 0}\n")

    (problem,) = refused(text).problems

    assert problem.field == "spec.lora.alpha"
    assert problem.line == line_of(text, "lora: {r: 8, alpha: 0}")
    assert problem.column == len("  lora: {r: 8, ") + 1


def test_yaml_syntax_error_names_line_and_column() -> None:
    error = refused("apiVersion: kubetune.io/v1alpha1\nkind: [FineTuneJob\nspec: {}\n", "broken.yaml")

    (problem,) = error.problems
    assert problem.line == 3
    assert str(error).startswith("broken.yaml:3:")
    assert "invalid YAML" in problem.message


def test_document_that_is_not_a_mapping_is_refused() -> None:
    (problem,) = refused("- a\n- b\n").problems

    assert (problem.line, problem.column) == (1, 1)
    assert "document 1 is a list" in problem.message


def test_duplicate_key_is_refused() -> None:
    text = job(BASE_SPEC + "method: lora\nmethod: qlora\n")

    (problem,) = refused(text).problems

    assert problem.field == "spec.method"
    assert problem.message == "key given more than once"
    assert problem.line == line_of(text, "method: qlora")


def test_unreadable_file_is_a_manifest_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ManifestError, match=r"nope\.yaml: cannot read: No such file or directory"):
        load_finetunejobs(missing)


def test_empty_file_holds_no_jobs(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n---\n")

    assert load_finetunejobs(path) == []


@pytest.mark.parametrize("name", list(VALID_MANIFESTS))
def test_dump_manifest_round_trips(name: str) -> None:
    (loaded,) = load_finetunejobs_text(VALID_MANIFESTS[name], name)

    text = dump_manifest(loaded)

    assert text.startswith("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\n")
    assert "null" not in text
    assert load_finetunejobs_text(text, "dumped.yaml") == [loaded]


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("spec", "training", "learningRate"), "spec.training.learningRate"),
        (("spec", "resources", "tolerations", 0, "key"), "spec.resources.tolerations[0].key"),
        (("spec", "resources", "nodeSelector", "kubetune.io/gpu"), 'spec.resources.nodeSelector["kubetune.io/gpu"]'),
        ((), ""),
    ],
)
def test_wire_path(loc: tuple[str | int, ...], path: str) -> None:
    assert wire_path(loc) == path
