"""An LLM judge behind any OpenAI-compatible endpoint: grades each prediction 0-100 against the reference.

Failures never escape: 429, 5xx, timeouts and connection errors are retried with backoff by the openai SDK
(`max_retries`), malformed replies are retried here up to `max_retries` times, and a case that still has no valid
verdict is marked unjudged. Every attempt's tokens count towards the judge cost. The API key is passed to the SDK
only; every message this module logs or stores is scrubbed of it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetune.api import JudgeSpec
from kubetune.contract import ENV_JUDGE_API_KEY
from kubetune_trainer.evaluate.scoring import parse_json_output

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam
    from openai.types.shared_params import ResponseFormatJSONSchema

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = (
    "Score how well the prediction answers the input, using the reference as the correct answer. "
    "100: same meaning and facts as the reference, in the requested format. 50: partly right, or right but in the "
    "wrong format. 0: wrong, missing or irrelevant."
)
SYSTEM_PROMPT = (
    "You are a strict, consistent grader of model outputs. Reply with JSON only: "
    '{"reasoning": "<one or two sentences>", "score": <integer 0-100>}.'
)
VERDICT_SCHEMA: ResponseFormatJSONSchema = {
    "type": "json_schema",
    "json_schema": {
        "name": "judgement",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "reasoning": {"type": "string", "description": "Why the score, in one or two sentences."},
                "score": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["reasoning", "score"],
            "additionalProperties": False,
        },
    },
}
# What the judge asks the endpoint for, strictest first. Not every OpenAI-compatible server takes a JSON schema
# (llama.cpp's server answers json_schema with HTTP 500 but constrains json_object to a schema given beside it; some
# take neither): a refused format is dropped for the next, and every reply is validated whatever the format.
RESPONSE_FORMATS: tuple[tuple[str, Any], ...] = (
    ("json_schema", VERDICT_SCHEMA),
    ("json_object with schema", {"type": "json_object", "schema": VERDICT_SCHEMA["json_schema"]["schema"]}),
    ("json_object", {"type": "json_object"}),
    ("text", None),
)
# Statuses with which a server refuses a request it cannot serve as asked (rather than the caller or the load).
FORMAT_REFUSED_STATUSES = frozenset({400, 422, 500, 501})
DEFAULT_REQUEST_TIMEOUT_SECONDS = 60.0
REDACTED = "***"


class MalformedVerdictError(ValueError):
    """A judge reply that is not a JSON object with a 0-100 score."""


@dataclass(frozen=True)
class JudgeCase:
    """What the judge sees: the model's input, the reference answer and the prediction to grade."""

    input_text: str
    reference: str
    prediction: str


@dataclass(frozen=True)
class Verdict:
    """A grade (None when unjudged), the judge's reasoning, attempts made, and why it failed if it did."""

    score: float | None
    reasoning: str = ""
    attempts: int = 0
    error: str | None = None

    @property
    def judged(self) -> bool:
        """Whether the judge returned a valid score."""
        return self.score is not None


@dataclass
class TokenUsage:
    """Tokens and successful requests summed over every attempt, safe to add to from several threads."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one reply."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.requests += 1


@dataclass(frozen=True)
class JudgeRun:
    """The verdicts, in the order of the cases, what they cost, and the response format the endpoint took."""

    verdicts: list[Verdict]
    usage: TokenUsage
    response_format: str = RESPONSE_FORMATS[0][0]


def refuses_the_format(error: Exception) -> bool:
    """Whether an API error reads as the server refusing the request's form (not auth, quota, load or a timeout)."""
    from openai import APIStatusError

    return isinstance(error, APIStatusError) and error.status_code in FORMAT_REFUSED_STATUSES


def redact(text: str, secret: str) -> str:
    """The text with every occurrence of the secret replaced."""
    return text.replace(secret, REDACTED) if secret else text


def judge_messages(case: JudgeCase, rubric: str | None) -> list[ChatCompletionMessageParam]:
    """The chat messages for one case: the rubric, then input, reference and prediction in labelled blocks."""
    user = (
        f"Rubric:\n{rubric or DEFAULT_RUBRIC}\n\n"
        f"<input>\n{case.input_text}\n</input>\n\n"
        f"<reference>\n{case.reference}\n</reference>\n\n"
        f"<prediction>\n{case.prediction}\n</prediction>\n\n"
        "Grade the prediction."
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(content: str | None) -> tuple[float, str]:
    """(score, reasoning) from a reply; MalformedVerdictError unless it is a JSON object with a 0-100 score.

    Accepts JSON in a ``` fence and a numeric string score, since not every compatible server enforces the schema.
    """
    if content is None or not content.strip():
        raise MalformedVerdictError("empty reply")
    ok, value = parse_json_output(content)
    if not ok or not isinstance(value, dict):
        raise MalformedVerdictError(f"not a JSON object: {content[:120]!r}")
    raw = value.get("score")
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise MalformedVerdictError(f"score missing or not a number: {raw!r}")
    try:
        score = float(raw)
    except ValueError as error:
        raise MalformedVerdictError(f"score is not a number: {raw!r}") from error
    if math.isnan(score) or not 0 <= score <= 100:
        raise MalformedVerdictError(f"score {raw!r} is outside 0-100")
    reasoning = value.get("reasoning")
    return score, reasoning if isinstance(reasoning, str) else ""


class LlmJudge:
    """Grades cases through the openai SDK with bounded concurrency."""

    def __init__(self, spec: JudgeSpec, api_key: str, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SECONDS) -> None:
        from openai import OpenAI

        self.spec = spec
        self._api_key = api_key
        self._format = 0  # index into RESPONSE_FORMATS, shared by the worker threads
        self._format_lock = threading.Lock()
        self._client: OpenAI = OpenAI(
            base_url=spec.base_url, api_key=api_key, max_retries=spec.max_retries, timeout=request_timeout
        )

    def __repr__(self) -> str:
        return f"LlmJudge(model={self.spec.model!r}, base_url={self.spec.base_url!r})"

    @property
    def response_format(self) -> str:
        """The response format the endpoint takes (the strictest one not refused so far)."""
        return RESPONSE_FORMATS[self._format][0]

    def request_verdict(self, case: JudgeCase, usage: TokenUsage) -> str | None:
        """One chat completion asking for a verdict; its tokens are added to usage; the reply's text returned.

        A response format the server refuses is dropped for the next one, for this and every later case."""
        while True:
            index = self._format
            try:
                return self._complete(case, RESPONSE_FORMATS[index][1], usage)
            except Exception as error:
                if not refuses_the_format(error) or index + 1 == len(RESPONSE_FORMATS):
                    raise
                with self._format_lock:
                    if self._format == index:
                        self._format = index + 1
                        log.warning(
                            "the judge endpoint refused response_format %s (%s); asking for %s instead",
                            RESPONSE_FORMATS[index][0],
                            redact(f"{type(error).__name__}: {error}", self._api_key)[:200],
                            RESPONSE_FORMATS[index + 1][0],
                        )

    def _complete(self, case: JudgeCase, response_format: Any, usage: TokenUsage) -> str | None:
        extra: dict[str, Any] = {} if response_format is None else {"response_format": response_format}
        reply = self._client.chat.completions.create(
            model=self.spec.model,
            messages=judge_messages(case, self.spec.rubric),
            temperature=0,
            **extra,
        )
        tokens = reply.usage
        usage.add(tokens.prompt_tokens if tokens else 0, tokens.completion_tokens if tokens else 0)
        return reply.choices[0].message.content if reply.choices else None

    def judge_case(self, case: JudgeCase, usage: TokenUsage) -> Verdict:
        """One verdict: malformed replies retried up to max_retries times, then unjudged; never raises."""
        attempts = 0
        while True:
            attempts += 1
            try:
                content = self.request_verdict(case, usage)
            except Exception as failure:  # one failed case must never fail the evaluation
                # The SDK has already retried 429/5xx/timeouts with backoff; more tries here would multiply that.
                error = redact(f"{type(failure).__name__}: {failure}", self._api_key)
                break
            try:
                score, reasoning = parse_verdict(content)
            except MalformedVerdictError as malformed:
                error = redact(f"malformed reply: {malformed}", self._api_key)
                log.info("judge reply malformed (attempt %d of %d): %s", attempts, self.spec.max_retries + 1, error)
                if attempts > self.spec.max_retries:
                    break
                continue
            return Verdict(score=score, reasoning=reasoning, attempts=attempts)
        log.warning("judge case left unjudged after %d attempt(s): %s", attempts, error)
        return Verdict(score=None, attempts=attempts, error=error)

    def judge_cases(self, cases: Sequence[JudgeCase], progress: Callable[[int, int], None] | None = None) -> JudgeRun:
        """Verdicts for every case, at most `concurrency` requests in flight; progress(done, total) as they finish."""
        usage = TokenUsage()
        done = 0
        lock = threading.Lock()

        def grade(case: JudgeCase) -> Verdict:
            nonlocal done
            verdict = self.judge_case(case, usage)
            if progress is not None:
                with lock:
                    done += 1
                    progress(done, len(cases))
            return verdict

        with ThreadPoolExecutor(max_workers=self.spec.concurrency, thread_name_prefix="judge") as pool:
            verdicts = list(pool.map(grade, cases))
        return JudgeRun(verdicts=verdicts, usage=usage, response_format=self.response_format)

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()


def judge_from_environment(
    spec: JudgeSpec,
    environ: Mapping[str, str] | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
) -> LlmJudge:
    """A judge whose API key comes from KUBETUNE_JUDGE_API_KEY (set by the operator from apiKeySecretRef)."""
    env = os.environ if environ is None else environ
    api_key = env.get(ENV_JUDGE_API_KEY, "")
    if not api_key:
        raise ValueError(
            f"evaluation.judge is set but {ENV_JUDGE_API_KEY} is empty: the operator fills it from "
            f"evaluation.judge.apiKeySecretRef (secret {spec.api_key_secret_ref.name!r}, "
            f"key {spec.api_key_secret_ref.key!r})"
        )
    return LlmJudge(spec, api_key, request_timeout)
