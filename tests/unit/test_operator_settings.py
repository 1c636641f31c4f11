"""OperatorSettings from KUBETUNE_* variables: defaults, parsing, and refusals that name the variable."""

from __future__ import annotations

import random

import pytest
from kubetune_operator.settings import (
    AUTO_PRIORITY_RANGE,
    DEFAULT_TRAINER_IMAGE,
    OperatorSettings,
    SettingsError,
    env_name,
    parse_mapping,
    parse_priority,
)

from kubetune.api import Toleration

pytestmark = pytest.mark.unit


def test_defaults_with_an_empty_environment() -> None:
    settings = OperatorSettings.from_env({})
    assert settings.trainer_image == DEFAULT_TRAINER_IMAGE
    assert settings.namespaces == ()
    assert settings.clusterwide
    assert (settings.metrics_port, settings.health_port, settings.trainer_metrics_port) == (8080, 8081, 9090)
    assert settings.liveness_endpoint == "http://0.0.0.0:8081/healthz"
    assert settings.s3_endpoint is None
    assert settings.s3_credentials_secret is None
    assert settings.progress_interval_seconds == 15.0
    assert settings.gpu_node_selector == {"nvidia.com/gpu.present": "true"}
    assert settings.gpu_tolerations == (Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),)
    assert settings.peering_name == "kubetune"
    assert AUTO_PRIORITY_RANGE[0] <= settings.peering_priority <= AUTO_PRIORITY_RANGE[1]
    assert settings.standalone is False


def test_every_field_is_documented_and_named_after_its_variable() -> None:
    for name, info in OperatorSettings.model_fields.items():
        assert info.description, f"{name} has no description"
        assert env_name(name) == "KUBETUNE_" + name.upper()


def test_values_are_read_from_the_environment() -> None:
    settings = OperatorSettings.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "registry.local/trainer:2",
            "KUBETUNE_LLAMA_CPP_IMAGE": "registry.local/llama-server:2",
            "KUBETUNE_VLLM_IMAGE": "registry.local/vllm:0.11",
            "KUBETUNE_NAMESPACES": " team-a, team-b ,",
            "KUBETUNE_METRICS_PORT": "9000",
            "KUBETUNE_HEALTH_PORT": "0",
            "KUBETUNE_LISTEN_ADDRESS": "127.0.0.1",
            "KUBETUNE_S3_ENDPOINT": "http://127.0.0.1:5000",
            "KUBETUNE_S3_REGION": "us-east-1",
            "KUBETUNE_S3_CREDENTIALS_SECRET": "s3-creds",
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "2.5",
            "KUBETUNE_TRAINER_METRICS_PORT": "0",
            "KUBETUNE_GPU_NODE_SELECTOR": "pool=a100, cloud.google.com/gke-accelerator=nvidia-a100",
            "KUBETUNE_GPU_TOLERATIONS": '[{"key": "gpu", "operator": "Exists", "tolerationSeconds": 30}]',
            "KUBETUNE_PEERING_NAME": "kubetune-prod",
            "KUBETUNE_PEERING_PRIORITY": "100",
            "KUBETUNE_STANDALONE": "true",
        }
    )
    assert settings.trainer_image == "registry.local/trainer:2"
    assert (settings.llama_cpp_image, settings.vllm_image) == (
        "registry.local/llama-server:2",
        "registry.local/vllm:0.11",
    )
    assert settings.namespaces == ("team-a", "team-b")
    assert not settings.clusterwide
    assert settings.metrics_port == 9000
    assert settings.liveness_endpoint is None
    assert settings.s3_endpoint == "http://127.0.0.1:5000"
    assert settings.s3_credentials_secret == "s3-creds"
    assert settings.progress_interval_seconds == 2.5
    assert settings.trainer_metrics_port == 0
    assert settings.gpu_node_selector == {"pool": "a100", "cloud.google.com/gke-accelerator": "nvidia-a100"}
    assert settings.gpu_tolerations == (Toleration(key="gpu", operator="Exists", toleration_seconds=30),)
    assert (settings.peering_name, settings.peering_priority, settings.standalone) == ("kubetune-prod", 100, True)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"KUBETUNE_GPU_NODE_SELECTOR": "{}"}, {}),
        ({"KUBETUNE_GPU_NODE_SELECTOR": ""}, {}),
        ({"KUBETUNE_GPU_NODE_SELECTOR": '{"a": "b"}'}, {"a": "b"}),
    ],
)
def test_gpu_node_selector_forms(environ: dict[str, str], expected: dict[str, str]) -> None:
    assert OperatorSettings.from_env(environ).gpu_node_selector == expected


def test_empty_s3_values_mean_unset_and_ipv6_liveness_is_bracketed() -> None:
    settings = OperatorSettings.from_env({"KUBETUNE_S3_ENDPOINT": "", "KUBETUNE_LISTEN_ADDRESS": "::1"})
    assert settings.s3_endpoint is None
    assert settings.liveness_endpoint == "http://[::1]:8081/healthz"


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("KUBETUNE_METRICS_PORT", "eighty", "valid integer"),
        ("KUBETUNE_HEALTH_PORT", "70000", "less than or equal to 65535"),
        ("KUBETUNE_NAMESPACES", "team-a,Team_B", "at 1"),
        ("KUBETUNE_S3_ENDPOINT", "minio:9000", "should match pattern"),
        ("KUBETUNE_S3_CREDENTIALS_SECRET", "Bad_Name", "should match pattern"),
        ("KUBETUNE_PROGRESS_INTERVAL_SECONDS", "0", "greater than or equal to 1"),
        ("KUBETUNE_GPU_NODE_SELECTOR", "pool", "item 'pool' is not key=value"),
        ("KUBETUNE_GPU_NODE_SELECTOR", "bad key!=x", "not a valid label key"),
        ("KUBETUNE_GPU_TOLERATIONS", "{not json", "Expecting property name"),
        ("KUBETUNE_GPU_TOLERATIONS", '{"key": "gpu"}', "expected a JSON list"),
        ("KUBETUNE_GPU_TOLERATIONS", '[{"effect": "Sometimes"}]', "at 0.effect"),
        ("KUBETUNE_PEERING_PRIORITY", "high", "invalid literal for int"),
        ("KUBETUNE_PEERING_PRIORITY", "-1", "greater than or equal to 0"),
        ("KUBETUNE_STANDALONE", "maybe", "expected true or false"),
        ("KUBETUNE_TRAINER_IMAGE", "has space:1", "should match pattern"),
        ("KUBETUNE_LISTEN_ADDRESS", "localhost", "should match pattern"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(variable: str, value: str, complaint: str) -> None:
    with pytest.raises(SettingsError) as raised:
        OperatorSettings.from_env({variable: value})
    message = str(raised.value)
    assert f"{variable}={value!r}" in message
    assert complaint in message


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        OperatorSettings.from_env({"KUBETUNE_METRICS_PORT": "x", "KUBETUNE_STANDALONE": "perhaps"})
    assert "KUBETUNE_METRICS_PORT" in str(raised.value)
    assert "KUBETUNE_STANDALONE" in str(raised.value)


def test_auto_priority_differs_between_replicas() -> None:
    rng = random.Random(7)
    drawn = {parse_priority("auto", rng) for _ in range(20)}
    assert len(drawn) == 20
    assert all(AUTO_PRIORITY_RANGE[0] <= value <= AUTO_PRIORITY_RANGE[1] for value in drawn)
    assert parse_priority(" 42 ") == 42


def test_mapping_parser_refuses_json_that_is_not_an_object_of_strings() -> None:
    with pytest.raises(ValueError, match="JSON object of strings"):
        parse_mapping('{"a": 1}')


def test_settings_are_immutable() -> None:
    settings = OperatorSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.metrics_port = 1  # type: ignore[misc]


def test_the_entrypoint_refuses_bad_settings_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune_operator.__main__ import main

    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "not-a-port")
    assert main() == 2
    error = capsys.readouterr().err
    assert error.startswith("kubetune-operator: bad operator settings in the environment:")
    assert "KUBETUNE_METRICS_PORT='not-a-port'" in error
