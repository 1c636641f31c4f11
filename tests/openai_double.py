"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API for tests, with scriptable replies.

Each (method, path) route answers from its queue of scripted replies first, then from its handler, else 404.
Every request is recorded. Extend it for more endpoints by adding handlers (`on`) or queued replies (`enqueue`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_PREFIX = "/v1"


@dataclass(frozen=True)
class RecordedRequest:
    """One request the double received; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class Reply:
    """What the double sends back: status, JSON (or raw text) body, headers, after an optional delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0


Handler = Callable[[RecordedRequest], Reply]


def chat_completion(
    content: str | None, prompt_tokens: int = 10, completion_tokens: int = 5, model: str = "judge"
) -> Reply:
    """A 200 chat.completion reply whose single choice says `content`, with usage."""
    return Reply(
        body={
            "id": "chatcmpl-double",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def api_error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An OpenAI-style error body with the given status, e.g. 429 with retry-after-ms."""
    return Reply(
        status=status, body={"error": {"message": message, "type": "double_error", "code": None}}, headers=headers or {}
    )


class OpenAIDouble:
    """The server; use as a context manager, point the SDK at `base_url`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str], deque[Reply]] = {}
        self._handlers: dict[tuple[str, str], Handler] = {}
        self.requests: list[RecordedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._request_handler_class())
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown (and so every test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-double", daemon=True
        )

    @property
    def base_url(self) -> str:
        """What OpenAI(base_url=...) takes: http://127.0.0.1:PORT/v1."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{API_PREFIX}"

    def on(self, method: str, path: str, handler: Handler) -> None:
        """Answer every request to API_PREFIX + path with handler(request) once the route's queue is empty."""
        with self._lock:
            self._handlers[(method.upper(), API_PREFIX + path)] = handler

    def enqueue(self, method: str, path: str, *replies: Reply) -> None:
        """Answer the next requests to API_PREFIX + path with these replies, in order."""
        with self._lock:
            self._queues.setdefault((method.upper(), API_PREFIX + path), deque()).extend(replies)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """The recorded requests to one route."""
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and r.path == API_PREFIX + path]

    def reply_for(self, request: RecordedRequest) -> Reply:
        """Record the request and pick its reply: queued first, then the handler, else 404."""
        key = (request.method, request.path)
        with self._lock:
            self.requests.append(request)
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
            handler = self._handlers.get(key)
        if handler is None:
            return api_error(404, f"no route for {request.method} {request.path}")
        return handler(request)

    def start(self) -> OpenAIDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _request_handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                request = RecordedRequest(
                    self.command,
                    self.path.split("?")[0],
                    {name.lower(): value for name, value in self.headers.items()},
                    body,
                )
                reply = double.reply_for(request)
                if reply.delay_seconds:
                    time.sleep(reply.delay_seconds)
                payload = (reply.body if isinstance(reply.body, str) else json.dumps(reply.body)).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    # The client gave up (its timeout) while this reply was delayed.
                    pass

            do_GET = do_POST = do_DELETE = _serve  # noqa: N815 - http.server dispatches on these names

            def log_message(self, format: str, *args: Any) -> None:
                # Keep test output quiet; requests are recorded instead.
                return

        return RequestHandler
