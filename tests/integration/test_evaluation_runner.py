"""The evaluation runner on a tiny random Llama with a real LoRA adapter: tuned vs zero-shot and few-shot baselines."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.data.formats import classification_instruction, few_shot_prompt, select_shots
from kubetune_trainer.data.rows import Example
from kubetune_trainer.evaluate import in_process as evaluation
from kubetune_trainer.evaluate.gate import evaluate_gate
from kubetune_trainer.evaluate.in_process import (
    EvaluationInputError,
    completion_loss,
    completion_token_ids,
    generate_outputs,
    pad_id,
    prompt_token_ids,
    run_evaluation,
    shared_prefix_length,
)
from kubetune_trainer.evaluate.judge import LlmJudge
from kubetune_trainer.evaluate.report import evaluation_status, write_report
from kubetune_trainer.evaluate.retrieval import retrieved_shots
from kubetune_trainer.evaluate.runner import styled_prompts
from kubetune_trainer.evaluate.scoring import parse_label

from kubetune.api import ContenderSpec, EvaluationSpec, GateSpec, JudgeSpec, SecretKeyRef, significant
from kubetune.contract import contender_api_key_env
from tests.testbed.fault_proxy import FaultProxy
from tests.testbed.llama_server import LlamaServer
from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.integration

LABELS = ["Business", "Sci/Tech", "Sports", "World"]
TEXTS = [
    ("Stocks rallied as oil prices fell.", "Business"),
    ("The team won the championship after a late goal.", "Sports"),
    ("A new chip doubles battery life in phones.", "Sci/Tech"),
    ("Leaders met at the summit to discuss the ceasefire.", "World"),
    ("The central bank raised interest rates again.", "Business"),
    ("Striker signs a record contract with the club.", "Sports"),
    ("Researchers map the genome of a rare orchid.", "Sci/Tech"),
    ("Floods displace thousands in the river delta.", "World"),
]


def chat_example(text: str, label: str, line: int) -> Example:
    return Example([{"role": "user", "content": classification_instruction(LABELS, text)}], label, text, line)


VALIDATION = [chat_example(text, label, line) for line, (text, label) in enumerate(TEXTS[:6], start=1)]
TRAIN = [chat_example(text, label, 100 + line) for line, (text, label) in enumerate(TEXTS[2:], start=1)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer")
    return build_tiny_llama(root / "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def plain_llama(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def peft_model(model_dir: Path) -> Any:
    """The base with a LoRA adapter whose B matrices are random too, so the adapter changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(plain_llama(model_dir), config)


@pytest.fixture
def spec() -> EvaluationSpec:
    return EvaluationSpec(few_shot_k=2, max_samples=5, batch_size=3, max_new_tokens=6)


def test_tuned_and_both_baselines_are_scored_and_reported(
    peft_model: Any, tokenizer: Any, spec: EvaluationSpec, tmp_path: Path
) -> None:
    progress: list[tuple[int, int]] = []

    results = run_evaluation(
        peft_model,
        tokenizer,
        VALIDATION,
        TRAIN,
        spec,
        dataset_format="classification",
        labels=LABELS,
        progress=lambda done, total: progress.append((done, total)),
    )

    assert list(results.models) == ["tuned", "zeroShot", "fewShot"]
    assert results.headline_metric == "accuracy"
    assert [sample.line for sample in results.samples] == [1, 2, 3, 4, 5]
    for name, result in results.models.items():
        assert len(result.outputs) == 5, name
        parsed = [parse_label(output, LABELS) for output in result.outputs]
        correct = sum(label == sample.reference for label, sample in zip(parsed, results.samples, strict=True))
        assert result.metrics["accuracy"] == pytest.approx(correct / 5), name
        assert {"macroF1", "weightedF1", "unparsed"} <= set(result.metrics), name
        assert result.confusion is not None and sum(map(sum, result.confusion.matrix)) == 5
        assert [score["prediction"] for score in result.sample_scores] == parsed
    for name in ("tuned", "zeroShot"):
        loss = results.models[name].metrics["loss"]
        assert loss > 0
        assert results.models[name].metrics["perplexity"] == pytest.approx(math.exp(loss))
    assert "loss" not in results.models["fewShot"].metrics
    # The random adapter moves the loss: the tuned and base models are really different models here.
    assert results.models["tuned"].metrics["loss"] != pytest.approx(results.models["zeroShot"].metrics["loss"])
    assert set(results.seconds) == {"tuned", "zeroShot", "fewShot", "loss", "total"}
    # Generation for three models plus a loss pass for two, 5 samples each, reported batch by batch.
    assert progress[-1] == (25, 25)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)

    gate = evaluate_gate(GateSpec(metric="loss", must_beat=["zeroShot"]), results.metric_tables())
    files = write_report(tmp_path, results, gate)
    report = json.loads(files.report_json.read_text())
    assert set(report["models"]) == {"tuned", "zeroShot", "fewShot"}
    assert report["lift"]["zeroShot"]["loss"] == pytest.approx(
        results.models["tuned"].metrics["loss"] - results.models["zeroShot"].metrics["loss"]
    )
    rows = [json.loads(line) for line in files.predictions.read_text().splitlines()]
    assert [row["outputs"]["fewShot"] for row in rows] == results.models["fewShot"].outputs
    assert "| accuracy |" in files.report_markdown.read_text()
    assert files.chart is not None and files.chart.stat().st_size > 0
    status = evaluation_status(results, gate)
    assert (status.metric, status.samples, set(status.baselines)) == ("accuracy", 5, {"zeroShot", "fewShot"})


def test_retrieval_few_shot_prompts_each_row_with_its_nearest_train_rows(peft_model: Any, tokenizer: Any) -> None:
    spec = EvaluationSpec(
        baselines=["zeroShot", "retrievalFewShot"], few_shot_k=2, max_samples=5, batch_size=3, max_new_tokens=6
    )

    results = run_evaluation(
        peft_model, tokenizer, VALIDATION, TRAIN, spec, dataset_format="classification", labels=LABELS
    )

    assert list(results.models) == ["tuned", "zeroShot", "retrievalFewShot"]
    retrieval = results.models["retrievalFewShot"]
    assert len(retrieval.outputs) == 5 and "accuracy" in retrieval.metrics
    # Rows 3-5 are also train rows: each gets two shots, never itself, and its prompt holds them before the question.
    nearest = retrieved_shots(TRAIN, VALIDATION[:5], 2)
    prompts = styled_prompts("retrievalFewShot", VALIDATION[:5], TRAIN, spec, seed=42)
    for example, shots, prompt in zip(VALIDATION[:5], nearest, prompts, strict=True):
        assert len(shots) == 2
        assert all(shot.input_text != example.input_text for shot in shots)
        assert prompt == few_shot_prompt(example, shots)
    assert len({str(prompt) for prompt in prompts}) == 5


def test_baselines_with_the_adapter_disabled_equal_a_model_without_adapter(
    peft_model: Any, tokenizer: Any, model_dir: Path, spec: EvaluationSpec
) -> None:
    results = run_evaluation(
        peft_model, tokenizer, VALIDATION, TRAIN, spec, dataset_format="classification", labels=LABELS
    )

    base = plain_llama(model_dir)
    prompts = [prompt_token_ids(tokenizer, example.prompt) for example in VALIDATION[:5]]
    base_outputs = generate_outputs(base, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    assert results.models["zeroShot"].outputs == base_outputs
    completions = [completion_token_ids(tokenizer, example.prompt, example.completion) for example in VALIDATION[:5]]
    base_loss, tokens = completion_loss(base, prompts, completions, batch_size=3, pad=pad_id(tokenizer))
    assert tokens > 0
    assert results.models["zeroShot"].metrics["loss"] == pytest.approx(base_loss, rel=1e-5)
    # The adapter is active again after the baselines ran.
    tuned_again = generate_outputs(peft_model, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    assert tuned_again == results.models["tuned"].outputs
    assert tuned_again != base_outputs


def counted_tokens(model: Any) -> list[int]:
    """Patch the model's forward to record how many input tokens each call feeds it."""
    fed: list[int] = []
    forward = model.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        fed.append(int(kwargs["input_ids"].numel()))
        return forward(*args, **kwargs)

    model.forward = counting_forward
    return fed


def test_the_shared_prompt_head_goes_through_the_model_once_and_changes_no_output(
    model_dir: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shots = select_shots(TRAIN, 3, seed=7)
    prompts = [prompt_token_ids(tokenizer, few_shot_prompt(example, shots)) for example in VALIDATION]
    shared = shared_prefix_length(prompts)
    assert shared >= evaluation.MIN_SHARED_PREFIX_TOKENS

    cached_model = plain_llama(model_dir)
    cached_fed = counted_tokens(cached_model)
    with caplog.at_level(logging.INFO, logger="kubetune_trainer.evaluate.in_process"):
        cached = generate_outputs(cached_model, tokenizer, prompts, batch_size=4, max_new_tokens=6)
    monkeypatch.setattr(evaluation, "MIN_SHARED_PREFIX_TOKENS", 10**9)
    plain_model = plain_llama(model_dir)
    plain_fed = counted_tokens(plain_model)
    plain = generate_outputs(plain_model, tokenizer, prompts, batch_size=4, max_new_tokens=6)

    assert cached == plain and all(cached)
    assert f"reuses the KV cache of the {shared} prompt tokens" in caplog.text
    # Prefill: the head once, then each batch's own tokens; without the cache every row carries the head again.
    assert cached_fed[0] == shared
    assert sum(plain_fed) - sum(cached_fed) == (len(prompts) - 1) * shared


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own() -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1], [1, 2]]) == 0
    assert shared_prefix_length([[7, 2], [8, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one prompt shares nothing


def test_completion_tokens_of_a_chat_prompt_end_with_the_end_of_turn_token(tokenizer: Any) -> None:
    example = VALIDATION[1]
    ids = completion_token_ids(tokenizer, example.prompt, "Sports")
    # What the chat template renders after the generation prompt (this template ends the turn with <|im_end|>).
    assert tokenizer.decode(ids) == "Sports<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion_token_ids(tokenizer, "Question: who won?\nAnswer: ", "Sports")) == (
        "Sports<|im_end|>"
    )


def test_template_prompts_are_used_as_they_are(peft_model: Any, tokenizer: Any) -> None:
    validation = [
        Example(f"Text: {text}\nLabel: ", label, text, line) for line, (text, label) in enumerate(TEXTS[:3], start=1)
    ]
    train = [Example(f"Text: {text}\nLabel: ", label, text, 10 + i) for i, (text, label) in enumerate(TEXTS[3:])]
    spec = EvaluationSpec(metrics=["exactMatch", "rougeL", "loss"], few_shot_k=3, batch_size=2)

    results = run_evaluation(peft_model, tokenizer, validation, train, spec, dataset_format="prompt-completion")

    assert results.headline_metric == "exactMatch"
    for result in results.models.values():
        assert len(result.outputs) == 3
        assert {"exactMatch", "rougeL"} <= set(result.metrics)
    assert results.models["tuned"].metrics["loss"] > 0


def test_select_shots_is_deterministic_prefers_distinct_labels_and_draws_from_train() -> None:
    shots = select_shots(TRAIN, 4, seed=7)
    assert shots == select_shots(TRAIN, 4, seed=7)
    assert len({shot.completion for shot in shots}) == 4
    assert all(shot in TRAIN for shot in shots)
    assert sorted(shot.line for shot in select_shots(TRAIN, 100, seed=7)) == [shot.line for shot in TRAIN]


def test_a_reference_outside_the_labels_is_refused_naming_its_line(peft_model: Any, tokenizer: Any) -> None:
    validation = [VALIDATION[0], chat_example("Rain expected tomorrow.", "Weather", 42)]
    spec = EvaluationSpec(baselines=[], max_new_tokens=2)
    with pytest.raises(EvaluationInputError, match=r"validation line 42: reference 1: label 'Weather'"):
        run_evaluation(peft_model, tokenizer, validation, TRAIN, spec, dataset_format="classification", labels=LABELS)


def test_judge_metric_needs_a_judge(peft_model: Any, tokenizer: Any) -> None:
    spec = EvaluationSpec(
        metrics=["judge"],
        judge=JudgeSpec(model="j", api_key_secret_ref=SecretKeyRef(name="s", key="k")),
    )
    with pytest.raises(EvaluationInputError, match=r"evaluation\.metrics has judge but no judge was configured"):
        run_evaluation(peft_model, tokenizer, VALIDATION, TRAIN, spec, dataset_format="classification")


@pytest.fixture
def judge_proxy(llama_server: LlamaServer) -> Iterator[FaultProxy]:
    """The real server, behind a proxy that counts what it answered (nothing is injected here)."""
    with FaultProxy(llama_server.base_url) as proxy:
        yield proxy


def test_the_judge_grades_every_model_and_its_cost_is_reported(
    peft_model: Any, tokenizer: Any, llama_server: LlamaServer, judge_proxy: FaultProxy, tmp_path: Path
) -> None:
    judge_spec = JudgeSpec(
        base_url=judge_proxy.base_url, model=llama_server.model, api_key_secret_ref=SecretKeyRef(name="s", key="k")
    )
    spec = EvaluationSpec(metrics=["judge"], judge=judge_spec, max_samples=3, few_shot_k=1, max_new_tokens=4)
    judge = LlmJudge(judge_spec, llama_server.api_key, request_timeout=60)

    results = run_evaluation(
        peft_model, tokenizer, VALIDATION, TRAIN, spec, dataset_format="classification", judge=judge
    )

    assert results.headline_metric == "judge"
    graded = 0
    for result in results.models.values():
        scores = [score["judge"] for score in result.sample_scores]
        judged = [score for score in scores if score is not None]
        assert len(scores) == 3 and all(0 <= score <= 100 for score in judged)
        assert result.metrics["judgeUnjudged"] == float(len(scores) - len(judged))
        if judged:
            assert result.metrics["judge"] == pytest.approx(sum(judged) / len(judged))
        graded += len(judged)
    assert graded >= 5  # most of the 9 outputs (3 rows, 3 models): what a 135M judge writes mostly parses
    prompt_tokens, completion_tokens, replies = judge_proxy.served_usage()
    cost = results.judge_cost
    assert cost is not None
    assert (cost.requests, cost.prompt_tokens, cost.completion_tokens, cost.judged) == (
        replies,
        prompt_tokens,
        completion_tokens,
        graded,
    )
    report = json.loads(write_report(tmp_path, results, None).report_json.read_text())
    assert report["judge"]["totalTokens"] == prompt_tokens + completion_tokens


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(2)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=4, id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)}
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    return get_peft_model(base, config)


def test_a_classification_head_predicts_labels_and_skips_baselines_it_cannot_give(
    classifier: Any, tokenizer: Any, spec: EvaluationSpec
) -> None:
    results = run_evaluation(
        classifier, tokenizer, VALIDATION, TRAIN, spec, dataset_format="classification", labels=LABELS
    )

    assert list(results.models) == ["tuned"]
    tuned = results.models["tuned"]
    assert all(output in LABELS for output in tuned.outputs)
    assert tuned.metrics["unparsed"] == 0.0
    assert tuned.metrics["loss"] > 0 and "perplexity" not in tuned.metrics
    assert any("baselines zeroShot, fewShot not evaluated" in note for note in results.notes)
    # The head reads the row's text alone, not the prompt with the label list a generating model gets.
    texts = [example.input_text for example in VALIDATION[: spec.max_samples]]
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert results.serving["tuned"].prompt_tokens_mean == pytest.approx(sum(lengths) / len(lengths))


def test_a_classifier_takes_its_baselines_from_a_given_base_causal_lm(
    classifier: Any, tokenizer: Any, model_dir: Path, spec: EvaluationSpec
) -> None:
    results = run_evaluation(
        classifier,
        tokenizer,
        VALIDATION,
        TRAIN,
        spec,
        dataset_format="classification",
        labels=LABELS,
        baseline_model=plain_llama(model_dir),
    )

    assert list(results.models) == ["tuned", "zeroShot", "fewShot"]
    assert "loss" not in results.models["zeroShot"].metrics
    assert all(len(result.outputs) == 5 for result in results.models.values())
    assert results.notes == [
        "loss is the classification head's cross-entropy; the baselines generate, so they have no loss"
    ]


def llama_contender(server: LlamaServer, **fields: Any) -> ContenderSpec:
    return ContenderSpec(
        name="smollm2",
        base_url=server.base_url,
        model=server.model,
        api_key_secret_ref=SecretKeyRef(name="llama", key="api-key"),
        prompting="retrievalFewShot",
        concurrency=2,
        max_retries=0,
        **fields,
    )


def test_a_contender_behind_a_real_server_answers_the_same_rows_scored_and_costed(
    peft_model: Any, tokenizer: Any, llama_server: LlamaServer, tmp_path: Path
) -> None:
    contender = llama_contender(llama_server, price_per_million_input_tokens=0.5, price_per_million_output_tokens=1.5)
    # At 3.6 per hour, 1,000 requests cost what one request takes in seconds.
    spec = EvaluationSpec(
        baselines=["zeroShot"],
        few_shot_k=2,
        max_samples=5,
        batch_size=3,
        max_new_tokens=6,
        contenders=[contender],
        self_served_price_per_hour=3.6,
    )

    results = run_evaluation(
        peft_model,
        tokenizer,
        VALIDATION,
        TRAIN,
        spec,
        dataset_format="classification",
        labels=LABELS,
        environ={contender_api_key_env(0): llama_server.api_key},
    )

    assert list(results.models) == ["tuned", "zeroShot", "smollm2"]
    answered = results.models["smollm2"]
    assert len(answered.outputs) == 5 and {"accuracy", "macroF1", "unparsed"} <= set(answered.metrics)
    # Real usage from the server: a chat-templated few-shot prompt of two solved rows and the question.
    serving = results.serving["smollm2"]
    assert (serving.requests, serving.failed) == (5, 0)
    assert serving.prompt_tokens_mean > 40 and serving.completion_tokens_mean > 0
    assert serving.latency_p50_seconds is not None and 0 < serving.latency_p50_seconds <= serving.latency_p95_seconds
    expected = (serving.prompt_tokens_mean * 0.5 + serving.completion_tokens_mean * 1.5) / 1e6 * 1000
    assert serving.cost_per_1k_requests == pytest.approx(expected)
    # The arms served in-process have their tokens, the latency of the batch that answered each row (batches of 3
    # and 2), and their hardware time per request at the price per hour.
    for name in ("tuned", "zeroShot"):
        local = results.serving[name]
        assert local.requests == 5 and local.prompt_tokens_mean > 0
        assert local.latency_p50_seconds is not None and local.latency_p95_seconds is not None
        assert 0 < local.latency_p50_seconds <= local.latency_p95_seconds <= results.seconds[name]
        assert local.cost_per_1k_requests is not None
        assert 0 < local.cost_per_1k_requests * 5 <= results.seconds[name]

    gate = evaluate_gate(GateSpec(metric="accuracy", must_beat=["smollm2"]), results.metric_tables())
    assert "smollm2" in gate.message
    files = write_report(tmp_path, results, gate)
    markdown = files.report_markdown.read_text()
    assert "| smollm2 |" in markdown and "cost per 1k requests" in markdown
    status = evaluation_status(results, gate)
    assert status.baselines["smollm2"] == significant(answered.metrics["accuracy"])
    assert status.cost_per_1k_requests["smollm2"] == significant(expected)
    assert set(status.cost_per_1k_requests) == {"tuned", "zeroShot", "smollm2"}
    assert status.problems == []
    assert llama_server.api_key not in files.report_json.read_text()


def test_a_contender_whose_requests_all_fail_is_scored_as_wrong_and_named_a_problem(
    peft_model: Any, tokenizer: Any, llama_server: LlamaServer
) -> None:
    spec = EvaluationSpec(
        baselines=[], max_samples=3, batch_size=3, max_new_tokens=4, contenders=[llama_contender(llama_server)]
    )
    wrong = "sk-not-the-servers-key-42"

    results = run_evaluation(
        peft_model,
        tokenizer,
        VALIDATION,
        TRAIN,
        spec,
        dataset_format="classification",
        labels=LABELS,
        environ={contender_api_key_env(0): wrong},
    )

    assert results.models["smollm2"].outputs == ["", "", ""]
    assert results.models["smollm2"].metrics["accuracy"] == 0.0
    serving = results.serving["smollm2"]
    assert (serving.requests, serving.failed) == (3, 3)
    assert serving.first_error is not None and "401" in serving.first_error and wrong not in serving.first_error
    [problem] = evaluation_status(results, None).problems
    assert problem.startswith("smollm2: 3 of 3 requests failed and were scored as wrong: AuthenticationError")
