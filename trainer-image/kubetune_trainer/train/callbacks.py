"""Trainer callbacks and trainer classes of the training stage: progress, divergence and preemption, checkpoint upload.

This module imports transformers and trl at the top because it subclasses their classes; training.py imports it
only inside the functions that train, so the trainer's entry point stays quick to start.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from kubetune_trainer.train.checkpoints import upload_checkpoint, upload_node_files
from kubetune_trainer.train.progress import ProgressTracker

log = logging.getLogger(__name__)

# How long a rank waits for the others to leave the process group after training. Past it the rank goes on (rank 0 to
# evaluate and publish) and the group is left to the process's exit: the run has saved everything it needs.
TEARDOWN_TIMEOUT_SECONDS = 300.0


@dataclass
class RunFlags:
    """What interrupts a run: a SIGTERM (preemption) or a non-finite loss, as seen by this process."""

    preempt_requested: bool = False
    diverged_step: int | None = None
    diverged_loss: float | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None


def distributed_world() -> int:
    """Processes in the torch.distributed group, 1 when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


def synchronize() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if distributed_world() > 1:
        torch.distributed.barrier()


def leave_process_group(timeout: float = TEARDOWN_TIMEOUT_SECONDS) -> bool:
    """Wait for every rank, then tear the torch.distributed group down; whether that finished within `timeout` (True
    in a single process).

    Left to the interpreter's exit, gloo's destructor raced the peer closing its sockets: a rank that exited while
    rank 0 went on to evaluate was sometimes killed by std::terminate (SIGABRT, "terminate called without an active
    exception") after a run that had succeeded. The teardown itself is known to hang now and then
    (pytorch/pytorch#75097), and a rank may not come at all, so it runs on a helper thread that this one waits for at
    most `timeout`, not gloo's 30 minutes; a process of a launch leaves with os._exit either way (commands.run).
    """
    if distributed_world() == 1:
        return True

    def teardown() -> None:
        synchronize()
        torch.distributed.destroy_process_group()

    error = finishes_within(teardown, timeout)
    if error is None:
        return True
    log.warning("the ranks did not leave the process group together (%s); this rank goes on without it", error)
    return False


def finishes_within(action: Callable[[], None], timeout: float) -> str | None:
    """Run `action` on a daemon thread, waiting at most `timeout` seconds: None when it returned, else what went
    wrong (its exception, or that it still runs; a daemon thread does not keep the process from exiting)."""
    outcome: list[str | None] = []

    def run() -> None:
        try:
            action()
        except Exception as error:
            outcome.append(f"{type(error).__name__}: {error}")
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="kubetune-bounded", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"still waiting after {timeout:.0f} s"


def any_rank(values: list[bool], device: Any) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks, so that every rank stops (or saves) at the same step."""
    if distributed_world() == 1:
        return values
    tensor = torch.tensor([1 if value else 0 for value in values], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


class LossWatch:
    """Trainer mixin: notes a non-finite loss on every micro-step, which the logged (averaged) loss could hide."""

    run_flags: RunFlags

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        if not self.run_flags.diverged:
            # One host sync per micro-step: small next to an LLM step, and NaN must be caught before a save.
            value = float(loss.detach().float().sum().item())
            if not math.isfinite(value):
                self.run_flags.diverged_step = self.state.global_step + 1  # type: ignore[attr-defined]
                self.run_flags.diverged_loss = value
        return loss


class WatchedSFTTrainer(LossWatch, SFTTrainer):
    """trl's SFTTrainer with the non-finite loss watch."""

    def __init__(self, *args: Any, run_flags: RunFlags, **kwargs: Any) -> None:
        self.run_flags = run_flags
        super().__init__(*args, **kwargs)


class WatchedTrainer(LossWatch, Trainer):
    """transformers' Trainer (sequence classification) with the non-finite loss watch."""

    def __init__(self, *args: Any, run_flags: RunFlags, **kwargs: Any) -> None:
        self.run_flags = run_flags
        super().__init__(*args, **kwargs)


class RunGuardCallback(TrainerCallback):
    """After each step: stop without saving on a non-finite loss; on SIGTERM save a checkpoint and stop.

    Runs after transformers' DefaultFlowCallback (callbacks passed to the trainer come later), so its decision on
    should_save is the last word for the step.
    """

    def __init__(self, flags: RunFlags) -> None:
        self.flags = flags
        self.stopped_for_preemption = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        preempt, diverged = any_rank([self.flags.preempt_requested, self.flags.diverged], args.device)
        if diverged:
            if self.flags.diverged_step is None:
                # Another rank saw it; this rank's record says where, for the error message.
                self.flags.diverged_step = state.global_step
            control.should_save = False
            control.should_training_stop = True
        elif preempt:
            self.flags.preempt_requested = True
            self.stopped_for_preemption = True
            control.should_save = True
            control.should_training_stop = True


class CheckpointUploadCallback(TrainerCallback):
    """After each checkpoint save: rank 0 uploads checkpoint-N with its COMPLETE marker; all ranks wait for it.

    The first barrier lets every rank finish writing its own files (e.g. rng_state_<rank>.pth) before the upload;
    the second keeps the other ranks from exiting (a preempted run) while rank 0 is still uploading. Across nodes
    (no shared disk) the first process of every other node uploads what its node wrote first, and rank 0's marker
    covers those files too, so that every rank resumes with its own state.
    """

    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri
        self.uploaded_steps: list[int] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        local_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        synchronize()
        node_files: dict[str, str] = {}
        if state.is_local_process_zero and not state.is_world_process_zero:
            node_files = upload_node_files(local_dir, self.output_uri, state.global_step)
        every_node = gather_to_all(node_files) if spans_nodes() else [node_files]
        if state.is_world_process_zero:
            other_nodes = {path: sha for files in every_node for path, sha in files.items()}
            upload_checkpoint(local_dir, self.output_uri, state.global_step, other_nodes)
        self.uploaded_steps.append(state.global_step)
        synchronize()


def spans_nodes() -> bool:
    """Whether the processes of this run sit on more than one node (torchrun's LOCAL_WORLD_SIZE below WORLD_SIZE)."""
    world = distributed_world()
    return world > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world


def gather_to_all(value: dict[str, str]) -> list[dict[str, str]]:
    """Every rank's value, on every rank (a collective: all ranks call it)."""
    gathered: list[Any] = [None] * distributed_world()
    torch.distributed.all_gather_object(gathered, value)
    return [dict(item or {}) for item in gathered]


class ProgressCallback(TrainerCallback):
    """Feeds the trainer's state to a ProgressTracker."""

    def __init__(self, tracker: ProgressTracker) -> None:
        self.tracker = tracker

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracker.begin(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs:
            self.tracker.observe_logs(logs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scheduler = kwargs.get("lr_scheduler")
        self.tracker.step(state, float(scheduler.get_last_lr()[0]) if scheduler is not None else None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracker.end(state)
