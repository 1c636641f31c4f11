"""`accelerate launch` for the trainer's multi-process runs, ending with the trainer's own exit code instead of 1."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from kubetune.contract import EXIT_CODE_PERMANENT


def shell_exit_code(exitcode: int) -> int:
    """A process's exit status as a shell (and the kubelet) reports it: 128 + N for one killed by signal N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def launch_exit_code(failures: Sequence[tuple[float, int]]) -> int:
    """The launch's exit code from its failed processes' (timestamp, exit code) pairs, as torch.distributed.elastic
    records them (a negative code: killed by that signal).

    A permanent failure (65: bad data, bad config, a diverged run) wins: every retry would fail the same way, and the
    Job's podFailurePolicy stops retrying only on that code. Otherwise the earliest failure is the root cause (the
    others follow from it: a peer's "connection closed", the launcher stopping the rest); within the same second, a
    process that exited on its own comes before one the launcher killed.
    """
    if not failures:
        return 1
    if any(code == EXIT_CODE_PERMANENT for _, code in failures):
        return EXIT_CODE_PERMANENT
    _, root_cause = min(failures, key=lambda failure: (failure[0], failure[1] < 0))
    return shell_exit_code(root_cause)


def main(argv: Sequence[str]) -> int:
    """Run `accelerate launch argv...`; 0, the failed processes' code, or 128 + the signal that stopped the launch."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(argv))
    try:
        launch_command(args)
    except ChildFailedError as error:
        # accelerate would end with a traceback and 1, hiding the trainer's code (65 permanent, 75 retryable, 143
        # preempted) from the Job's podFailurePolicy and the operator; the failure table stays in the log.
        print(error.format_msg(), file=sys.stderr, flush=True)
        return launch_exit_code([(failure.timestamp, failure.exitcode) for failure in error.failures.values()])
    except SignalException as stopped:
        # The kubelet stopped the pod; the processes were stopped with the same signal (and checkpointed on SIGTERM).
        print(f"launch stopped by {signal.Signals(stopped.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
