"""The status queue: coalescing per key, one derivation of a key at a time, and deference to creates (bounded)."""

from __future__ import annotations

import threading
import time

import pytest
from kubetune_operator.status_queue import DeferredQueue

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_put_while_waiting_is_taken_once() -> None:
    queue: DeferredQueue[str] = DeferredQueue(lambda _: None, workers=1, clock=FakeClock())
    for _ in range(3):
        queue.put("a")
    queue.put("b")

    assert queue.pending == 2


def test_work_is_ready_at_once_when_nothing_is_being_created() -> None:
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(lambda _: None, workers=1, clock=clock)
    queue.put("a")

    assert queue.next_ready(clock()) == ("a", None)


def test_work_waits_for_a_create_in_flight_but_not_beyond_the_limit() -> None:
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(lambda _: None, workers=1, max_defer_seconds=5.0, clock=clock)
    queue.put("a")
    with queue.creating():
        key, wait = queue.next_ready(clock())
        assert (key, wait) == (None, 5.0)
        clock.now += 5.0
        assert queue.next_ready(clock()) == ("a", None)


def test_work_waits_a_quiet_moment_after_the_last_create() -> None:
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(lambda _: None, workers=1, quiet_seconds=0.2, clock=clock)
    queue.put("a")
    with queue.creating():
        pass
    key, wait = queue.next_ready(clock())
    assert key is None
    assert wait == pytest.approx(0.2)
    clock.now += 0.2
    assert queue.next_ready(clock()) == ("a", None)


def test_keys_go_in_the_order_first_put_and_one_in_progress_is_passed_over() -> None:
    clock = FakeClock()
    started = threading.Event()
    release = threading.Event()

    def process(_key: str) -> None:
        started.set()
        release.wait(5)

    queue: DeferredQueue[str] = DeferredQueue(process, workers=1, clock=clock)
    queue.put("a")
    clock.now += 1
    queue.put("b")
    queue.put("a")  # put again while waiting: keeps its place
    assert queue.next_ready(clock())[0] == "a"

    queue.start()
    try:
        assert started.wait(5)  # the worker holds "a"
        queue.put("a")
        with queue._changed:
            assert queue.next_ready(clock())[0] == "b"
    finally:
        release.set()
        queue.stop()


def test_workers_process_every_key_never_one_key_twice_at_once_and_survive_failures() -> None:
    running: dict[str, int] = {}
    overlaps: list[str] = []
    done: list[str] = []
    errors: list[str] = []
    guard = threading.Lock()

    def process(key: str) -> None:
        with guard:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlaps.append(key)
        time.sleep(0.01)
        with guard:
            running[key] -= 1
            done.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    queue: DeferredQueue[str] = DeferredQueue(
        process, workers=4, on_error=lambda key, _error: errors.append(key)
    ).start()
    try:
        for round_ in range(20):
            for key in ("a", "b", "bad"):
                queue.put(key)
            if round_ % 5 == 0:
                time.sleep(0.02)
        assert queue.wait_idle(10)
    finally:
        queue.stop()

    assert overlaps == []
    assert {"a", "b", "bad"} <= set(done)
    assert errors and set(errors) == {"bad"}
    assert queue.pending == 0


class CountingCondition(threading.Condition):
    """A Condition that counts the workers it was asked to wake."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.wakes = 0

    def notify(self, n: int = 1) -> None:
        self.wakes += n
        super().notify(n)

    def notify_all(self) -> None:
        self.wakes += 1_000
        super().notify_all()


def test_a_burst_of_creates_and_puts_wakes_workers_only_when_work_may_have_come_sooner() -> None:
    # Every trainer Job create ends and every Job event puts a key: waking the workers each time cost the creates CPU.
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(lambda _: None, workers=8, clock=clock)
    counting = CountingCondition(queue._changed._lock)  # type: ignore[attr-defined]
    queue._changed = counting
    with queue.creating():  # a create stays in flight all along, as in a burst with 16 handler threads
        for index in range(500):
            with queue.creating():
                pass
            queue.put(f"job-{index}")
            queue.put(f"job-{index}")

    # One wake for the first key to wait for, one when the last create ends; none per create or per later key.
    assert counting.wakes == 2
    assert queue.pending == 500


def test_ready_keys_are_taken_by_several_workers_at_once_after_one_wake() -> None:
    running = 0
    most_at_once = 0
    guard = threading.Lock()

    def process(_key: str) -> None:
        nonlocal running, most_at_once
        with guard:
            running += 1
            most_at_once = max(most_at_once, running)
        time.sleep(0.3)
        with guard:
            running -= 1

    queue: DeferredQueue[str] = DeferredQueue(process, workers=4, quiet_seconds=0.05).start()
    try:
        with queue.creating():
            for key in "abcd":
                queue.put(key)
        # The last create's end wakes one worker; each worker that takes a key wakes the next.
        assert queue.wait_idle(10)
    finally:
        queue.stop()

    assert most_at_once == 4
