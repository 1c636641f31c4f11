"""The `kubetune` click group and its subcommands: validate, crd, train, check-endpoint, status, logs."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobStatus
from kubetune.crd import render_crd_yaml
from kubetune.manifests import ManifestError, load_finetunejobs, load_finetunejobs_text

if TYPE_CHECKING:
    from kubetune.contract import TrainerSummary

STDIN_NAME = "<stdin>"
TRAINER_EXTRA = "trainer"
# What `kubetune train` runs in this process that only the `trainer` extra installs.
TRAINER_MODULES = ("torch", "transformers", "peft", "trl", "datasets", "boto3")
EVALUATION_STAGES = frozenset({"evaluate", "publish"})  # trainer stages during and after which eval counts are live


@click.group()
@click.version_option(package_name="kubetune")
def main() -> None:
    """Kubernetes-native qLoRA fine-tuning of open LLMs: FineTuneJob tools."""


@main.command()
@click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="A FineTuneJob manifest (single or multi-document YAML); repeatable; - reads stdin.",
)
def validate(files: tuple[str, ...]) -> None:
    """Check FineTuneJob manifests offline against the same rules as the API server."""
    failed = False
    for file in files:
        try:
            source, jobs = _load_jobs(file)
        except ManifestError as error:
            click.echo(str(error), err=True)
            failed = True
            continue
        click.echo(f"{source}: {len(jobs)} FineTuneJob(s) valid")
    if failed:
        sys.exit(1)


def _load_jobs(file: str) -> tuple[str, list[FineTuneJob]]:
    if file == "-":
        return STDIN_NAME, load_finetunejobs_text(sys.stdin.read(), STDIN_NAME)
    return file, load_finetunejobs(file)


@main.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the CRD to this file instead of stdout.",
)
def crd(output: Path | None) -> None:
    """Print the FineTuneJob CustomResourceDefinition (generated from the typed API)."""
    text = render_crd_yaml()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}")


# ----------------------------------------------------------------------------------------------------------------------
# kubetune train: the trainer's run_job in this process, without a cluster


def with_output_uri(job: FineTuneJob, output_uri: str | None, per_job: bool) -> FineTuneJob:
    """The job with spec.output.uri replaced (by <output_uri>/<name> when several jobs share it), validated again."""
    if output_uri is None:
        return job
    from kubetune_trainer import storage

    uri = storage.join(output_uri, job.metadata.name) if per_job else output_uri
    wire = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    wire["spec"]["output"]["uri"] = uri
    try:
        return FineTuneJob.model_validate(wire)
    except ValidationError as error:
        problems = "; ".join(issue["msg"] for issue in error.errors(include_url=False))
        raise click.BadParameter(f"{uri!r}: {problems}", param_hint="--output-uri") from error


def report_markdown(summary: TrainerSummary) -> str | None:
    """The published eval/report.md (the evaluation table), or None when there is none to read."""
    report = summary.artifacts.report if summary.artifacts else None
    if not report or not report.endswith("report.json"):
        return None
    from kubetune_trainer import storage

    try:
        return storage.read_bytes(report[: -len("report.json")] + "report.md").decode("utf-8")
    except (storage.StorageError, UnicodeDecodeError):
        return None


def describe_summary(job: FineTuneJob, summary: TrainerSummary) -> list[str]:
    """What `kubetune train` prints after a run: outcome, the evaluation table, the gate and the artifacts."""
    name = job.metadata.name
    if summary.outcome == "Failed":
        return [f"{name}: Failed ({summary.reason}): {summary.message}"]
    lines = [f"{name}: Succeeded: {summary.message}"]
    evaluation = summary.evaluation
    table = report_markdown(summary)
    if table:
        lines.extend(["", table.rstrip(), ""])
    elif evaluation is not None and evaluation.tuned is not None:
        lines.append(f"  {evaluation.metric}: tuned {evaluation.tuned:.4f}, baselines {evaluation.baselines}")
    if evaluation is not None and evaluation.gate is not None:
        lines.append(f"  gate {'passed' if evaluation.gate.passed else 'FAILED'}: {evaluation.gate.message}")
    artifacts = summary.artifacts.to_wire() if summary.artifacts else {}
    lines.extend(f"  {kind}: {uri}" for kind, uri in artifacts.items())
    return lines


def gate_fails_job(job: FineTuneJob, summary: TrainerSummary) -> bool:
    """Whether the run succeeded but its failed gate fails the job (evaluation.gate.failJob), as the operator does."""
    gate = summary.evaluation.gate if summary.evaluation else None
    spec_gate = job.spec.evaluation.gate
    return bool(gate is not None and gate.passed is False and spec_gate is not None and spec_gate.fail_job)


@main.command()
@click.option(
    "-f",
    "--filename",
    "file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="FineTuneJob manifest (single or multi-document YAML); URIs may be local paths or s3://.",
)
@click.option(
    "--output-uri",
    default=None,
    help="Write the results here instead of spec.output.uri (under <uri>/<name> when the file has several jobs).",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Log every stage's details (JSON lines on stderr), not only warnings."
)
def train(file: Path, output_uri: str | None, verbose: bool) -> None:
    """Fine-tune and evaluate each FineTuneJob in FILE in this process, without a cluster.

    Runs the trainer's stages (data, model, train, evaluate, publish) with a progress bar on a terminal, then prints
    the evaluation table and where the artifacts are. Exits 1 when a job fails (or its gate fails with failJob),
    143 when interrupted by SIGTERM (rerunning resumes from the newest checkpoint).
    """
    require_extra(TRAINER_MODULES, TRAINER_EXTRA, "train")
    jobs = load_or_exit(file)
    jobs = [with_output_uri(job, output_uri, per_job=len(jobs) > 1) for job in jobs]
    failed = False
    for job in jobs:
        summary = train_one(job, verbose)
        for line in describe_summary(job, summary):
            click.echo(line, err=summary.outcome == "Failed")
        failed = failed or summary.outcome == "Failed" or gate_fails_job(job, summary)
    if failed:
        sys.exit(1)


@main.command("check-endpoint")
@click.option(
    "-f",
    "--filename",
    "file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The FineTuneJob manifest whose finished run is checked (its output.uri holds the evaluation).",
)
@click.option("--base-url", required=True, help="The endpoint's OpenAI-compatible base URL, e.g. http://host:8080/v1.")
@click.option("--model", required=True, help="The model name the endpoint serves the tuned model under.")
@click.option(
    "--api-key-env",
    default=None,
    help="The environment variable holding the endpoint's API key (a key is never passed on the command line).",
)
def check_endpoint(file: Path, base_url: str, model: str, api_key_env: str | None) -> None:
    """Ask the served tuned model the rows the evaluation scored and compare its scores with the in-process ones.

    Writes eval/endpoint.json under the job's output.uri: both scores, how often the answers agree, and the
    endpoint's latency and tokens per request. Exits 1 when the check cannot run.
    """
    require_extra(TRAINER_MODULES, TRAINER_EXTRA, "check-endpoint")
    import os

    from kubetune_trainer.evaluate.endpoint_check import check_endpoint as run_check

    jobs = load_or_exit(file)
    if len(jobs) != 1:
        raise click.ClickException(f"{file}: holds {len(jobs)} FineTuneJobs; the check takes one")
    if api_key_env and api_key_env not in os.environ:
        raise click.ClickException(f"--api-key-env {api_key_env}: no such environment variable")
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    try:
        check = run_check(jobs[0], base_url, model, key)
    except Exception as error:  # the check's own errors name what is missing (report, rows, endpoint)
        raise click.ClickException(f"endpoint check failed: {error}") from None
    for line in check.lines():
        click.echo(line)


def load_or_exit(file: Path) -> list[FineTuneJob]:
    """The FineTuneJobs of a manifest file; exit 2 with the loader's message (file:line, field) when it is bad."""
    try:
        return load_finetunejobs(file)
    except ManifestError as error:
        click.echo(str(error), err=True)
        sys.exit(2)


def require_extra(modules: Sequence[str], extra: str, command: str) -> None:
    """Exit naming the extra to install when a module the command runs is missing (found without importing it)."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise click.ClickException(
            f"`kubetune {command}` needs {', '.join(missing)}, not installed here: pip install 'kubetune[{extra}]'"
        )


def train_one(job: FineTuneJob, verbose: bool) -> TrainerSummary:
    """run_job with a terminal reporter and JSON-lines logs (warnings only unless verbose); exits 143 on SIGTERM."""
    from kubetune_trainer.backends.local import run_job
    from kubetune_trainer.progress.reporter import json_logging, terminal_reporter
    from kubetune_trainer.train.trainer import TrainingPreempted

    from kubetune.contract import EXIT_CODE_PREEMPTED

    reporter = terminal_reporter()
    with json_logging(lambda: reporter.stage, level=logging.INFO if verbose else logging.WARNING):
        try:
            summary = run_job(job, reporter)
        except TrainingPreempted as preempted:
            click.echo(f"{job.metadata.name}: {preempted}", err=True)
            sys.exit(EXIT_CODE_PREEMPTED)
        finally:
            reporter.finish()
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# kubetune status: a FineTuneJob as the cluster has it


def kubernetes_client(kubeconfig: str | None) -> tuple[Any, str]:
    """An ApiClient and the default namespace: from the kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster."""
    from kubernetes import client, config

    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
        return config.new_client_from_config(config_file=kubeconfig), namespace
    except config.ConfigException:
        if kubeconfig is not None:
            raise
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    namespace_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
    return client.ApiClient(configuration), namespace


def format_duration(seconds: int) -> str:
    """1h02m03s, 4m05s or 6s."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(status: FineTuneJobStatus) -> str | None:
    """status.progress in one line."""
    progress = status.progress
    if progress is None:
        return None
    parts = [f"stage {progress.stage or '-'}"]
    if progress.step is not None:
        step = f"step {progress.step}" + (f"/{progress.total_steps}" if progress.total_steps else "")
        parts.append(step + (f" ({progress.percent:.1f}%)" if progress.percent is not None else ""))
    if progress.epoch is not None:
        parts.append(f"epoch {progress.epoch:.2f}")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4g}")
    if progress.learning_rate is not None:
        parts.append(f"lr {progress.learning_rate:.2e}")
    if progress.tokens_per_second is not None:
        parts.append(f"{progress.tokens_per_second:.0f} tokens/s")
    if progress.eta_seconds is not None and progress.stage == "train":
        parts.append(f"eta {format_duration(progress.eta_seconds)}")
    # A retried attempt may still carry the last attempt's evaluation counts while it trains again.
    if progress.eval_total and progress.eval_done is not None and progress.stage in EVALUATION_STAGES:
        evaluated = f"evaluated {progress.eval_done}/{progress.eval_total} samples"
        parts.append(evaluated + (f" ({progress.eval_percent:.1f}%)" if progress.eval_percent is not None else ""))
    if progress.updated_at:
        parts.append(f"updated {progress.updated_at}")
    return ", ".join(parts)


def serving_lines(status: FineTuneJobStatus) -> list[str]:
    """The endpoint of spec.serving: its URL and ready servers, and the endpoint check; or why there is none."""
    serving = status.serving
    if serving is None:
        return []
    if not serving.url:
        return [f"Serving:     {serving.message}"] if serving.message else []
    lines = [f"Serving:     {serving.url} (model {serving.model}, {serving.ready_replicas or 0} ready)"]
    check = serving.check
    if check is not None:
        lines.append(f"Check:       {check.state}" + (f": {check.message}" if check.message else ""))
    return lines


def describe_status(namespace: str, name: str, status: FineTuneJobStatus) -> list[str]:
    """What `kubetune status` prints: phase, progress, conditions, evaluation, artifacts and usage."""
    lines = [f"FineTuneJob {namespace}/{name}", f"Phase:       {status.phase or 'Pending'}"]
    if status.model:
        lines.append(f"Model:       {status.model}")
    if status.message:
        lines.append(f"Message:     {status.message}")
    progress = progress_line(status)
    if progress:
        lines.append(f"Progress:    {progress}")
    dataset = status.dataset
    if dataset is not None:
        text = f"{dataset.format or '?'}, {dataset.train_rows} train / {dataset.validation_rows} validation rows"
        if dataset.token_lengths is not None:
            lengths = dataset.token_lengths
            text += f", tokens p50 {lengths.p50} p95 {lengths.p95} max {lengths.max}"
        if dataset.truncated_fraction is not None:
            text += f", {dataset.truncated_fraction:.1%} truncated"
        lines.append(f"Dataset:     {text}")
    if status.conditions:
        lines.append("Conditions:")
        lines.extend(f"  {c.type:<11} {c.status:<7} {c.reason:<22} {c.message}".rstrip() for c in status.conditions)
    evaluation = status.evaluation
    if evaluation is not None and evaluation.tuned is not None:
        scores = [f"tuned {evaluation.tuned:.4g}"]
        scores.extend(
            f"{model} {score:.4g} (lift {evaluation.lift.get(model, evaluation.tuned - score):+.4g})"
            for model, score in evaluation.baselines.items()
        )
        lines.append(f"Evaluation:  {evaluation.metric} on {evaluation.samples} samples: " + ", ".join(scores))
        if evaluation.cost_per_1k_requests:
            prices = ", ".join(f"{model} {cost:.4g}" for model, cost in evaluation.cost_per_1k_requests.items())
            lines.append(f"Cost:        per 1,000 requests: {prices}")
        for problem in evaluation.problems:
            lines.append(f"Problem:     {problem}")
        if evaluation.gate is not None:
            lines.append(f"Gate:        {'passed' if evaluation.gate.passed else 'failed'}: {evaluation.gate.message}")
    if status.artifacts is not None:
        lines.append("Artifacts:")
        lines.extend(f"  {kind:<12} {uri}" for kind, uri in status.artifacts.to_wire().items())
    lines.extend(serving_lines(status))
    usage = status.usage
    if usage is not None:
        lines.append(
            f"Usage:       {usage.trained_tokens or 0} trained tokens, {usage.gpu_seconds or 0:.0f} GPU-seconds, "
            f"{usage.wall_seconds or 0:.0f}s wall"
        )
    return lines


@main.command()
@click.argument("name")
@click.option("-n", "--namespace", default=None, help="Namespace of the FineTuneJob; default: the context's.")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG", help="kubeconfig file; default: KUBECONFIG.")
def status(name: str, namespace: str | None, kubeconfig: str | None) -> None:
    """Show a FineTuneJob's phase, progress, conditions, evaluation and artifacts from the cluster."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api_client, default_namespace = kubernetes_client(kubeconfig)
    target = namespace or default_namespace
    try:
        job = client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, target, PLURAL, name)
    except ApiException as error:
        detail = "not found" if error.status == 404 else f"HTTP {error.status} {error.reason}"
        click.echo(f"FineTuneJob {target}/{name}: {detail}", err=True)
        sys.exit(1)
    parsed = FineTuneJobStatus.model_validate(job.get("status") or {})
    for line in describe_status(target, name, parsed):
        click.echo(line)


# ----------------------------------------------------------------------------------------------------------------------
# kubetune logs: the trainer pod's log


def pods_newest_first(pods: list[Any]) -> list[Any]:
    """Pods (kubernetes client objects) by creation, newest first: the newest is the current attempt."""
    return sorted(pods, key=lambda pod: (pod.metadata.creation_timestamp, pod.metadata.name), reverse=True)


def trainer_pod_for_logs(job_label: str, trainer_job: str, pods: list[Any], previous: bool) -> Any:
    """The newest trainer pod, or with `previous` the attempt before it; ClickException saying what is missing."""
    ordered = pods_newest_first(pods)
    if not ordered:
        raise click.ClickException(f"FineTuneJob {job_label}: trainer Job {trainer_job} has no pod yet")
    if not previous:
        return ordered[0]
    if len(ordered) < 2:
        raise click.ClickException(
            f"FineTuneJob {job_label}: no previous attempt; trainer Job {trainer_job} has run one pod"
        )
    return ordered[1]


def api_error_message(error: Any) -> str:
    """The API server's own message from an ApiException (its Status body), else the HTTP status."""
    import json

    try:
        message = str(json.loads(error.body).get("message") or "")
    except (TypeError, ValueError, AttributeError):
        message = ""
    return message or f"HTTP {error.status} {error.reason}"


@main.command()
@click.argument("name")
@click.option("-n", "--namespace", default=None, help="Namespace of the FineTuneJob; default: the context's.")
@click.option("-f", "--follow", is_flag=True, help="Stream the log until the trainer exits.")
@click.option(
    "-p",
    "--previous",
    is_flag=True,
    help="The attempt before the newest (a retried trainer runs each attempt in a new pod).",
)
@click.option("--tail", type=int, default=None, help="Only the last N lines.")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG", help="kubeconfig file; default: KUBECONFIG.")
def logs(
    name: str, namespace: str | None, follow: bool, previous: bool, tail: int | None, kubeconfig: str | None
) -> None:
    """Print the trainer pod's log of a FineTuneJob (its newest attempt; JSON lines from the trainer).

    The pod is found by the FineTuneJob's label on its trainer Job's pods; which pod it is goes to stderr.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kubetune.contract import LABEL_JOB_NAME

    api_client, default_namespace = kubernetes_client(kubeconfig)
    target = namespace or default_namespace
    label = f"{target}/{name}"
    try:
        job = client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, target, PLURAL, name)
    except ApiException as error:
        detail = "not found" if error.status == 404 else api_error_message(error)
        raise click.ClickException(f"FineTuneJob {label}: {detail}") from None
    trainer = FineTuneJobStatus.model_validate(job.get("status") or {}).trainer
    trainer_job = trainer.job_name if trainer and trainer.job_name else None
    if trainer_job is None:
        raise click.ClickException(f"FineTuneJob {label}: no trainer Job yet (the operator has not created it)")
    core = client.CoreV1Api(api_client)
    try:
        pods = core.list_namespaced_pod(target, label_selector=f"{LABEL_JOB_NAME}={name}").items
        pod = trainer_pod_for_logs(label, trainer_job, pods, previous)
        click.echo(f"pod {pod.metadata.name} (attempt {len(pods) - pods_newest_first(pods).index(pod)})", err=True)
        response = core.read_namespaced_pod_log(
            pod.metadata.name, target, follow=follow, tail_lines=tail, _preload_content=False
        )
    except ApiException as error:
        raise click.ClickException(f"FineTuneJob {label}: {api_error_message(error)}") from None
    try:
        for chunk in response.stream(amt=64 * 1024, decode_content=True):
            click.echo(chunk, nl=False)
    finally:
        response.release_conn()
