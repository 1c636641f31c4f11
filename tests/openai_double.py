"""A real HTTP server on 127.0.0.1 standing in for OpenAI's paid fine-tuning service (files, fine-tuning jobs and the
tuned model's chat completions), which nothing here can run; every other OpenAI-compatible endpoint in the tests is
llama.cpp's real server (tests/testbed/llama_server.py).

Each (method, path) route answers from its queue of scripted replies first, then from its handler, else 404.
Every request is recorded. Extend it for more endpoints by adding handlers (`on`) or queued replies (`enqueue`).
`FineTuningService` installs the files, fine-tuning jobs and chat completions routes of a small hosted service.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_PREFIX = "/v1"


@dataclass(frozen=True)
class RecordedRequest:
    """One request the double received; header names are lower-cased; `query` holds every value of each parameter."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, list[str]] = field(default_factory=dict)
    raw: bytes = b""


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


def api_error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    error_type: str = "double_error",
    param: str | None = None,
) -> Reply:
    """An OpenAI-style error body with the given status, e.g. 429 with retry-after-ms and code insufficient_quota."""
    return Reply(
        status=status,
        body={"error": {"message": message, "type": error_type, "code": code, "param": param}},
        headers=headers or {},
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
                url = urlsplit(self.path)
                request = RecordedRequest(
                    self.command,
                    url.path,
                    {name.lower(): value for name, value in self.headers.items()},
                    body,
                    parse_qs(url.query, keep_blank_values=True),
                    raw,
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


# ----------------------------------------------------------------------------------------------------------------------
# A hosted fine-tuning service: files, jobs with a state machine, events, checkpoints and chat completions.

DEFAULT_STATUSES = ("validating_files", "queued", "running", "running", "running", "succeeded")
ZERO_SHOT_ANSWER = "This text is about something."
UNKNOWN_ANSWER = "I do not know."
RESOLVED_DEFAULTS = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}
TOKENS_PER_BYTE = 0.25


@dataclass(frozen=True)
class JobPlan:
    """How the next created job plays out: one status per GET of the job (the last one stays), steps reported while
    running, and for a failed job the error the service gives."""

    statuses: tuple[str, ...] = DEFAULT_STATUSES
    total_steps: int = 30
    error: dict[str, Any] | None = None


def multipart_fields(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (file name or None, content)} of a multipart/form-data body."""
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def page(items: list[dict[str, Any]], request: RecordedRequest) -> Reply:
    """A cursor page of items (already in the service's order) honouring `after` and `limit`."""
    after = request.query.get("after", [None])[0]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = int(request.query.get("limit", ["10000"])[0])
    return Reply(body={"object": "list", "data": items[:limit], "has_more": len(items) > limit})


def last_user_content(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message."""
    return next((str(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")


class FineTuningService:
    """Installs on an OpenAIDouble the routes of a hosted fine-tuning service with deterministic models.

    - POST/GET /files (multipart upload, purpose filter), POST/GET /fine_tuning/jobs (metadata filter), and per job
      GET /fine_tuning/jobs/{id}, POST .../cancel, GET .../events, GET .../checkpoints.
    - Each GET of a job advances it one status along its JobPlan; each running poll adds a metrics event, and success
      adds checkpoints, the fine-tuned model's name and trained tokens.
    - POST /chat/completions: a fine-tuned model answers with the assistant message its uploaded files hold for the
      same last user message; the base model copies the first answer it is shown (few-shot) or answers
      ZERO_SHOT_ANSWER, so scores are known in advance. Any other model is a 404.
    - Every route wants `Authorization: Bearer <api_key>`, else 401 (whose message echoes the key given, as the real
      service echoes part of it). Failures are scripted with the double's `enqueue` or a JobPlan.
    """

    def __init__(self, double: OpenAIDouble, api_key: str) -> None:
        self.double = double
        self.api_key = api_key
        self.plan = JobPlan()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self._plans: dict[str, JobPlan] = {}
        self._polls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._clock = 1_700_000_000
        double.on("POST", "/files", self._authorized(self.upload_file))
        double.on("GET", "/files", self._authorized(self.list_files))
        double.on("POST", "/fine_tuning/jobs", self._authorized(self.create_job))
        double.on("GET", "/fine_tuning/jobs", self._authorized(self.list_jobs))
        double.on("POST", "/chat/completions", self._authorized(self.chat))

    # -- plumbing

    def _authorized(self, handler: Handler) -> Handler:
        def guarded(request: RecordedRequest) -> Reply:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if given != self.api_key:
                return api_error(
                    401,
                    f"Incorrect API key provided: {given}.",
                    code="invalid_api_key",
                    error_type="invalid_request_error",
                )
            with self._lock:
                return handler(request)

        return guarded

    def _now(self) -> int:
        self._clock += 1
        return self._clock

    def _event(self, job_id: str, message: str, kind: str = "message", data: dict[str, Any] | None = None) -> None:
        events = self.events[job_id]
        events.append(
            {
                "id": f"ftevent-{job_id}-{len(events) + 1}",
                "object": "fine_tuning.job.event",
                "created_at": self._now(),
                "level": "info",
                "message": message,
                "type": kind,
                "data": data or {},
            }
        )

    # -- files

    def upload_file(self, request: RecordedRequest) -> Reply:
        fields = multipart_fields(request.headers.get("content-type", ""), request.raw)
        if "file" not in fields or "purpose" not in fields:
            return api_error(400, "file and purpose are required", code="invalid_request_error")
        filename, content = fields["file"]
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": self._now(),
            "filename": filename or "upload",
            "purpose": fields["purpose"][1].decode(),
            "status": "processed",
        }
        self.contents[file_id] = content
        return Reply(body=self.files[file_id])

    def list_files(self, request: RecordedRequest) -> Reply:
        purpose = request.query.get("purpose", [None])[0]
        items = [item for item in self.files.values() if purpose is None or item["purpose"] == purpose]
        return page(sorted(items, key=lambda item: -item["created_at"]), request)

    # -- jobs

    def create_job(self, request: RecordedRequest) -> Reply:
        body = request.body or {}
        if body.get("training_file") not in self.files:
            return api_error(
                400,
                f"invalid training_file: {body.get('training_file')}",
                code="invalid_request_error",
                param="training_file",
            )
        job_id = f"ftjob-{len(self.jobs) + 1}"
        requested = ((body.get("method") or {}).get("supervised") or {}).get("hyperparameters") or {}
        resolved = {
            name: default if requested.get(name, "auto") == "auto" else requested[name]
            for name, default in RESOLVED_DEFAULTS.items()
        }
        self.jobs[job_id] = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": self._now(),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": resolved,
            "method": {"type": "supervised", "supervised": {"hyperparameters": resolved}},
            "model": body.get("model"),
            "organization_id": "org-double",
            "result_files": [],
            "seed": body.get("seed", 7),
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "estimated_finish": None,
            "metadata": body.get("metadata"),
            "suffix": body.get("suffix"),
        }
        self.events[job_id] = []
        self.checkpoints[job_id] = []
        self._plans[job_id] = self.plan
        self._polls[job_id] = 0
        self._event(job_id, f"Created fine-tuning job: {job_id}")
        self.double.on("GET", f"/fine_tuning/jobs/{job_id}", self._authorized(self.retrieve_job))
        self.double.on("POST", f"/fine_tuning/jobs/{job_id}/cancel", self._authorized(self.cancel_job))
        self.double.on("GET", f"/fine_tuning/jobs/{job_id}/events", self._authorized(self.list_events))
        self.double.on("GET", f"/fine_tuning/jobs/{job_id}/checkpoints", self._authorized(self.list_checkpoints))
        return Reply(body=self.public_job(job_id))

    def public_job(self, job_id: str) -> dict[str, Any]:
        return {key: value for key, value in self.jobs[job_id].items() if key != "suffix"}

    def list_jobs(self, request: RecordedRequest) -> Reply:
        wanted = {
            key[len("metadata[") : -1]: values[0]
            for key, values in request.query.items()
            if key.startswith("metadata[")
        }
        items = [
            self.public_job(job_id)
            for job_id, job in self.jobs.items()
            if all((job["metadata"] or {}).get(key) == value for key, value in wanted.items())
        ]
        return page(sorted(items, key=lambda item: -item["created_at"]), request)

    def _job_id(self, request: RecordedRequest) -> str:
        return request.path.split("/fine_tuning/jobs/")[1].split("/")[0]

    def retrieve_job(self, request: RecordedRequest) -> Reply:
        job_id = self._job_id(request)
        self._advance(job_id)
        return Reply(body=self.public_job(job_id))

    def _advance(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return
        plan = self._plans[job_id]
        self._polls[job_id] += 1
        status = plan.statuses[min(self._polls[job_id], len(plan.statuses) - 1)]
        job["status"] = status
        running_polls = plan.statuses.count("running")
        if status == "running":
            done = plan.statuses[: self._polls[job_id] + 1].count("running")
            step = max(1, plan.total_steps * done // max(1, running_polls))
            self._event(
                job_id,
                f"Step {step}/{plan.total_steps}: training loss={2.0 / step:.4f}",
                "metrics",
                {
                    "step": step,
                    "total_steps": plan.total_steps,
                    "train_loss": 2.0 / step,
                    "train_mean_token_accuracy": min(1.0, 0.5 + step / (2 * plan.total_steps)),
                },
            )
            job["estimated_finish"] = self._clock + 60 * (running_polls - done + 1)
        elif status == "succeeded":
            self._succeed(job_id, plan)
        elif status == "failed":
            job["error"] = plan.error or {"code": "server_error", "message": "The job failed.", "param": None}
            job["finished_at"] = self._now()
            self._event(job_id, f"Fine-tuning job failed: {job['error']['message']}")

    def _succeed(self, job_id: str, plan: JobPlan) -> None:
        job = self.jobs[job_id]
        suffix = job["suffix"] or ""
        job["fine_tuned_model"] = f"ft:{job['model']}:org-double:{suffix}:{job_id}"
        epochs = int(job["hyperparameters"]["n_epochs"])
        job["trained_tokens"] = int(len(self.contents[job["training_file"]]) * TOKENS_PER_BYTE) * epochs
        job["finished_at"] = self._now()
        job["estimated_finish"] = None
        for step in (plan.total_steps // 2, plan.total_steps):
            self.checkpoints[job_id].append(
                {
                    "id": f"ftckpt-{job_id}-{step}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": self._now(),
                    "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{step}",
                    "fine_tuning_job_id": job_id,
                    "step_number": step,
                    "metrics": {
                        "step": step,
                        "train_loss": 2.0 / step,
                        "full_valid_loss": 0.5,
                        "full_valid_mean_token_accuracy": 0.9,
                    },
                }
            )
        self._event(job_id, "The job has successfully completed")

    def cancel_job(self, request: RecordedRequest) -> Reply:
        job_id = self._job_id(request)
        job = self.jobs[job_id]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return api_error(400, f"Job {job_id} has already completed.", code="invalid_request_error")
        job["status"] = "cancelled"
        job["finished_at"] = self._now()
        self._event(job_id, "Fine-tuning job cancelled")
        return Reply(body=self.public_job(job_id))

    def list_events(self, request: RecordedRequest) -> Reply:
        return page(list(reversed(self.events[self._job_id(request)])), request)

    def list_checkpoints(self, request: RecordedRequest) -> Reply:
        return page(sorted(self.checkpoints[self._job_id(request)], key=lambda c: -c["step_number"]), request)

    # -- chat completions

    def answers(self) -> dict[str, str]:
        """{last user message: assistant answer} over every uploaded file: what the fine-tuned models learned."""
        table: dict[str, str] = {}
        for content in self.contents.values():
            for line in content.decode().splitlines():
                if line.strip():
                    messages = json.loads(line)["messages"]
                    table[last_user_content(messages[:-1])] = messages[-1]["content"]
        return table

    def fine_tuned_models(self) -> set[str]:
        return {job["fine_tuned_model"] for job in self.jobs.values() if job["fine_tuned_model"]}

    def chat(self, request: RecordedRequest) -> Reply:
        body = request.body or {}
        model = body.get("model")
        messages = body.get("messages") or []
        if model in self.fine_tuned_models():
            answer = self.answers().get(last_user_content(messages), UNKNOWN_ANSWER)
        elif model in {job["model"] for job in self.jobs.values()}:
            shots = [m["content"] for m in messages if m.get("role") == "assistant"]
            answer = shots[0] if shots else ZERO_SHOT_ANSWER
        else:
            return api_error(404, f"The model `{model}` does not exist", code="model_not_found")
        return chat_completion(answer, model=str(model))
