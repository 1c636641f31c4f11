"""`make bench`: every benchmark in turn, then their results collected into one README with the machine details.

    python -m bench.run_all [--quick] [--only operator_scale ...] [--results-dir bench/results] [--collect-only]

Runs operator scale, trainer throughput, multi-node scaling, time to first step and quality (AG News and Banking77),
each as its own process, one after the other (they would only slow each other down on a shared machine). A failing
benchmark does not stop the others; the exit code says whether all passed. --quick (BENCH_QUICK=1 in make) runs the
short variants and writes to bench/results/quick/, so a quick check never overwrites the full results.
--collect-only runs nothing and rewrites the README from the files already there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import click

from bench.figures import load_line, markdown_table
from bench.machine import cpu_line, library_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
README = "README.md"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark run: its module, the file it writes, and its arguments in full and quick runs."""

    name: str
    module: str
    output: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    what: str


BENCHMARKS = (
    Benchmark(
        "operator_scale", "bench.operator_scale", "operator_scale.md", ("--jobs", "500", "--rounds", "5"),
        ("--jobs", "100", "--rounds", "1"),
        "500 FineTuneJobs at once from 1, 4 and 16 client threads: time until every trainer Job exists vs a plain "
        "client (median of 5 rounds each), operator peak RSS",
    ),
    Benchmark(
        "trainer_throughput", "bench.trainer_throughput", "trainer_throughput.md", (),
        ("--steps", "4", "--warmup", "1", "--rounds", "1", "--rows", "160"),
        "real tokens/s of our trainer vs a plain TRL script, with and without packing",
    ),
    Benchmark(
        "multinode_scaling", "bench.multinode_scaling", "multinode_scaling.md", (), ("--steps", "4", "--rounds", "1"),
        "the same job on 2 nodes (one process each, gloo) vs 1: tokens/s and scaling efficiency, with the core count",
    ),
    Benchmark(
        "image_builds", "bench.image_builds", "image_builds.md", (), ("--skip-base",),
        "the operator and trainer images: sizes, cold and warm builds, first push to an empty registry",
    ),
    Benchmark(
        "time_to_first_step", "bench.time_to_first_step", "time_to_first_step.md", (), (),
        "FineTuneJob created → first training step on the real node, stage by stage",
    ),
    Benchmark(
        "quality_ag_news", "bench.quality", "quality-ag_news.md", ("--dataset", "ag_news"),
        ("--dataset", "ag_news", "--max-steps", "10", "--max-samples", "40"),
        "AG News: tuned accuracy vs zero-shot and 5-shot prompting",
    ),
    Benchmark(
        "quality_banking77", "bench.quality", "quality-banking77.md", ("--dataset", "banking77"),
        ("--dataset", "banking77", "--max-steps", "10", "--max-samples", "40"),
        "Banking77: tuned accuracy vs zero-shot and 5-shot prompting",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """How one benchmark ran in this invocation."""

    name: str
    exit_code: int
    seconds: float


def command_of(benchmark: Benchmark, quick: bool, results_dir: Path) -> list[str]:
    """The benchmark's command line: its own module, its full or quick arguments, its output file."""
    arguments = benchmark.quick if quick else benchmark.full
    return [sys.executable, "-m", benchmark.module, *arguments, "--output", str(results_dir / benchmark.output)]


def chosen(names: Sequence[str]) -> list[Benchmark]:
    """The benchmarks named (all when none), in the usual order; a clear error for an unknown name."""
    known = {benchmark.name for benchmark in BENCHMARKS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}; known: {', '.join(sorted(known))}", param_hint="--only")
    return [benchmark for benchmark in BENCHMARKS if not names or benchmark.name in names]


def demoted(markdown: str) -> str:
    """Every heading one level deeper (outside code fences), to nest a results file under the README's headings."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(lines)


def status_cell(outcome: Outcome | None) -> str:
    if outcome is None:
        return "from an earlier run"
    if outcome.exit_code == 0:
        return f"ran now ({outcome.seconds / 60:.1f} min)"
    return f"**failed now** (exit {outcome.exit_code}, {outcome.seconds / 60:.1f} min): file from an earlier run"


def render_readme(
    results: Mapping[str, str],
    outcomes: Mapping[str, Outcome],
    machine: Sequence[str],
    quick: bool,
) -> str:
    """The README: what each benchmark measures and how it last ran, the machine, then every results file."""
    by_output = {benchmark.output: benchmark for benchmark in BENCHMARKS}
    rows = []
    for file_name in sorted(results, key=lambda name: (name not in by_output, name)):
        benchmark = by_output.get(file_name)
        what = benchmark.what if benchmark else "—"
        outcome = outcomes.get(benchmark.name) if benchmark else None
        rows.append([f"[{file_name}]({file_name})", what, status_cell(outcome)])
    missing = [b.output for b in BENCHMARKS if b.output not in results]
    command = "`BENCH_QUICK=1`, `python -m bench.run_all --quick`" if quick else "`python -m bench.run_all`"
    return "\n".join(
        [
            "# Benchmark results" + (" (quick variants)" if quick else ""),
            "",
            f"Written by `make bench` ({command}): each benchmark writes its own file here; this README collects "
            "them. Figures, never assertions: read each file's set-up and load line before comparing runs.",
            "",
            *markdown_table(["file", "measures", "this invocation"], rows),
            "",
            *([f"No results yet: {', '.join(missing)}.", ""] if missing else []),
            "## Machine",
            "",
            *machine,
            "",
            *(part for name in sorted(results) for part in (demoted(results[name]).rstrip(), "")),
        ]
    )


def machine_lines(loads: Sequence[tuple[str, tuple[float, float, float]]], date: datetime) -> list[str]:
    """The machine this invocation ran on."""
    return [
        f"- Date: {date.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_line()}",
        f"- Libraries: {library_versions()}, kopf {version('kopf')}, kubernetes (Python) {version('kubernetes')}",
        f"- {load_line(loads, os.cpu_count() or 0)}",
    ]


def read_results(results_dir: Path) -> dict[str, str]:
    """Every results file in the directory but the README."""
    return {
        path.name: path.read_text(encoding="utf-8") for path in sorted(results_dir.glob("*.md")) if path.name != README
    }


@click.command()
@click.option("--quick", is_flag=True, envvar="BENCH_QUICK", help="Short variants (also BENCH_QUICK=1).")
@click.option("--only", multiple=True, help="Benchmark names to run; repeatable. Default: all.")
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Where results go; default {RESULTS_DIR.relative_to(REPO_ROOT)} ({QUICK_RESULTS_DIR.relative_to(REPO_ROOT)}"
    " with --quick).",
)
@click.option("--collect-only", is_flag=True, help="Run nothing: only write the README from the files there.")
def main(quick: bool, only: tuple[str, ...], results_dir: Path | None, collect_only: bool) -> None:
    """Run the benchmarks one after another and write the README of their results."""
    target = results_dir or (QUICK_RESULTS_DIR if quick else RESULTS_DIR)
    target.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    loads = [("start", os.getloadavg())]
    outcomes: dict[str, Outcome] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    for benchmark in [] if collect_only else chosen(only):
        command = command_of(benchmark, quick, target)
        click.echo(f"==> {benchmark.name}: {' '.join(command[1:])}", err=True)
        began = time.monotonic()
        exit_code = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False).returncode
        outcomes[benchmark.name] = Outcome(benchmark.name, exit_code, time.monotonic() - began)
        loads.append((f"after {benchmark.name}", os.getloadavg()))
        click.echo(f"==> {benchmark.name}: exit {exit_code} in {outcomes[benchmark.name].seconds:.0f} s", err=True)
    readme = render_readme(read_results(target), outcomes, machine_lines(loads, started), quick)
    (target / README).write_text(readme, encoding="utf-8")
    click.echo(f"wrote {target / README}", err=True)
    failed = [name for name, outcome in outcomes.items() if outcome.exit_code != 0]
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
