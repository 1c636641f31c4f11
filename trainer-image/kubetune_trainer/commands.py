"""The trainer image's commands: `run` (the local backend, kubetune_trainer.backends.local) and `hosted` (the hosted
backend, kubetune_trainer.backends.hosted), each running one FineTuneJob inside its pod; `check-endpoint` and `fetch`
for the operator's endpoint."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from kubetune.api import EndpointCheckStatus
from kubetune.contract import ENV_JOB_MANIFEST, ENV_TERMINATION_MESSAGE_PATH, check_termination_message
from kubetune_trainer.backends.local import Launch, log_rank, run_in_process
from kubetune_trainer.failures import ConfigError
from kubetune_trainer.pipeline import load_job, refuse_config
from kubetune_trainer.progress.reporter import ProgressSettingsError, Reporter, json_logging, reporter_from_environment


def config_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The commands' --config option: a manifest file, else the one the operator puts in the environment."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"{what}; default: the {ENV_JOB_MANIFEST} environment variable.",
    )


@click.group()
def cli() -> None:
    """kubetune trainer: runs one FineTuneJob (data → model → train → evaluate → publish) inside its pod."""


@cli.command()
@config_option("FineTuneJob manifest (YAML) to run")
def run(config: Path | None) -> None:
    """Run the job; the summary goes to the termination message, the exit code says whether to retry.

    Exit codes: 0 succeeded; 65 failed for good (config, data, model, out of memory, diverged, evaluation);
    75 failed in a way a retry may fix (storage, internal); 143 preempted by SIGTERM after checkpointing.
    """
    env = dict(os.environ)
    # The log formatter asks the reporter (made inside the block, so its warnings are JSON too) for the stage.
    reporters: list[Reporter] = []
    with json_logging(lambda: reporters[0].stage if reporters else None, rank=log_rank(env)):
        try:
            launch = Launch.from_env(env)
            reporters.append(reporter_from_environment(env, is_main_process=launch.is_main_process))
            job = load_job(config, env)
        except (ConfigError, ProgressSettingsError) as error:
            sys.exit(refuse_config(error, env, reporters))
        code = run_in_process(job, reporters[0], env)
        if launch.distributed:
            leave_launch(code)
    sys.exit(code)


def leave_launch(code: int) -> NoReturn:
    """Exit a process of a multi-process launch with `code`, its logs flushed, skipping the interpreter's teardown.

    Its result is written by now (termination message, S3). What the teardown would still do is destroy what is left
    of the torch.distributed group, where gloo's destructors race a peer that already left (std::terminate) or hang
    (docs/decisions/0013); a run that succeeded must not end as a crash or a pod that never finishes.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@cli.command()
@config_option("FineTuneJob manifest (YAML, backend openai)")
def hosted(config: Path | None) -> None:
    """Run a backend-openai job on the hosted service (kubetune_trainer.backends.hosted); exit codes as for run."""
    from kubetune_trainer.backends.hosted.driver import hosted_main

    sys.exit(hosted_main(config, dict(os.environ)))


@cli.command("check-endpoint")
@config_option("The FineTuneJob manifest (YAML) whose run is checked")
@click.option("--base-url", required=True, help="The endpoint's OpenAI-compatible base URL, e.g. http://host:8080/v1.")
@click.option("--model", required=True, help="The model name the endpoint serves the tuned model under.")
@click.option(
    "--api-key-env",
    default=None,
    help="The environment variable holding the endpoint's API key (a key is never passed on the command line).",
)
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 64), help="Requests in flight.")
def check_endpoint_command(
    config: Path | None, base_url: str, model: str, api_key_env: str | None, concurrency: int
) -> None:
    """Send the rows the evaluation scored to the served tuned model, score its answers the same way, and write
    eval/endpoint.json beside the report (which shows it); exits 1 when the check cannot run. In a pod (the
    operator's check Job) the result also goes to the termination message, for status.serving.check."""
    from kubetune_trainer.evaluate.endpoint_check import check_endpoint, endpoint_uri

    env = dict(os.environ)
    try:
        job = load_job(config, env)
        if api_key_env and api_key_env not in env:
            raise ConfigError(f"--api-key-env {api_key_env}: no such environment variable")
        check = check_endpoint(
            job, base_url, model, env.get(api_key_env, "") if api_key_env else "", concurrency=concurrency
        )
    except Exception as error:
        click.echo(f"endpoint check failed: {error}", err=True)
        write_check_result(env, EndpointCheckStatus(state="Failed", message=f"endpoint check failed: {error}"))
        sys.exit(1)
    write_check_result(env, check.status(endpoint_uri(job.spec.output.uri)))
    for line in check.lines():
        click.echo(line)


def write_check_result(env: dict[str, str], status: EndpointCheckStatus) -> None:
    """The check's result where the operator reads it, the pod's termination message (KUBETUNE_TERMINATION_MESSAGE_PATH,
    set in the check Job); nothing outside a pod."""
    path = env.get(ENV_TERMINATION_MESSAGE_PATH)
    if path:
        Path(path).write_text(check_termination_message(status), encoding="utf-8")


@cli.command()
@click.argument("source")
@click.argument("target", type=click.Path(path_type=Path))
def fetch(source: str, target: Path) -> None:
    """Copy SOURCE (an S3 URI or path: one object, or every object under a prefix) to TARGET, e.g. an endpoint's
    GGUF file or adapter folder into its server's volume; exits 1 naming what is missing."""
    from kubetune_trainer import storage

    try:
        files = storage.download(source, target)
    except storage.StorageError as error:
        click.echo(f"fetch failed: {error}", err=True)
        sys.exit(1)
    click.echo(f"fetched {len(files)} file(s) from {source} to {target}")
