"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server: rate limits, server errors, hung
connections and mangled replies on the wire, in the order queued; every other request reaches the server as sent."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# What is forwarded of a request's headers: the rest (Host, Content-Length, keep-alive) belongs to each hop.
FORWARDED_HEADERS = ("authorization", "content-type", "accept")
UPSTREAM_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Fault:
    """What the proxy does to the next request instead of passing it through.

    status: answer with this HTTP status and an OpenAI-style error body, without forwarding.
    hang_seconds: hold the connection that long, then close it unanswered (a client times out first).
    content: forward, then replace the reply's message content (the server's token usage stays).
    echo_authorization: put the request's Authorization header into the error message, as a hostile server might.
    """

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str = "injected by the fault proxy"
    hang_seconds: float = 0.0
    content: str | None = None
    replace_content: bool = False
    echo_authorization: bool = False

    @classmethod
    def mangle(cls, content: str | None) -> Fault:
        """Forward, and answer with this message content (None: a null content) in the server's reply."""
        return cls(content=content, replace_content=True)


@dataclass(frozen=True)
class Exchange:
    """One request the proxy took: what was asked, what it answered, and the fault applied (None: passed through)."""

    method: str
    path: str
    body: dict[str, Any]
    authorization: str
    status: int
    usage: Mapping[str, int] | None
    fault: Fault | None


def error_body(fault: Fault, authorization: str) -> bytes:
    message = f"{fault.message}; credentials: {authorization}" if fault.echo_authorization else fault.message
    return json.dumps({"error": {"message": message, "type": "injected", "code": fault.status}}).encode()


def with_content(reply: bytes, content: str | None) -> bytes:
    """A chat completion with its first choice's message content replaced."""
    document = json.loads(reply)
    document["choices"][0]["message"]["content"] = content
    return json.dumps(document).encode()


class FaultProxy:
    """Listens on loopback and forwards to `upstream` (a base URL such as http://127.0.0.1:8000/v1)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._in_flight = 0
        self.most_in_flight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def base_url(self) -> str:
        prefix = urllib.parse.urlparse(self.upstream).path
        return f"http://127.0.0.1:{self._server.server_address[1]}{prefix}"

    def inject(self, *faults: Fault) -> None:
        """Apply these to the next requests, one each, in order."""
        with self._lock:
            self._faults.extend(faults)

    def exchanges(self, path_suffix: str = "/chat/completions") -> list[Exchange]:
        """The requests taken so far whose path ends with path_suffix, in arrival order."""
        with self._lock:
            return [exchange for exchange in self._exchanges if exchange.path.endswith(path_suffix)]

    def served_usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, replies) of the chat completions the server answered with 200."""
        answered = [e.usage for e in self.exchanges() if e.status == 200 and e.usage is not None]
        return sum(u["prompt_tokens"] for u in answered), sum(u["completion_tokens"] for u in answered), len(answered)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self._exchanges.append(exchange)

    def _forward(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes, str]:
        prefix = urllib.parse.urlparse(self.upstream).path
        url = self.upstream + path[len(prefix) :] if path.startswith(prefix) else self.upstream + path
        request = urllib.request.Request(url, data=body or None, method=method, headers=dict(headers))
        try:
            with urllib.request.urlopen(request, timeout=UPSTREAM_TIMEOUT_SECONDS) as response:
                return response.status, response.read(), response.headers.get("content-type", "application/json")
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers.get("content-type", "application/json")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # the test's output stays the test's
                return

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                with proxy._counted():
                    raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                    headers = {name: self.headers[name] for name in FORWARDED_HEADERS if self.headers.get(name)}
                    authorization = headers.get("authorization", "")
                    fault = proxy._next_fault()
                    status, reply, content_type, extra = self._answer(fault, headers, raw, authorization)
                    usage = None
                    if status == 200 and content_type.startswith("application/json"):
                        usage = json.loads(reply).get("usage")
                    body = json.loads(raw) if raw else {}
                    proxy._record(Exchange(self.command, self.path, body, authorization, status, usage, fault))
                    if status == 0:
                        self.close_connection = True
                        return
                    self._reply(status, reply, content_type, extra)

            def _answer(
                self, fault: Fault | None, headers: Mapping[str, str], raw: bytes, authorization: str
            ) -> tuple[int, bytes, str, Mapping[str, str]]:
                if fault is not None and fault.hang_seconds:
                    threading.Event().wait(fault.hang_seconds)
                    return 0, b"", "", {}
                if fault is not None and fault.status is not None:
                    return fault.status, error_body(fault, authorization), "application/json", fault.headers
                status, reply, content_type = proxy._forward(self.command, self.path, headers, raw)
                if fault is not None and fault.replace_content and status == 200:
                    reply = with_content(reply, fault.content)
                return status, reply, content_type, {}

            def _reply(self, status: int, body: bytes, content_type: str, extra: Mapping[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(body)))
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout) first
                    self.close_connection = True

        return Handler
