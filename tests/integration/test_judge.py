"""The LLM judge against llama.cpp's real OpenAI-compatible server, through the real openai SDK, with rate limits,
server errors, hung connections and mangled replies injected on the wire by a proxy in front of it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from kubetune_trainer.evaluate.judge import REDACTED, JudgeCase, LlmJudge, Verdict, judge_from_environment

from kubetune.api import JudgeSpec, SecretKeyRef
from kubetune.contract import ENV_JUDGE_API_KEY
from tests.testbed.fault_proxy import Fault, FaultProxy
from tests.testbed.llama_server import LlamaServer
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.integration

CASES = [
    JudgeCase("What is the capital of France?", "Paris", "Paris"),
    JudgeCase("What is 2 + 2?", "4", "five"),
    JudgeCase("Name a primary colour.", "red", "Red."),
]
# Generous for one short reply of a 135M model on a busy 2-core machine; a hung connection outlasts it.
REQUEST_TIMEOUT = 20.0
HANG = REQUEST_TIMEOUT + 5
RETRY_SOON = {"retry-after-ms": "20"}


@pytest.fixture
def proxy(llama_server: LlamaServer) -> Iterator[FaultProxy]:
    with FaultProxy(llama_server.base_url) as proxy:
        yield proxy


def judge_spec(
    proxy: FaultProxy, server: LlamaServer, max_retries: int = 2, concurrency: int = 2, rubric: str | None = None
) -> JudgeSpec:
    return JudgeSpec(
        base_url=proxy.base_url,
        model=server.model,
        api_key_secret_ref=SecretKeyRef(name="judge", key="api-key"),
        rubric=rubric,
        concurrency=concurrency,
        max_retries=max_retries,
    )


def warmed_judge(proxy: FaultProxy, server: LlamaServer, **spec: int) -> tuple[LlmJudge, Verdict]:
    """A judge that has graded CASES[0] once, without faults: it has found the response format the server takes
    (llama.cpp refuses json_schema), so the faults queued next meet the requests the test is about. At temperature
    0 the server grades that case the same way again."""
    judge = LlmJudge(judge_spec(proxy, server, **spec), server.api_key, request_timeout=REQUEST_TIMEOUT)
    first = judge.judge_cases(CASES[:1]).verdicts[0]
    assert first.judged, f"the server's grade of a plain case did not parse: {first.error}"
    return judge, first


def test_every_case_gets_a_grade_or_a_reason_and_the_cost_is_the_servers_token_count(
    proxy: FaultProxy, llama_server: LlamaServer
) -> None:
    judge = LlmJudge(
        judge_spec(proxy, llama_server, rubric="Exact facts only."), llama_server.api_key, request_timeout=60
    )

    run = judge.judge_cases(CASES)

    assert len(run.verdicts) == len(CASES)
    assert sum(verdict.judged for verdict in run.verdicts) >= 2
    for verdict in run.verdicts:
        assert verdict.judged or (verdict.error or "").startswith("malformed reply")
        assert verdict.score is None or 0 <= verdict.score <= 100
    # The real server refused json_schema (HTTP 500, retried by the SDK), and the judge took the next format.
    assert run.response_format == "json_object with schema"
    sent = proxy.exchanges()
    assert sent[0].body["response_format"]["type"] == "json_schema" and sent[0].status == 500
    assert sent[-1].body["response_format"]["type"] == "json_object"
    assert all(exchange.authorization == f"Bearer {llama_server.api_key}" for exchange in sent)
    assert all(exchange.body["model"] == llama_server.model for exchange in sent)
    prompts = " ".join(exchange.body["messages"][-1]["content"] for exchange in sent)
    assert "Exact facts only." in prompts
    assert "<input>\nWhat is 2 + 2?\n</input>" in prompts
    served = proxy.served_usage()
    assert served[0] > 0 and served[1] > 0
    assert (run.usage.prompt_tokens, run.usage.completion_tokens, run.usage.requests) == served


@pytest.mark.parametrize(
    "bad_content",
    [None, '{"reasoning": "no score"}', '{"reasoning": "too high", "score": 140}', '{"score": true}', "[1, 2, 3]"],
    ids=["null-content", "no-score", "out-of-range", "boolean-score", "not-an-object"],
)
def test_a_mangled_reply_is_asked_again_and_graded_on_the_second_attempt(
    proxy: FaultProxy, llama_server: LlamaServer, bad_content: str | None
) -> None:
    judge, first = warmed_judge(proxy, llama_server, max_retries=1)
    proxy.inject(Fault.mangle(bad_content))

    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert (verdict.score, verdict.attempts) == (first.score, 2)


def test_replies_that_stay_malformed_leave_the_case_unjudged_and_still_cost_tokens(
    proxy: FaultProxy, llama_server: LlamaServer
) -> None:
    judge, _ = warmed_judge(proxy, llama_server, max_retries=2, concurrency=1)
    proxy.inject(*[Fault.mangle("I would give it a solid eight")] * 3)
    before = proxy.served_usage()

    run = judge.judge_cases(CASES[:1])

    verdict = run.verdicts[0]
    assert verdict.score is None and not verdict.judged
    assert verdict.attempts == 3
    assert verdict.error is not None and "malformed reply" in verdict.error
    after = proxy.served_usage()
    assert (run.usage.prompt_tokens, run.usage.completion_tokens, run.usage.requests) == tuple(
        b - a for a, b in zip(before, after, strict=True)
    )
    assert run.usage.requests == 3 and run.usage.prompt_tokens > 0


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retried_until_the_server_answers(
    proxy: FaultProxy, llama_server: LlamaServer, status: int
) -> None:
    judge, first = warmed_judge(proxy, llama_server, max_retries=3)
    proxy.inject(Fault(status=status, headers=RETRY_SOON), Fault(status=status, headers=RETRY_SOON))
    before = len(proxy.exchanges())

    run = judge.judge_cases(CASES[:1])

    assert run.verdicts[0].score == first.score
    assert [exchange.status for exchange in proxy.exchanges()[before:]] == [status, status, 200]
    assert run.usage.requests == 1 and run.usage.prompt_tokens > 0
    # A transient 500 retried to success is not taken for a refused format.
    assert run.response_format == "json_object with schema"


def test_a_500_without_retry_after_is_backed_off_then_answered(proxy: FaultProxy, llama_server: LlamaServer) -> None:
    judge, first = warmed_judge(proxy, llama_server, max_retries=2)
    proxy.inject(Fault(status=500))

    started = time.monotonic()
    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert verdict.score == first.score
    # The SDK's first backoff is 0.5 s less up to 25% jitter.
    assert time.monotonic() - started >= 0.3


def test_errors_that_outlast_the_retries_leave_the_cases_unjudged_without_raising(
    proxy: FaultProxy, llama_server: LlamaServer
) -> None:
    judge, _ = warmed_judge(proxy, llama_server, max_retries=2)
    proxy.inject(*[Fault(status=429, message="quota", headers={"retry-after-ms": "5"})] * 6)
    before = len(proxy.exchanges())

    run = judge.judge_cases(CASES[:2])

    assert [verdict.score for verdict in run.verdicts] == [None, None]
    assert all(verdict.error and verdict.error.startswith("RateLimitError") for verdict in run.verdicts)
    assert [exchange.status for exchange in proxy.exchanges()[before:]] == [429] * 6
    assert run.usage.requests == 0


def test_a_hung_request_times_out_and_is_retried(proxy: FaultProxy, llama_server: LlamaServer) -> None:
    judge, first = warmed_judge(proxy, llama_server, max_retries=1)
    proxy.inject(Fault(hang_seconds=HANG))
    before = len(proxy.exchanges())

    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert verdict.score == first.score
    # The hung exchange is recorded when the proxy lets it go, after the retry that answered.
    wait_for(lambda: len(proxy.exchanges()) == before + 2, HANG, "the proxy to let the hung request go")
    assert sorted(exchange.status for exchange in proxy.exchanges()[before:]) == [0, 200]


def test_a_judge_that_always_hangs_leaves_the_case_unjudged(proxy: FaultProxy, llama_server: LlamaServer) -> None:
    judge, _ = warmed_judge(proxy, llama_server, max_retries=0)
    proxy.inject(Fault(hang_seconds=HANG))

    verdict = judge.judge_cases(CASES[:1]).verdicts[0]

    assert verdict.score is None
    assert verdict.error is not None and verdict.error.startswith("APITimeoutError")


def test_concurrency_is_bounded_by_the_spec(proxy: FaultProxy, llama_server: LlamaServer) -> None:
    judge = LlmJudge(judge_spec(proxy, llama_server, concurrency=2), llama_server.api_key, request_timeout=60)
    progress: list[tuple[int, int]] = []

    run = judge.judge_cases(CASES * 2, progress=lambda done, total: progress.append((done, total)))

    assert len(run.verdicts) == 6
    # The server answers one request at a time, so two judge threads keep two requests waiting at the proxy.
    assert proxy.most_in_flight == 2
    assert progress[-1] == (6, 6) and len(progress) == 6


def test_the_api_key_never_appears_in_logs_or_errors(
    proxy: FaultProxy, llama_server: LlamaServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = llama_server.api_key
    judge, _ = warmed_judge(proxy, llama_server, max_retries=1, concurrency=1)
    # A hostile endpoint echoes the credentials in its errors and in its replies.
    proxy.inject(
        *[Fault(status=429, echo_authorization=True, headers={"retry-after-ms": "1"})] * 2,
        *[Fault.mangle(f"not json, key {key}")] * 2,
    )
    caplog.set_level(logging.DEBUG)

    run = judge.judge_cases(CASES[:2])

    assert [verdict.score for verdict in run.verdicts] == [None, None]
    errors = " ".join(verdict.error or "" for verdict in run.verdicts)
    assert REDACTED in errors
    assert key not in errors
    assert "judge case left unjudged" in caplog.text
    assert key not in caplog.text
    assert key not in repr(judge)


def test_judge_from_environment_needs_the_key_and_names_the_secret(
    proxy: FaultProxy, llama_server: LlamaServer
) -> None:
    spec = judge_spec(proxy, llama_server)
    with pytest.raises(ValueError, match=rf"{ENV_JUDGE_API_KEY} is empty.*secret 'judge', key 'api-key'"):
        judge_from_environment(spec, environ={})

    judge = judge_from_environment(spec, environ={ENV_JUDGE_API_KEY: llama_server.api_key}, request_timeout=60)

    assert judge.judge_cases(CASES[:1]).verdicts[0].attempts >= 1
    assert proxy.exchanges()[-1].status == 200
    assert proxy.exchanges()[0].authorization == f"Bearer {llama_server.api_key}"
