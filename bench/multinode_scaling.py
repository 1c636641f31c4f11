"""Scaling efficiency of a multi-node trainer: the same job on 1 node and on 2 nodes (one process each), tokens/s.

    python -m bench.multinode_scaling [--steps 12] [--rounds 2]

Each "node" is one launcher started with the command the operator renders for a JobSet pod (kubetune.contract.
trainer_command with its node rank and rank 0's address, here 127.0.0.1), with a work directory of its own, one CPU
thread, and gloo between the nodes: what a 2-pod JobSet runs, on one machine. The job is SmolLM2-135M-Instruct with
LoRA on AG News rows, the same rows, batch size per process, length and steps on both sides; 2 nodes train twice the
rows per step (data parallel). Real tokens come from the trainer's own count (gathered over every rank).

Scaling efficiency = tokens/s of 2 nodes / (2 x tokens/s of 1 node), which is 1.0 when a second node doubles the
throughput. On a machine with fewer cores than processes x threads the figure measures the machine, not the trainer:
the results print the core count beside it. With a GPU, the same bench runs 2 processes (--gpus-per-node).

Results: a markdown table on stdout and in bench/results/multinode_scaling.md, with the machine and its load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from bench.figures import load_line, markdown_table
from bench.machine import cpu_line, library_versions
from tests.testbed.processes import free_port
from tests.testbed.shared_data import shared_sample

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "bench" / "results" / "multinode_scaling.md"
DRIVER = REPO_ROOT / "tests" / "integration" / "training_driver.py"
ROWS = 400


@dataclass(frozen=True)
class Run:
    """One measured run: how many nodes, the tokens trained and the training time (rank 0's)."""

    nodes: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def per_process(self) -> float:
        return self.tokens_per_second / self.nodes


def write_rows(directory: Path) -> Path:
    """AG News rows in the classification format (the label list in the prompt, the label as the answer)."""
    rows = [json.loads(line) for line in shared_sample("ag_news", "train").read_text().splitlines()[:ROWS]]
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def spec_wire(model_dir: Path, train_file: Path, steps: int, out: Path) -> dict[str, object]:
    from kubetune.api import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(model_dir)},
            "dataset": {"train": str(train_file), "format": "classification", "maxLength": 256},
            "method": "lora",
            "training": {"maxSteps": steps, "batchSize": 4, "checkpointEvery": 10_000},
            "evaluation": {"enabled": False},
            "output": {"uri": str(out)},
        }
    )
    return spec.to_wire()


def run_nodes(nodes: int, model_dir: Path, train_file: Path, steps: int, gpus_per_node: int, work: Path) -> Run:
    """Start `nodes` launchers as the operator's JobSet pods would and read rank 0's result."""
    from kubetune.contract import trainer_command

    work.mkdir(parents=True)
    port = free_port()
    config = {
        "spec": spec_wire(model_dir, train_file, steps, work / "out"),
        "model_dir": str(model_dir),
        "record_dir": str(work),
        "progress_interval": 5,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launchers = []
    for node in range(nodes):
        config_path = work / f"node{node}.json"
        config_path.write_text(json.dumps({**config, "work_dir": str(work / f"node{node}")}))
        command = trainer_command(
            gpus_per_node,
            python=sys.executable,
            entry=[str(DRIVER), str(config_path)],
            nodes=nodes,
            node_rank=str(node),
            main_address="127.0.0.1",
            main_port=port,
        )
        # The child holds its own copy of the descriptor: ours closes once the launcher has started.
        with (work / f"node{node}.log").open("wb") as log:
            launchers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT))
    codes = [launcher.wait(timeout=3600) for launcher in launchers]
    if any(codes):
        logs = "\n".join((work / f"node{node}.log").read_text(errors="replace")[-3000:] for node in range(nodes))
        raise click.ClickException(f"{nodes}-node run failed (exit codes {codes}):\n{logs}")
    result = json.loads((work / "result-rank0.json").read_text())
    return Run(nodes, int(result["trained_tokens"]), float(result["runtime_seconds"]))


@click.command()
@click.option("--steps", default=12, show_default=True, help="Training steps of each run.")
@click.option("--rounds", default=2, show_default=True, help="Rounds; each runs 1 node and 2 nodes, order alternating.")
@click.option("--gpus-per-node", default=0, show_default=True, help="Processes per node on a GPU machine.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS_FILE, show_default=True)
def main(steps: int, rounds: int, gpus_per_node: int, output: Path) -> None:
    """Run the same job on 1 and 2 nodes and print the scaling efficiency."""
    from tests.testbed.smollm2 import convert_smollm2

    model_dir = convert_smollm2()
    loads = [("start", os.getloadavg())]
    runs: dict[int, list[Run]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-nodes-") as scratch:
        train_file = write_rows(Path(scratch))
        for round_number in range(rounds):
            order = (1, 2) if round_number % 2 == 0 else (2, 1)
            for nodes in order:
                click.echo(f"round {round_number + 1}: {nodes} node(s), {steps} steps", err=True)
                started = time.monotonic()
                work = Path(scratch) / f"round{round_number}-nodes{nodes}"
                run = run_nodes(nodes, model_dir, train_file, steps, gpus_per_node, work)
                runs[nodes].append(run)
                click.echo(f"  {run.tokens_per_second:.0f} tokens/s ({time.monotonic() - started:.0f} s)", err=True)
            loads.append((f"after round {round_number + 1}", os.getloadavg()))
    one = statistics.median(run.tokens_per_second for run in runs[1])
    two = statistics.median(run.tokens_per_second for run in runs[2])
    efficiency = two / (2 * one)
    cores = os.cpu_count() or 0
    table = markdown_table(
        ["nodes (1 process, 1 thread each)", "tokens/s (median)", "tokens/s per process", "runs"],
        [
            ["1", f"{one:.0f}", f"{one:.0f}", ", ".join(f"{run.tokens_per_second:.0f}" for run in runs[1])],
            ["2", f"{two:.0f}", f"{two / 2:.0f}", ", ".join(f"{run.tokens_per_second:.0f}" for run in runs[2])],
        ],
    )
    fits = (
        ": they fit the cores, so the figure is mostly the cost of the gradient all-reduce and the lockstep (the two "
        "processes also share the memory bandwidth)"
        if cores >= 2
        else ": more processes than cores, so the figure measures the machine"
    )
    lines = [
        "# Multi-node scaling",
        "",
        f"`python -m bench.multinode_scaling --steps {steps} --rounds {rounds}`"
        + (f" `--gpus-per-node {gpus_per_node}`" if gpus_per_node else ""),
        "",
        f"SmolLM2-135M-Instruct, LoRA, AG News rows, batch 4 per process, {steps} steps; each node is one launcher "
        "started as the operator starts a JobSet pod (its own work directory, one thread, gloo between nodes).",
        "",
        *table,
        "",
        f"**Scaling efficiency (2 nodes vs 1): {efficiency:.2f}** on a machine with {cores} cores "
        f"({len(os.sched_getaffinity(0))} usable) running 2 processes x 1 thread{fits}.",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_line()}",
        f"- Libraries: {library_versions()}",
        f"- {load_line(loads, cores)}",
    ]
    text = "\n".join(lines) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    click.echo(text)


if __name__ == "__main__":
    main()
