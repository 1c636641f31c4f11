"""The few pure parts of the kopf glue: kopf configuration, the backend filter, validation messages, body copies."""

from __future__ import annotations

from typing import Any

import kopf
import pytest
from kubetune_operator.handlers import (
    CHILD_SELECTOR,
    configure_kopf,
    format_validation_error,
    plain,
)
from kubetune_operator.settings import OperatorSettings
from pydantic import ValidationError

from kubetune.api import FineTuneJob

pytestmark = pytest.mark.unit


def configured(settings: OperatorSettings, standalone_flag: bool = False) -> kopf.OperatorSettings:
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.peering.standalone = standalone_flag  # what `kopf run --standalone` would have set
    configure_kopf(kopf_settings, settings)
    return kopf_settings


def test_kopf_keeps_its_state_in_kubetune_annotations() -> None:
    kopf_settings = configured(OperatorSettings())
    progress = kopf_settings.persistence.progress_storage
    diffbase = kopf_settings.persistence.diffbase_storage
    assert isinstance(progress, kopf.AnnotationsProgressStorage)
    assert progress.prefix == "kubetune.io"
    assert isinstance(diffbase, kopf.AnnotationsDiffBaseStorage)
    assert (diffbase.prefix, diffbase.key) == ("kubetune.io", "last-handled-configuration")
    assert kopf_settings.persistence.finalizer.startswith("kubetune.io/")


def test_kopf_watches_only_kubetune_children_and_scans_nothing() -> None:
    kopf_settings = configured(OperatorSettings())
    assert kopf_settings.scanning.disabled is True
    watched: list[tuple[Any, str]] = list(kopf_settings.watching.label_selectors.items())  # keys are kopf Selectors
    selectors = {(key.group, key.version, key.any_name): value for key, value in watched}
    assert selectors == {("batch", "v1", "jobs"): CHILD_SELECTOR, ("", "v1", "pods"): CHILD_SELECTOR}
    assert CHILD_SELECTOR == "app.kubernetes.io/managed-by=kubetune,kubetune.io/job-name"


@pytest.mark.parametrize(
    ("ours", "cli_standalone", "standalone", "mandatory"),
    [
        (OperatorSettings(peering_name="team", peering_priority=7), False, False, True),
        (OperatorSettings(standalone=True), False, True, False),
        (OperatorSettings(standalone=False), True, True, False),
    ],
    ids=["peering is mandatory", "standalone by setting", "standalone by kopf's flag"],
)
def test_peering(ours: OperatorSettings, cli_standalone: bool, standalone: bool, mandatory: bool) -> None:
    peering = configured(ours, cli_standalone).peering
    assert (peering.standalone, peering.mandatory) == (standalone, mandatory)
    assert (peering.name, peering.priority) == (ours.peering_name, ours.peering_priority)


def test_validation_errors_name_each_field() -> None:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team"},
        "spec": {"model": {"name": "m"}, "dataset": {"train": "s3://data/x"}, "output": {}, "training": {"epochs": 0}},
    }
    with pytest.raises(ValidationError) as raised:
        FineTuneJob.model_validate(body)
    message = format_validation_error(raised.value)
    assert message.startswith("invalid FineTuneJob: ")
    assert "spec.output.uri: Field required" in message
    assert "spec.training.epochs: Input should be greater than 0" in message


def test_plain_copies_nested_mappings_and_lists() -> None:
    source: dict[str, Any] = {"a": {"b": [{"c": 1}, (2, 3)]}}
    copy = plain(source)
    assert copy == {"a": {"b": [{"c": 1}, [2, 3]]}}
    copy["a"]["b"][0]["c"] = 9
    assert source["a"]["b"][0]["c"] == 1
