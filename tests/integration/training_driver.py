"""Runs the training stage in its own process (one per rank under accelerate launch) and records what it saw.

Usage: python training_driver.py CONFIG.json, where the config holds the spec (wire form), work_dir, record_dir,
step_delay and progress_interval. Each rank writes into record_dir: steps-rank<R>.txt (every finished step),
world-rank<R>.json (its torch.distributed rank and world size), progress-rank<R>.jsonl (what the sink got), and
result-rank<R>.json on success. A preempted run exits with TrainingPreempted.exit_code, as the trainer's entry does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kubetune_trainer.commands import leave_launch
from kubetune_trainer.data.prepare import prepare_data
from kubetune_trainer.train.trainer import TrainingPreempted, train
from transformers import TrainerCallback

from kubetune.api import FineTuneJobSpec, ProgressStatus


class StepRecorder(TrainerCallback):
    """Appends every finished step to a file; step_delay slows steps so that a signal lands mid-run."""

    def __init__(self, record_dir: Path, rank: int, step_delay: float) -> None:
        self.steps_file = record_dir / f"steps-rank{rank}.txt"
        self.world_file = record_dir / f"world-rank{rank}.json"
        self.step_delay = step_delay

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = {
            "rank": torch.distributed.get_rank() if initialized else 0,
            "world_size": torch.distributed.get_world_size() if initialized else 1,
            "backend": torch.distributed.get_backend() if initialized else None,
            "pid": os.getpid(),
        }
        self.world_file.write_text(json.dumps(world))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.steps_file.open("a") as handle:
            handle.write(f"{state.global_step}\n")
        time.sleep(self.step_delay)


def main(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    spec = FineTuneJobSpec.model_validate(config["spec"])
    record_dir = Path(config["record_dir"])
    rank = int(os.environ.get("RANK", "0"))
    progress_file = record_dir / f"progress-rank{rank}.jsonl"

    def record_progress(progress: ProgressStatus) -> None:
        with progress_file.open("a") as handle:
            handle.write(json.dumps(progress.to_wire()) + "\n")

    data = prepare_data(spec.dataset, spec.training.seed)
    try:
        result = train(
            spec,
            data,
            Path(config["model_dir"]),
            Path(config["work_dir"]),
            progress=record_progress,
            progress_interval_seconds=float(config.get("progress_interval", 0.0)),
            extra_callbacks=[StepRecorder(record_dir, rank, float(config.get("step_delay", 0.0)))],
        )
    except TrainingPreempted as preempted:
        print(f"rank {rank}: {preempted}", file=sys.stderr)
        return preempted.exit_code
    summary = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(result).items()}
    (record_dir / f"result-rank{rank}.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_launch(code)  # as the trainer's `run` leaves a launch
    sys.exit(code)
