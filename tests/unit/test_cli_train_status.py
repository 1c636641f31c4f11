"""`kubetune train` and `kubetune status` pieces that need no model or cluster: output override and rendering."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kubetune.api import FineTuneJob, FineTuneJobStatus
from kubetune.contract import TrainerSummary
from kubetune_cli.cli import describe_status, describe_summary, format_duration, gate_fails_job, main, with_output_uri

pytestmark = pytest.mark.unit

JOB = FineTuneJob.model_validate(
    {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "news"},
        "spec": {
            "model": {"uri": "/models/tiny"},
            "dataset": {"train": "/data/train.jsonl"},
            "output": {"uri": "/out/news"},
            "evaluation": {"gate": {"metric": "accuracy", "threshold": 0.8, "failJob": True}},
        },
    }
)


def test_the_output_uri_is_replaced_and_per_job_when_several_share_it() -> None:
    assert with_output_uri(JOB, None, per_job=False) is JOB
    assert with_output_uri(JOB, "s3://bucket/runs", per_job=False).spec.output.uri == "s3://bucket/runs"
    assert with_output_uri(JOB, "s3://bucket/runs", per_job=True).spec.output.uri == "s3://bucket/runs/news"


def test_an_invalid_output_uri_is_refused_naming_the_option() -> None:
    with pytest.raises(click.BadParameter, match="s3://x"):
        with_output_uri(JOB, "s3://x", per_job=False)


def test_a_failed_gate_fails_the_job_only_with_fail_job() -> None:
    failed_gate = TrainerSummary.model_validate(
        {"outcome": "Succeeded", "evaluation": {"metric": "accuracy", "tuned": 0.5, "gate": {"passed": False}}}
    )
    passed_gate = TrainerSummary.model_validate(
        {"outcome": "Succeeded", "evaluation": {"metric": "accuracy", "tuned": 0.9, "gate": {"passed": True}}}
    )
    without_gate = JOB.spec.evaluation.model_copy(update={"gate": None})
    lenient = JOB.model_copy(update={"spec": JOB.spec.model_copy(update={"evaluation": without_gate})})

    assert gate_fails_job(JOB, failed_gate)
    assert not gate_fails_job(JOB, passed_gate)
    assert not gate_fails_job(lenient, failed_gate)


def test_a_failed_run_is_one_line_with_its_reason_and_message() -> None:
    summary = TrainerSummary(outcome="Failed", reason="DataError", message="/data/train.jsonl:3: malformed JSON")

    assert describe_summary(JOB, summary) == ["news: Failed (DataError): /data/train.jsonl:3: malformed JSON"]


def test_a_successful_run_lists_headline_gate_and_artifacts_without_a_published_report() -> None:
    summary = TrainerSummary.model_validate(
        {
            "outcome": "Succeeded",
            "message": "trained 4 steps",
            "evaluation": {
                "metric": "accuracy",
                "tuned": 0.9,
                "baselines": {"zeroShot": 0.1},
                "gate": {"passed": True, "message": "accuracy 0.9 >= 0.8"},
            },
            "artifacts": {"adapter": "/out/news/adapter", "manifest": "/out/news/manifest.json"},
        }
    )

    lines = describe_summary(JOB, summary)

    assert lines[0] == "news: Succeeded: trained 4 steps"
    assert "  gate passed: accuracy 0.9 >= 0.8" in lines
    assert "  adapter: /out/news/adapter" in lines
    assert "  manifest: /out/news/manifest.json" in lines


def test_status_shows_phase_progress_dataset_conditions_evaluation_artifacts_and_usage() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Succeeded",
            "model": "SmolLM2-135M-Instruct",
            "message": "tuned accuracy 0.880 vs zeroShot 0.080",
            "progress": {"stage": "publish", "step": 250, "totalSteps": 250, "percent": 100.0, "loss": 0.1234},
            "dataset": {"format": "classification", "trainRows": 900, "validationRows": 100, "truncatedFraction": 0},
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "done"}],
            "evaluation": {
                "metric": "accuracy",
                "tuned": 0.88,
                "baselines": {"zeroShot": 0.08},
                "lift": {"zeroShot": 0.8},
                "samples": 100,
                "gate": {"passed": True, "message": "accuracy 0.88 >= 0.8"},
            },
            "artifacts": {"adapter": "s3://b/news/adapter", "manifest": "s3://b/news/manifest.json"},
            "usage": {"trainedTokens": 72000, "gpuSeconds": 0, "wallSeconds": 812.4},
        }
    )

    text = "\n".join(describe_status("ml", "news", status))

    assert "FineTuneJob ml/news" in text
    assert "Phase:       Succeeded" in text
    assert "stage publish, step 250/250 (100.0%)" in text
    assert "loss 0.1234" in text
    assert "classification, 900 train / 100 validation rows, 0.0% truncated" in text
    assert "Succeeded   True    Completed" in text
    assert "Model:       SmolLM2-135M-Instruct" in text
    assert "accuracy on 100 samples: tuned 0.88, zeroShot 0.08 (lift +0.8)" in text
    assert "Gate:        passed: accuracy 0.88 >= 0.8" in text
    assert "adapter      s3://b/news/adapter" in text
    assert "Usage:       72000 trained tokens, 0 GPU-seconds, 812s wall" in text


@pytest.mark.parametrize(
    ("stage", "shown"),
    [("evaluate", True), ("publish", True), ("train", False)],
    ids=["evaluating", "publishing after it", "a retry training again"],
)
def test_status_shows_evaluation_progress_while_and_after_evaluating(stage: str, shown: bool) -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Evaluating",
            "progress": {
                "stage": stage,
                "step": 40,
                "totalSteps": 40,
                "evalDone": 150,
                "evalTotal": 600,
                "evalPercent": 25.0,
            },
        }
    )

    progress = [line for line in describe_status("ml", "news", status) if line.startswith("Progress:")]

    evaluated = "evaluated 150/600 samples (25.0%)"
    assert progress == [f"Progress:    stage {stage}, step 40/40" + (f", {evaluated}" if shown else "")]


def test_status_shows_the_endpoint_and_its_check_or_why_there_is_none() -> None:
    check = {"state": "Succeeded", "message": "accuracy 0.8400 served vs 0.8500 in-process on 100 held-out rows"}
    served = FineTuneJobStatus.model_validate(
        {"serving": {"url": "http://news-serve.ml.svc:8080/v1", "model": "news", "readyReplicas": 1, "check": check}}
    )
    lines = describe_status("ml", "news", served)
    assert lines[-2:] == [
        "Serving:     http://news-serve.ml.svc:8080/v1 (model news, 1 ready)",
        f"Check:       Succeeded: {check['message']}",
    ]
    gated = FineTuneJobStatus.model_validate({"serving": {"message": "not served: the evaluation gate failed"}})
    assert describe_status("ml", "news", gated)[-1] == "Serving:     not served: the evaluation gate failed"


def test_a_job_without_status_is_pending() -> None:
    assert describe_status("ml", "news", FineTuneJobStatus()) == ["FineTuneJob ml/news", "Phase:       Pending"]


@pytest.mark.parametrize(("seconds", "text"), [(6, "6s"), (245, "4m05s"), (3723, "1h02m03s"), (-3, "0s")])
def test_durations_read_like_a_clock(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


def test_train_refuses_a_manifest_with_errors_naming_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {}\n")

    result = CliRunner().invoke(main, ["train", "-f", str(manifest)])

    assert result.exit_code == 2
    assert f"{manifest}:4:" in result.stderr
    assert "spec.model" in result.stderr
