"""A coalescing queue for status derivations that gives way to trainer Job creation during a burst.

Why: in a burst of FineTuneJobs every status patch and Event competes with the creates for the API server, and a
FineTuneJob write costs the API server about twice what a Job create does (schema, CEL, managed fields). Deriving
statuses after the creates gets every trainer pod asked for sooner; coalescing turns the several watch events a job
gets in a burst (its creation, our own status patch coming back, its Job appearing) into as few derivations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)


class DeferredQueue(Generic[Key]):
    """Keys to process by worker tasks on the event loop: each key at most once at a time, put twice while waiting =
    processed once.

    Work waits while a create is in flight or ended less than `quiet_seconds` ago, but never longer than
    `max_defer_seconds` after its key was put: a steady stream of creates cannot starve the statuses.

    Workers are woken one at a time, and only when what they wait for may have come sooner: a first key to wait
    for, the last create in flight ending, a key taken with more behind it. In a burst every create ends and every
    trainer Job puts a key; waking every worker each time would cost the creates CPU for nothing.
    """

    def __init__(
        self,
        process: Callable[[Key], Awaitable[None]],
        workers: int,
        quiet_seconds: float = 0.2,
        max_defer_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[Key, Exception], None] | None = None,
    ) -> None:
        self.process = process
        self.workers = workers
        self.quiet_seconds = quiet_seconds
        self.max_defer_seconds = max_defer_seconds
        self.clock = clock
        self.on_error = on_error
        self.wakes = 0  # workers woken so far
        self._pending: dict[Key, float] = {}  # key -> when it was first put since it was last taken
        self._active: set[Key] = set()
        self._creates = 0
        self._last_create_end = float("-inf")
        self._sleeping: deque[asyncio.Future[None]] = deque()  # one future per idle worker, woken first in first out
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> DeferredQueue[Key]:
        """Start the workers on the running loop. Tasks run in a copy of the caller's context: started from a kopf
        handler, they have the context variables kopf.event needs."""
        self._tasks = [
            asyncio.get_running_loop().create_task(self._work(), name=f"kubetune-status-{index}")
            for index in range(self.workers)
        ]
        return self

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    async def stop(self) -> None:
        """Stop the workers; pending keys are dropped (a restart lists all jobs)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def put(self, key: Key) -> None:
        """Ask for `key` to be processed (again) soon."""
        if key in self._pending:
            return
        self._pending[key] = self.clock()
        # Workers that wait for an older key's moment wake no later than this key's; only a first one needs one.
        if self._first_waiting() == key:
            self._wake_one()

    @contextmanager
    def creating(self) -> Iterator[None]:
        """Mark a create in flight for as long as the block runs: pending work waits for it."""
        self._creates += 1
        try:
            yield
        finally:
            self._creates -= 1
            self._last_create_end = self.clock()
            # The last create ending may bring waiting work forward (quiet_seconds instead of max_defer_seconds).
            if self._creates == 0 and self._pending:
                self._wake_one()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def wait_idle(self, timeout: float) -> bool:
        """Until nothing is pending or in progress (tests); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending or self._active:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _first_waiting(self) -> Key | None:
        """The key waiting longest that no worker holds."""
        return next((key for key in self._pending if key not in self._active), None)

    def next_ready(self, now: float) -> tuple[Key | None, float | None]:
        """(a key to process now, None) or (None, seconds to wait before asking again; None = until woken)."""
        # _pending keeps first-put order (a key is deleted when taken), so the first key not in progress is the one
        # waiting longest: found past at most `workers` keys, not by a scan of every pending key.
        oldest = next(((key, since) for key, since in self._pending.items() if key not in self._active), None)
        if oldest is None:
            return None, None
        key, since = oldest
        deferred_until = since + self.max_defer_seconds
        if self._creates == 0:
            deferred_until = min(deferred_until, self._last_create_end + self.quiet_seconds)
        if now >= deferred_until:
            return key, None
        return None, deferred_until - now

    def _wake_one(self) -> None:
        """Wake the worker idle longest, if any."""
        while self._sleeping:
            waiter = self._sleeping.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.wakes += 1
                return

    async def _sleep(self, seconds: float | None) -> None:
        """Until woken, or `seconds` have passed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleeping.append(waiter)
        try:
            with suppress(TimeoutError):
                await asyncio.wait_for(waiter, seconds)
        finally:
            if waiter in self._sleeping:
                self._sleeping.remove(waiter)

    async def _work(self) -> None:
        while True:
            key, wait = self.next_ready(self.clock())
            if key is None:
                await self._sleep(wait)
                continue
            del self._pending[key]
            self._active.add(key)
            if self._first_waiting() is not None:
                self._wake_one()  # the next key may be ready too: another worker takes it
            try:
                await self.process(key)
            except Exception as error:  # a worker must outlive any one job's failure
                log.exception("deriving the status of %s failed", key)
                if self.on_error is not None:
                    self.on_error(key, error)
            finally:
                self._active.discard(key)
                if key in self._pending:
                    self._wake_one()  # put again while held: now it can be taken
