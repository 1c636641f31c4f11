"""Real-token throughput of our trainer vs a plain TRL SFTTrainer script, with and without packing, and peak memory.

    python -m bench.trainer_throughput [--steps 12] [--warmup 2] [--rounds 2]

SmolLM2-135M-Instruct, qLoRA (4-bit nf4 base, LoRA r16 on every linear layer), the same rows, batch size, max length,
learning-rate schedule and seed for both. Every configuration runs in its own process (so peak RSS is its own), for
`warmup` unmeasured steps and then `steps` measured ones; the rounds alternate the order of the configurations, so a
burst of load from elsewhere on the machine hits both sides. Real tokens are counted by the same forward hook in both
(bench/throughput_meter.py): attention-mask ones, or every token of a packed batch but its rows' pad tails.

Data: AG News rows (classification: the label list in the prompt, the label as the answer) for the plain comparison,
and a length-skewed set built from the shared samples (three short Banking77 questions for every long row of four
AG News articles) for packing. Both sides get the same examples: the plain script takes the TRL rows our data stage
produced, so the token streams are identical and only the training loop differs.

With packing, TRL concatenates a batch's packed rows into one padding-free row; the plain script keeps that. Our
trainer on the CPU feeds the batch's packed rows as one [batch, longest row] tensor with block-diagonal attention
(training.BlockDiagonalPackedCollator), since without a variable-length attention kernel attention over the
concatenated row is quadratic in batch x length.

Results: a markdown table on stdout and in bench/results/trainer_throughput.md, with the machine and its load.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import click

from bench.machine import cpu_line, library_versions
from tests.testbed.shared_data import shared_sample

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "bench" / "results" / "trainer_throughput.md"
RESULT_PREFIX = "THROUGHPUT-RESULT "

Runner = Literal["ours", "plain"]
DatasetName = Literal["ag_news", "skewed"]
# One long row (four AG News articles) for every SHORT_PER_LONG short ones (a Banking77 question each).
SHORT_PER_LONG = 3
ARTICLES_PER_LONG_ROW = 4


@dataclass(frozen=True)
class Configuration:
    """One measured setup: which data, which training loop, packed or not."""

    dataset: DatasetName
    runner: Runner
    packing: bool

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.runner}{'+packing' if self.packing else ''}"

    @property
    def title(self) -> str:
        loop = "kubetune trainer" if self.runner == "ours" else "plain TRL script"
        return f"{self.dataset}, {loop}{', packing' if self.packing else ''}"


@dataclass(frozen=True)
class Comparison:
    """A throughput ratio the issue sets a target for: subject / reference."""

    subject: str
    reference: str
    target: float
    meaning: str


CONFIGURATIONS = (
    Configuration("ag_news", "plain", packing=False),
    Configuration("ag_news", "ours", packing=False),
    Configuration("skewed", "plain", packing=False),
    Configuration("skewed", "ours", packing=False),
    Configuration("skewed", "ours", packing=True),
    Configuration("skewed", "plain", packing=True),
)
DEFAULT_KEYS = tuple(configuration.key for configuration in CONFIGURATIONS)
# Under load from other processes, OpenMP threads that spin while waiting lose their time slices to each other and
# a 2-thread matmul runs at half the speed of one thread (measured here); passive waiting keeps the runs comparable.
OMP_WAIT_POLICY = "PASSIVE"
COMPARISONS = (
    Comparison("ag_news/ours", "ag_news/plain", 0.95, "no overhead of ours (AG News, no packing)"),
    Comparison("skewed/ours", "skewed/plain", 0.95, "no overhead of ours (skewed, no packing)"),
    Comparison("skewed/ours+packing", "skewed/plain", 1.5, "packing pays on the skewed set"),
    Comparison("skewed/ours+packing", "skewed/plain+packing", 0.95, "no overhead of ours (skewed, both packing)"),
)


@dataclass(frozen=True)
class Settings:
    """What every run shares."""

    warmup: int
    steps: int
    batch_size: int
    max_length: int


@dataclass(frozen=True)
class RunResult:
    """One child process's figures."""

    key: str
    round: int
    tokens: int
    fed_tokens: int
    seconds: float
    peak_rss_mb: float
    load_before: float
    load_after: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a clear error naming the file and line when one is not JSON."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise click.ClickException(f"{path}:{number}: not JSON: {error}") from error
    return rows


def skewed_rows(ag_news: Sequence[dict[str, Any]], banking77: Sequence[dict[str, Any]], count: int, seed: int) -> list:
    """prompt/completion rows: SHORT_PER_LONG short Banking77 questions for each long row of joined AG News articles."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    articles = list(ag_news)
    questions = list(banking77)
    rng.shuffle(articles)
    rng.shuffle(questions)
    for index in range(count):
        if index % (SHORT_PER_LONG + 1) == SHORT_PER_LONG:
            start = (index // (SHORT_PER_LONG + 1)) * ARTICLES_PER_LONG_ROW % len(articles)
            group = [articles[(start + offset) % len(articles)] for offset in range(ARTICLES_PER_LONG_ROW)]
            prompt = "Which topic is the first of these news items about?\n\n" + "\n\n".join(r["text"] for r in group)
            rows.append({"prompt": prompt, "completion": group[0]["label"]})
        else:
            question = questions[index % len(questions)]
            rows.append({"prompt": question["text"], "completion": question["label"]})
    return rows


def write_datasets(target: Path, rows: int, seed: int) -> dict[str, tuple[Path, str]]:
    """The two training files: {name: (path, dataset.format)}."""
    ag_news = read_jsonl(shared_sample("ag_news"))
    banking77 = read_jsonl(shared_sample("banking77"))
    target.mkdir(parents=True, exist_ok=True)
    files = {
        "ag_news": (target / "ag_news.jsonl", "classification", ag_news[:rows]),
        "skewed": (target / "skewed.jsonl", "prompt-completion", skewed_rows(ag_news, banking77, rows, seed)),
    }
    for path, _, content in files.values():
        path.write_text("".join(json.dumps(row) + "\n" for row in content), encoding="utf-8")
    return {name: (path, data_format) for name, (path, data_format, _) in files.items()}


# ----------------------------------------------------------------------------------------------------------------------
# One run (in a child process)


def job_spec(model_dir: Path, train_file: Path, data_format: str, packing: bool, settings: Settings, out: Path) -> Any:
    """The FineTuneJob spec our trainer runs: defaults except the bench's steps, batch size, length and packing."""
    from kubetune.api import FineTuneJobSpec

    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(model_dir)},
            "dataset": {"train": str(train_file), "format": data_format, "maxLength": settings.max_length},
            "training": {
                "maxSteps": settings.warmup + settings.steps,
                "batchSize": settings.batch_size,
                "packing": packing,
                # No checkpoint inside the measured window (the default, 50, is past it too; said for the record).
                "checkpointEvery": 10_000,
            },
            "evaluation": {"enabled": False},
            "output": {"uri": str(out)},
        }
    )


def run_ours(spec: Any, data: Any, model_dir: Path, work_dir: Path, meter: Any) -> None:
    """Our training stage, as the trainer's entry point calls it (progress tracker, guards, checkpoint callback)."""
    from kubetune_trainer.progress.reporter import LogChannel, Reporter
    from kubetune_trainer.train.progress import DEFAULT_PROGRESS_INTERVAL_SECONDS
    from kubetune_trainer.train.trainer import train

    reporter = Reporter([LogChannel(DEFAULT_PROGRESS_INTERVAL_SECONDS)])
    train(spec, data, model_dir, work_dir, progress=reporter, on_step=reporter.report_step, extra_callbacks=[meter])


def run_plain(spec: Any, data: Any, model_dir: Path, work_dir: Path, meter: Any) -> None:
    """What a user would write with TRL alone: a 4-bit base, a LoRA config handed to SFTTrainer, the same settings."""
    import torch
    from datasets import Dataset
    from kubetune_trainer.train.trainer import sft_records
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    training = spec.training
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
    )
    config = SFTConfig(
        output_dir=str(work_dir / "plain"),
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.scheduler,
        warmup_steps=training.warmup_steps,
        logging_steps=training.logging_steps,
        seed=training.seed,
        max_length=spec.dataset.max_length,
        packing=training.packing,
        completion_only_loss=True,
        # SFTConfig turns activation checkpointing on by default; ours follows training.gradientCheckpointing (off).
        activation_checkpointing=training.gradient_checkpointing,
        bf16=True,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(sft_records(data.format, data.train)),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[meter],
    )
    trainer.train()


def run_child(configuration: Configuration, train_file: Path, data_format: str, settings: Settings, work: Path) -> dict:
    """Train one configuration and return its window's figures and this process's peak RSS."""
    import torch
    from kubetune_trainer.data.prepare import prepare_data

    from bench.throughput_meter import ThroughputMeter
    from tests.testbed.smollm2 import convert_smollm2

    torch.manual_seed(0)
    model_dir = convert_smollm2()
    spec = job_spec(model_dir, train_file, data_format, configuration.packing, settings, work / "out")
    data = prepare_data(spec.dataset, spec.training.seed)
    meter = ThroughputMeter(settings.warmup, settings.steps)
    runner = run_ours if configuration.runner == "ours" else run_plain
    runner(spec, data, model_dir, work, meter)
    if meter.result is None:
        last = settings.warmup + settings.steps
        raise click.ClickException(f"{configuration.key}: training ended before step {last}")
    return {
        "tokens": meter.result.tokens,
        "fed_tokens": meter.result.fed_tokens,
        "seconds": meter.result.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------------------------------------------------
# The parent: runs, figures, report


def launch(
    configuration: Configuration,
    files: dict[str, tuple[Path, str]],
    settings: Settings,
    work: Path,
    round_number: int,
) -> RunResult:
    """One configuration in a fresh process; its log is kept in work/ and its tail shown when it fails."""
    train_file, data_format = files[configuration.dataset]
    run_dir = work / f"round{round_number}-{configuration.key.replace('/', '-').replace('+', '-')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "bench.trainer_throughput",
        "child",
        configuration.key,
        str(train_file),
        data_format,
        str(run_dir),
        *(str(value) for value in (settings.warmup, settings.steps, settings.batch_size, settings.max_length)),
    ]
    load_before = os.getloadavg()[0]
    log_path = run_dir / "child.log"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", OMP_WAIT_POLICY)}
    with log_path.open("w", encoding="utf-8") as log:
        finished = subprocess.run(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, check=False
        )
    load_after = os.getloadavg()[0]
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if finished.returncode != 0 or not lines:
        tail = "\n".join(log_path.read_text(encoding="utf-8").splitlines()[-30:])
        raise click.ClickException(f"{configuration.key} failed (exit {finished.returncode}); {log_path}:\n{tail}")
    figures = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return RunResult(
        key=configuration.key,
        round=round_number,
        tokens=figures["tokens"],
        fed_tokens=figures["fed_tokens"],
        seconds=figures["seconds"],
        peak_rss_mb=figures["peak_rss_mb"],
        load_before=load_before,
        load_after=load_after,
    )


def round_order(configurations: Sequence[Configuration], round_number: int) -> list[Configuration]:
    """Odd rounds run the configurations backwards, so that neither side always goes first."""
    return list(configurations) if round_number % 2 == 1 else list(reversed(configurations))


def mean_throughput(results: Sequence[RunResult], key: str) -> float | None:
    """Mean real tokens/s of a configuration over its runs."""
    values = [result.tokens_per_second for result in results if result.key == key]
    return statistics.fmean(values) if values else None


def ratio_of(results: Sequence[RunResult], comparison: Comparison) -> float | None:
    """subject / reference mean throughput, or None when either did not run."""
    subject, reference = mean_throughput(results, comparison.subject), mean_throughput(results, comparison.reference)
    if subject is None or not reference:
        return None
    return subject / reference


def configuration_rows(results: Sequence[RunResult]) -> list[str]:
    """The per-configuration table: mean throughput, each run, the share of fed tokens that were real, RSS."""
    by_key = {configuration.key: configuration for configuration in CONFIGURATIONS}
    reference_of = {
        "ag_news/ours": "ag_news/plain",
        "skewed/ours": "skewed/plain",
        "skewed/ours+packing": "skewed/plain",
        "skewed/plain+packing": "skewed/plain",
    }
    lines = [
        "| configuration | real tokens/s (mean) | per run | real share of fed tokens | ratio | peak RSS MB |",
        "| --- | ---: | --- | ---: | --- | ---: |",
    ]
    for key in dict.fromkeys(result.key for result in results):
        runs = [result for result in results if result.key == key]
        mean = mean_throughput(results, key) or 0.0
        reference = reference_of.get(key, "")
        reference_mean = mean_throughput(results, reference)
        ratio = f"{mean / reference_mean:.2f}× {by_key[reference].title}" if reference_mean else "1.00 (reference)"
        share = sum(run.tokens for run in runs) / max(1, sum(run.fed_tokens for run in runs))
        lines.append(
            f"| {by_key[key].title} | {mean:.0f} | {', '.join(f'{run.tokens_per_second:.0f}' for run in runs)} | "
            f"{share:.2f} | {ratio} | {max(run.peak_rss_mb for run in runs):.0f} |"
        )
    return lines


def comparison_rows(results: Sequence[RunResult]) -> list[str]:
    """The issue's targets and whether this run met them."""
    lines = ["| comparison | ratio | target | met |", "| --- | ---: | ---: | --- |"]
    for comparison in COMPARISONS:
        ratio = ratio_of(results, comparison)
        if ratio is None:
            continue
        verdict = "yes" if ratio >= comparison.target else "**no**"
        lines.append(
            f"| {comparison.meaning}: {comparison.subject} / {comparison.reference} | {ratio:.2f}× | "
            f"≥ {comparison.target:.2f}× | {verdict} |"
        )
    return lines


def render_report(results: Sequence[RunResult], settings: Settings, rows: int, started: datetime) -> str:
    """The markdown the bench prints and writes."""
    loads = [value for result in results for value in (result.load_before, result.load_after)]
    lines = [
        "# Trainer throughput: kubetune vs a plain TRL script",
        "",
        "Command: `python -m bench.trainer_throughput` "
        f"(`--steps {settings.steps} --warmup {settings.warmup} --rounds {max(r.round for r in results)}`).",
        "",
        f"SmolLM2-135M-Instruct, qLoRA (nf4 4-bit base, LoRA r16 all-linear), batch {settings.batch_size}, "
        f"maxLength {settings.max_length}, bf16 autocast on the CPU; {settings.warmup} warm-up steps then "
        f"{settings.steps} measured steps per run, each run in its own process; rounds alternate the order. "
        f"Data: {rows} rows of each set (AG News classification; skewed = {SHORT_PER_LONG} short Banking77 "
        f"questions per long row of {ARTICLES_PER_LONG_ROW} AG News articles). Real tokens = non-pad tokens fed "
        "to the model (prompt included). With packing our trainer feeds the batch's packed rows as one "
        "[batch, longest row] tensor with block-diagonal attention on the CPU; the plain script feeds TRL's "
        "concatenated batch row.",
        "",
        *configuration_rows(results),
        "",
        *comparison_rows(results),
        "",
        "## Machine",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}, {sum(r.seconds for r in results):.0f} s measured in "
        f"{len(results)} runs",
        f"- CPU: {cpu_line()}",
        f"- Libraries: {library_versions()}",
        f"- Threads: torch default ({os.cpu_count()}), OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', OMP_WAIT_POLICY)} in every run (see OMP_WAIT_POLICY in the bench)",
        f"- Load (1-minute average, before/after each run): min {min(loads):.2f}, max {max(loads):.2f}, "
        f"mean {statistics.fmean(loads):.2f}. The machine is shared with other engineers' work: a load above the "
        "core count means the runs got less than the whole CPU, and alternating the order spreads that over both "
        "sides.",
        "",
        "## Runs",
        "",
        "| round | configuration | real tokens | fed tokens | seconds | real tokens/s | load before → after |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
        *(
            f"| {r.round} | {r.key} | {r.tokens} | {r.fed_tokens} | {r.seconds:.1f} | {r.tokens_per_second:.0f} | "
            f"{r.load_before:.2f} → {r.load_after:.2f} |"
            for r in results
        ),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


@click.group(invoke_without_command=True)
@click.option("--steps", default=12, show_default=True, help="Measured optimizer steps per run.")
@click.option("--warmup", default=2, show_default=True, help="Unmeasured steps before the window.")
@click.option("--rounds", default=2, show_default=True, help="Runs per configuration (order alternates).")
@click.option("--batch-size", default=8, show_default=True, help="Examples per step.")
@click.option("--max-length", default=256, show_default=True, help="dataset.maxLength / SFTConfig.max_length.")
@click.option("--rows", default=640, show_default=True, help="Rows of each training set.")
@click.option(
    "--only", multiple=True, help=f"Configuration keys to run; repeatable. Default: {', '.join(DEFAULT_KEYS)}."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=RESULTS_FILE,
    show_default=True,
    help="Where the markdown goes.",
)
@click.pass_context
def main(
    context: click.Context,
    steps: int,
    warmup: int,
    rounds: int,
    batch_size: int,
    max_length: int,
    rows: int,
    only: tuple[str, ...],
    output: Path,
) -> None:
    """Run every configuration `rounds` times and print the throughput table."""
    if context.invoked_subcommand is not None:
        return
    known = {configuration.key for configuration in CONFIGURATIONS}
    unknown = sorted(set(only) - known)
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}; known: {', '.join(sorted(known))}", param_hint="--only")
    wanted = set(only or DEFAULT_KEYS)
    chosen = [configuration for configuration in CONFIGURATIONS if configuration.key in wanted]
    settings = Settings(warmup=warmup, steps=steps, batch_size=batch_size, max_length=max_length)
    started = datetime.now(UTC)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-throughput-") as scratch:
        work = Path(scratch)
        files = write_datasets(work / "data", rows, seed=0)
        for round_number in range(1, rounds + 1):
            for configuration in round_order(chosen, round_number):
                began = time.monotonic()
                result = launch(configuration, files, settings, work, round_number)
                results.append(result)
                click.echo(
                    f"round {round_number} {configuration.key}: {result.tokens_per_second:.0f} real tokens/s, "
                    f"peak RSS {result.peak_rss_mb:.0f} MB, load {result.load_before:.2f} "
                    f"({time.monotonic() - began:.0f} s)",
                    err=True,
                )
    report = render_report(results, settings, rows, started)
    click.echo(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)


@main.command(hidden=True)
@click.argument("key")
@click.argument("train_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data_format")
@click.argument("work", type=click.Path(file_okay=False, path_type=Path))
@click.argument("warmup", type=int)
@click.argument("steps", type=int)
@click.argument("batch_size", type=int)
@click.argument("max_length", type=int)
def child(
    key: str, train_file: Path, data_format: str, work: Path, warmup: int, steps: int, batch_size: int, max_length: int
) -> None:
    """One run in this process (the parent starts it); prints its figures as one JSON line."""
    configuration = next((c for c in CONFIGURATIONS if c.key == key), None)
    if configuration is None:
        raise click.BadParameter(f"unknown configuration {key!r}", param_hint="KEY")
    settings = Settings(warmup=warmup, steps=steps, batch_size=batch_size, max_length=max_length)
    figures = run_child(configuration, train_file, data_format, settings, work)
    click.echo(RESULT_PREFIX + json.dumps({**figures, "settings": asdict(settings)}))


if __name__ == "__main__":
    main()
