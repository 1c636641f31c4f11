"""The kubelet stand-in's pure parts: which images it cannot pull, container memory limits, exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.testbed.kubelet_standin import (
    cannot_pull,
    exit_status,
    image_registry,
    memory_limit_bytes,
    process_group_rss_bytes,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("image", "registry", "fails"),
    [
        ("kubetune-trainer:test", None, False),
        ("kubetune/trainer:1", None, False),
        ("ghcr.io/kubetune/kubetune-trainer:0.1.0", "ghcr.io", False),
        ("localhost:5000/trainer", "localhost:5000", False),
        ("registry.invalid/kubetune/trainer:missing", "registry.invalid", True),
        ("registry.invalid:5000/trainer", "registry.invalid:5000", True),
        ("invalid/trainer", None, False),  # a Docker Hub organisation named "invalid", not a registry host
    ],
)
def test_only_registries_under_the_invalid_tld_fail_to_pull(image: str, registry: str | None, fails: bool) -> None:
    assert image_registry(image) == registry
    assert cannot_pull(image) is fails


@pytest.mark.parametrize(
    ("limit", "expected"),
    [("64Mi", 64 * 2**20), ("2Gi", 2 * 2**30), ("500M", 500 * 10**6), ("1.5Gi", int(1.5 * 2**30)), ("1024", 1024)],
)
def test_memory_limits_are_read_as_quantities(limit: str, expected: int) -> None:
    assert memory_limit_bytes({"resources": {"limits": {"memory": limit}}}) == expected


def test_no_memory_limit_means_none() -> None:
    assert memory_limit_bytes({"resources": {"requests": {"memory": "1Gi"}}}) is None
    assert memory_limit_bytes({}) is None


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (1, 1), (65, 65), (-9, 137), (-15, 143)])
def test_a_death_by_signal_is_reported_as_128_plus_the_signal(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


def test_the_rss_of_a_process_group_counts_its_processes() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; block = bytearray(64 * 2**20); time.sleep(30)"], start_new_session=True
    )
    try:
        for _ in range(100):
            rss = process_group_rss_bytes(child.pid)
            if rss > 64 * 2**20:
                break
            os.sched_yield()
            subprocess.run(["sleep", "0.05"], check=True)
        assert rss > 64 * 2**20
        assert process_group_rss_bytes(os.getpgrp()) > 0
    finally:
        child.kill()
        child.wait()
