"""The benchmarks' own logic: the skewed data, token counting, ratios and tables, the quality recipes and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune_trainer.evaluate.contenders import ServingCost, token_cost
from kubetune_trainer.evaluate.report import build_report
from kubetune_trainer.evaluate.results import EvalSample, EvaluationResults, ModelResult

from bench.quality import RECIPES, TARGETS, baselines_option, model_rows, recipe_job, table_lines, verdict_lines
from bench.throughput_meter import fed_tokens, real_tokens
from bench.trainer_throughput import (
    COMPARISONS,
    SHORT_PER_LONG,
    RunResult,
    comparison_rows,
    configuration_rows,
    ratio_of,
    round_order,
    skewed_rows,
    write_datasets,
)
from bench.trainer_throughput import CONFIGURATIONS as THROUGHPUT_CONFIGURATIONS
from kubetune.api import FineTuneJob
from tests.testbed.shared_data import SharedDataMissingError, shared_sample

pytestmark = pytest.mark.unit

NEWS = [{"text": f"article {index} " + "word " * 40, "label": ["World", "Sports"][index % 2]} for index in range(12)]
QUESTIONS = [{"text": f"card {index}?", "label": "card_arrival"} for index in range(12)]


def result(key: str, tokens: int, seconds: float, fed: int | None = None, round_number: int = 1) -> RunResult:
    return RunResult(key, round_number, tokens, fed or tokens, seconds, 1000.0, 1.0, 1.0)


def test_skewed_rows_mix_short_questions_with_long_article_rows() -> None:
    rows = skewed_rows(NEWS, QUESTIONS, count=40, seed=0)

    long_rows = [row for row in rows if row["prompt"].startswith("Which topic")]
    assert len(long_rows) == 40 // (SHORT_PER_LONG + 1)
    assert min(len(row["prompt"]) for row in long_rows) > 10 * max(
        len(row["prompt"]) for row in rows if row not in long_rows
    )
    assert {row["completion"] for row in long_rows} <= {"World", "Sports"}
    assert skewed_rows(NEWS, QUESTIONS, count=40, seed=0) == rows


def test_bench_datasets_are_written_from_the_shared_samples(tmp_path: Path) -> None:
    files = write_datasets(tmp_path, rows=24, seed=0)

    assert {name: data_format for name, (_, data_format) in files.items()} == {
        "ag_news": "classification",
        "skewed": "prompt-completion",
    }
    for path, _ in files.values():
        assert len(path.read_text().splitlines()) == 24


def test_real_tokens_are_the_attention_mask_or_every_token_of_a_padding_free_batch() -> None:
    import torch

    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": mask}
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    packed = {"input_ids": torch.ones(1, 9, dtype=torch.long), "position_ids": positions}

    assert (real_tokens(padded), fed_tokens(padded)) == (7, 10)
    assert (real_tokens(packed), fed_tokens(packed)) == (9, 9)


def test_packed_rows_with_a_pad_tail_count_every_token_but_the_tail() -> None:
    import torch

    pad = 2
    # Row 1: examples of 3 and 2 tokens, then a 2-token pad tail; row 2 fills the width with examples of 4 and 3, the
    # last ending in the pad token (an EOS that is also the pad token); row 3 is one example cut before its answer.
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]])
    ids = torch.tensor([[5, 6, 2, 7, 2, 2, 2], [5, 6, 7, 2, 8, 9, 2], [5, 6, 7, 8, 9, 10, 11]])
    batch = {"input_ids": ids, "position_ids": positions, "labels": torch.full((3, 7), -100)}

    assert (real_tokens(batch, pad_token_id=pad), fed_tokens(batch)) == (19, 21)


def test_ratios_compare_mean_throughputs_and_tables_say_whether_targets_are_met() -> None:
    results = [
        result("ag_news/plain", 1000, 10.0),
        result("ag_news/plain", 1200, 10.0, round_number=2),
        result("ag_news/ours", 1050, 10.0),
        result("skewed/plain", 400, 10.0, fed=1000),
        result("skewed/ours+packing", 500, 10.0),
    ]
    packing = next(c for c in COMPARISONS if c.subject == "skewed/ours+packing" and c.reference == "skewed/plain")

    assert ratio_of(results, COMPARISONS[0]) == pytest.approx(1050 / 1100)
    assert ratio_of(results, packing) == pytest.approx(1.25)
    table = "\n".join(comparison_rows(results))
    assert "| 0.95× | ≥ 0.95× | yes |" in table
    assert "| 1.25× | ≥ 1.50× | **no** |" in table
    rows = "\n".join(configuration_rows(results))
    assert "| ag_news, plain TRL script | 110 | 100, 120 | 1.00 | 1.00 (reference) |" in rows
    assert "| skewed, plain TRL script | 40 | 40 | 0.40 |" in rows


def test_rounds_alternate_the_order() -> None:
    assert round_order(THROUGHPUT_CONFIGURATIONS, 1) == list(THROUGHPUT_CONFIGURATIONS)
    assert round_order(THROUGHPUT_CONFIGURATIONS, 2) == list(reversed(THROUGHPUT_CONFIGURATIONS))


@pytest.mark.parametrize(("dataset", "objective"), sorted(RECIPES))
def test_every_recipe_is_a_valid_job_on_the_shared_files(dataset: str, objective: str, tmp_path: Path) -> None:
    job = recipe_job(
        dataset,  # type: ignore[arg-type]
        objective,  # type: ignore[arg-type]
        model_dir=tmp_path / "model",
        output_uri=str(tmp_path / "out"),
        max_samples=500,
    )

    assert isinstance(job, FineTuneJob)
    assert job.spec.training.objective == objective
    assert job.spec.dataset.validation == str(shared_sample(dataset, "test"))
    assert job.spec.evaluation.baselines == ["zeroShot", "fewShot", "retrievalFewShot"]
    assert job.spec.evaluation.few_shot_k == 5 and job.spec.evaluation.contenders == []
    assert job.spec.evaluation.max_samples == 500 and job.spec.training.max_steps is None


def test_a_recipe_on_missing_samples_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SharedDataMissingError, match=str(tmp_path / "banking77" / "train.jsonl")):
        recipe_job(
            "banking77", "sequence-classification", model_dir=tmp_path, output_uri="", max_samples=8, data_dir=tmp_path
        )


def test_max_steps_caps_a_recipe_for_a_quick_check(tmp_path: Path) -> None:
    job = recipe_job("ag_news", "causal-lm", model_dir=tmp_path, output_uri=str(tmp_path), max_samples=8, max_steps=3)
    assert job.spec.training.max_steps == 3


def test_the_reported_command_names_baselines_other_than_the_default() -> None:
    assert baselines_option(["zeroShot", "fewShot", "retrievalFewShot"]) == ""
    assert baselines_option([]) == ' --baselines ""'
    assert baselines_option(["zeroShot"]) == ' --baselines "zeroShot"'


def test_quality_table_reads_the_trainers_report_json() -> None:
    samples = [EvalSample("a", "World"), EvalSample("b", "Sports")]
    results = EvaluationResults(
        headline_metric="accuracy",
        samples=samples,
        models={
            "tuned": ModelResult(outputs=["World", "Sports"], metrics={"accuracy": 1.0, "macroF1": 1.0}),
            "zeroShot": ModelResult(outputs=["x", "y"], metrics={"accuracy": 0.0, "macroF1": 0.0}),
            "fewShot": ModelResult(outputs=["World", "x"], metrics={"accuracy": 0.5, "macroF1": 0.33}),
        },
        seconds={"tuned": 3.0, "zeroShot": 4.0, "fewShot": 9.0, "total": 16.0},
        serving={
            "tuned": token_cost([40, 44], [2, 2]),
            "contender": ServingCost(2, 0, 900.0, 950.0, 3.0, 3.0, 0.5, 0.7, 1.25),
        },
    )
    results.models["contender"] = ModelResult(outputs=["World", "Sports"], metrics={"accuracy": 1.0, "macroF1": 1.0})
    # Through JSON, as the bench reads the published file.
    report = json.loads(json.dumps(build_report(results, None)))

    rows = model_rows(report, train_seconds=600.0)

    assert [row.model.split()[0] for row in rows] == ["zero-shot", "5-shot", "tuned", "contender"]
    assert rows[2].accuracy == 1.0 and rows[2].train_seconds == 600.0 and rows[2].eval_seconds == 3.0
    assert rows[1].macro_f1 == 0.33 and rows[1].train_seconds is None
    table = "\n".join(table_lines(rows))
    assert "| tuned (qLoRA) | 1.0000 | 1.0000 | 42 | — | 600 s (10.0 min) | 3 s (0.1 min) |" in table
    assert "| contender | 1.0000 | 1.0000 | 900 | 0.50 s | — | — |" in table
    verdict = "\n".join(verdict_lines("ag_news", rows, 600.0))
    assert "accuracy 1.0000 (met)" in verdict and "training 600 s (10.0 min) (met)" in verdict
    assert f"{1.0 - TARGETS['ag_news'].naive_accuracy:+.4f}" in verdict
    slow = "\n".join(verdict_lines("ag_news", rows, 16 * 60.0))
    assert "(NOT met)" in slow
