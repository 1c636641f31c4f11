"""The trainer image's commands: `run` (the local backend, kubetune_trainer.main) and `hosted` (the hosted backend,
kubetune_trainer.hosted), each running one FineTuneJob inside its pod."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from kubetune.contract import ENV_JOB_MANIFEST
from kubetune_trainer.failures import ConfigError
from kubetune_trainer.main import Launch, log_rank, run_in_process
from kubetune_trainer.pipeline import load_job, refuse_config
from kubetune_trainer.progress import ProgressSettingsError, Reporter, json_logging, reporter_from_environment


@click.group()
def cli() -> None:
    """kubetune trainer: runs one FineTuneJob (data → model → train → evaluate → publish) inside its pod."""


@cli.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"FineTuneJob manifest (YAML) to run; default: the {ENV_JOB_MANIFEST} environment variable.",
)
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
        sys.exit(run_in_process(job, reporters[0], env))


@cli.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"FineTuneJob manifest (YAML, backend openai); default: the {ENV_JOB_MANIFEST} environment variable.",
)
def hosted(config: Path | None) -> None:
    """Run a backend-openai job on the hosted service (see kubetune_trainer.hosted); exit codes as for run."""
    from kubetune_trainer.hosted import hosted_main

    sys.exit(hosted_main(config, dict(os.environ)))
