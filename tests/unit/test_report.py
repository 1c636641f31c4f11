"""The evaluation report files and the status summary, from hand-built results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune_trainer.evaluate.contenders import token_cost
from kubetune_trainer.evaluate.gate import GateOutcome
from kubetune_trainer.evaluate.report import (
    build_report,
    chart_scores,
    cost_figure,
    cost_points,
    evaluation_status,
    plot_scores,
    render_markdown,
    score_figure,
    write_report,
)
from kubetune_trainer.evaluate.results import EvalSample, EvaluationResults, JudgeCost, ModelResult
from kubetune_trainer.evaluate.scoring import ConfusionMatrix
from matplotlib.backends.backend_agg import FigureCanvasAgg

from kubetune.api import EvaluationStatus, GateStatus

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hand_built_results() -> EvaluationResults:
    samples = [
        EvalSample("Stocks rally", "Business", line=1),
        EvalSample("Team wins cup", "Sports", line=2),
        EvalSample("Election held", "World", line=5),
    ]
    return EvaluationResults(
        headline_metric="accuracy",
        samples=samples,
        models={
            "tuned": ModelResult(
                outputs=["Business", "Sports", "World"],
                metrics={"loss": 0.5, "accuracy": 1.0, "macroF1": 1.0},
                sample_scores=[{"prediction": "Business", "correct": 1.0}] * 3,
                confusion=ConfusionMatrix(["Business"], ["Business", "<unparsed>"], [[1, 0]]),
            ),
            "zeroShot": ModelResult(
                outputs=["I think business", "?", "?"],
                metrics={"loss": 2.0, "accuracy": 1 / 3, "macroF1": 0.25},
                sample_scores=[{"prediction": "Business", "correct": 1.0}, {}, {}],
            ),
            "fewShot": ModelResult(
                outputs=["Business", "Sports", "Sports"],
                metrics={"accuracy": 2 / 3, "macroF1": 0.5},
                sample_scores=[{"correct": 1.0}, {"correct": 1.0}, {"correct": 0.0}],
            ),
        },
        seconds={"tuned": 1.25, "zeroShot": 2.0, "total": 4.5},
        judge_cost=JudgeCost(
            model="judge-1", prompt_tokens=900, completion_tokens=90, requests=9, judged=8, unjudged=1
        ),
        notes=["a note for the reader"],
    )


def test_write_report_produces_the_four_files(tmp_path: Path) -> None:
    gate = GateOutcome(True, "accuracy 1 >= 0.8 and beats zeroShot (0.3333) and fewShot (0.6667)")
    files = write_report(tmp_path / "eval", hand_built_results(), gate, fail_job=True)

    report = json.loads(files.report_json.read_text())
    assert report["headlineMetric"] == "accuracy"
    assert report["samples"] == 3
    assert list(report["models"]) == ["zeroShot", "fewShot", "tuned"]
    assert report["models"]["tuned"]["metrics"] == {"loss": 0.5, "accuracy": 1.0, "macroF1": 1.0}
    assert report["models"]["tuned"]["confusionMatrix"] == {
        "labels": ["Business"],
        "columns": ["Business", "<unparsed>"],
        "matrix": [[1, 0]],
    }
    assert report["models"]["fewShot"]["confusionMatrix"] is None
    assert report["lift"]["zeroShot"] == pytest.approx({"loss": -1.5, "accuracy": 2 / 3, "macroF1": 0.75})
    assert report["lift"]["fewShot"] == pytest.approx({"accuracy": 1 / 3, "macroF1": 0.5})
    assert report["seconds"] == {"tuned": 1.25, "zeroShot": 2.0, "total": 4.5}
    assert report["judge"] == {
        "model": "judge-1",
        "promptTokens": 900,
        "completionTokens": 90,
        "totalTokens": 990,
        "requests": 9,
        "judged": 8,
        "unjudged": 1,
        "responseFormat": None,
    }
    assert report["problems"] == []
    assert report["gate"] == {"passed": True, "message": gate.message, "failJob": True}
    assert report["notes"] == ["a note for the reader"]

    assert files.chart is not None
    assert files.chart.read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_table_has_a_row_per_metric_and_the_lift_over_the_best_baseline(tmp_path: Path) -> None:
    gate = GateOutcome(False, "accuracy 1 < 1.1")
    files = write_report(tmp_path, hand_built_results(), gate, fail_job=False)

    lines = files.report_markdown.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table == [
        "| metric | zero-shot | few-shot | fine-tuned | lift (vs best baseline) |",
        "| --- | ---: | ---: | ---: | ---: |",
        # The headline metric first.
        "| accuracy | 0.3333 | 0.6667 | 1.0000 | +0.3333 |",
        # Loss: lower is better and only zero-shot has one, so the lift is 0.5 - 2.0.
        "| loss | 2.0000 | — | 0.5000 | -1.5000 |",
        "| macroF1 | 0.2500 | 0.5000 | 1.0000 | +0.5000 |",
    ]
    assert "Gate failed (the job still succeeds): accuracy 1 < 1.1" in lines
    assert "Headline metric: **accuracy** on 3 held-out samples." in lines
    assert "Judge judge-1: 900 prompt + 90 completion tokens in 9 requests; 8 judged, 1 unjudged." in lines
    assert "Note: a note for the reader" in lines


def test_lift_over_the_best_baseline_picks_the_lowest_loss(tmp_path: Path) -> None:
    results = hand_built_results()
    results.models["fewShot"].metrics["loss"] = 0.25
    lines = write_report(tmp_path, results, None).report_markdown.read_text().splitlines()
    assert "| loss | 2.0000 | 0.2500 | 0.5000 | +0.2500 |" in lines


def test_prediction_rows_hold_every_model_output_and_scores(tmp_path: Path) -> None:
    files = write_report(tmp_path, hand_built_results(), None)

    rows = [json.loads(line) for line in files.predictions.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[2] == {
        "index": 2,
        "line": 5,
        "input": "Election held",
        "reference": "World",
        "outputs": {"zeroShot": "?", "fewShot": "Sports", "tuned": "World"},
        "scores": {
            "zeroShot": {},
            "fewShot": {"correct": 0.0},
            "tuned": {"prediction": "Business", "correct": 1.0},
        },
    }


def test_report_without_gate_or_judge_says_so(tmp_path: Path) -> None:
    results = hand_built_results()
    results.judge_cost = None
    files = write_report(tmp_path, results, None)
    report = json.loads(files.report_json.read_text())
    assert report["gate"] is None and report["judge"] is None
    assert not any(line.startswith(("Gate", "Judge")) for line in files.report_markdown.read_text().splitlines())


def test_chart_scores_leave_out_loss_and_put_the_judge_on_a_0_to_1_axis() -> None:
    tables = {"tuned": {"loss": 0.4, "accuracy": 0.9, "judge": 80.0}, "zeroShot": {"accuracy": 0.1, "judge": 20.0}}
    assert chart_scores(tables) == {
        "accuracy": {"zeroShot": 0.1, "tuned": 0.9},
        "judge (/100)": {"zeroShot": 0.2, "tuned": 0.8},
    }


def test_no_chart_when_only_loss_was_measured(tmp_path: Path) -> None:
    assert not plot_scores({"tuned": {"loss": 0.4, "perplexity": 1.5}}, tmp_path / "scores.png")
    assert not (tmp_path / "scores.png").exists()


def test_evaluation_status_summarises_the_headline_metric() -> None:
    gate = GateOutcome(True, "accuracy 1 >= 0.8")
    status = evaluation_status(hand_built_results(), gate)
    assert isinstance(status, EvaluationStatus)
    assert (status.metric, status.tuned, status.samples) == ("accuracy", 1.0, 3)
    # Four significant digits: what a person reads in `kubectl get ftj`.
    assert status.baselines == {"zeroShot": 0.3333, "fewShot": 0.6667}
    assert status.lift == {"zeroShot": 0.6667, "fewShot": 0.3333}
    assert status.gate == GateStatus(passed=True, message="accuracy 1 >= 0.8")
    assert status.to_wire()["gate"] == {"passed": True, "message": "accuracy 1 >= 0.8"}


def test_evaluation_status_without_baselines_has_no_lift() -> None:
    results = hand_built_results()
    del results.models["zeroShot"], results.models["fewShot"]
    status = evaluation_status(results, None)
    assert (status.tuned, status.baselines, status.lift, status.gate) == (1.0, {}, {}, None)


def test_chart_puts_the_headline_first_labels_every_bar_and_keeps_the_legend_off_the_data() -> None:
    tables = {
        "zeroShot": {"f1": 0.2, "accuracy": 0.0},
        "fewShot": {"f1": 0.3, "accuracy": 0.25},
        "tuned": {"f1": 0.9, "accuracy": 0.875},
    }
    figure = score_figure(tables, headline="accuracy")
    assert figure is not None
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["accuracy", "f1"]
    # A zero score is a labelled bar, not a gap.
    labels = [text.get_text() for text in axes.texts]
    assert labels == ["0.00", "0.20", "0.25", "0.30", "0.88", "0.90"]
    renderer = canvas.get_renderer()
    legend = figure.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(axes.get_window_extent(renderer))
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["zero-shot", "few-shot", "fine-tuned"]


def test_a_model_without_a_score_gets_no_bar() -> None:
    figure = score_figure({"zeroShot": {"accuracy": 0.5}, "tuned": {"accuracy": 0.9, "f1": 0.8}}, "accuracy")
    assert figure is not None
    FigureCanvasAgg(figure).draw()
    assert [text.get_text() for text in figure.axes[0].texts] == ["0.50", "0.90", "0.80"]


def test_lower_is_better_names_only_the_scores_the_job_computed() -> None:
    report = {"headlineMetric": "accuracy", "samples": 2, "models": {"tuned": {"metrics": {"accuracy": 1.0}}}}
    assert "Lower is better" not in render_markdown(report)
    report["models"]["tuned"]["metrics"]["loss"] = 0.5
    assert "Lower is better for: loss; higher for the rest." in render_markdown(report)


def test_a_judge_that_graded_too_few_outputs_is_a_problem_in_report_and_status(tmp_path: Path) -> None:
    results = hand_built_results()
    results.judge_cost = JudgeCost(
        model="smollm2",
        requests=12,
        judged=1,
        unjudged=5,
        response_format="json_object",
        first_error="malformed reply: score missing or not a number: None",
    )
    problem = (
        "judge smollm2 graded 1 of 6 outputs (response format json_object), too few for a judge score: "
        "malformed reply: score missing or not a number: None"
    )
    files = write_report(tmp_path, results, None)
    assert json.loads(files.report_json.read_text())["problems"] == [problem]
    assert f"Problem: {problem}" in files.report_markdown.read_text().splitlines()
    assert evaluation_status(results, None).problems == [problem]


def test_a_model_without_any_score_is_a_problem() -> None:
    results = hand_built_results()
    results.judge_cost = None
    results.models["fewShot"].metrics = {}
    assert evaluation_status(results, None).problems == ["fewShot produced no score"]


def test_the_cost_chart_puts_each_model_at_its_cost_and_score() -> None:
    results = hand_built_results()
    results.serving = {
        "zeroShot": token_cost([40, 40, 40], [2, 2, 2]),
        "fewShot": token_cost([400, 420, 410], [2, 2, 2]),
        "tuned": token_cost([40, 40, 40], [2, 2, 2]),
    }
    report = json.loads(json.dumps(build_report(results, None)))
    # No prices: the x axis is the prompt tokens per request, which every model has.
    label, points = cost_points(report)
    assert label == "prompt tokens per request"
    assert points == {"zeroShot": (40.0, 1 / 3), "fewShot": (410.0, 2 / 3), "tuned": (40.0, 1.0)}
    figure = cost_figure(report)
    assert figure is not None
    FigureCanvasAgg(figure).draw()
    assert sorted(text.get_text() for text in figure.axes[0].texts) == ["few-shot", "fine-tuned", "zero-shot"]
    # Priced everywhere: the x axis is the cost per 1,000 requests.
    for name in report["serving"]:
        report["serving"][name]["costPer1kRequests"] = 1.5
    assert cost_points(report)[0] == "cost per 1,000 requests"


def test_status_names_the_cost_per_1k_requests_of_each_priced_model_on_the_wire() -> None:
    from dataclasses import replace

    results = hand_built_results()
    results.serving = {
        "tuned": replace(token_cost([40], [2]), cost_per_1k_requests=0.123456),
        "zeroShot": token_cost([9], [1]),
    }
    assert evaluation_status(results, None).to_wire()["costPer1kRequests"] == {"tuned": 0.1235}
