"""The evaluation report: report.json, report.md, predictions.jsonl and a bar chart, plus the status summary.

Everything is written into a local directory; publishing it under output.uri/eval/ is the publisher's job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api import MAX_PROBLEMS, PROBLEM_LIMIT, EvaluationStatus, GateStatus, significant
from kubetune_trainer.evaluate.gate import GateOutcome
from kubetune_trainer.evaluate.results import MIN_JUDGED_SHARE, MODEL_ORDER, TUNED, EvaluationResults
from kubetune_trainer.evaluate.scoring import LOWER_IS_BETTER, ConfusionMatrix, is_better

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
PREDICTIONS_JSONL = "predictions.jsonl"
CHART_PNG = "chart.png"
COST_CHART_PNG = "cost.png"

COLUMN_TITLES = {
    "zeroShot": "zero-shot",
    "fewShot": "few-shot",
    "retrievalFewShot": "retrieval few-shot",
    "tuned": "fine-tuned",
}
JUDGE_SCALE = 100.0
"""The judge scores 0-100; the chart divides by this to share the 0-1 axis with the other scores."""
UNCHARTED = LOWER_IS_BETTER | {"perplexity"}


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the files write_report produced."""

    report_json: Path
    report_markdown: Path
    predictions: Path
    chart: Path | None
    cost_chart: Path | None = None


def ordered_models(models: Mapping[str, Any]) -> list[str]:
    """Model names in report order: zero-shot, few-shot, fine-tuned, then anything else."""
    return [name for name in MODEL_ORDER if name in models] + sorted(set(models) - set(MODEL_ORDER))


def lift_tables(tables: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Tuned minus each baseline, for every score both have (negative is better for loss-like scores)."""
    tuned = tables.get(TUNED, {})
    return {
        baseline: {name: tuned[name] - value for name, value in table.items() if name in tuned}
        for baseline, table in tables.items()
        if baseline != TUNED
    }


def best_baseline_lift(name: str, tables: Mapping[str, Mapping[str, float]]) -> float | None:
    """Tuned minus the strongest baseline on one score, or None when the tuned model or every baseline lacks it."""
    tuned = tables.get(TUNED, {}).get(name)
    scores = [table[name] for baseline, table in tables.items() if baseline != TUNED and name in table]
    if tuned is None or not scores:
        return None
    best = scores[0]
    for score in scores[1:]:
        if is_better(name, score, best):
            best = score
    return tuned - best


def metric_names(tables: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Every score in the tables, the tuned model's first, in the order they were computed."""
    names: list[str] = []
    for model in [TUNED, *(name for name in ordered_models(tables) if name != TUNED)]:
        names.extend(name for name in tables.get(model, {}) if name not in names)
    return names


def confusion_json(confusion: ConfusionMatrix | None) -> dict[str, Any] | None:
    """A confusion matrix as report.json holds it: labels, columns and matrix."""
    return None if confusion is None else asdict(confusion)


def scoring_problems(results: EvaluationResults) -> list[str]:
    """What scored too little to mean anything: a judge that graded under half the outputs, a model with no score."""
    problems = [f"{name} produced no score" for name, result in results.models.items() if not result.metrics]
    for name, serving in results.serving.items():
        if serving.failed and serving.failed >= MIN_JUDGED_SHARE * serving.requests:
            why = f": {serving.first_error}" if serving.first_error else ""
            problems.append(
                f"{name}: {serving.failed} of {serving.requests} requests failed and were scored as wrong{why}"
            )
    cost = results.judge_cost
    cases = 0 if cost is None else cost.judged + cost.unjudged
    if cost is not None and cases and cost.judged < MIN_JUDGED_SHARE * cases:
        why = f": {cost.first_error}" if cost.first_error else ""
        problems.append(
            f"judge {cost.model} graded {cost.judged} of {cases} outputs (response format {cost.response_format}), "
            f"too few for a judge score{why}"
        )
    return problems


def build_report(results: EvaluationResults, gate: GateOutcome | None, fail_job: bool = False) -> dict[str, Any]:
    """The report.json document."""
    tables = results.metric_tables()
    cost = results.judge_cost
    return {
        "headlineMetric": results.headline_metric,
        "samples": len(results.samples),
        "models": {
            name: {
                "metrics": tables[name],
                "confusionMatrix": confusion_json(results.models[name].confusion),
            }
            for name in ordered_models(results.models)
        },
        "lift": lift_tables(tables),
        "seconds": results.seconds,
        "judge": None
        if cost is None
        else {
            "model": cost.model,
            "promptTokens": cost.prompt_tokens,
            "completionTokens": cost.completion_tokens,
            "totalTokens": cost.total_tokens,
            "requests": cost.requests,
            "judged": cost.judged,
            "unjudged": cost.unjudged,
            "responseFormat": cost.response_format,
        },
        "problems": scoring_problems(results),
        "serving": {name: results.serving[name].to_json() for name in ordered_models(results.serving)},
        "gate": None if gate is None else {"passed": gate.passed, "message": gate.message, "failJob": fail_job},
        "notes": results.notes,
    }


def report_tables(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The per-model metric tables of a report.json document."""
    return {name: model["metrics"] for name, model in report["models"].items()}


def format_cell(value: float | None, signed: bool = False) -> str:
    """A table cell: four decimals, an explicit sign for lifts, an em dash when absent."""
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: one row per score, columns zero-shot | few-shot | fine-tuned | lift vs the best baseline."""
    tables = report_tables(report)
    models = ordered_models(tables)
    header = ["metric", *(COLUMN_TITLES.get(name, name) for name in models), "lift (vs best baseline)"]
    lines = [
        "# Evaluation: fine-tuned adapter vs prompting the base model",
        "",
        f"Headline metric: **{report['headlineMetric']}** on {report['samples']} held-out samples.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    names = metric_names(tables)
    headline = report["headlineMetric"]
    # The headline leads the table; the rest follow in the order they were computed.
    for name in ([headline] if headline in names else []) + [name for name in names if name != headline]:
        cells = [format_cell(tables[model].get(name)) for model in models]
        lift = format_cell(best_baseline_lift(name, tables), signed=True)
        lines.append("| " + " | ".join([name, *cells, lift]) + " |")
    lines.append("")
    lines.extend(serving_table(report))
    lines.extend(endpoint_table(report))
    lower = sorted(LOWER_IS_BETTER & set(names))
    if lower:
        lines.append(f"Lower is better for: {', '.join(lower)}; higher for the rest.")
    gate = report.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "failed"
        consequence = "" if gate["passed"] else (" (the job fails)" if gate["failJob"] else " (the job still succeeds)")
        lines.append(f"Gate {verdict}{consequence}: {gate['message']}")
    seconds = report.get("seconds") or {}
    if seconds:
        lines.append("Time (s): " + ", ".join(f"{part} {value:.1f}" for part, value in seconds.items()))
    judge = report.get("judge")
    if judge:
        lines.append(
            f"Judge {judge['model']}: {judge['promptTokens']} prompt + {judge['completionTokens']} completion tokens "
            f"in {judge['requests']} requests; {judge['judged']} judged, {judge['unjudged']} unjudged"
            + (f" (response format {judge['responseFormat']})." if judge.get("responseFormat") else ".")
        )
    lines.extend(f"Problem: {problem}" for problem in report.get("problems") or [])
    lines.extend(f"Note: {note}" for note in report.get("notes") or [])
    return "\n".join(lines) + "\n"


def serving_table(report: Mapping[str, Any]) -> list[str]:
    """What each model's answers cost per request beside its headline score (empty when nothing was measured)."""
    serving = report.get("serving") or {}
    if not serving:
        return []
    headline = report["headlineMetric"]
    tables = report_tables(report)

    def pair(first: float | None, second: float | None, digits: int) -> str:
        if first is None or second is None:
            return "—"
        return f"{first:.{digits}f} / {second:.{digits}f}"

    lines = [
        f"Quality and cost per request ({headline}; tokens as each model's endpoint or tokenizer counts them):",
        "",
        f"| model | {headline} | prompt tokens (mean / p95) | completion tokens (mean / p95) | latency s (p50 / p95) "
        "| cost per 1k requests | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, cost in serving.items():
        price = cost.get("costPer1kRequests")
        lines.append(
            "| "
            + " | ".join(
                [
                    COLUMN_TITLES.get(name, name),
                    format_cell(tables.get(name, {}).get(headline)),
                    pair(cost["promptTokensMean"], cost["promptTokensP95"], 0),
                    pair(cost["completionTokensMean"], cost["completionTokensP95"], 0),
                    pair(cost.get("latencyP50Seconds"), cost.get("latencyP95Seconds"), 2),
                    "—" if price is None else f"{price:.4g}",
                    str(cost["failed"]),
                ]
            )
            + " |"
        )
    lines.append("")
    return lines


def endpoint_table(report: Mapping[str, Any]) -> list[str]:
    """The endpoint check (kubetune check-endpoint): the served model beside the in-process one on the same rows."""
    endpoint = report.get("endpoint")
    if not endpoint:
        return []
    cost = endpoint["serving"]
    latency = cost.get("latencyP50Seconds")
    lines = [
        f"Served endpoint: model `{endpoint['model']}` at {endpoint['baseUrl']}, asked the same "
        f"{endpoint['rows']} held-out rows; answers alike on {endpoint['agreement']:.0%} of rows.",
        "",
        "| metric | fine-tuned (in-process) | fine-tuned (endpoint) |",
        "| --- | ---: | ---: |",
    ]
    for name in sorted(endpoint["scores"]):
        lines.append(
            f"| {name} | {format_cell(endpoint['inProcess'].get(name))} | {format_cell(endpoint['scores'][name])} |"
        )
    lines += [
        "",
        f"Endpoint per request: latency p50 {'—' if latency is None else f'{latency:.2f} s'}, "
        f"{cost['promptTokensMean']:.0f} prompt + {cost['completionTokensMean']:.0f} completion tokens; "
        f"{cost['failed']} of {cost['requests']} requests failed.",
        "",
    ]
    return lines


def prediction_rows(results: EvaluationResults) -> list[dict[str, Any]]:
    """predictions.jsonl: per sample its input, reference, every model's output and per-sample scores."""
    models = ordered_models(results.models)
    return [
        {
            "index": index,
            "line": sample.line,
            "input": sample.input_text,
            "reference": sample.reference,
            "outputs": {name: results.models[name].outputs[index] for name in models},
            "scores": {
                name: results.models[name].sample_scores[index] if results.models[name].sample_scores else {}
                for name in models
            },
        }
        for index, sample in enumerate(results.samples)
    ]


def chart_scores(tables: Mapping[str, Mapping[str, float]], headline: str | None = None) -> dict[str, dict[str, float]]:
    """Per charted score, each model's value on a 0-1 axis: higher-is-better scores only, the judge divided by 100,
    the headline first."""
    charted: dict[str, dict[str, float]] = {}
    names = metric_names(tables)
    for name in sorted(names, key=lambda name: name != headline):
        if name in UNCHARTED:
            continue
        scale = JUDGE_SCALE if name == "judge" else 1.0
        label = "judge (/100)" if name == "judge" else name
        charted[label] = {
            model: tables[model][name] / scale for model in ordered_models(tables) if name in tables[model]
        }
    return charted


def plot_scores(tables: Mapping[str, Mapping[str, float]], path: Path, headline: str | None = None) -> bool:
    """The score chart as a PNG at path; False (and no file) when nothing is chartable."""
    figure = score_figure(tables, headline)
    if figure is None:
        return False
    figure.savefig(path, format="png", dpi=100)
    return True


def score_figure(tables: Mapping[str, Mapping[str, float]], headline: str | None = None) -> Figure | None:
    """Grouped bars of the baselines and the tuned model per score, the headline first, each bar labelled with its
    value (a zero score reads `0.00`, not as a missing bar), the legend beside the axes; None when nothing is
    chartable."""
    from matplotlib.figure import Figure

    charted = chart_scores(tables, headline)
    if not charted:
        return None
    models = ordered_models(tables)
    width = 0.8 / len(models)
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    figure = Figure(figsize=(max(5.0, 1.6 * len(charted) + 3), 4.0), layout="constrained")
    axes = figure.add_subplot()
    for offset, model in enumerate(models):
        # A model without this score gets no bar (and no label), unlike one that scored zero.
        placed = [
            (i + (offset - (len(models) - 1) / 2) * width, scores[model])
            for i, scores in enumerate(charted.values())
            if model in scores
        ]
        bars = axes.bar([x for x, _ in placed], [h for _, h in placed], width, label=COLUMN_TITLES.get(model, model))
        axes.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    axes.set_xticks(range(len(charted)), list(charted))
    axes.set_ylim(0, 1.12)  # room for the labels above a perfect score
    axes.set_ylabel("score")
    axes.set_title("Fine-tuned adapter vs prompting baselines")
    figure.legend(loc="outside right upper")
    return figure


def cost_points(report: Mapping[str, Any]) -> tuple[str, dict[str, tuple[float, float]]]:
    """(x-axis label, {model: (cost, headline score)}): the cost per 1,000 requests when every scored model has a
    price, else the prompt tokens per request, which every model has."""
    headline = report["headlineMetric"]
    tables = report_tables(report)
    serving = {name: cost for name, cost in (report.get("serving") or {}).items() if headline in tables.get(name, {})}
    if all(cost.get("costPer1kRequests") is not None for cost in serving.values()):
        key, label = "costPer1kRequests", "cost per 1,000 requests"
    else:
        key, label = "promptTokensMean", "prompt tokens per request"
    return label, {name: (float(cost[key]), float(tables[name][headline])) for name, cost in serving.items()}


def cost_figure(report: Mapping[str, Any]) -> Figure | None:
    """The headline score against what a request costs, one labelled point per model; None with fewer than two."""
    from matplotlib.figure import Figure

    label, points = cost_points(report)
    if len(points) < 2:
        return None
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for name, (cost, score) in points.items():
        axes.scatter([cost], [score], s=40)
        title = COLUMN_TITLES.get(name, name)
        axes.annotate(title, (cost, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel(label)
    axes.set_ylabel(report["headlineMetric"])
    axes.set_title("Quality against cost per request")
    axes.margins(x=0.15, y=0.1)
    return figure


def write_report(
    directory: Path, results: EvaluationResults, gate: GateOutcome | None, fail_job: bool = False
) -> ReportFiles:
    """Write report.json, report.md, predictions.jsonl, chart.png and cost.png into directory (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(results, gate, fail_job)
    report_json = directory / REPORT_JSON
    report_json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report_markdown = directory / REPORT_MARKDOWN
    report_markdown.write_text(render_markdown(report), encoding="utf-8")
    predictions = directory / PREDICTIONS_JSONL
    with predictions.open("w", encoding="utf-8") as stream:
        for row in prediction_rows(results):
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    chart = directory / CHART_PNG
    cost_chart = directory / COST_CHART_PNG
    figure = cost_figure(report)
    if figure is not None:
        figure.savefig(cost_chart, format="png", dpi=100)
    return ReportFiles(
        report_json,
        report_markdown,
        predictions,
        chart if plot_scores(report_tables(report), chart, results.headline_metric) else None,
        cost_chart if figure is not None else None,
    )


def evaluation_status(results: EvaluationResults, gate: GateOutcome | None) -> EvaluationStatus:
    """status.evaluation: the headline score of the tuned model and each baseline, the lifts, the gate."""
    name = results.headline_metric
    tables = results.metric_tables()
    tuned = tables.get(TUNED, {}).get(name)
    baselines = {model: table[name] for model, table in tables.items() if model != TUNED and name in table}
    # Four significant digits: what `kubectl get ftj` and `kubetune status` show; report.json keeps every digit.
    return EvaluationStatus(
        metric=name,
        tuned=significant(tuned),
        baselines={model: significant(score) for model, score in baselines.items()},
        lift={} if tuned is None else {model: significant(tuned - score) for model, score in baselines.items()},
        samples=len(results.samples),
        gate=None if gate is None else GateStatus(passed=gate.passed, message=gate.message),
        problems=[problem[:PROBLEM_LIMIT] for problem in scoring_problems(results)][:MAX_PROBLEMS],
        cost_per_1k_requests={
            name: significant(cost.cost_per_1k_requests)
            for name, cost in results.serving.items()
            if cost.cost_per_1k_requests is not None
        },
    )
