"""A coalescing queue for status derivations that gives way to trainer Job creation during a burst.

Why: in a burst of FineTuneJobs every status patch and Event competes with the creates for the API server, and a
FineTuneJob write costs the API server about twice what a Job create does (schema, CEL, managed fields). Deriving
statuses after the creates gets every trainer pod asked for sooner; coalescing turns the several watch events a job
gets in a burst (its creation, our own status patch coming back, its Job appearing) into as few derivations.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)


class DeferredQueue(Generic[Key]):
    """Keys to process on worker threads: each key at most once at a time, put twice while waiting = processed once.

    Work waits while a create is in flight or ended less than `quiet_seconds` ago, but never longer than
    `max_defer_seconds` after its key was put: a steady stream of creates cannot starve the statuses.

    Workers are woken one at a time, and only when what they wait for may have come sooner: a first key to wait
    for, the last create in flight ending, a key taken with more behind it. In a burst every create ends and every
    trainer Job puts a key; waking all workers each time cost the creates CPU for nothing.
    """

    def __init__(
        self,
        process: Callable[[Key], None],
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
        self._pending: dict[Key, float] = {}  # key -> when it was first put since it was last taken
        self._active: set[Key] = set()
        self._creates = 0
        self._last_create_end = float("-inf")
        self._stopping = False
        lock = threading.Lock()
        self._changed = threading.Condition(lock)  # workers wait here
        self._settled = threading.Condition(lock)  # wait_idle waits here
        self._threads: list[threading.Thread] = []

    def start(self, context: contextvars.Context | None = None) -> DeferredQueue[Key]:
        """Start the workers, each in a copy of `context` when given (kopf.event needs the context variables kopf
        sets for its handlers; a new thread starts without them)."""
        for index in range(self.workers):
            target = self._work if context is None else _in_copy(context, self._work)
            thread = threading.Thread(target=target, name=f"kubetune-status-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers after the derivations in progress; pending keys are dropped (a restart lists all jobs)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def put(self, key: Key) -> None:
        """Ask for `key` to be processed (again) soon."""
        with self._changed:
            if key in self._pending:
                return
            self._pending[key] = self.clock()
            # Workers that wait for an older key's moment wake no later than this key's; only a first one needs one.
            if self._first_waiting() == key:
                self._changed.notify()

    @contextmanager
    def creating(self) -> Iterator[None]:
        """Mark a create in flight for as long as the block runs: pending work waits for it."""
        with self._changed:
            self._creates += 1
        try:
            yield
        finally:
            with self._changed:
                self._creates -= 1
                self._last_create_end = self.clock()
                # The last create ending may bring waiting work forward (quiet_seconds instead of max_defer_seconds).
                if self._creates == 0 and self._pending:
                    self._changed.notify()

    @property
    def pending(self) -> int:
        with self._changed:
            return len(self._pending)

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is pending or in progress (tests); False on timeout."""
        deadline = self.clock() + timeout
        with self._settled:
            while self._pending or self._active:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._settled.wait(min(left, 0.05))
        return True

    def _first_waiting(self) -> Key | None:
        """The key waiting longest that no worker holds. Call with the lock held."""
        return next((key for key in self._pending if key not in self._active), None)

    def next_ready(self, now: float) -> tuple[Key | None, float | None]:
        """(a key to process now, None) or (None, seconds to wait before asking again; None = until woken).
        Call with the lock held."""
        # _pending keeps first-put order (a key is deleted when taken), so the first key not in progress is the one
        # waiting longest: found past at most `workers` keys, not by a scan of every pending key (500 in a burst,
        # scanned by every worker after every create).
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

    def _work(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._stopping:
                        return
                    key, wait = self.next_ready(self.clock())
                    if key is not None:
                        break
                    self._changed.wait(wait)
                del self._pending[key]
                self._active.add(key)
                if self._first_waiting() is not None:
                    self._changed.notify()  # the next key may be ready too: another worker takes it
            try:
                self.process(key)
            except Exception as error:  # a worker must outlive any one job's failure
                log.exception("deriving the status of %s failed", key)
                if self.on_error is not None:
                    self.on_error(key, error)
            finally:
                with self._changed:
                    self._active.discard(key)
                    if key in self._pending:
                        self._changed.notify()  # put again while held: now it can be taken
                    if not self._pending and not self._active:
                        self._settled.notify_all()


def _in_copy(context: contextvars.Context, function: Callable[[], None]) -> Callable[[], None]:
    """`function` run in a copy of `context` (one Context cannot be entered by two threads at once)."""
    return lambda: context.copy().run(function)
