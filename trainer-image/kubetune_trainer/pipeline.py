"""What both backends' runs share: the run record, the job and its pre-flight checks, the data stage, the judge,
the evaluation's figures and sentences for the summary, and the termination message. The local backend
(kubetune_trainer.backends.local) and the hosted one (kubetune_trainer.backends.hosted) supply how they train,
predict and publish."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api import DatasetStatus, EvaluationStatus, FineTuneJob, FineTuneJobSpec
from kubetune.contract import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    ENV_JOB_MANIFEST,
    ENV_TERMINATION_MESSAGE_PATH,
    TrainerSummary,
)
from kubetune.manifests import ManifestError, load_finetunejobs, load_finetunejobs_text
from kubetune_trainer import storage
from kubetune_trainer.failures import ConfigError, EvaluationError, classify_failure, exit_code, failed_summary
from kubetune_trainer.progress.reporter import Reporter, Stage

if TYPE_CHECKING:
    from kubetune_trainer.data.rows import PreparedData
    from kubetune_trainer.evaluate.report import ReportFiles
    from kubetune_trainer.evaluate.results import EvaluationResults

log = logging.getLogger(__name__)

MANIFEST_SOURCE = f"${ENV_JOB_MANIFEST}"


@dataclass
class RunRecord:
    """What the run has found so far; a failure's summary keeps the parts that are known."""

    timings: dict[str, float] = field(default_factory=dict)
    dataset: DatasetStatus | None = None
    started: float = field(default_factory=time.monotonic)

    current: tuple[str, float] | None = None

    @contextmanager
    def stage(self, reporter: Reporter, name: Stage) -> Iterator[None]:
        """Enter a stage on the reporter and time it."""
        reporter.enter_stage(name)
        self.current = (name, time.monotonic())
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - self.current[1], 3)
            self.current = None

    def wall_seconds(self) -> float:
        """Seconds since the run began."""
        return round(time.monotonic() - self.started, 3)

    def timings_so_far(self) -> dict[str, float]:
        """Seconds per finished stage, the running stage's so far, and the total."""
        running = {self.current[0]: round(time.monotonic() - self.current[1], 3)} if self.current else {}
        return {**self.timings, **running, "total": self.wall_seconds()}


@dataclass(frozen=True)
class EvaluationOutcome:
    """The evaluation's status block, its per-model tables and the report files written locally."""

    status: EvaluationStatus
    tables: dict[str, dict[str, float]]
    report: ReportFiles


def load_job(config: Path | None, env: Mapping[str, str]) -> FineTuneJob:
    """The FineTuneJob from --config or KUBETUNE_JOB_MANIFEST (YAML); ConfigError naming the source otherwise."""
    try:
        if config is not None:
            jobs = load_finetunejobs(config)
            source = str(config)
        elif env.get(ENV_JOB_MANIFEST, "").strip():
            jobs = load_finetunejobs_text(env[ENV_JOB_MANIFEST], MANIFEST_SOURCE)
            source = MANIFEST_SOURCE
        else:
            raise ConfigError(f"no job to run: pass --config FILE or set {ENV_JOB_MANIFEST} to a FineTuneJob (YAML)")
    except ManifestError as error:
        raise ConfigError(f"invalid FineTuneJob manifest:\n{error}") from error
    if len(jobs) != 1:
        raise ConfigError(f"{source} holds {len(jobs)} FineTuneJobs; the trainer runs exactly one")
    return jobs[0]


def check_spec_uris(spec: FineTuneJobSpec, include_model: bool) -> None:
    """Every URI of the spec is well formed and its bucket reachable, before any work: ConfigError naming the field."""
    uris = {"output.uri": spec.output.uri, "dataset.train": spec.dataset.train}
    if spec.dataset.validation is not None:
        uris["dataset.validation"] = spec.dataset.validation
    if include_model and spec.model.uri is not None:
        uris["model.uri"] = spec.model.uri
    for field_name, uri in uris.items():
        try:
            storage.check_uri(uri)
        except storage.StorageError as error:
            raise ConfigError(f"{field_name}: {error}") from error


def data_stage(spec: FineTuneJobSpec, reporter: Reporter) -> PreparedData:
    """Pre-flight: fetch, parse and validate every row, split, and check that output.uri is reachable; no model."""
    from kubetune_trainer.data.prepare import prepare_data

    check_contender_keys(spec, os.environ)
    data = prepare_data(spec.dataset, spec.training.seed)
    check_gate_is_computed(spec, data)
    # A missing output bucket or denied credentials surface now, not after hours of training.
    storage.exists(spec.output.uri)
    reporter.report_dataset(data.dataset_status())
    return data


def check_contender_keys(spec: FineTuneJobSpec, environ: Mapping[str, str]) -> None:
    """Every contender with an apiKeySecretRef has its key: found out before training, not after."""
    from kubetune_trainer.evaluate.contenders import contender_key

    if not spec.evaluation.enabled:
        return
    for index, contender in enumerate(spec.evaluation.contenders):
        try:
            contender_key(index, contender, environ)
        except ValueError as error:
            raise ConfigError(str(error)) from error


def check_gate_is_computed(spec: FineTuneJobSpec, data: PreparedData) -> None:
    """A gate on a metric the evaluation will not compute fails pre-flight, not after training (the API server
    refuses what it can tell from the spec; the metrics inferred from the data are known only now)."""
    from kubetune_trainer.evaluate.gate import uncomputed_gate_metric
    from kubetune_trainer.evaluate.scoring import default_metrics

    evaluation = spec.evaluation
    if not evaluation.enabled or evaluation.gate is None or evaluation.metrics:
        return
    references = [example.completion for example in data.validation[: evaluation.max_samples]]
    metrics = default_metrics(data.format, references)
    problem = uncomputed_gate_metric(evaluation.gate, list(metrics), data.format)
    if problem:
        raise ConfigError(problem)


def judge_for(spec: FineTuneJobSpec) -> Any:
    """The LLM judge when evaluation.metrics asks for it; EvaluationError when its API key is missing."""
    from kubetune_trainer.evaluate.judge import judge_from_environment

    judge_spec = spec.evaluation.judge
    if judge_spec is None or "judge" not in spec.evaluation.metrics:
        return None
    try:
        return judge_from_environment(judge_spec)
    except ValueError as error:
        raise EvaluationError(str(error)) from error


def finite_tables(results: EvaluationResults) -> dict[str, dict[str, float]]:
    """Every model's scores, without NaN or infinity (the status and JSON hold neither)."""
    return {
        model: {name: value for name, value in table.items() if math.isfinite(value)}
        for model, table in results.metric_tables().items()
    }


def write_termination_message(summary: TrainerSummary, env: Mapping[str, str]) -> None:
    """The summary into KUBETUNE_TERMINATION_MESSAGE_PATH (default /dev/termination-log); ignored outside a pod."""
    path = Path(env.get(ENV_TERMINATION_MESSAGE_PATH) or DEFAULT_TERMINATION_MESSAGE_PATH)
    try:
        path.write_text(summary.to_termination_message(), encoding="utf-8")
    except OSError as error:
        log.warning("cannot write the termination message to %s: %s", path, error)


def refuse_config(error: Exception, env: Mapping[str, str], reporters: Sequence[Reporter]) -> int:
    """A job or setting the trainer cannot run with: logged, the Failed summary written, the exit code returned."""
    failure = classify_failure(ConfigError(str(error)))
    log.error("%s: %s", failure.reason, failure.message)
    summary = failed_summary(failure)
    write_termination_message(summary, env)
    for reporter in reporters:
        reporter.finish()
    return exit_code(summary)


def evaluation_figures(evaluation: EvaluationOutcome | None, headline_only: bool) -> dict[str, float]:
    """`eval.<model>.<metric>` scores: every score (the manifest), or the headline and loss only (the summary,
    whose termination message holds 4 KB in all)."""
    if evaluation is None:
        return {}
    kept = {evaluation.status.metric, "loss"}
    return {
        f"eval.{model}.{name}": value
        for model, table in evaluation.tables.items()
        for name, value in table.items()
        if not headline_only or name in kept
    }


def outcome_sentences(evaluation: EvaluationOutcome | None, output_uri: str) -> list[str]:
    """The summary's closing parts: the tuned score against the baselines, and where the artifacts are."""
    parts = []
    status = evaluation.status if evaluation else None
    if status is not None and status.tuned is not None:
        versus = ", ".join(f"{name} {score:.4f}" for name, score in status.baselines.items())
        parts.append(f"tuned {status.metric} {status.tuned:.4f}" + (f" vs {versus}" if versus else ""))
    parts.append(f"artifacts in {output_uri}")
    return parts
