"""The LLM judge against a real OpenAI-compatible HTTP server on loopback, through the real openai SDK."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from kubetune_trainer.judge import REDACTED, JudgeCase, LlmJudge, judge_from_environment

from kubetune.api import JudgeSpec, SecretKeyRef
from kubetune.contract import ENV_JUDGE_API_KEY
from tests.openai_double import OpenAIDouble, RecordedRequest, Reply, api_error, chat_completion

pytestmark = pytest.mark.integration

API_KEY = "sk-test-judge-key-0123456789"
CHAT = "/chat/completions"
CASES = [
    JudgeCase("What is the capital of France?", "Paris", "Paris"),
    JudgeCase("What is 2 + 2?", "4", "five"),
    JudgeCase("Name a primary colour.", "red", "Red."),
]


@pytest.fixture
def double() -> Iterator[OpenAIDouble]:
    with OpenAIDouble() as server:
        yield server


def judge_spec(
    double: OpenAIDouble, max_retries: int = 2, concurrency: int = 2, rubric: str | None = None
) -> JudgeSpec:
    return JudgeSpec(
        base_url=double.base_url,
        model="judge-model",
        api_key_secret_ref=SecretKeyRef(name="judge", key="api-key"),
        rubric=rubric,
        concurrency=concurrency,
        max_retries=max_retries,
    )


def grade_by_reference(request: RecordedRequest) -> Reply:
    """A judge that gives 100 when the prediction block repeats the reference block (case-insensitively), else 0."""
    user = request.body["messages"][-1]["content"]
    reference = user.split("<reference>\n")[1].split("\n</reference>")[0]
    prediction = user.split("<prediction>\n")[1].split("\n</prediction>")[0]
    agrees = reference.casefold() in prediction.casefold()
    verdict = {"reasoning": "matches" if agrees else "differs", "score": 100 if agrees else 0}
    return chat_completion(json.dumps(verdict), prompt_tokens=100, completion_tokens=20)


def test_normal_replies_are_scored_in_case_order_and_cost_is_summed(double: OpenAIDouble) -> None:
    double.on("POST", CHAT, grade_by_reference)
    judge = LlmJudge(judge_spec(double, rubric="Exact facts only."), API_KEY, request_timeout=5)

    run = judge.judge_cases(CASES)

    assert [verdict.score for verdict in run.verdicts] == [100.0, 0.0, 100.0]
    assert [verdict.reasoning for verdict in run.verdicts] == ["matches", "differs", "matches"]
    assert all(verdict.attempts == 1 and verdict.error is None for verdict in run.verdicts)
    assert (run.usage.prompt_tokens, run.usage.completion_tokens, run.usage.requests) == (300, 60, 3)
    sent = double.requests_to("POST", CHAT)
    assert len(sent) == 3
    first = sent[0]
    assert first.headers["authorization"] == f"Bearer {API_KEY}"
    assert first.body["model"] == "judge-model"
    assert first.body["response_format"]["type"] == "json_schema"
    assert first.body["response_format"]["json_schema"]["schema"]["required"] == ["reasoning", "score"]
    prompts = " ".join(request.body["messages"][-1]["content"] for request in sent)
    assert "Exact facts only." in prompts
    assert "<input>\nWhat is 2 + 2?\n</input>" in prompts


def test_fenced_json_and_numeric_string_scores_are_accepted(double: OpenAIDouble) -> None:
    double.enqueue("POST", CHAT, chat_completion('```json\n{"reasoning": "ok", "score": "75"}\n```'))
    judge = LlmJudge(judge_spec(double), API_KEY, request_timeout=5)

    run = judge.judge_cases(CASES[:1])

    assert run.verdicts[0].score == 75.0
    assert run.verdicts[0].reasoning == "ok"


def test_malformed_replies_are_retried_then_the_case_is_unjudged(double: OpenAIDouble) -> None:
    double.on("POST", CHAT, lambda request: chat_completion("I would give it a solid eight", 7, 3))
    judge = LlmJudge(judge_spec(double, max_retries=2, concurrency=1), API_KEY, request_timeout=5)

    run = judge.judge_cases(CASES[:1])

    verdict = run.verdicts[0]
    assert verdict.score is None and not verdict.judged
    assert verdict.attempts == 3
    assert verdict.error is not None and "malformed reply" in verdict.error
    assert len(double.requests_to("POST", CHAT)) == 3
    # Malformed replies still cost tokens.
    assert (run.usage.prompt_tokens, run.usage.completion_tokens) == (21, 9)


@pytest.mark.parametrize(
    "bad_reply",
    [
        chat_completion(None),
        chat_completion('{"reasoning": "no score"}'),
        chat_completion('{"reasoning": "too high", "score": 140}'),
        chat_completion('{"reasoning": "boolean", "score": true}'),
        chat_completion("[1, 2, 3]"),
    ],
    ids=["null-content", "no-score", "out-of-range", "boolean-score", "not-an-object"],
)
def test_a_malformed_reply_followed_by_a_good_one_is_judged_on_the_second_attempt(
    double: OpenAIDouble, bad_reply: Reply
) -> None:
    double.enqueue("POST", CHAT, bad_reply, chat_completion('{"reasoning": "fine", "score": 60}'))
    judge = LlmJudge(judge_spec(double, max_retries=1), API_KEY, request_timeout=5)

    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert (verdict.score, verdict.attempts) == (60.0, 2)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retried_until_success(double: OpenAIDouble, status: int) -> None:
    double.enqueue(
        "POST",
        CHAT,
        api_error(status, "slow down", headers={"retry-after-ms": "20"}),
        api_error(status, "slow down", headers={"retry-after-ms": "20"}),
        chat_completion('{"reasoning": "good", "score": 90}', 11, 4),
    )
    judge = LlmJudge(judge_spec(double, max_retries=3), API_KEY, request_timeout=5)

    run = judge.judge_cases(CASES[:1])

    assert run.verdicts[0].score == 90.0
    assert len(double.requests_to("POST", CHAT)) == 3
    assert (run.usage.prompt_tokens, run.usage.completion_tokens, run.usage.requests) == (11, 4, 1)


def test_a_500_without_retry_after_is_backed_off_then_succeeds(double: OpenAIDouble) -> None:
    double.enqueue("POST", CHAT, api_error(500, "boom"), chat_completion('{"reasoning": "r", "score": 10}'))
    judge = LlmJudge(judge_spec(double, max_retries=2), API_KEY, request_timeout=5)

    started = time.monotonic()
    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert verdict.score == 10.0
    # The SDK's first backoff is 0.5 s less up to 25% jitter.
    assert time.monotonic() - started >= 0.3


def test_errors_that_outlast_the_retries_leave_the_case_unjudged_without_raising(double: OpenAIDouble) -> None:
    double.on("POST", CHAT, lambda request: api_error(429, "quota", headers={"retry-after-ms": "5"}))
    judge = LlmJudge(judge_spec(double, max_retries=2), API_KEY, request_timeout=5)

    run = judge.judge_cases(CASES[:2])

    assert [verdict.score for verdict in run.verdicts] == [None, None]
    assert all(verdict.error and verdict.error.startswith("RateLimitError") for verdict in run.verdicts)
    assert len(double.requests_to("POST", CHAT)) == 6
    assert run.usage.requests == 0


def test_a_timed_out_request_is_retried(double: OpenAIDouble) -> None:
    double.enqueue(
        "POST",
        CHAT,
        Reply(body={"late": True}, delay_seconds=2.0),
        chat_completion('{"reasoning": "in time", "score": 55}'),
    )
    judge = LlmJudge(judge_spec(double, max_retries=1), API_KEY, request_timeout=0.3)

    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert (verdict.score, verdict.reasoning) == (55.0, "in time")
    assert len(double.requests_to("POST", CHAT)) == 2


def test_a_judge_that_always_times_out_leaves_the_case_unjudged(double: OpenAIDouble) -> None:
    double.on("POST", CHAT, lambda request: Reply(body={"late": True}, delay_seconds=1.0))
    judge = LlmJudge(judge_spec(double, max_retries=0), API_KEY, request_timeout=0.2)

    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert verdict.score is None
    assert verdict.error is not None and verdict.error.startswith("APITimeoutError")


def test_concurrency_is_bounded_by_the_spec(double: OpenAIDouble) -> None:
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def slow_grade(request: RecordedRequest) -> Reply:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.15)
        with lock:
            in_flight -= 1
        return chat_completion('{"reasoning": "r", "score": 50}')

    double.on("POST", CHAT, slow_grade)
    judge = LlmJudge(judge_spec(double, concurrency=2), API_KEY, request_timeout=5)
    progress: list[tuple[int, int]] = []

    run = judge.judge_cases(CASES * 2, progress=lambda done, total: progress.append((done, total)))

    assert all(verdict.score == 50.0 for verdict in run.verdicts)
    assert most == 2
    assert progress[-1] == (6, 6) and len(progress) == 6


def test_the_api_key_never_appears_in_logs_or_errors(double: OpenAIDouble, caplog: pytest.LogCaptureFixture) -> None:
    def echo_authorization(request: RecordedRequest) -> Reply:
        # A hostile server that echoes the credentials back in its error body.
        return api_error(500, f"bad credentials: {request.headers.get('authorization')}", {"retry-after-ms": "1"})

    double.on("POST", CHAT, echo_authorization)
    double.enqueue("POST", "/chat/completions", chat_completion(f"not json, key {API_KEY}"))
    caplog.set_level(logging.DEBUG)
    judge = LlmJudge(judge_spec(double, max_retries=1, concurrency=1), API_KEY, request_timeout=5)

    run = judge.judge_cases(CASES[:2])

    assert [verdict.score for verdict in run.verdicts] == [None, None]
    errors = " ".join(verdict.error or "" for verdict in run.verdicts)
    assert REDACTED in errors
    assert API_KEY not in errors
    assert "judge case left unjudged" in caplog.text
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(judge)


def test_judge_from_environment_needs_the_key_and_names_the_secret(double: OpenAIDouble) -> None:
    spec = judge_spec(double)
    with pytest.raises(ValueError, match=rf"{ENV_JUDGE_API_KEY} is empty.*secret 'judge', key 'api-key'"):
        judge_from_environment(spec, environ={})
    double.enqueue("POST", CHAT, chat_completion('{"reasoning": "r", "score": 30}'))

    judge = judge_from_environment(spec, environ={ENV_JUDGE_API_KEY: API_KEY}, request_timeout=5)

    assert judge.judge_cases(CASES[:1]).verdicts[0].score == 30.0
    assert double.requests_to("POST", CHAT)[0].headers["authorization"] == f"Bearer {API_KEY}"
