"""The hosted backend's pure rules: job parameters, status and metrics to progress, polling, when to cancel, config."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune_trainer.backends.hosted.driver import (
    check_hosted_runnable,
    hosted_exit_code,
    hosted_settings_from_environment,
    is_stopped_by_user,
)
from kubetune_trainer.backends.hosted.service import (
    HostedSettings,
    StepMetrics,
    backoff_seconds,
    hosted_file_name,
    job_create_params,
    newest_live_job,
    newest_metrics,
    next_poll_delay,
    progress_of,
)
from kubetune_trainer.failures import EXIT_CODE_PERMANENT, EXIT_CODE_RETRYABLE, ConfigError

from kubetune.api import FineTuneJobSpec, OpenAISpec
from kubetune.contract import TrainerSummary

pytestmark = pytest.mark.unit

API_KEY = "sk-unit"


def openai_spec(**fields: Any) -> OpenAISpec:
    return OpenAISpec.model_validate(
        {"model": "gpt-4o-mini-2024-07-18", "apiKeySecretRef": {"name": "openai", "key": "api-key"}, **fields}
    )


def hosted_job(status: str, **fields: Any) -> Any:
    from openai.types.fine_tuning import FineTuningJob

    return FineTuningJob.model_validate(
        {
            "id": "ftjob-1",
            "object": "fine_tuning.job",
            "created_at": 100,
            "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8},
            "model": "gpt-4o-mini-2024-07-18",
            "organization_id": "org",
            "result_files": [],
            "seed": 1,
            "status": status,
            "training_file": "file-1",
            **fields,
        }
    )


def metrics_event(event_id: str, step: int, **data: Any) -> Any:
    from openai.types.fine_tuning import FineTuningJobEvent

    return FineTuningJobEvent.model_validate(
        {
            "id": event_id,
            "object": "fine_tuning.job.event",
            "created_at": 1,
            "level": "info",
            "message": f"Step {step}",
            "type": "metrics",
            "data": {"step": step, **data},
        }
    )


def spec(**fields: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "gpt-4o-mini-2024-07-18"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/hosted"},
            "backend": "openai",
            "openai": openai_spec().to_wire(),
            **fields,
        }
    )


def test_unset_hyperparameters_are_auto_in_the_supervised_method() -> None:
    params = job_create_params(openai_spec(hyperparameters={"batchSize": 8}), "file-1", None, "uid-1")

    assert params == {
        "model": "gpt-4o-mini-2024-07-18",
        "training_file": "file-1",
        "metadata": {"kubetune-uid": "uid-1"},
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": "auto", "batch_size": 8, "learning_rate_multiplier": "auto"}
            },
        },
    }


def test_suffix_seed_and_validation_file_are_passed_when_set() -> None:
    params = job_create_params(openai_spec(suffix="news", seed=0), "file-1", "file-2", "uid-1")

    assert (params["suffix"], params["seed"], params["validation_file"]) == ("news", 0, "file-2")


def test_upload_names_depend_on_the_job_and_the_content_only() -> None:
    name = hosted_file_name("uid-1", "train", "ab" * 32)

    assert name == hosted_file_name("uid-1", "train", "ab" * 32) == "kubetune-uid-1-train-abababababababab.jsonl"
    assert name != hosted_file_name("uid-2", "train", "ab" * 32)
    assert name != hosted_file_name("uid-1", "train", "cd" * 32)


def test_the_newest_job_of_this_uid_that_was_not_cancelled_is_reattached_to() -> None:
    jobs = [
        hosted_job("cancelled", id="ftjob-3", created_at=300, metadata={"kubetune-uid": "uid-1"}),
        hosted_job("running", id="ftjob-2", created_at=200, metadata={"kubetune-uid": "uid-1"}),
        hosted_job("succeeded", id="ftjob-1", created_at=100, metadata={"kubetune-uid": "uid-1"}),
        hosted_job("running", id="ftjob-4", created_at=400, metadata={"kubetune-uid": "uid-2"}),
        hosted_job("running", id="ftjob-5", created_at=500),
    ]

    found = newest_live_job(jobs, "uid-1")

    assert found is not None and found.id == "ftjob-2"
    assert newest_live_job(jobs[:1], "uid-1") is None


@pytest.mark.parametrize(
    ("status", "stage"),
    [("validating_files", "data"), ("queued", "train"), ("running", "train"), ("failed", "train")],
)
def test_the_service_status_maps_to_a_stage(status: str, stage: str) -> None:
    assert progress_of(hosted_job(status), None, now=0).stage == stage


def test_running_progress_has_step_total_epoch_percent_loss_and_eta() -> None:
    metrics = StepMetrics(step=15, total_steps=60, values={"finalLoss": 0.75})

    progress = progress_of(hosted_job("running", estimated_finish=1_000), metrics, now=880.5)

    assert progress.step == 15 and progress.total_steps == 60
    assert progress.percent == 25.0
    assert progress.epoch == 0.75  # 3 epochs over 60 steps
    assert progress.loss == 0.75
    assert progress.eta_seconds == 120


def test_a_succeeded_job_is_complete() -> None:
    progress = progress_of(hosted_job("succeeded"), StepMetrics(step=60, total_steps=60), now=0)

    assert (progress.percent, progress.eta_seconds) == (100.0, 0)


def test_the_highest_step_wins_and_keeps_the_known_total() -> None:
    events = [
        metrics_event("e2", 20, train_loss=0.5, train_mean_token_accuracy=0.8),
        metrics_event("e1", 10, train_loss=0.9, total_steps=40),
        metrics_event("e3", 30, train_loss=float("nan"), valid_loss=True),
    ]

    newest = newest_metrics(events, StepMetrics(step=5, total_steps=40))

    assert newest is not None
    assert (newest.step, newest.total_steps) == (30, 40)
    # NaN and booleans are not figures.
    assert newest.values == {}
    assert newest_metrics(events[:2], None) == StepMetrics(20, 40, {"finalLoss": 0.5, "trainMeanTokenAccuracy": 0.8})


def test_polling_slows_down_while_nothing_changes_and_speeds_up_after_a_change() -> None:
    settings = HostedSettings(poll_interval_seconds=10, max_poll_interval_seconds=60)

    delays = [10.0]
    for changed in (False, False, False, True):
        delays.append(next_poll_delay(delays[-1], changed, settings))

    assert delays == [10, 20, 40, 60, 10]


def test_retry_backoff_doubles_up_to_its_cap() -> None:
    settings = HostedSettings(transient_backoff_seconds=5, max_backoff_seconds=30)

    assert [backoff_seconds(attempt, settings) for attempt in (1, 2, 3, 4)] == [5, 10, 20, 30]


@pytest.mark.parametrize(
    ("finetunejob", "stopped"),
    [
        ({"metadata": {"name": "a"}, "spec": {"runPolicy": {"suspend": False}}}, False),
        ({"metadata": {"name": "a"}, "spec": {}}, False),
        ({"metadata": {"name": "a"}, "spec": {"runPolicy": {"suspend": True}}}, True),
        ({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {}}, True),
    ],
    ids=["running", "no-run-policy", "suspended", "being-deleted"],
)
def test_only_suspension_or_deletion_cancels_the_hosted_job(finetunejob: dict[str, Any], stopped: bool) -> None:
    assert is_stopped_by_user(finetunejob) is stopped


@pytest.mark.parametrize(
    ("job_spec", "key", "message"),
    [
        (spec(backend="local", openai=None), API_KEY, "backend local is run by `python -m kubetune_trainer run`"),
        (spec(), "", "OPENAI_API_KEY is empty: the operator fills it from openai.apiKeySecretRef (secret 'openai'"),
    ],
    ids=["local-backend", "no-key"],
)
def test_what_the_hosted_backend_cannot_run_is_refused_naming_the_field(
    job_spec: FineTuneJobSpec, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        check_hosted_runnable(job_spec, key)

    assert message in str(refused.value)


def test_a_runnable_spec_gives_its_openai_settings() -> None:
    assert check_hosted_runnable(spec(), API_KEY).model == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize(
    ("value", "message"),
    [("soon", "is not a number of seconds"), ("0", "must be more than 0 seconds"), ("nan", "must be more than 0")],
)
def test_a_malformed_poll_interval_is_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        hosted_settings_from_environment({"KUBETUNE_HOSTED_POLL_SECONDS": value})


def test_the_poll_interval_comes_from_the_environment() -> None:
    settings = hosted_settings_from_environment({"KUBETUNE_HOSTED_POLL_SECONDS": "2.5"})

    assert (settings.poll_interval_seconds, settings.max_poll_interval_seconds) == (2.5, 15.0)
    assert hosted_settings_from_environment({}) == HostedSettings()


@pytest.mark.parametrize(
    ("reason", "code"),
    [("HostedServiceUnavailable", EXIT_CODE_RETRYABLE), ("HostedJobFailed", EXIT_CODE_PERMANENT)],
)
def test_only_an_unavailable_service_is_worth_a_retried_pod(reason: str, code: int) -> None:
    assert hosted_exit_code(TrainerSummary(outcome="Failed", reason=reason)) == code
