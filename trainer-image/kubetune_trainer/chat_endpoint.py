"""Greedy chat completions from any OpenAI-compatible endpoint, a bounded number in flight, each request recorded
with the tokens the endpoint counted and its latency: how hosted models and contenders answer the evaluation's rows."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune_trainer.data.rows import ChatMessages
from kubetune_trainer.evaluate.judge import redact

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_SECONDS = 120.0
# An endpoint needs some key string even without auth (the SDK refuses an empty one).
NO_KEY = "none"
SKIPPED = "skipped: an earlier request failed"
ERROR_LIMIT = 300


@dataclass(frozen=True)
class RequestRecord:
    """One request: the tokens the endpoint counted, how long it took, and why it failed if it did."""

    prompt_tokens: int
    completion_tokens: int
    seconds: float
    error: str | None = None


def as_chat(prompt: ChatMessages | str) -> list[ChatCompletionMessageParam]:
    """Chat prompts as they are; a rendered template prompt as one user message."""
    messages: list[Any] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages


def first_failure(records: Sequence[RequestRecord]) -> tuple[int, str] | None:
    """(index, why) of the first request that failed by itself (not skipped after another), if any."""
    return next(
        ((index, record.error) for index, record in enumerate(records) if record.error and record.error != SKIPPED),
        None,
    )


class ChatEndpoint:
    """One endpoint's client; 429, 5xx and timeouts are retried with backoff by the openai SDK (its max_retries),
    and a request that still fails is recorded with why, never raised, the key scrubbed from the message."""

    def __init__(self, client: OpenAI, api_key: str, *, concurrency: int, max_tokens: int, seed: int) -> None:
        self.client = client
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.seed = seed
        self._api_key = api_key

    @classmethod
    def connect(
        cls,
        base_url: str | None,
        api_key: str,
        *,
        max_retries: int,
        concurrency: int,
        max_tokens: int,
        seed: int,
        timeout: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
    ) -> ChatEndpoint:
        """A client of its own for base_url (None: OpenAI's API), closed by close()."""
        from openai import OpenAI

        client = OpenAI(base_url=base_url, api_key=api_key or NO_KEY, max_retries=max_retries, timeout=timeout)
        return cls(client, api_key, concurrency=concurrency, max_tokens=max_tokens, seed=seed)

    def answer(self, model: str, prompt: ChatMessages | str) -> tuple[str, RequestRecord]:
        """One greedy reply, stripped, and its record ("" and the reason when the request failed)."""
        started = time.monotonic()
        try:
            reply = self.client.chat.completions.create(
                model=model,
                messages=as_chat(prompt),
                temperature=0,
                max_completion_tokens=self.max_tokens,
                seed=self.seed,
            )
        except Exception as error:  # recorded for the caller to count or refuse
            why = redact(f"{type(error).__name__}: {error}", self._api_key)
            return "", RequestRecord(0, 0, time.monotonic() - started, why[:ERROR_LIMIT])
        seconds = time.monotonic() - started
        usage = reply.usage
        content = reply.choices[0].message.content if reply.choices else None
        return (content or "").strip(), RequestRecord(
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, seconds
        )

    def answer_all(
        self,
        model: str,
        prompts: Sequence[ChatMessages | str],
        on_done: Callable[[int], None] = lambda count: None,
        *,
        stop_on_failure: bool = False,
    ) -> tuple[list[str], list[RequestRecord]]:
        """Replies and records for every prompt, in order. With stop_on_failure, the prompts not yet sent when a
        request fails are skipped (recorded as such): a caller that refuses any failure wastes no more requests."""
        failed = threading.Event()

        def one(prompt: ChatMessages | str) -> tuple[str, RequestRecord]:
            if stop_on_failure and failed.is_set():
                return "", RequestRecord(0, 0, 0.0, SKIPPED)
            text, record = self.answer(model, prompt)
            if record.error:
                failed.set()
            on_done(1)
            return text, record

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="chat-endpoint") as pool:
            answered = list(pool.map(one, prompts))
        return [text for text, _ in answered], [record for _, record in answered]

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()
