"""The `kubetune` command line: one click group that each subcommand (validate, crd, ...) registers on."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kubetune.api import FineTuneJob
from kubetune.crd import render_crd_yaml
from kubetune.manifests import ManifestError, load_finetunejobs, load_finetunejobs_text

STDIN_NAME = "<stdin>"


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
