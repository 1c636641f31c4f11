"""The LLM judge and the hosted backend's evaluation against a real OpenAI-compatible model server: llama.cpp's,
serving SmolLM2-135M-Instruct. Real generation, real token usage, real malformed output, and a server that refuses the
`json_schema` response format."""

from __future__ import annotations

import logging

import pytest
from kubetune_trainer.backends.hosted.evaluation import HostedModels, run_hosted_evaluation
from kubetune_trainer.chat_endpoint import ChatEndpoint
from kubetune_trainer.data.rows import Example
from kubetune_trainer.evaluate.judge import RESPONSE_FORMATS, JudgeCase, LlmJudge
from kubetune_trainer.evaluate.runner import EvaluationInputError

from kubetune.api import EvaluationSpec, JudgeSpec, SecretKeyRef
from tests.testbed.fault_proxy import Fault, FaultProxy
from tests.testbed.llama_server import LlamaServer

pytestmark = pytest.mark.integration

CASES = [
    JudgeCase("What is the capital of France?", "Paris", "Paris"),
    JudgeCase("What is 2 + 2?", "4", "five"),
    JudgeCase("Name a primary colour.", "red", "Red."),
    JudgeCase("Which planet is called the red planet?", "Mars", "Jupiter"),
]


def judge_spec(server: LlamaServer, max_retries: int = 1) -> JudgeSpec:
    return JudgeSpec(
        base_url=server.base_url,
        model=server.model,
        api_key_secret_ref=SecretKeyRef(name="judge", key="api-key"),
        concurrency=2,
        max_retries=max_retries,
    )


def test_the_judge_falls_back_from_json_schema_and_grades_with_real_tokens(
    llama_server: LlamaServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubetune_trainer.evaluate.judge")
    judge = LlmJudge(judge_spec(llama_server), llama_server.api_key, request_timeout=60)
    try:
        run = judge.judge_cases(CASES)
    finally:
        judge.close()

    # llama.cpp's server answers `json_schema` with HTTP 500; it constrains `json_object` to a schema given beside it.
    assert run.response_format == "json_object with schema"
    assert "refused response_format json_schema" in caplog.text
    # Real generation: every request is counted with the tokens the server reported.
    assert run.usage.requests >= len(CASES)
    assert run.usage.prompt_tokens > 100 * len(CASES)  # the rubric and the case alone are that long
    assert run.usage.completion_tokens > 0
    # A schema-constrained reply parses; its score must still lie in 0-100 (the grammar does not bound integers), or the
    # case is retried and then left unjudged with the reason.
    for verdict in run.verdicts:
        if verdict.judged:
            assert verdict.score is not None and 0 <= verdict.score <= 100
        else:
            assert verdict.error and verdict.error.startswith("malformed reply: score")
    assert sum(verdict.judged for verdict in run.verdicts) >= len(CASES) // 2
    assert llama_server.api_key not in caplog.text


def test_free_text_replies_of_a_small_model_are_validated_and_counted(llama_server: LlamaServer) -> None:
    # An endpoint that takes no response format at all: the judge asks in words, and what a 135M model writes back
    # is parsed and validated like any reply; what does not parse is retried, then left unjudged with the reason.
    judge = LlmJudge(judge_spec(llama_server, max_retries=0), llama_server.api_key, request_timeout=60)
    judge._format = len(RESPONSE_FORMATS) - 1  # as if every stricter format had been refused
    try:
        run = judge.judge_cases(CASES)
    finally:
        judge.close()

    assert run.response_format == "text"
    assert run.usage.requests == len(CASES)
    for verdict in run.verdicts:
        assert verdict.attempts == 1
        assert verdict.judged or (verdict.error or "").startswith("malformed reply")


def test_a_wrong_key_leaves_every_case_unjudged_naming_the_refusal_not_the_key(llama_server: LlamaServer) -> None:
    wrong = "sk-wrong-key-for-the-judge-0123"
    judge = LlmJudge(judge_spec(llama_server, max_retries=0), wrong, request_timeout=30)
    try:
        run = judge.judge_cases(CASES[:2])
    finally:
        judge.close()

    assert not any(verdict.judged for verdict in run.verdicts)
    for verdict in run.verdicts:
        assert verdict.error and "AuthenticationError" in verdict.error and "401" in verdict.error
        assert wrong not in verdict.error
    # 401 is the caller's fault, not the format's: the judge did not fall back.
    assert run.response_format == "json_schema"


def test_the_hosted_evaluation_scores_chat_completions_of_a_real_server(llama_server: LlamaServer) -> None:
    from openai import OpenAI

    labels = ["Business", "Sports"]
    rows = [
        ("Shares fell after the bank cut its forecast.", "Business"),
        ("The striker scored twice in the cup final.", "Sports"),
        ("Oil prices rose as supply tightened.", "Business"),
    ]
    examples = [
        Example([{"role": "user", "content": f"Label as Business or Sports: {text}"}], label, text, line)
        for line, (text, label) in enumerate(rows, 1)
    ]
    client = OpenAI(base_url=llama_server.base_url, api_key=llama_server.api_key, max_retries=0, timeout=60)
    endpoint = ChatEndpoint(client, llama_server.api_key, concurrency=2, max_tokens=4, seed=7)
    spec = EvaluationSpec(metrics=["accuracy"], baselines=["zeroShot", "retrievalFewShot"], few_shot_k=1)
    progress: list[tuple[int, int]] = []

    results = run_hosted_evaluation(
        endpoint,
        HostedModels(tuned=llama_server.model, base=llama_server.model),
        examples,
        examples,
        spec,
        dataset_format="classification",
        labels=labels,
        progress=lambda done, total: progress.append((done, total)),
    )
    client.close()

    assert list(results.models) == ["tuned", "zeroShot", "retrievalFewShot"]
    for name, result in results.models.items():
        assert len(result.outputs) == 3 and all(isinstance(output, str) for output in result.outputs), name
        assert 0.0 <= result.metrics["accuracy"] <= 1.0 and "unparsed" in result.metrics, name
    # The tuned and zero-shot entries are the same model and prompt here, and replies are greedy: the same answers.
    assert results.models["tuned"].outputs == results.models["zeroShot"].outputs
    assert progress[-1] == (9, 9)
    # Every arm's serving cost, from the server's own token counts and the measured latency.
    assert list(results.serving) == ["tuned", "zeroShot", "retrievalFewShot"]
    for name, cost in results.serving.items():
        assert (cost.requests, cost.failed) == (3, 0), name
        assert cost.prompt_tokens_mean > 0 and cost.latency_p50_seconds is not None, name
        assert cost.cost_per_1k_requests is None, name  # no prices given for a hosted model
    retrieved, bare = results.serving["retrievalFewShot"], results.serving["zeroShot"]
    assert retrieved.prompt_tokens_mean > bare.prompt_tokens_mean


def test_a_failed_request_of_the_job_s_own_model_fails_the_evaluation_naming_the_line_and_sends_no_more(
    llama_server: LlamaServer,
) -> None:
    from openai import OpenAI

    examples = [Example([{"role": "user", "content": f"Say {word}."}], word, word, line) for line, word in
                enumerate(["yes", "no", "maybe", "later"], 11)]  # fmt: skip
    with FaultProxy(llama_server.base_url) as proxy:
        client = OpenAI(base_url=proxy.base_url, api_key=llama_server.api_key, max_retries=1, timeout=60)
        endpoint = ChatEndpoint(client, llama_server.api_key, concurrency=1, max_tokens=4, seed=7)
        proxy.inject(*[Fault(status=503, message="overloaded", headers={"retry-after-ms": "1"})] * 2)
        spec = EvaluationSpec(metrics=["exactMatch"], baselines=[])

        with pytest.raises(EvaluationInputError) as refused:
            run_hosted_evaluation(
                endpoint, HostedModels(tuned="ft:model", base=llama_server.model), examples, examples, spec,
                dataset_format="prompt-completion",
            )  # fmt: skip
        client.close()

    assert str(refused.value).startswith("tuned model ft:model: InternalServerError: Error code: 503")
    assert str(refused.value).endswith("on validation line 11")
    # The first row's request and its one retry; the rows after it were never sent.
    assert [exchange.status for exchange in proxy.exchanges()] == [503, 503]
