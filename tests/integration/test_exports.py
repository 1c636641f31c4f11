"""The exports beside the adapter: SmolLM2 tuned, exported as GGUF by llama.cpp's converter and served by llama.cpp's
server, where the endpoint check finds it answering as the in-process evaluation did; its adapter pushed to a
password-protected registry (distribution) and pulled back intact; bad credentials or a missing converter stop the
run before any data is read."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kubetune_trainer.backends.local import run_job
from kubetune_trainer.commands import cli
from kubetune_trainer.progress.reporter import Reporter
from kubetune_trainer.publish.gguf_export import ENV_CONVERTER_DIR
from kubetune_trainer.publish.registry_push import ADAPTER_CONFIG_MEDIA_TYPE

from kubetune.api import EndpointCheckStatus, FineTuneJob
from kubetune.contract import ENV_REGISTRY_CONFIG, ENV_TERMINATION_MESSAGE_PATH, parse_termination_message
from tests.testbed.llama_server import LlamaServer
from tests.testbed.registry import LocalRegistry, htpasswd_line
from tests.testbed.shared_data import shared_sample
from tests.testbed.smollm2 import LEARNS_LABELS_LORA, LEARNS_LABELS_TRAINING

USER = "adapter-pusher"
PASSWORD = "pw-never-logged-7d1c"
REPOSITORY = "team/adapters"
VALIDATION_ROWS = 24


@pytest.fixture
def password_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A distribution registry that takes pushes from USER with PASSWORD only (htpasswd, HTTP Basic)."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(htpasswd_line(USER, PASSWORD))
    registry = LocalRegistry(
        log_dir=tmp_path / "registry-logs", storage_dir=tmp_path / "registry", htpasswd=htpasswd
    ).start()
    yield registry
    registry.stop()


def docker_config(path: Path, host: str, user: str, password: str) -> Path:
    """What `kubectl create secret docker-registry` stores under .dockerconfigjson."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"username": user, "password": password, "auth": auth}}}))
    return path


def news_file(path: Path, rows: int) -> Path:
    lines = shared_sample("ag_news").read_text().splitlines()[:rows]
    path.write_text(
        "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in map(json.loads, lines))
    )
    return path


def export_job(model: Path, train: Path, output: Path, registry: LocalRegistry, steps: int) -> FineTuneJob:
    """LoRA on SmolLM2 (a 16-bit base: the in-process evaluation reads the weights the merge starts from), the
    tuned model only, GGUF q8_0 and a push of the adapter."""
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "exports", "namespace": "team"},
            "spec": {
                "model": {"uri": str(model)},
                "dataset": {"train": str(train), "format": "classification", "maxLength": 256, "validationSplit": 0.1},
                "method": "lora",
                "lora": LEARNS_LABELS_LORA,
                "training": {**LEARNS_LABELS_TRAINING, "maxSteps": steps, "checkpointEvery": max(steps, 1)},
                "evaluation": {
                    "baselines": [],
                    "metrics": ["accuracy"],
                    "maxSamples": VALIDATION_ROWS,
                    "batchSize": 8,
                    "maxNewTokens": 6,
                },
                "output": {
                    "uri": str(output),
                    "gguf": {"quantization": "q8_0"},
                    "registry": {
                        "repository": f"{registry.endpoint}/{REPOSITORY}",
                        "credentialsSecretRef": "registry-push",
                        "insecure": True,
                    },
                },
            },
        }
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pull(registry: LocalRegistry, reference: str, outdir: Path) -> tuple[dict[str, Any], list[Path]]:
    """The pushed manifest and its files, pulled back with oras (the way a serving side would)."""
    import oras.provider

    client = oras.provider.Registry(hostname=registry.endpoint, insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(USER, PASSWORD)
    files = client.pull(reference, outdir=str(outdir))
    return client.get_manifest(reference), [Path(name) for name in files]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_gguf_export_answers_as_evaluated_and_the_pushed_adapter_pulls_back_whole(
    smollm2_dir: Path,
    password_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = docker_config(tmp_path / "config.json", password_registry.endpoint, USER, PASSWORD)
    monkeypatch.setenv(ENV_REGISTRY_CONFIG, str(config))
    output = tmp_path / "out"
    job = export_job(smollm2_dir, news_file(tmp_path / "train.jsonl", 240), output, password_registry, steps=24)

    with caplog.at_level(logging.DEBUG):
        summary = run_job(job, Reporter([]))

    assert summary.outcome == "Succeeded", summary.message
    artifacts = summary.artifacts
    assert artifacts is not None
    manifest = json.loads((output / "manifest.json").read_text())
    # GGUF: beside the adapter, hashed in manifest.json, its URI in status; merged/ itself was not asked for.
    gguf = output / "gguf" / "model-q8_0.gguf"
    assert artifacts.gguf == str(gguf)
    assert manifest["artifacts"]["gguf/model-q8_0.gguf"] == sha256(gguf)
    assert artifacts.merged_model is None and not (output / "merged").exists()
    # The registry push: status and manifest.json name the same digest-pinned reference.
    assert artifacts.adapter_image is not None
    assert artifacts.adapter_image.startswith(f"{password_registry.endpoint}/{REPOSITORY}:exports@sha256:")
    assert manifest["adapterImage"] == artifacts.adapter_image
    pushed_manifest, pulled = pull(password_registry, artifacts.adapter_image.split("@")[0], tmp_path / "pulled")
    assert pushed_manifest["config"]["mediaType"] == ADAPTER_CONFIG_MEDIA_TYPE
    adapter_hashes = {key.removeprefix("adapter/"): value for key, value in manifest["artifacts"].items()}
    pulled_hashes = {path.name: sha256(path) for path in pulled}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(pulled_hashes)
    assert pulled_hashes == {name: adapter_hashes[name] for name in pulled_hashes}
    assert set(pulled_hashes) == {path.name for path in (output / "adapter").iterdir()}
    # The password is in no log line and no part of the summary.
    assert PASSWORD not in caplog.text
    assert PASSWORD not in summary.model_dump_json()

    # llama.cpp serves the GGUF; the endpoint check sends it the evaluated rows and scores them the same way.
    manifest_file = tmp_path / "job.yaml"
    manifest_file.write_text(yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True, mode="json")))
    server = LlamaServer(log_dir=tmp_path / "llama", model_path=gguf).start()
    monkeypatch.setenv("ENDPOINT_KEY", server.api_key)
    # In the operator's check Job the result also goes to the termination message.
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(ENV_TERMINATION_MESSAGE_PATH, str(termination))
    try:
        checked = CliRunner().invoke(
            cli,
            [
                *("check-endpoint", "--config", str(manifest_file)),
                *("--base-url", server.base_url, "--model", server.model, "--api-key-env", "ENDPOINT_KEY"),
            ],
        )
    finally:
        server.stop()
    assert checked.exit_code == 0, checked.output
    assert f"endpoint {server.model} at {server.base_url}, {VALIDATION_ROWS} held-out rows:" in checked.output
    assert server.api_key not in checked.output
    endpoint = json.loads((output / "eval" / "endpoint.json").read_text())
    tuned_accuracy = summary.metrics["eval.tuned.accuracy"]
    assert tuned_accuracy >= 0.5, "24 steps teach SmolLM2 the four labels (chance is 0.25)"
    assert endpoint["rows"] == VALIDATION_ROWS
    assert endpoint["inProcess"]["accuracy"] == tuned_accuracy
    assert set(endpoint["scores"]) == set(endpoint["inProcess"])
    assert endpoint["agreement"] >= 0.8, endpoint
    assert abs(endpoint["scores"]["accuracy"] - tuned_accuracy) <= 0.15, endpoint
    serving = endpoint["serving"]
    assert serving["requests"] == VALIDATION_ROWS and serving["failed"] == 0
    assert serving["promptTokensMean"] > 20 and serving["completionTokensMean"] >= 1
    assert serving["latencyP50Seconds"] > 0
    # The report shows the check beside the in-process scores; manifest.json has the files' new hashes.
    report_md = (output / "eval" / "report.md").read_text()
    assert f"| accuracy | {tuned_accuracy:.4f} | {endpoint['scores']['accuracy']:.4f} |" in report_md
    assert json.loads((output / "eval" / "report.json").read_text())["endpoint"] == endpoint
    hashes = json.loads((output / "manifest.json").read_text())["artifacts"]
    for name in ("report.md", "report.json", "endpoint.json"):
        assert hashes[f"eval/{name}"] == sha256(output / "eval" / name)
    status = parse_termination_message(EndpointCheckStatus, termination.read_text())
    assert status is not None and status.state == "Succeeded" and status.score == endpoint["scores"]["accuracy"]
    assert (status.rows, status.agreement) == (VALIDATION_ROWS, endpoint["agreement"])


def test_refused_registry_credentials_stop_the_run_before_any_data_is_read(
    password_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-password"
    config = docker_config(tmp_path / "config.json", password_registry.endpoint, USER, wrong)
    monkeypatch.setenv(ENV_REGISTRY_CONFIG, str(config))
    # The model and data paths do not exist: reading either would fail differently.
    job = export_job(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "out", password_registry, steps=1)

    with caplog.at_level(logging.DEBUG):
        summary = run_job(job, Reporter([]))

    assert summary.outcome == "Failed"
    assert summary.reason == "ExportError"
    assert f"registry {password_registry.endpoint} refused the credentials" in summary.message
    assert "credentialsSecretRef" in summary.message
    assert summary.dataset is None
    assert wrong not in caplog.text and wrong not in summary.model_dump_json()


def test_a_registry_secret_without_this_registry_is_named(
    password_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = docker_config(tmp_path / "config.json", "other.example.com", USER, PASSWORD)
    monkeypatch.setenv(ENV_REGISTRY_CONFIG, str(config))
    job = export_job(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "out", password_registry, steps=1)

    summary = run_job(job, Reporter([]))

    assert summary.reason == "ExportError"
    assert f"no entry for {password_registry.endpoint} under `auths`" in summary.message


def test_a_missing_gguf_converter_stops_the_run_before_any_data_is_read(
    password_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_CONVERTER_DIR, str(tmp_path / "empty"))
    job = export_job(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "out", password_registry, steps=1)

    summary = run_job(job, Reporter([]))

    assert summary.outcome == "Failed"
    assert summary.reason == "ExportError"
    assert f"output.gguf: llama.cpp's GGUF converter is not in {tmp_path / 'empty'}" in summary.message
    assert summary.dataset is None


def test_the_endpoint_check_names_an_endpoint_that_does_not_answer(tmp_path: Path) -> None:
    from kubetune_trainer.evaluate.endpoint_check import check_endpoint
    from kubetune_trainer.failures import EvaluationError

    from tests.testbed.processes import free_port

    output = tmp_path / "out"
    (output / "eval").mkdir(parents=True)
    train = news_file(tmp_path / "train.jsonl", 40)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "offline"},
            "spec": {
                "model": {"uri": str(tmp_path / "model")},
                "dataset": {"train": str(train), "format": "classification", "validationSplit": 0.1},
                "evaluation": {"metrics": ["accuracy"], "maxSamples": 4},
                "output": {"uri": str(output)},
            },
        }
    )
    # No evaluation yet: the check says so.
    with pytest.raises(EvaluationError, match=r"report\.json does not exist"):
        check_endpoint(job, "http://127.0.0.1:9/v1", "tuned")
    # An evaluation of other rows than the spec gives: named, before any request.
    (output / "eval" / "report.json").write_text(json.dumps({"models": {"tuned": {"metrics": {"accuracy": 1.0}}}}))
    stale = [{"line": 10_000 + i, "outputs": {"tuned": rows[i]["label"]}} for i in range(4)]
    (output / "eval" / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in stale))
    with pytest.raises(EvaluationError, match="not the ones the evaluation scored"):
        check_endpoint(job, "http://127.0.0.1:9/v1", "tuned")
    # The right rows, but nothing listens at the endpoint: every request fails and the check says where.
    from kubetune_trainer.pipeline import data_stage

    validation = data_stage(job.spec, Reporter([])).validation[:4]
    fresh = [{"line": example.line, "outputs": {"tuned": example.completion}} for example in validation]
    (output / "eval" / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in fresh))
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}/v1"
    with pytest.raises(EvaluationError, match=f"{url} answered none of the 4 requests"):
        check_endpoint(job, url, "tuned")


def test_fetch_copies_one_object_or_a_prefix_from_s3_as_an_endpoint_init_container_does(
    s3_env: dict[str, str], s3_bucket: str, s3_server: Any, tmp_path: Path
) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="run/gguf/model-q8_0.gguf", Body=b"GGUF" + bytes(2000))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        client.put_object(Bucket=s3_bucket, Key=f"run/adapter/{name}", Body=name.encode())
    runner = CliRunner()

    single = runner.invoke(cli, ["fetch", f"s3://{s3_bucket}/run/gguf/model-q8_0.gguf", str(tmp_path / "m.gguf")])
    folder = runner.invoke(cli, ["fetch", f"s3://{s3_bucket}/run/adapter", str(tmp_path / "adapter")])
    missing = runner.invoke(cli, ["fetch", f"s3://{s3_bucket}/run/nothing-here", str(tmp_path / "x")])

    assert single.exit_code == 0, single.output
    assert (tmp_path / "m.gguf").read_bytes() == b"GGUF" + bytes(2000)
    assert folder.exit_code == 0, folder.output
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert missing.exit_code == 1
    assert f"fetch failed: s3://{s3_bucket}/run/nothing-here" in missing.output
