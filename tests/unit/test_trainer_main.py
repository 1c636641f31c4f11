"""The trainer entry point's pure parts: where the job comes from, run settings, summary metrics and message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune_trainer.backends.local import (
    Launch,
    check_runnable,
    default_settings,
    log_rank,
    run_metrics,
    shared_work_dir,
    success_message,
)
from kubetune_trainer.data.rows import Example, PreparedData
from kubetune_trainer.evaluate.report import ReportFiles
from kubetune_trainer.failures import ConfigError
from kubetune_trainer.pipeline import EvaluationOutcome, RunRecord, check_gate_is_computed, load_job
from kubetune_trainer.progress.reporter import Reporter
from kubetune_trainer.train.trainer import TrainResult

from kubetune.api import EvaluationStatus, FineTuneJobSpec

pytestmark = pytest.mark.unit


def manifest(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://runs/out"},
            **spec,
        },
    }


RESULT = TrainResult(
    steps=40,
    total_steps=40,
    train_loss=0.9,
    final_loss=0.25,
    trained_tokens=1000,
    runtime_seconds=12.5,
    resumed_from_step=None,
    adapter_dir=Path("/work/adapter"),
    merged_dir=None,
    checkpoint_steps=(20, 40),
)
EVALUATION = EvaluationOutcome(
    status=EvaluationStatus(metric="accuracy", tuned=0.875, baselines={"zeroShot": 0.125, "fewShot": 0.5}),
    tables={
        "tuned": {"accuracy": 0.875, "macroF1": 0.8, "loss": 0.3},
        "zeroShot": {"accuracy": 0.125, "macroF1": 0.1, "loss": 2.0},
        "fewShot": {"accuracy": 0.5, "macroF1": 0.4},
    },
    report=ReportFiles(Path("r.json"), Path("r.md"), Path("p.jsonl"), None),
)


def test_the_job_comes_from_the_config_file_first_then_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(manifest("from-file")))
    env = {"KUBETUNE_JOB_MANIFEST": yaml.safe_dump(manifest("from-env"))}

    assert load_job(config, env).metadata.name == "from-file"
    assert load_job(None, env).metadata.name == "from-env"


def test_no_job_anywhere_names_both_sources() -> None:
    with pytest.raises(ConfigError, match="--config FILE or set KUBETUNE_JOB_MANIFEST"):
        load_job(None, {"KUBETUNE_JOB_MANIFEST": "  "})


def test_a_file_with_several_jobs_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump_all([manifest("a"), manifest("b")]))

    with pytest.raises(ConfigError, match="holds 2 FineTuneJobs; the trainer runs exactly one"):
        load_job(config, {})


def test_an_invalid_manifest_names_the_environment_variable_line_and_field() -> None:
    text = "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec:\n  model: {}\n"

    with pytest.raises(ConfigError) as raised:
        load_job(None, {"KUBETUNE_JOB_MANIFEST": text})

    assert "$KUBETUNE_JOB_MANIFEST:4:" in str(raised.value)


def test_a_hosted_job_is_refused_by_run_with_the_command_that_runs_it() -> None:
    spec = FineTuneJobSpec.model_validate(
        manifest(
            "hosted",
            backend="openai",
            openai={"model": "gpt-4o-mini-2024-07-18", "apiKeySecretRef": {"name": "openai", "key": "key"}},
        )["spec"]
    )

    with pytest.raises(ConfigError, match="python -m kubetune_trainer hosted"):
        check_runnable(spec)


def test_settings_follow_the_launcher_s_rank_and_world_size(tmp_path: Path) -> None:
    single = default_settings({}, tmp_path)
    second_rank = default_settings({"RANK": "1", "WORLD_SIZE": "2", "KUBETUNE_MODEL_CACHE": "/cache"}, tmp_path)

    assert (single.is_main_process, single.world_size) == (True, 1)
    assert (second_rank.is_main_process, second_rank.world_size) == (False, 2)
    assert second_rank.model_cache_dir == Path("/cache")


def test_a_launcher_value_that_is_not_a_number_is_refused_naming_it() -> None:
    assert Launch.from_env({"WORLD_SIZE": "2", "RANK": "1"}) == Launch(world_size=2, rank=1)
    assert log_rank({"WORLD_SIZE": "2", "RANK": "1"}) == 1 and log_rank({"RANK": "0"}) is None
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='two' from the launcher is not a whole number"):
        Launch.from_env({"WORLD_SIZE": "two"})
    assert log_rank({"RANK": "x", "WORLD_SIZE": "2"}) is None


def test_every_rank_of_one_launch_shares_a_work_dir_and_a_single_process_gets_its_own() -> None:
    assert shared_work_dir({}) is None
    assert shared_work_dir({"WORLD_SIZE": "1"}) is None
    shared = shared_work_dir({"WORLD_SIZE": "4"})
    assert shared is not None
    assert shared == shared_work_dir({"WORLD_SIZE": "4", "RANK": "3"})


def test_summary_metrics_keep_the_headline_and_loss_and_the_manifest_keeps_every_score() -> None:
    summary = run_metrics(RESULT, EVALUATION, headline_only=True)
    manifest_metrics = run_metrics(RESULT, EVALUATION, headline_only=False)

    assert summary == {
        "trainSteps": 40.0,
        "trainRuntimeSeconds": 12.5,
        "trainLoss": 0.9,
        "finalLoss": 0.25,
        "eval.tuned.accuracy": 0.875,
        "eval.tuned.loss": 0.3,
        "eval.zeroShot.accuracy": 0.125,
        "eval.zeroShot.loss": 2.0,
        "eval.fewShot.accuracy": 0.5,
    }
    assert manifest_metrics["eval.fewShot.macroF1"] == 0.4
    assert run_metrics(RESULT, None, headline_only=True) == {
        "trainSteps": 40.0,
        "trainRuntimeSeconds": 12.5,
        "trainLoss": 0.9,
        "finalLoss": 0.25,
    }


def test_the_success_message_says_steps_loss_headline_and_where() -> None:
    assert success_message(RESULT, EVALUATION, "s3://runs/out") == (
        "trained 40 steps (loss 0.2500); tuned accuracy 0.8750 vs zeroShot 0.1250, fewShot 0.5000; "
        "artifacts in s3://runs/out"
    )
    assert success_message(RESULT, None, "/out") == "trained 40 steps (loss 0.2500); artifacts in /out"


def test_stage_timings_include_the_running_stage_and_the_total() -> None:
    record = RunRecord()
    reporter = Reporter([])

    with record.stage(reporter, "data"):
        pass
    with record.stage(reporter, "publish"):
        running = record.timings_so_far()

    assert set(running) == {"data", "publish", "total"}
    assert set(record.timings) == {"data", "publish"}
    assert reporter.stage == "publish"


def prepared(format_name: str, completions: list[str]) -> PreparedData:
    examples = [
        Example(prompt="q", completion=text, input_text="q", line=line) for line, text in enumerate(completions, 1)
    ]
    return PreparedData(format_name, examples, examples, None, "0" * 64, None)


@pytest.mark.parametrize(
    ("gate_metric", "completions", "refused"),
    [
        ("exactMatch", ["Paris", "Rome"], False),  # short answers: exactMatch is inferred
        ("exactMatch", ["a long answer of many words, " * 3] * 2, True),  # long ones: rougeL instead
        ("jsonF1", ['{"a": 1}', '{"a": 2}'], False),
        ("rougeL", ['{"a": 1}', '{"a": 2}'], True),
    ],
)
def test_a_gate_on_a_metric_the_data_does_not_infer_fails_pre_flight(
    gate_metric: str, completions: list[str], refused: bool
) -> None:
    spec = FineTuneJobSpec.model_validate(manifest("gated", evaluation={"gate": {"metric": gate_metric}})["spec"])
    data = prepared("prompt-completion", completions)
    if not refused:
        check_gate_is_computed(spec, data)
        return
    with pytest.raises(ConfigError) as caught:
        check_gate_is_computed(spec, data)
    assert f"evaluation.gate.metric {gate_metric} is not computed" in str(caught.value)
    assert "list the gate's metric in evaluation.metrics" in str(caught.value)


def test_listed_metrics_are_not_second_guessed_by_the_data() -> None:
    spec = FineTuneJobSpec.model_validate(
        manifest("gated", evaluation={"metrics": ["rougeL"], "gate": {"metric": "rougeL"}})["spec"]
    )
    check_gate_is_computed(spec, prepared("prompt-completion", ['{"a": 1}']))
