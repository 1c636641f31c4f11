"""The status queue: coalescing per key, one derivation of a key at a time, and deference to creates (bounded)."""

from __future__ import annotations

import asyncio

import pytest
from kubetune_operator.status_queue import DeferredQueue

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def nothing(_key: str) -> None:
    return None


def test_a_key_put_while_waiting_is_taken_once() -> None:
    queue: DeferredQueue[str] = DeferredQueue(nothing, workers=1, clock=FakeClock())
    for _ in range(3):
        queue.put("a")
    queue.put("b")

    assert queue.pending == 2


def test_work_is_ready_at_once_when_nothing_is_being_created() -> None:
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(nothing, workers=1, clock=clock)
    queue.put("a")

    assert queue.next_ready(clock()) == ("a", None)


def test_work_waits_for_a_create_in_flight_but_not_beyond_the_limit() -> None:
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(nothing, workers=1, max_defer_seconds=5.0, clock=clock)
    queue.put("a")
    with queue.creating():
        key, wait = queue.next_ready(clock())
        assert (key, wait) == (None, 5.0)
        clock.now += 5.0
        assert queue.next_ready(clock()) == ("a", None)


def test_work_waits_a_quiet_moment_after_the_last_create() -> None:
    clock = FakeClock()
    queue: DeferredQueue[str] = DeferredQueue(nothing, workers=1, quiet_seconds=0.2, clock=clock)
    queue.put("a")
    with queue.creating():
        pass
    key, wait = queue.next_ready(clock())
    assert key is None
    assert wait == pytest.approx(0.2)
    clock.now += 0.2
    assert queue.next_ready(clock()) == ("a", None)


def test_keys_go_in_the_order_first_put_and_one_in_progress_is_passed_over() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        started = asyncio.Event()
        release = asyncio.Event()

        async def process(_key: str) -> None:
            started.set()
            await release.wait()

        queue: DeferredQueue[str] = DeferredQueue(process, workers=1, clock=clock)
        queue.put("a")
        clock.now += 1
        queue.put("b")
        queue.put("a")  # put again while waiting: keeps its place
        assert queue.next_ready(clock())[0] == "a"

        queue.start()
        try:
            await asyncio.wait_for(started.wait(), 5)  # the worker holds "a"
            queue.put("a")
            assert queue.next_ready(clock())[0] == "b"
        finally:
            release.set()
            await queue.stop()

    asyncio.run(scenario())


def test_workers_process_every_key_never_one_key_twice_at_once_and_survive_failures() -> None:
    running: dict[str, int] = {}
    overlaps: list[str] = []
    done: list[str] = []
    errors: list[str] = []

    async def process(key: str) -> None:
        running[key] = running.get(key, 0) + 1
        if running[key] > 1:
            overlaps.append(key)
        await asyncio.sleep(0.01)
        running[key] -= 1
        done.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    async def scenario() -> None:
        queue: DeferredQueue[str] = DeferredQueue(
            process, workers=4, on_error=lambda key, _error: errors.append(key)
        ).start()
        try:
            for round_ in range(20):
                for key in ("a", "b", "bad"):
                    queue.put(key)
                await asyncio.sleep(0.02 if round_ % 5 == 0 else 0)
            assert await queue.wait_idle(10)
        finally:
            await queue.stop()
        assert queue.pending == 0

    asyncio.run(scenario())

    assert overlaps == []
    assert {"a", "b", "bad"} <= set(done)
    assert errors and set(errors) == {"bad"}


def test_a_burst_of_creates_and_puts_wakes_workers_only_when_work_may_have_come_sooner() -> None:
    # Every trainer Job create ends and every Job event puts a key: waking the workers each time costs the creates CPU.
    async def scenario() -> DeferredQueue[str]:
        clock = FakeClock()
        queue: DeferredQueue[str] = DeferredQueue(nothing, workers=8, clock=clock).start()
        await asyncio.sleep(0)  # every worker goes idle
        with queue.creating():  # a create stays in flight all along, as in a burst
            for index in range(500):
                with queue.creating():
                    pass
                queue.put(f"job-{index}")
                queue.put(f"job-{index}")
        wakes = queue.wakes
        await queue.stop()
        queue.wakes = wakes
        return queue

    queue = asyncio.run(scenario())

    # One wake for the first key to wait for, one when the last create ends; none per create or per later key.
    assert queue.wakes == 2
    assert queue.pending == 500


def test_ready_keys_are_taken_by_several_workers_at_once_after_one_wake() -> None:
    running = 0
    most_at_once = 0

    async def process(_key: str) -> None:
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        await asyncio.sleep(0.3)
        running -= 1

    async def scenario() -> None:
        queue: DeferredQueue[str] = DeferredQueue(process, workers=4, quiet_seconds=0.05).start()
        try:
            with queue.creating():
                for key in "abcd":
                    queue.put(key)
            # The last create's end wakes one worker; each worker that takes a key wakes the next.
            assert await queue.wait_idle(10)
        finally:
            await queue.stop()

    asyncio.run(scenario())

    assert most_at_once == 4
