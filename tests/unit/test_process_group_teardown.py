"""Leaving a multi-process launch: the teardown of the process group is bounded, and the exit never waits on it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from kubetune_trainer.train.callbacks import finishes_within, leave_process_group

pytestmark = pytest.mark.unit


def test_an_action_that_returns_in_time_is_none() -> None:
    assert finishes_within(lambda: None, timeout=5) is None


def test_an_action_that_raises_says_what_it_raised() -> None:
    def refuse() -> None:
        raise RuntimeError("Connection closed by peer")

    assert finishes_within(refuse, timeout=5) == "RuntimeError: Connection closed by peer"


def test_an_action_that_hangs_is_left_behind_after_the_timeout() -> None:
    release = threading.Event()
    started = time.monotonic()

    outcome = finishes_within(release.wait, timeout=0.2)

    assert outcome == "still waiting after 0 s"
    assert time.monotonic() - started < 3
    release.set()


def test_a_single_process_has_no_group_to_leave() -> None:
    assert leave_process_group(timeout=0.1) is True


def test_a_process_of_a_launch_exits_with_its_code_and_its_logs_although_a_thread_still_runs() -> None:
    # A thread that never ends would keep a normal interpreter exit waiting forever: the teardown that hangs.
    script = (
        "import logging, threading\n"
        "from kubetune_trainer.commands import leave_launch\n"
        "logging.basicConfig(format='%(message)s')\n"
        "threading.Thread(target=threading.Event().wait).start()\n"
        "logging.getLogger('kubetune').warning('checkpoint step 4 uploaded')\n"
        "leave_launch(143)\n"
    )

    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)

    assert result.returncode == 143, result.stderr
    assert "checkpoint step 4 uploaded" in result.stderr
