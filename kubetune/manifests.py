"""Loads FineTuneJob manifests from YAML, reporting every problem as FILE:LINE:COL: field.path: message."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import KIND, RULES_ERROR, FineTuneJob


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with a manifest, and where it is in the source (1-based line and column)."""

    file: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ManifestError(ValueError):
    """A manifest that is not a set of valid FineTuneJobs; `problems` lists each defect with its location."""

    def __init__(self, problems: Sequence[ManifestProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class YamlDocument:
    """One document of a YAML stream: its 1-based position, its node tree (with source marks) and its data."""

    index: int
    node: yaml.Node
    data: Any


def parse_documents(text: str, file: str) -> list[YamlDocument]:
    """Every document in a YAML stream with its node tree, or ManifestError at the syntax error."""
    loader = yaml.SafeLoader(text)
    documents = []
    try:
        index = 0
        # Composing and constructing each document from the same loader keeps the data aligned with its nodes.
        while loader.check_node():
            index += 1
            node = loader.get_node()
            if node is None:  # check_node said a document follows, so this does not happen
                break
            documents.append(YamlDocument(index, node, loader.construct_document(node)))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ManifestError([ManifestProblem(file, line, column, "", f"invalid YAML: {error.problem}")]) from error
    finally:
        loader.dispose()
    return documents


def _mapping_value(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    # The last occurrence wins, as it does for the constructed data.
    for key_node, value_node in reversed(node.value):
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def locate(root: yaml.Node, loc: Sequence[str | int]) -> yaml.Mark:
    """Where a field path points in the source: its key, or the deepest existing parent's key when it is missing."""
    node, mark = root, root.start_mark
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            found = _mapping_value(node, part)
            if found is None:
                break
            key_node, node = found
            mark = key_node.start_mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return mark


def wire_path(loc: Sequence[str | int]) -> str:
    """A field path as users write it: spec.resources.tolerations[0].key, nodeSelector["kubernetes.io/arch"]."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "." in part or "/" in part:
            path += f'["{part}"]'
        else:
            path += f".{part}" if path else part
    return path


def duplicate_key_problems(node: yaml.Node, file: str, loc: tuple[str | int, ...] = ()) -> Iterator[ManifestProblem]:
    """Keys given twice in one mapping: YAML keeps the last silently, kubectl refuses the file."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            if key in seen:
                mark = key_node.start_mark
                yield ManifestProblem(
                    file, mark.line + 1, mark.column + 1, wire_path((*loc, key)), "key given more than once"
                )
            seen.add(key)
            yield from duplicate_key_problems(value_node, file, (*loc, key))
    elif isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            yield from duplicate_key_problems(item, file, (*loc, position))


def _problem_at(file: str, root: yaml.Node, loc: Sequence[str | int], message: str) -> ManifestProblem:
    mark = locate(root, loc)
    return ManifestProblem(file, mark.line + 1, mark.column + 1, wire_path(loc), message)


def issue_problems(file: str, root: yaml.Node, issue: Mapping[str, Any]) -> list[ManifestProblem]:
    """One problem per pydantic issue, and one per broken CEL rule (at the field the rule names, as the API server
    reports it)."""
    if issue["type"] == RULES_ERROR:
        return [
            _problem_at(file, root, (*issue["loc"], *path), message) for path, message in issue["ctx"]["violations"]
        ]
    return [_problem_at(file, root, issue["loc"], issue["msg"])]


def document_problems(document: YamlDocument, file: str) -> tuple[FineTuneJob | None, list[ManifestProblem]]:
    """The FineTuneJob in one document, or the problems that keep it from being one."""
    root, data = document.node, document.data
    if not isinstance(data, dict):
        found = type(data).__name__
        message = f"document {document.index} is a {found}, not a FineTuneJob mapping"
        return None, [_problem_at(file, root, (), message)]
    duplicates = list(duplicate_key_problems(root, file))
    if data.get("kind") != KIND:
        message = f"document {document.index} has kind {data.get('kind')!r}; only {KIND} is accepted"
        return None, [*duplicates, _problem_at(file, root, ("kind",), message)]
    try:
        # by_name=False: snake_case keys are unknown fields, as they are to the API server.
        job = FineTuneJob.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as error:
        problems = [
            problem for issue in error.errors(include_url=False) for problem in issue_problems(file, root, issue)
        ]
        return None, [*duplicates, *problems]
    return (None if duplicates else job), duplicates


def load_finetunejobs_text(text: str, file: str) -> list[FineTuneJob]:
    """Every FineTuneJob in a YAML stream (empty documents skipped), or ManifestError listing every problem."""
    jobs: list[FineTuneJob] = []
    problems: list[ManifestProblem] = []
    for document in parse_documents(text, file):
        if document.data is None:
            continue
        job, found = document_problems(document, file)
        problems.extend(found)
        if job is not None:
            jobs.append(job)
    if problems:
        raise ManifestError(problems)
    return jobs


def load_finetunejobs(path: str | Path) -> list[FineTuneJob]:
    """Every FineTuneJob in a single- or multi-document YAML file; ManifestError names FILE:LINE:COL of each defect."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ManifestError([ManifestProblem(file, None, None, "", f"cannot read: {reason}")]) from error
    return load_finetunejobs_text(text, file)


def dump_manifest(job: FineTuneJob) -> str:
    """A FineTuneJob as YAML that `kubectl apply -f` and load_finetunejobs both accept (unset fields left out)."""
    wire = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    return yaml.safe_dump(wire, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
