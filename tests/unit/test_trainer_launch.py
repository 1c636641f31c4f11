"""The exit code of a multi-process launch: the trainer's own, so that the Job and the operator read it as for one."""

from __future__ import annotations

import pytest
from kubetune_trainer.launch import launch_exit_code, shell_exit_code

from kubetune.contract import (
    EXIT_CODE_PERMANENT,
    EXIT_CODE_PREEMPTED,
    EXIT_CODE_RETRYABLE,
    LAUNCHER_MODULE,
    trainer_command,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("exitcode", "shell"), [(0, 0), (65, 65), (-9, 137), (-15, 143)])
def test_a_process_killed_by_a_signal_reads_as_the_shell_reports_it(exitcode: int, shell: int) -> None:
    assert shell_exit_code(exitcode) == shell


@pytest.mark.parametrize(
    ("failures", "code"),
    [
        ([(10, 75)], EXIT_CODE_RETRYABLE),
        ([(10, 65)], EXIT_CODE_PERMANENT),
        # A bad dataset fails every rank; the one retryable failure does not make the run worth a retry.
        ([(10, 75), (11, 65)], EXIT_CODE_PERMANENT),
        # Rank 1 lost its peer after rank 0 was preempted: the root cause is the preemption.
        ([(10, 143), (11, 75)], EXIT_CODE_PREEMPTED),
        # The launcher stopped rank 0 (SIGTERM) in the same second that rank 1 failed on its own.
        ([(10, -15), (10, 75)], EXIT_CODE_RETRYABLE),
        ([(10, -9)], 137),
        ([], 1),
    ],
)
def test_the_launch_ends_with_the_root_cause_and_a_permanent_failure_wins(
    failures: list[tuple[float, int]], code: int
) -> None:
    assert launch_exit_code(failures) == code


def test_the_trainer_command_launches_through_it() -> None:
    assert trainer_command(2)[:3] == ["python", "-m", LAUNCHER_MODULE]
    assert trainer_command(1, nodes=2)[:3] == ["python", "-m", LAUNCHER_MODULE]
