"""The endpoint check: the rows the evaluation scored, sent to the tuned model where it is served, scored the same way.

A job's report measures the tuned model in-process; what users run is an endpoint (llama.cpp serving the GGUF, vLLM
with the adapter). The check rebuilds the same held-out rows from the spec (the split is seeded), asks the endpoint
with the tuned model's own prompts, scores the answers with the evaluation's text metrics, and writes
`eval/endpoint.json` beside the report: both scores, how often the two answered alike, and the endpoint's measured
latency and tokens per request. The report (report.json, report.md) gains the check, and manifest.json the new hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api import EndpointCheckStatus, FineTuneJob
from kubetune_trainer import storage
from kubetune_trainer.chat_endpoint import ChatEndpoint
from kubetune_trainer.evaluate.contenders import ServingCost
from kubetune_trainer.evaluate.predictors import EndpointPredictor
from kubetune_trainer.evaluate.report import PREDICTIONS_JSONL, REPORT_JSON, REPORT_MARKDOWN, render_markdown
from kubetune_trainer.evaluate.results import TUNED, EvalSample, ModelResult
from kubetune_trainer.evaluate.runner import add_text_scores, evaluation_metrics
from kubetune_trainer.failures import EvaluationError
from kubetune_trainer.publish.outputs import EVAL_PREFIX, MANIFEST_FILE

log = logging.getLogger(__name__)

ENDPOINT_JSON = "endpoint.json"
# Answers the endpoint may give past the label or reference: the in-process run's own cap, else this.
DEFAULT_MAX_TOKENS = 64
# Metrics that need the model's probabilities or a judge: an endpoint check scores text only.
NOT_FROM_TEXT = frozenset({"loss", "judge"})


@dataclass(frozen=True)
class EndpointCheck:
    """The endpoint's scores beside the in-process ones on the same rows."""

    base_url: str
    model: str
    rows: int
    headline: str
    scores: dict[str, float]
    in_process: dict[str, float]
    agreement: float
    cost: ServingCost

    def to_json(self) -> dict[str, Any]:
        return {
            "baseUrl": self.base_url,
            "model": self.model,
            "rows": self.rows,
            "headlineMetric": self.headline,
            "scores": self.scores,
            "inProcess": self.in_process,
            "agreement": self.agreement,
            "serving": self.cost.to_json(),
        }

    def shown_metric(self) -> str:
        """The metric status shows: the headline when the endpoint's text can be scored on it, else the first one."""
        return self.headline if self.headline in self.scores else min(self.scores, default=self.headline)

    def status(self, uri: str) -> EndpointCheckStatus:
        """status.serving.check as the operator records it from the check pod's termination message."""
        metric = self.shown_metric()
        score, in_process = self.scores.get(metric), self.in_process.get(metric)
        cost = self.cost
        answered = cost.requests > cost.failed
        summary = f"{metric} {score:.4f} served vs {in_process:.4f} in-process" if score is not None else "no score"
        return EndpointCheckStatus(
            state="Succeeded",
            metric=metric,
            score=score,
            in_process_score=in_process,
            agreement=self.agreement,
            rows=self.rows,
            latency_p50_seconds=cost.latency_p50_seconds if answered else None,
            prompt_tokens_mean=cost.prompt_tokens_mean if answered else None,
            completion_tokens_mean=cost.completion_tokens_mean if answered else None,
            failed_requests=cost.failed,
            uri=uri,
            message=f"{summary} on {self.rows} held-out rows; answers alike on {self.agreement:.0%}"
            + (f"; p50 {cost.latency_p50_seconds:.2f} s a request" if answered and cost.latency_p50_seconds else ""),
        )

    def lines(self) -> list[str]:
        """The check as a short table for a terminal."""
        names = sorted(self.scores)
        rows = [f"endpoint {self.model} at {self.base_url}, {self.rows} held-out rows:"]
        rows += [
            f"  {name:<10} endpoint {self.scores[name]:.4f}   in-process {self.in_process.get(name, float('nan')):.4f}"
            for name in names
        ]
        rows.append(f"  answers alike on {self.agreement:.0%} of rows")
        cost = self.cost
        if cost.requests == cost.failed:
            rows.append("  no request answered" + (f": {cost.first_error}" if cost.first_error else ""))
            return rows
        rows.append(
            f"  latency p50 {cost.latency_p50_seconds or 0.0:.3f} s, prompt tokens {cost.prompt_tokens_mean:.1f}, "
            f"completion tokens {cost.completion_tokens_mean:.1f} per request"
            + (f"; {cost.failed} of {cost.requests} requests failed: {cost.first_error}" if cost.failed else "")
        )
        return rows


def read_evaluation(output_uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The job's report.json and predictions.jsonl; an EvaluationError when the job has none yet."""
    report_uri = storage.join(output_uri, EVAL_PREFIX, REPORT_JSON)
    if not storage.exists(report_uri):
        raise EvaluationError(f"{report_uri} does not exist: the endpoint check compares with a finished evaluation")
    report = json.loads(storage.read_bytes(report_uri))
    text = storage.read_bytes(storage.join(output_uri, EVAL_PREFIX, PREDICTIONS_JSONL)).decode("utf-8")
    return report, [json.loads(line) for line in text.splitlines() if line.strip()]


def text_metrics(report: Mapping[str, Any]) -> list[str]:
    """The tuned model's scored metrics an endpoint's text can be scored on."""
    return [name for name in report["models"][TUNED]["metrics"] if name.split(".")[0] not in NOT_FROM_TEXT]


def agreement(ours: Sequence[str], theirs: Sequence[str]) -> float:
    """The share of rows where both answered the same text (surrounding white space aside)."""
    if not ours:
        return 0.0
    return sum(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True)) / len(ours)


def check_endpoint(
    job: FineTuneJob,
    base_url: str,
    model: str,
    api_key: str = "",
    *,
    concurrency: int = 4,
    max_tokens: int | None = None,
) -> EndpointCheck:
    """Ask the endpoint the evaluated rows, score its answers, write eval/endpoint.json under output.uri."""
    from kubetune_trainer.data.prepare import prepare_data

    spec = job.spec
    report, predictions = read_evaluation(spec.output.uri)
    # The data alone, as pre-flight splits it (seeded): no model, no contender keys, no output check.
    data = prepare_data(spec.dataset, spec.training.seed)
    examples = data.validation[: len(predictions)]
    lines = [row["line"] for row in predictions]
    if [example.line for example in examples] != lines:
        raise EvaluationError(
            "the held-out rows rebuilt from the spec are not the ones the evaluation scored "
            f"(lines {lines[:5]}… in {PREDICTIONS_JSONL}): was the data changed after the run?"
        )
    samples = [EvalSample(example.input_text, example.completion, example.line) for example in examples]
    metrics = evaluation_metrics(spec.evaluation, data.format, [sample.reference for sample in samples])
    endpoint = ChatEndpoint.connect(
        base_url,
        api_key,
        max_retries=2,
        concurrency=concurrency,
        max_tokens=max_tokens or spec.evaluation.max_new_tokens or DEFAULT_MAX_TOKENS,
        seed=spec.training.seed,
    )
    # The served model answers through the same predictor as a hosted model; a failed request is a wrong answer
    # counted in the cost, so that one bad row does not hide the endpoint's score.
    predictor = EndpointPredictor(endpoint, model, fail_on_error=False)
    try:
        prediction = predictor.predict(
            [example.prompt for example in examples], examples, text=True, loss=False, on_done=lambda rows: None
        )
    finally:
        endpoint.close()
    outputs, cost = prediction.outputs or [], prediction.cost
    if cost.failed == cost.requests:
        raise EvaluationError(f"{base_url} answered none of the {cost.requests} requests: {cost.first_error}")
    result = ModelResult(outputs=outputs)
    add_text_scores(result, samples, [m for m in metrics if m not in NOT_FROM_TEXT], data.labels)
    wanted = text_metrics(report)
    check = EndpointCheck(
        base_url=base_url,
        model=model,
        rows=len(examples),
        headline=report["headlineMetric"],
        scores={name: value for name, value in result.metrics.items() if name in wanted},
        in_process={name: report["models"][TUNED]["metrics"][name] for name in wanted},
        agreement=agreement(outputs, [row["outputs"][TUNED] for row in predictions]),
        cost=cost,
    )
    record_check(spec.output.uri, report, check)
    return check


def endpoint_uri(output_uri: str) -> str:
    return storage.join(output_uri, EVAL_PREFIX, ENDPOINT_JSON)


def record_check(output_uri: str, report: dict[str, Any], check: EndpointCheck) -> None:
    """eval/endpoint.json, the check in report.json and report.md, and their new hashes in manifest.json."""
    report = {**report, "endpoint": check.to_json()}
    written = {
        ENDPOINT_JSON: json.dumps(check.to_json(), indent=2) + "\n",
        REPORT_JSON: json.dumps(report, indent=2, ensure_ascii=False) + "\n",
        REPORT_MARKDOWN: render_markdown(report),
    }
    hashes = {}
    for name, text in written.items():
        body = text.encode("utf-8")
        storage.write_bytes(storage.join(output_uri, EVAL_PREFIX, name), body)
        hashes[f"{EVAL_PREFIX}/{name}"] = hashlib.sha256(body).hexdigest()
    manifest_uri = storage.join(output_uri, MANIFEST_FILE)
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_bytes(manifest_uri))
        manifest["artifacts"] = {**manifest.get("artifacts", {}), **hashes}
        storage.write_bytes(manifest_uri, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("endpoint check written to %s; report and manifest updated", endpoint_uri(output_uri))
