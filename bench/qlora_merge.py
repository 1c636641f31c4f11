"""What a qLoRA adapter answers once merged and served: merged into the original 16-bit base or into the 16-bit copy
of the 4-bit base it was trained against, each exported to GGUF, served by llama.cpp and put through the endpoint check
on the rows the run evaluated.

Usage: python -m bench.qlora_merge --job JOB.yaml [--output FILE]
JOB.yaml is a finished qLoRA run (its output.uri holds adapter/ and eval/); its data and model are read as the run
read them (S3 through the standard AWS variables).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import click

from bench.figures import markdown_table
from bench.machine import cpu_line
from kubetune.api import FineTuneJob
from kubetune.manifests import load_finetunejobs

if TYPE_CHECKING:
    from kubetune_trainer.evaluate.endpoint_check import EndpointCheck

# The two places an adapter can be merged into, by what the merge starts from.
MERGES = {"original 16-bit checkpoint": False, "dequantized 4-bit base (kubetune's merge)": True}


def merged_gguf(job: FineTuneJob, model_dir: Path, adapter_dir: Path, work: Path, dequantized: bool) -> Path:
    """The adapter merged one way and exported as the job's GGUF."""
    from kubetune_trainer.modeling import detect_mixed_precision, load_tokenizer
    from kubetune_trainer.publish.gguf_export import export_gguf
    from kubetune_trainer.train.trainer import merge_adapter

    spec = job.spec
    # merge_adapter reads only these of the training's LoadedModel.
    loaded: Any = SimpleNamespace(
        tokenizer=load_tokenizer(model_dir),
        objective=spec.training.objective,
        mixed_precision=detect_mixed_precision(),
    )
    quantization = spec.resolved_quantization() if dequantized else None
    merged = merge_adapter(model_dir, adapter_dir, work / "merged", loaded, None, quantization)
    return export_gguf(merged, work / "gguf", spec.output.gguf.quantization if spec.output.gguf else "q8_0").path


def served_check(job: FineTuneJob, gguf: Path, log_dir: Path) -> EndpointCheck:
    """The endpoint check of the GGUF served by llama.cpp's server on this machine."""
    from kubetune_trainer.evaluate.endpoint_check import check_endpoint

    from tests.testbed.llama_server import LlamaServer

    server = LlamaServer(log_dir=log_dir, model_path=gguf, threads=os.cpu_count() or 1).start()
    try:
        return check_endpoint(job, server.base_url, server.model, server.api_key)
    finally:
        server.stop()


@click.command()
@click.option("--job", "job_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Markdown file to write.")
def main(job_file: Path, output: Path | None) -> None:
    """Merge a finished qLoRA run's adapter both ways, serve each GGUF, and compare with the in-process evaluation."""
    from kubetune_trainer import storage
    from kubetune_trainer.modeling import resolve_model_dir

    (job,) = load_finetunejobs(job_file)
    if job.spec.method != "qlora":
        raise click.ClickException(f"{job_file}: method {job.spec.method}; this compares merges of a qlora adapter")
    rows = []
    checked_rows = 0
    with tempfile.TemporaryDirectory(prefix="kubetune-merge-") as scratch:
        root = Path(scratch)
        model_dir = resolve_model_dir(job.spec.model, root / "model-cache")
        adapter_dir = root / "adapter"
        storage.download_dir(storage.join(job.spec.output.uri, "adapter"), adapter_dir)
        for name, dequantized in MERGES.items():
            work = root / ("dequantized" if dequantized else "original")
            click.echo(f"merging into the {name}", err=True)
            check = served_check(job, merged_gguf(job, model_dir, adapter_dir, work, dequantized), work / "llama")
            rows.append(
                [
                    name,
                    f"{check.scores['accuracy']:.4f}",
                    f"{check.in_process['accuracy']:.4f}",
                    f"{check.agreement:.0%}",
                ]
            )
            checked_rows = check.rows
    lines = [
        "# qLoRA merge: what the served GGUF answers",
        "",
        f"Command: `python -m bench.qlora_merge --job {job_file}`",
        "",
        f"{cpu_line()}. The run's adapter merged two ways, each exported to GGUF "
        f"({job.spec.output.gguf.quantization if job.spec.output.gguf else 'q8_0'}), served by llama.cpp's server and "
        f"asked the {checked_rows} held-out rows the run evaluated (the endpoint check); in-process is the run's own "
        "evaluation of the 4-bit base with the adapter.",
        "",
        *markdown_table(
            ["merged into", "served accuracy", "in-process accuracy", "answers alike"], rows, right=(1, 2, 3)
        ),
        "",
    ]
    text = "\n".join(lines)
    click.echo(text)
    if output is not None:
        output.write_text(text)


if __name__ == "__main__":
    main()
