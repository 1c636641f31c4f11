"""The export helpers that need no model or registry: where the converter's files come from, docker config
credentials, registry challenges, references and the pushed artifact's description."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.publish.exports import artifact_config, gguf_source, registry_credentials
from kubetune_trainer.publish.gguf_export import (
    LLAMA_CPP_DIR,
    GgufExportError,
    converter_command,
    converter_env,
    converter_missing,
    export_gguf,
    gguf_file_name,
    member_target,
)
from kubetune_trainer.publish.registry_push import (
    Credentials,
    RegistryPushError,
    credentials_for,
    parse_challenge,
    read_credentials,
    registry_host,
    target_reference,
)

from kubetune.api import FineTuneJob, RegistryExport


@pytest.mark.parametrize(
    ("member", "target"),
    [
        (LLAMA_CPP_DIR + "convert_hf_to_gguf.py", "convert_hf_to_gguf.py"),
        (LLAMA_CPP_DIR + "conversion/llama.py", "conversion/llama.py"),
        (LLAMA_CPP_DIR + "gguf-py/gguf/gguf_writer.py", "gguf/gguf_writer.py"),
        (LLAMA_CPP_DIR + "LICENSE", "LICENSE"),
        (LLAMA_CPP_DIR + "gguf-py/pyproject.toml", None),
        (LLAMA_CPP_DIR + "src/llama.cpp", None),
        (LLAMA_CPP_DIR + "convert_lora_to_gguf.py", None),
        ("llama_cpp_python-0.3.36/llama_cpp/server/app.py", None),
        (LLAMA_CPP_DIR + "conversion/", None),
    ],
)
def test_only_the_converter_and_its_own_gguf_library_are_unpacked(member: str, target: str | None) -> None:
    assert member_target(member) == target


def test_the_converter_runs_with_its_own_gguf_library_first_on_the_path(tmp_path: Path) -> None:
    env = converter_env(tmp_path, {"PYTHONPATH": "/elsewhere", "HOME": "/home/x"})
    assert env["PYTHONPATH"].split(":") == [str(tmp_path), "/elsewhere"]
    assert env["HOME"] == "/home/x"
    command = converter_command(tmp_path / "merged", tmp_path / "out.gguf", "q8_0", tmp_path)
    assert command[0] == sys.executable
    assert command[1:] == [
        str(tmp_path / "convert_hf_to_gguf.py"),
        str(tmp_path / "merged"),
        "--outtype",
        "q8_0",
        "--outfile",
        str(tmp_path / "out.gguf"),
    ]
    assert gguf_file_name("bf16") == "model-bf16.gguf"


def test_a_converter_directory_is_checked_and_a_failed_conversion_says_why(tmp_path: Path) -> None:
    assert "KUBETUNE_GGUF_CONVERTER" in (converter_missing(tmp_path) or "")
    # A converter whose run fails: its own last words end up in the error, bounded.
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "__init__.py").write_text("")
    (tmp_path / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('x' * 5000, file=sys.stderr)\nprint('Model MysteryForCausalLM is not supported', "
        "file=sys.stderr)\nsys.exit(1)\n"
    )
    assert converter_missing(tmp_path) is None
    with pytest.raises(GgufExportError) as raised:
        export_gguf(tmp_path / "merged", tmp_path / "out", "q8_0", tmp_path)
    message = str(raised.value)
    assert "exit 1" in message and message.endswith("Model MysteryForCausalLM is not supported")
    assert len(message) < 2300
    assert raised.value.reason == "ExportError"


def _config(host_key: str, **entry: str) -> dict[str, object]:
    return {"auths": {host_key: entry}}


@pytest.mark.parametrize(
    "config",
    [
        _config("registry.example.com:5000", username="u", password="p:w"),
        _config("registry.example.com:5000", auth=base64.b64encode(b"u:p:w").decode()),
        _config("https://registry.example.com:5000", username="u", password="p:w"),
        _config("https://registry.example.com:5000/v1/", auth=base64.b64encode(b"u:p:w").decode()),
    ],
)
def test_docker_config_credentials_in_every_form_docker_writes(config: dict[str, object]) -> None:
    assert credentials_for(config, "registry.example.com:5000") == Credentials("u", "p:w")


def test_credentials_of_another_registry_are_not_used_and_the_password_is_never_shown(tmp_path: Path) -> None:
    assert credentials_for(_config("other.example.com", username="u", password="p"), "registry.example.com") is None
    assert "secret-pw" not in repr(Credentials("u", "secret-pw"))
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(RegistryPushError, match=r"not a docker config\.json"):
        read_credentials(broken, "registry.example.com")


def test_the_spec_decides_whether_credentials_are_read(tmp_path: Path) -> None:
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "team"},
            "spec": {
                "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://out/demo", "registry": {"repository": "registry.example.com/team/adapters"}},
            },
        }
    )
    # An open registry: nothing is read, not even a file that is not there.
    assert registry_credentials(job.spec, {"KUBETUNE_REGISTRY_CONFIG": str(tmp_path / "absent")}) is None
    assert artifact_config(job, "abc123") == {
        "baseModel": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "baseModelRevision": "abc123",
        "method": "qlora",
        "objective": "causal-lm",
        "job": "team/demo",
        "output": "s3://out/demo",
    }
    # After qLoRA the converter reads the merged model; after full fine-tuning the saved model itself.
    assert gguf_source(job.spec, tmp_path / "adapter", tmp_path / "merged") == tmp_path / "merged"
    full = job.spec.model_copy(update={"method": "full"})
    assert gguf_source(full, tmp_path / "adapter", None) == tmp_path / "adapter"
    with pytest.raises(GgufExportError, match="merged model was not written"):
        gguf_source(job.spec, tmp_path / "adapter", None)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Basic realm="kubetune-testbed"', ("basic", {"realm": "kubetune-testbed"})),
        (
            'Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull"',
            (
                "bearer",
                {
                    "realm": "https://auth.example.com/token",
                    "service": "registry.example.com",
                    "scope": "repository:a/b:pull",
                },
            ),
        ),
        ("", ("", {})),
    ],
)
def test_registry_challenges_are_read(header: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_challenge(header) == expected


def test_the_tag_defaults_to_the_jobs_name() -> None:
    export = RegistryExport(repository="registry.example.com:5000/team/adapters")
    assert registry_host(export.repository) == "registry.example.com:5000"
    assert target_reference(export, "banking77") == "registry.example.com:5000/team/adapters:banking77"
    tagged = RegistryExport(repository="registry.example.com/team/adapters", tag="v1")
    assert target_reference(tagged, "banking77") == "registry.example.com/team/adapters:v1"


def test_the_endpoint_check_scores_text_only_and_counts_alike_answers() -> None:
    from kubetune_trainer.evaluate.contenders import serving_cost
    from kubetune_trainer.evaluate.endpoint_check import EndpointCheck, agreement, text_metrics

    report = {"models": {"tuned": {"metrics": {"loss": 0.4, "accuracy": 0.9, "f1.macro": 0.8, "judge": 70.0}}}}
    assert text_metrics(report) == ["accuracy", "f1.macro"]
    assert agreement(["Sports ", "World", "Business"], ["Sports", "Sci/Tech", "Business"]) == 2 / 3
    assert agreement([], []) == 0.0
    check = EndpointCheck(
        base_url="http://llama:8080/v1",
        model="tuned",
        rows=3,
        headline="accuracy",
        scores={"accuracy": 0.6667},
        in_process={"accuracy": 0.9},
        agreement=2 / 3,
        cost=serving_cost([]),
    )
    assert check.lines() == [
        "endpoint tuned at http://llama:8080/v1, 3 held-out rows:",
        "  accuracy   endpoint 0.6667   in-process 0.9000",
        "  answers alike on 67% of rows",
        "  no request answered",
    ]
    assert check.to_json()["inProcess"] == {"accuracy": 0.9}


def answered_check(headline: str = "accuracy") -> Any:
    from kubetune_trainer.evaluate.contenders import ServingCost
    from kubetune_trainer.evaluate.endpoint_check import EndpointCheck

    cost = ServingCost(
        requests=20,
        failed=1,
        prompt_tokens_mean=118.2,
        prompt_tokens_p95=130.0,
        completion_tokens_mean=3.1,
        completion_tokens_p95=4.0,
        latency_p50_seconds=0.412,
        latency_p95_seconds=0.9,
    )
    return EndpointCheck(
        base_url="http://demo-serve.team.svc:8080/v1",
        model="demo",
        rows=20,
        headline=headline,
        scores={"accuracy": 0.85, "f1.macro": 0.8},
        in_process={"accuracy": 0.9, "f1.macro": 0.82},
        agreement=0.95,
        cost=cost,
    )


def test_the_endpoint_check_becomes_status_through_the_termination_message() -> None:
    from kubetune.api import EndpointCheckStatus
    from kubetune.contract import check_termination_message, parse_termination_message

    status = answered_check().status("s3://out/demo/eval/endpoint.json")
    assert (status.state, status.metric, status.score, status.in_process_score) == ("Succeeded", "accuracy", 0.85, 0.9)
    assert (status.rows, status.agreement, status.failed_requests) == (20, 0.95, 1)
    assert (status.latency_p50_seconds, status.prompt_tokens_mean, status.completion_tokens_mean) == (0.412, 118.2, 3.1)
    assert status.message == (
        "accuracy 0.8500 served vs 0.9000 in-process on 20 held-out rows; answers alike on 95%; p50 0.41 s a request"
    )
    message = check_termination_message(status)
    assert len(message.encode()) < 1024
    assert parse_termination_message(EndpointCheckStatus, message) == status
    assert parse_termination_message(EndpointCheckStatus, "Traceback (most recent call last): ...") is None
    # A headline the endpoint's text cannot be scored on (a judge score) shows the first text metric instead.
    assert answered_check(headline="judge").status("s3://x").metric == "accuracy"


def test_the_report_shows_the_endpoint_beside_the_in_process_model() -> None:
    from kubetune_trainer.evaluate.report import endpoint_table, render_markdown

    report = {
        "headlineMetric": "accuracy",
        "samples": 20,
        "models": {"tuned": {"metrics": {"accuracy": 0.9}}, "zero_shot": {"metrics": {"accuracy": 0.1}}},
    }
    assert endpoint_table(report) == []
    lines = endpoint_table({**report, "endpoint": answered_check().to_json()})
    assert lines[0] == (
        "Served endpoint: model `demo` at http://demo-serve.team.svc:8080/v1, asked the same 20 held-out rows; "
        "answers alike on 95% of rows."
    )
    assert "| accuracy | 0.9000 | 0.8500 |" in lines and "| f1.macro | 0.8200 | 0.8000 |" in lines
    cost_line = "Endpoint per request: latency p50 0.41 s, 118 prompt + 3 completion tokens; 1 of 20 requests failed."
    assert cost_line in lines
    assert "| accuracy | 0.9000 | 0.8500 |" in render_markdown({**report, "endpoint": answered_check().to_json()})
