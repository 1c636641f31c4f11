"""backend openai end to end: moto S3, a real HTTP fine-tuning service double and the real openai SDK."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_trainer import storage
from kubetune_trainer.backends.hosted.driver import HostedPreempted, cancel_check_from_environment, run_hosted
from kubetune_trainer.backends.hosted.service import HostedSettings
from kubetune_trainer.progress.reporter import ProgressChannel, Reporter, Stage

from kubetune.api import DatasetStatus, EvaluationStatus, FineTuneJob, ProgressStatus, significant
from kubetune.conditions import (
    TRAINER_REASON_DATA_ERROR,
    TRAINER_REASON_HOSTED_AUTH_ERROR,
    TRAINER_REASON_HOSTED_JOB_FAILED,
    TRAINER_REASON_HOSTED_QUOTA_EXCEEDED,
    TRAINER_REASON_HOSTED_UNAVAILABLE,
)
from kubetune.contract import TrainerSummary
from tests.openai_double import FineTuningService, JobPlan, OpenAIDouble, api_error
from tests.testbed.controlplane import ControlPlane
from tests.testbed.trainer_credentials import trainer_kubeconfig

pytestmark = pytest.mark.integration

API_KEY = "sk-hosted-test-key-0123456789abcdef"
WRONG_KEY = "sk-wrong-key-9876543210fedcba"
UID = "0b7d9c6e-1f2a-4b3c-8d4e-5f6a7b8c9d0e"
BASE_MODEL = "gpt-4o-mini-2024-07-18"
DATA = Path("/work/shared/data/ag_news")
TRAIN_ROWS = 30
VALIDATION_ROWS = 12
FAST = HostedSettings(
    sdk_max_retries=1,
    request_timeout_seconds=10,
    transient_attempts=3,
    transient_backoff_seconds=0.01,
    poll_interval_seconds=0.01,
    max_poll_interval_seconds=0.05,
)
# Slow enough polling that a SIGTERM lands while the job still runs.
LONG_RUNNING = JobPlan(statuses=("validating_files", "queued", *["running"] * 40, "succeeded"))
SLOW_POLLS = HostedSettings(sdk_max_retries=1, poll_interval_seconds=0.2, max_poll_interval_seconds=0.2)
JOBS = "/fine_tuning/jobs"


class RecordingChannel(ProgressChannel):
    """Everything the reporter fans out, kept for assertions."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.progress: list[ProgressStatus] = []
        self.datasets: list[DatasetStatus] = []
        self.scores: list[EvaluationStatus] = []

    def stage_changed(self, stage: Stage, progress: ProgressStatus) -> None:
        self.stages.append(stage)

    def dataset_measured(self, dataset: DatasetStatus) -> None:
        self.datasets.append(dataset)

    def progress_changed(self, progress: ProgressStatus, final: bool) -> None:
        self.progress.append(progress)

    def scores_known(self, tables: Any, evaluation: EvaluationStatus) -> None:
        self.scores.append(evaluation)


@pytest.fixture
def double() -> Iterator[OpenAIDouble]:
    with OpenAIDouble() as server:
        yield server


@pytest.fixture
def service(double: OpenAIDouble) -> FineTuningService:
    return FineTuningService(double, API_KEY)


def jsonl_rows(path: Path, count: int, labels: set[str] | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if labels is None or row["label"] in labels][:count]


def upload_rows(bucket: str, key: str, rows: list[dict[str, Any]]) -> str:
    uri = f"s3://{bucket}/{key}"
    storage.write_bytes(uri, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return uri


@pytest.fixture
def dataset(s3_env: dict[str, str], s3_bucket: str) -> dict[str, str]:
    """AG News rows in moto S3: 30 for training, 12 held out (labels all seen in training)."""
    train = jsonl_rows(DATA / "train.jsonl", TRAIN_ROWS)
    validation = jsonl_rows(DATA / "test.jsonl", VALIDATION_ROWS, {row["label"] for row in train})
    return {
        "train": upload_rows(s3_bucket, "data/train.jsonl", train),
        "validation": upload_rows(s3_bucket, "data/validation.jsonl", validation),
        "output": f"s3://{s3_bucket}/out/hosted",
    }


def finetunejob(double: OpenAIDouble, dataset: dict[str, str], name: str = "hosted-news", **spec: Any) -> FineTuneJob:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": UID},
        "spec": {
            "model": {"name": BASE_MODEL},
            "dataset": {"train": dataset["train"], "validation": dataset["validation"]},
            "output": {"uri": dataset["output"]},
            "resources": {"gpus": 0},
            "backend": "openai",
            "openai": {
                "model": BASE_MODEL,
                "baseUrl": double.base_url,
                "apiKeySecretRef": {"name": "openai", "key": "api-key"},
                "suffix": "news",
                "seed": 11,
                "hyperparameters": {"nEpochs": 2, "learningRateMultiplier": 0.5},
            },
            "evaluation": {"fewShotK": 3},
            **spec,
        },
    }
    return FineTuneJob.model_validate(body)


def run(
    job: FineTuneJob,
    tmp_path: Path,
    key: str = API_KEY,
    settings: HostedSettings = FAST,
    channel: RecordingChannel | None = None,
    **kwargs: Any,
) -> TrainerSummary:
    reporter = Reporter([channel or RecordingChannel()], interval=0)
    work_dir = tmp_path / f"work-{uuid.uuid4().hex[:6]}"
    work_dir.mkdir()
    return run_hosted(job, reporter, api_key=key, work_dir=work_dir, settings=settings, **kwargs)


def count(double: OpenAIDouble, method: str, path: str) -> int:
    return len(double.requests_to(method, path))


@pytest.fixture
def sigterm_guard() -> Iterator[list[int]]:
    """A SIGTERM that misses the runner's own handler is recorded here instead of ending the test session."""
    missed: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: missed.append(signum))
    yield missed
    signal.signal(signal.SIGTERM, previous)


def sigterm_once_polled(double: OpenAIDouble, job_path: str) -> threading.Thread:
    """Send this process SIGTERM as soon as the job has been polled once (the runner catches it)."""

    def send() -> None:
        deadline = time.monotonic() + 30
        while not double.requests_to("GET", job_path):
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------------------------------------------------
# Success


def test_hosted_job_runs_end_to_end_and_publishes_tuned_vs_baselines(
    double: OpenAIDouble,
    service: FineTuningService,
    dataset: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    channel = RecordingChannel()

    summary = run(finetunejob(double, dataset), tmp_path, channel=channel)

    assert summary.outcome == "Succeeded", summary.message
    hosted_job = service.jobs["ftjob-1"]
    assert summary.fine_tuned_model == hosted_job["fine_tuned_model"] == f"ft:{BASE_MODEL}:org-double:news:ftjob-1"
    assert summary.usage is not None and summary.usage.trained_tokens == hosted_job["trained_tokens"] > 0
    # One upload per file and one job, created with the spec's settings in the SDK's method shape.
    assert count(double, "POST", "/files") == 2
    assert count(double, "POST", JOBS) == 1
    create = double.requests_to("POST", JOBS)[0].body
    assert create["model"] == BASE_MODEL
    assert create["metadata"] == {"kubetune-uid": UID}
    assert create["suffix"] == "news" and create["seed"] == 11
    assert create["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}},
    }
    uploaded = service.files[create["training_file"]]
    assert uploaded["filename"].startswith(f"kubetune-{UID}-train-") and uploaded["purpose"] == "fine-tune"
    lines = [json.loads(line) for line in service.contents[create["training_file"]].decode().splitlines()]
    assert len(lines) == TRAIN_ROWS
    assert [message["role"] for message in lines[0]["messages"]] == ["user", "assistant"]
    assert lines[0]["messages"][1]["content"] in {"World", "Sports", "Business", "Sci/Tech"}
    assert create["validation_file"] in service.files
    # Progress: the service's validation in the data stage, then steps with loss and ETA, then evaluation.
    assert channel.stages == ["data", "train", "evaluate", "publish"]
    running = [p for p in channel.progress if p.step is not None]
    assert running[0].total_steps == 30 and running[0].loss is not None and running[0].eta_seconds is not None
    assert running[-1].step == 30 and running[-1].percent == 100.0 and running[-1].epoch == 2.0
    # Evaluation: the double's tuned model knows every answer, its base answers zero-shot with a non-label and
    # few-shot with the first shot's label.
    assert summary.evaluation is not None and summary.evaluation.metric == "accuracy"
    assert summary.evaluation.tuned == 1.0
    few_shot_request = next(
        r.body for r in double.requests_to("POST", "/chat/completions") if len(r.body["messages"]) > 1
    )
    assert few_shot_request["model"] == BASE_MODEL
    first_shot = next(m["content"] for m in few_shot_request["messages"] if m["role"] == "assistant")
    references = [json.loads(line)["label"] for line in storage.read_bytes(dataset["validation"]).decode().splitlines()]
    assert summary.evaluation.baselines == {
        "zeroShot": 0.0,
        # Status shows four significant digits; report.json keeps every digit.
        "fewShot": significant(references.count(first_shot) / len(references)),
    }
    assert channel.scores == [summary.evaluation]
    # The report and manifest are where local jobs put them.
    assert summary.artifacts is not None
    report = json.loads(storage.read_bytes(summary.artifacts.report or ""))
    assert set(report["models"]) == {"zeroShot", "fewShot", "tuned"}
    assert report["models"]["tuned"]["metrics"]["accuracy"] == 1.0
    assert any("loss not computed" in note for note in report["notes"])
    manifest = json.loads(storage.read_bytes(summary.artifacts.manifest or ""))
    assert manifest["hosted"]["jobId"] == "ftjob-1"
    assert manifest["hosted"]["fineTunedModel"] == summary.fine_tuned_model
    assert [c["step"] for c in manifest["hosted"]["checkpoints"]] == [15, 30]
    assert manifest["usage"]["trainedTokens"] == hosted_job["trained_tokens"]
    assert set(manifest["artifacts"]) >= {"eval/report.json", "eval/report.md", "eval/predictions.jsonl"}
    assert summary.metrics["trainSteps"] == 30 and summary.metrics["fullValidLoss"] == 0.5
    assert summary.metrics["eval.tuned.accuracy"] == 1.0
    # The key went to the service in every request, and nowhere else.
    assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in double.requests)
    assert API_KEY not in caplog.text
    assert API_KEY not in summary.to_termination_message()


def test_hosted_command_writes_the_summary_as_the_termination_message(
    double: OpenAIDouble, service: FineTuningService, dataset: dict[str, str], s3_env: dict[str, str], tmp_path: Path
) -> None:
    job = finetunejob(double, dataset, evaluation={"enabled": False})
    termination = tmp_path / "termination-log"
    env = {
        **os.environ,
        **s3_env,
        "KUBETUNE_JOB_MANIFEST": yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True, mode="json")),
        "OPENAI_API_KEY": API_KEY,
        "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination),
        "KUBETUNE_HOSTED_POLL_SECONDS": "0.01",
    }
    for name in ("KUBETUNE_JOB_NAME", "KUBETUNE_JOB_NAMESPACE", "KUBETUNE_METRICS_PORT"):
        env.pop(name, None)

    result = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "hosted"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    summary = TrainerSummary.model_validate_json(termination.read_text())
    assert summary.outcome == "Succeeded"
    assert summary.fine_tuned_model == service.jobs["ftjob-1"]["fine_tuned_model"]
    assert API_KEY not in result.stderr + result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Refusals and failures


@pytest.mark.parametrize(
    ("train_rows", "long_row", "expected"),
    [
        (8, None, "8 training examples"),
        (TRAIN_ROWS, 3, "train.jsonl:4: about"),
    ],
    ids=["too-few-examples", "example-over-the-token-limit"],
)
def test_data_the_service_would_refuse_is_refused_before_any_upload(
    double: OpenAIDouble,
    service: FineTuningService,
    s3_env: dict[str, str],
    s3_bucket: str,
    tmp_path: Path,
    train_rows: int,
    long_row: int | None,
    expected: str,
) -> None:
    rows = jsonl_rows(DATA / "train.jsonl", train_rows)
    if long_row is not None:
        rows[long_row] = {"text": "word " * 60_000, "label": rows[long_row]["label"]}
    dataset = {
        "train": upload_rows(s3_bucket, "small/train.jsonl", rows),
        "validation": upload_rows(s3_bucket, "small/validation.jsonl", rows[:3]),
        "output": f"s3://{s3_bucket}/out/small",
    }

    summary = run(finetunejob(double, dataset), tmp_path)

    assert summary.outcome == "Failed"
    assert summary.reason == TRAINER_REASON_DATA_ERROR
    assert expected in summary.message and dataset["train"] in summary.message
    assert double.requests == []


def test_a_failed_hosted_job_fails_with_the_services_code_and_message(
    double: OpenAIDouble, service: FineTuningService, dataset: dict[str, str], tmp_path: Path
) -> None:
    service.plan = JobPlan(
        statuses=("validating_files", "failed"),
        error={
            "code": "invalid_training_file",
            "message": "Example 3 has no assistant turn.",
            "param": "training_file",
        },
    )

    summary = run(finetunejob(double, dataset), tmp_path)

    assert summary.outcome == "Failed"
    assert summary.reason == TRAINER_REASON_HOSTED_JOB_FAILED
    assert summary.message == (
        "hosted fine-tuning job ftjob-1 failed: invalid_training_file: Example 3 has no assistant turn. "
        "(param training_file)"
    )
    assert summary.fine_tuned_model is None
    assert count(double, "POST", "/chat/completions") == 0


def test_an_invalid_key_fails_with_the_service_message_and_no_key_anywhere(
    double: OpenAIDouble,
    service: FineTuningService,
    dataset: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    summary = run(finetunejob(double, dataset), tmp_path, key=WRONG_KEY)

    assert summary.outcome == "Failed"
    assert summary.reason == TRAINER_REASON_HOSTED_AUTH_ERROR
    # The service echoed the key it was given; the summary and logs carry only the redaction.
    assert "HTTP 401 invalid_api_key: Incorrect API key provided: ***." in summary.message
    assert "openai.apiKeySecretRef" in summary.message
    assert WRONG_KEY not in summary.to_termination_message()
    assert WRONG_KEY not in caplog.text
    assert count(double, "POST", "/files") == 0 and count(double, "POST", JOBS) == 0


def test_spent_quota_fails_without_creating_a_job(
    double: OpenAIDouble, service: FineTuningService, dataset: dict[str, str], tmp_path: Path
) -> None:
    quota = api_error(429, "You exceeded your current quota.", {"retry-after-ms": "1"}, code="insufficient_quota")
    double.enqueue("GET", JOBS, quota, quota)

    summary = run(finetunejob(double, dataset), tmp_path)

    assert summary.outcome == "Failed"
    assert summary.reason == TRAINER_REASON_HOSTED_QUOTA_EXCEEDED
    assert "HTTP 429 insufficient_quota: You exceeded your current quota." in summary.message
    assert count(double, "POST", JOBS) == 0


def test_rate_limits_and_server_errors_are_retried_until_the_job_succeeds(
    double: OpenAIDouble, service: FineTuningService, dataset: dict[str, str], tmp_path: Path
) -> None:
    busy = api_error(429, "Rate limit reached.", {"retry-after-ms": "1"}, code="rate_limit_exceeded")
    broken = api_error(500, "The server had an error.", {"retry-after-ms": "1"})
    # Three failures outlast the SDK's one retry, so kubetune's own loop retries the create too.
    double.enqueue("POST", JOBS, busy, broken, busy)
    double.enqueue("GET", f"{JOBS}/ftjob-1", broken)

    summary = run(finetunejob(double, dataset, evaluation={"enabled": False}), tmp_path)

    assert summary.outcome == "Succeeded", summary.message
    assert count(double, "POST", JOBS) == 4
    assert list(service.jobs) == ["ftjob-1"]


def test_a_restarted_pod_reuses_the_upload_and_reattaches_to_the_job(
    double: OpenAIDouble,
    service: FineTuningService,
    dataset: dict[str, str],
    tmp_path: Path,
    sigterm_guard: list[int],
) -> None:
    job = finetunejob(double, dataset, evaluation={"enabled": False})
    # First pod: the uploads land, the create keeps failing, and the pod gives up for a retry.
    broken = api_error(503, "Overloaded.", {"retry-after-ms": "1"})
    double.enqueue("POST", JOBS, *[broken] * 6)
    first = run(job, tmp_path)
    assert first.reason == TRAINER_REASON_HOSTED_UNAVAILABLE
    # Second pod: preempted (SIGTERM, FineTuneJob neither deleted nor suspended) while the job runs.
    service.plan = LONG_RUNNING
    sigterm_once_polled(double, f"{JOBS}/ftjob-1")
    with pytest.raises(HostedPreempted) as preempted:
        run(job, tmp_path, settings=SLOW_POLLS, should_cancel=lambda: False)
    assert not preempted.value.cancelled
    assert sigterm_guard == []  # the runner's own handler took it
    assert service.jobs["ftjob-1"]["status"] in ("queued", "running")

    third = run(job, tmp_path)

    assert third.outcome == "Succeeded", third.message
    assert third.fine_tuned_model == service.jobs["ftjob-1"]["fine_tuned_model"]
    assert count(double, "POST", "/files") == 2
    assert list(service.jobs) == ["ftjob-1"]
    assert count(double, "POST", f"{JOBS}/ftjob-1/cancel") == 0


# ----------------------------------------------------------------------------------------------------------------------
# SIGTERM against the real API server: suspended or deleted cancels, anything else leaves the job running


@pytest.fixture(scope="module")
def crd_installed(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> None:
    from kubetune.crd import CRD_NAME, render_crd_yaml

    path = tmp_path_factory.mktemp("crd") / "crd.yaml"
    path.write_text(render_crd_yaml())
    kube.kubectl("apply", "--server-side", "-f", str(path), check=True)
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)


def pod_environment(kube: ControlPlane, job: FineTuneJob, namespace: str) -> dict[str, str]:
    """What the trainer pod has: a token bound to its pod under the trainer policy, and its job's name."""
    kubeconfig = trainer_kubeconfig(kube, namespace, job.metadata.name)
    return {"KUBECONFIG": kubeconfig, "KUBETUNE_JOB_NAME": job.metadata.name, "KUBETUNE_JOB_NAMESPACE": namespace}


@pytest.mark.parametrize(
    ("situation", "cancelled"),
    [("suspended", True), ("being-deleted", True), ("preempted", False)],
)
def test_sigterm_cancels_the_hosted_job_only_when_the_finetunejob_is_suspended_or_deleted(
    kube: ControlPlane,
    crd_installed: None,
    namespace: str,
    double: OpenAIDouble,
    service: FineTuningService,
    dataset: dict[str, str],
    tmp_path: Path,
    situation: str,
    cancelled: bool,
    caplog: pytest.LogCaptureFixture,
    sigterm_guard: list[int],
) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi(kube.api_client())
    name = f"hosted-{situation}"
    job = finetunejob(double, dataset, name=name, evaluation={"enabled": False})
    body = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    body["metadata"] = {"name": name, "namespace": namespace}
    if situation == "suspended":
        body["spec"]["runPolicy"] = {"suspend": True}
    if situation == "being-deleted":
        body["metadata"]["finalizers"] = ["kubetune.io/test-hold"]
    created = api.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", body)
    job = FineTuneJob.model_validate({**body, "metadata": {**body["metadata"], "uid": created["metadata"]["uid"]}})
    if situation == "being-deleted":
        api.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", name)
    should_cancel = cancel_check_from_environment(pod_environment(kube, job, namespace))
    service.plan = LONG_RUNNING
    sigterm_once_polled(double, f"{JOBS}/ftjob-1")

    try:
        with pytest.raises(HostedPreempted) as preempted:
            run(job, tmp_path, settings=SLOW_POLLS, should_cancel=should_cancel)
    finally:
        if situation == "being-deleted":
            api.patch_namespaced_custom_object(
                "kubetune.io", "v1alpha1", namespace, "finetunejobs", name, {"metadata": {"finalizers": None}}
            )

    # The pod's own narrow Role was enough to read the FineTuneJob: the decision rests on what it says.
    assert "cannot read FineTuneJob" not in caplog.text
    assert preempted.value.cancelled is cancelled
    assert sigterm_guard == []
    assert (service.jobs["ftjob-1"]["status"] == "cancelled") is cancelled
    assert count(double, "POST", f"{JOBS}/ftjob-1/cancel") == int(cancelled)
    assert service.jobs["ftjob-1"]["metadata"] == {"kubetune-uid": created["metadata"]["uid"]}


def test_sigterm_cancels_when_the_finetunejob_is_already_gone(
    kube: ControlPlane,
    crd_installed: None,
    namespace: str,
    double: OpenAIDouble,
    service: FineTuningService,
    dataset: dict[str, str],
    tmp_path: Path,
    sigterm_guard: list[int],
) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi(kube.api_client())
    name = "hosted-collected"
    job = finetunejob(double, dataset, name=name, evaluation={"enabled": False})
    body = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    body["metadata"] = {"name": name, "namespace": namespace}
    created = api.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", body)
    job = FineTuneJob.model_validate({**body, "metadata": {**body["metadata"], "uid": created["metadata"]["uid"]}})
    should_cancel = cancel_check_from_environment(pod_environment(kube, job, namespace))
    # Deleting a FineTuneJob removes it before garbage collection reaches its trainer Job and pod: the pod's SIGTERM
    # finds it gone (its own token still valid: the pod is terminating, not deleted).
    api.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", name)
    service.plan = LONG_RUNNING
    sigterm_once_polled(double, f"{JOBS}/ftjob-1")

    with pytest.raises(HostedPreempted) as preempted:
        run(job, tmp_path, settings=SLOW_POLLS, should_cancel=should_cancel)

    assert preempted.value.cancelled is True
    assert service.jobs["ftjob-1"]["status"] == "cancelled"


def test_a_resumed_job_starts_a_new_hosted_job_after_the_cancelled_one(
    double: OpenAIDouble,
    service: FineTuningService,
    dataset: dict[str, str],
    tmp_path: Path,
    sigterm_guard: list[int],
) -> None:
    job = finetunejob(double, dataset, evaluation={"enabled": False})
    service.plan = LONG_RUNNING
    sigterm_once_polled(double, f"{JOBS}/ftjob-1")
    with pytest.raises(HostedPreempted):
        run(job, tmp_path, settings=SLOW_POLLS, should_cancel=lambda: True)
    assert sigterm_guard == []
    service.plan = JobPlan()

    resumed = run(job, tmp_path)

    assert resumed.outcome == "Succeeded", resumed.message
    assert [hosted["status"] for hosted in service.jobs.values()] == ["cancelled", "succeeded"]
    assert resumed.fine_tuned_model == service.jobs["ftjob-2"]["fine_tuned_model"]
    # The files of the first attempt are reused.
    assert count(double, "POST", "/files") == 2
