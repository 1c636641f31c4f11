"""A Kubernetes watch read as raw JSON lines, each stamped with its wall-clock receive time (the benchmarks' clock)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# Each watch request ends after this long, so a stop request or the deadline is noticed between requests.
WATCH_REQUEST_SECONDS = 5


class WatchFailedError(RuntimeError):
    """The API server ended a watch with an ERROR event (e.g. 410 Gone: the resourceVersion is too old)."""


def list_version(list_call: Callable[..., Any], *args: Any) -> tuple[str, list[dict[str, Any]]]:
    """The list's resourceVersion and items as plain dicts (no model deserialization)."""
    listing = json.loads(list_call(*args, _preload_content=False).data)
    return listing["metadata"]["resourceVersion"], listing["items"]


def watch_events(
    list_call: Callable[..., Any],
    *args: Any,
    resource_version: str,
    deadline: float,
    stop: threading.Event | None = None,
) -> Iterator[tuple[float, str, dict[str, Any]]]:
    """(receive time, event type, object) for every change after resource_version, until the monotonic deadline or
    `stop`; bookmarks only move the resourceVersion on. `list_call` is a kubernetes list method (e.g.
    BatchV1Api.list_namespaced_job) and `args` its positional arguments."""
    from kubernetes.watch.watch import iter_resp_lines

    version = resource_version
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        response = list_call(
            *args,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(min(WATCH_REQUEST_SECONDS, deadline - time.monotonic()))),
            _preload_content=False,
        )
        try:
            for line in iter_resp_lines(response):
                received = time.time()
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise WatchFailedError(f"watch ended by the API server: {event['object'].get('message')}")
                version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    yield received, event["type"], event["object"]
        finally:
            response.release_conn()
