"""A multi-process launch as the trainer container runs it (kubetune_trainer.launch over accelerate and
torch.distributed.run): it ends with the code its processes ended with, so that the Job's podFailurePolicy and the
operator read a launch as they read one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.contract import EXIT_CODE_PERMANENT, EXIT_CODE_PREEMPTED, EXIT_CODE_RETRYABLE, trainer_command
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.integration

# Each rank marks that it started, waits its delay, and exits with its code.
PROCESS = """
import os, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
Path(sys.argv[1], f"started-{rank}").touch()
time.sleep(float(sys.argv[3].split(",")[rank]))
sys.exit(int(sys.argv[2].split(",")[rank]))
"""


def launch(tmp_path: Path, codes: str, delays: str) -> subprocess.Popen[str]:
    script = tmp_path / "process.py"
    script.write_text(PROCESS)
    command = trainer_command(2, python=sys.executable, entry=[str(script), str(tmp_path), codes, delays])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("codes", "delays", "expected"),
    [
        ("0,0", "0,0", 0),
        # Rank 1 refuses the data: the Job must not retry, so the pod ends with 65, not accelerate's 1.
        ("0,65", "0,0", EXIT_CODE_PERMANENT),
        # Rank 0 fails in a way a retry may fix; the launcher stops rank 1, whose SIGTERM is not the root cause.
        (f"{EXIT_CODE_RETRYABLE},0", "0,60", EXIT_CODE_RETRYABLE),
    ],
)
def test_a_launch_ends_with_the_code_its_processes_ended_with(
    codes: str, delays: str, expected: int, tmp_path: Path
) -> None:
    started = time.monotonic()
    process = launch(tmp_path, codes, delays)

    _, stderr = process.communicate(timeout=120)

    assert process.returncode == expected, stderr[-3000:]
    assert time.monotonic() - started < 50, "the launcher waited for the rank it should have stopped"
    if expected:
        assert "Root Cause (first observed failure)" in stderr, "the failure table stays in the log"


def test_sigterm_to_the_launch_stops_every_process_and_ends_with_the_preempted_code(tmp_path: Path) -> None:
    process = launch(tmp_path, "0,0", "60,60")
    wait_for(lambda: {path.name for path in tmp_path.glob("started-*")} == {"started-0", "started-1"}, 60, "both ranks")

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == EXIT_CODE_PREEMPTED, stderr[-3000:]
    assert "launch stopped by SIGTERM" in stderr
