"""Pure parts of the model and training stages: launch command, progress rate, checkpoint listing, configs, records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubetune_trainer.data.rows import DataError, Example
from kubetune_trainer.modeling import (
    base_dtype_name,
    build_bnb_config,
    build_lora_config,
    cache_dir_name,
    cpu_has_native_bf16,
    hub_offline,
    keep_trainable_weights_in_fp32,
    mixed_precision,
    upcasts_unquantized_weights,
)
from kubetune_trainer.train.checkpoints import (
    CheckpointError,
    RemoteCheckpoint,
    complete_marker,
    complete_steps,
    parse_complete_marker,
)
from kubetune_trainer.train.progress import (
    ProgressTracker,
    RateLimit,
    TrainingStep,
    eta_seconds,
    tokens_per_second,
)
from kubetune_trainer.train.trainer import (
    build_sft_config,
    classification_records,
    common_arguments,
    counted_input_tokens,
    record_kind,
    sft_batch_shape,
    sft_record,
    sft_records,
)

from kubetune.api import FineTuneJobSpec, LoraSpec, ProgressStatus, QuantizationSpec, TrainingSpec
from kubetune.contract import EXIT_CODE_PREEMPTED, trainer_command

pytestmark = pytest.mark.unit

CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


# ----------------------------------------------------------------------------------------------------------------------
# Launch command


def test_one_gpu_runs_the_trainer_module_directly() -> None:
    assert trainer_command(1) == ["python", "-m", "kubetune_trainer", "run"]
    assert trainer_command(0) == ["python", "-m", "kubetune_trainer", "run"]


def test_several_gpus_run_one_process_each_under_accelerate_launch() -> None:
    command = trainer_command(4)

    assert command[:3] == ["python", "-m", "kubetune_trainer.launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[-3:] == ["-m", "kubetune_trainer", "run"]


def test_the_entry_and_interpreter_can_be_swapped_for_a_script() -> None:
    command = trainer_command(2, python="/venv/bin/python", entry=["driver.py", "config.json"])

    assert command[0] == "/venv/bin/python" and command[-2:] == ["driver.py", "config.json"]


def test_preempted_exit_code_is_non_zero_so_the_job_retries() -> None:
    assert EXIT_CODE_PREEMPTED == 128 + 15


# ----------------------------------------------------------------------------------------------------------------------
# Progress


@dataclass
class FakeState:
    """The TrainerState fields the tracker reads."""

    global_step: int = 0
    max_steps: int = 10
    epoch: float = 0.0
    num_input_tokens_seen: int = 0
    is_world_process_zero: bool = True


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_lets_one_event_through_per_interval_and_forced_ones_always() -> None:
    limit = RateLimit(min_interval=5)

    allowed = [limit.allow(now) for now in (0, 1, 4.9, 5, 6, 10.5)]

    assert allowed == [True, False, False, True, False, True]
    assert limit.allow(10.6, force=True)


def test_tracker_reports_at_a_bounded_rate_with_throughput_eta_and_the_final_state() -> None:
    clock, state = FakeClock(), FakeState(global_step=2, num_input_tokens_seen=500)
    reports: list[ProgressStatus] = []
    steps_seen: list[TrainingStep] = []
    tracker = ProgressTracker(sink=reports.append, on_step=steps_seen.append, min_interval=1.0, clock=clock)

    tracker.begin(state)  # a resumed run: 2 steps and 500 tokens happened before this session
    for step in range(3, 11):
        clock.now += 0.5
        state.global_step, state.epoch = step, step / 10
        state.num_input_tokens_seen += 100
        tracker.observe_logs({"loss": 2.0 - step / 10})
        tracker.step(state, learning_rate=1e-4)
    tracker.end(state)

    steps = [report.step for report in reports]
    assert steps == [3, 5, 7, 9, 10], "the first step, then one report per second at most, then the final state"
    fifth = reports[1]  # step 5: 3 steps and 300 tokens in 1.5 s
    assert fifth.tokens_per_second == pytest.approx(200.0)
    assert fifth.eta_seconds == 3  # 5 steps left at 0.5 s each
    assert fifth.percent == 50.0 and fifth.total_steps == 10 and fifth.learning_rate == 1e-4
    assert fifth.loss == pytest.approx(1.5)
    assert reports[-1].percent == 100.0 and reports[-1].eta_seconds == 0
    # Every step reaches on_step (gauges, the bar), with the tokens seen and the loss logged by then.
    assert [seen.step for seen in steps_seen] == list(range(3, 11))
    assert steps_seen[2] == TrainingStep(step=5, total_steps=10, trained_tokens=800, loss=1.5, learning_rate=1e-4)


def test_tracker_on_another_rank_reports_nothing() -> None:
    reports: list[ProgressStatus] = []
    steps_seen: list[TrainingStep] = []
    tracker = ProgressTracker(sink=reports.append, on_step=steps_seen.append, min_interval=0)
    state = FakeState(is_world_process_zero=False)

    tracker.begin(state)
    state.global_step = 1
    tracker.step(state, learning_rate=None)
    tracker.end(state)

    assert reports == [] and steps_seen == []


def test_non_finite_losses_are_left_out_of_the_status() -> None:
    reports: list[ProgressStatus] = []
    tracker = ProgressTracker(sink=reports.append, min_interval=0)
    state = FakeState(global_step=1)
    tracker.begin(state)
    tracker.observe_logs({"loss": float("nan")})

    tracker.end(state)

    assert reports[0].loss is None


@pytest.mark.parametrize(("tokens", "seconds", "expected"), [(1000, 2.0, 500.0), (10, 0.0, None), (0, 1.0, 0.0)])
def test_tokens_per_second(tokens: int, seconds: float, expected: float | None) -> None:
    assert tokens_per_second(tokens, seconds) == expected


@pytest.mark.parametrize(
    ("done", "seconds", "left", "expected"), [(4, 8.0, 6, 12), (0, 3.0, 5, None), (3, 1.0, 0, 0), (3, 1.0, 1, 1)]
)
def test_eta_seconds(done: int, seconds: float, left: int, expected: int | None) -> None:
    assert eta_seconds(done, seconds, left) == expected


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint listing and markers


def test_only_step_directories_with_a_complete_marker_count_newest_first() -> None:
    prefix = "s3://bucket/out/checkpoints"
    listing = [
        f"{prefix}/step-10/adapter_model.safetensors",
        f"{prefix}/step-10/COMPLETE",
        f"{prefix}/step-20/adapter_model.safetensors",  # no marker: an upload that died
        f"{prefix}/step-5/COMPLETE",
        f"{prefix}/step-5/sub/COMPLETE",  # a file called COMPLETE deeper down is not the marker
        f"{prefix}/latest/COMPLETE",
        "s3://bucket/out/checkpoints-old/step-99/COMPLETE",
    ]

    assert complete_steps(listing, prefix) == [
        RemoteCheckpoint(10, f"{prefix}/step-10"),
        RemoteCheckpoint(5, f"{prefix}/step-5"),
    ]


def test_complete_marker_round_trips_the_hashes() -> None:
    hashes = {"optimizer.pt": "b" * 64, "adapter_model.safetensors": "a" * 64}

    marker = complete_marker(7, hashes)

    assert json.loads(marker)["step"] == 7
    assert parse_complete_marker(marker, "s3://b/COMPLETE") == hashes


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"not json", "is not JSON"), (b'{"step": 1}', "no 'files' map"), (b'{"files": {"a": 1}}', "sha256 strings")],
)
def test_malformed_complete_markers_are_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=rf"s3://b/step-1/COMPLETE: .*{message}"):
        parse_complete_marker(data, "s3://b/step-1/COMPLETE")


# ----------------------------------------------------------------------------------------------------------------------
# Precision, devices and model locations


@pytest.mark.parametrize(
    ("on_cuda", "cuda_bf16", "cpu_bf16", "expected"),
    [
        (True, True, False, "bf16"),
        (True, False, True, "fp16"),
        (False, False, True, "bf16"),
        (False, False, False, "no"),
    ],
)
def test_mixed_precision(on_cuda: bool, cuda_bf16: bool, cpu_bf16: bool, expected: str) -> None:
    assert mixed_precision(on_cuda, cuda_bf16, cpu_bf16) == expected


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu sse avx2\n")
    assert not cpu_has_native_bf16("")


@pytest.mark.parametrize(
    ("method", "precision", "expected"),
    [
        ("qlora", "bf16", "float16"),
        ("lora", "bf16", "bfloat16"),
        ("lora", "fp16", "float16"),
        ("lora", "no", "float32"),
        ("full", "bf16", "float32"),
    ],
)
def test_base_weights_dtype(method: str, precision: str, expected: str) -> None:
    quantization = QuantizationSpec(compute_dtype="float16") if method == "qlora" else None

    assert base_dtype_name(method, precision, quantization) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("precision", "expected"), [("bf16", False), ("fp16", True), ("no", True)])
def test_4bit_bases_upcast_their_unquantized_weights_except_under_bf16(precision: str, expected: bool) -> None:
    assert upcasts_unquantized_weights(precision) is expected  # type: ignore[arg-type]


def test_trained_weights_get_fp32_master_copies_and_frozen_ones_keep_their_dtype() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)

    keep_trainable_weights_in_fp32(model)

    assert {parameter.dtype for parameter in model[0].parameters()} == {torch.bfloat16}
    assert {parameter.dtype for parameter in model[1].parameters()} == {torch.float32}


def test_hub_offline_reads_the_usual_variables() -> None:
    assert hub_offline({"HF_HUB_OFFLINE": "1"})
    assert hub_offline({"TRANSFORMERS_OFFLINE": "true"})
    assert not hub_offline({"HF_HUB_OFFLINE": "0"})
    assert not hub_offline({})


def test_cache_directory_names_are_stable_and_distinct() -> None:
    first = cache_dir_name("s3://models/smollm2/")
    assert first == cache_dir_name("s3://models/smollm2/")
    assert first.startswith("smollm2-") and first != cache_dir_name("s3://other/smollm2/")


# ----------------------------------------------------------------------------------------------------------------------
# Factories


def test_bnb_config_is_4bit_nf4_with_double_quantization_by_default() -> None:
    import torch

    config = build_bnb_config(QuantizationSpec(), keep_full_precision=["score"])

    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.llm_int8_skip_modules == ["score"]


def test_lora_config_follows_the_spec() -> None:
    everything = build_lora_config(LoraSpec(), "CAUSAL_LM")
    chosen = build_lora_config(LoraSpec(r=8, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"]), "SEQ_CLS")

    assert everything.target_modules == "all-linear" and everything.r == 16 and everything.lora_alpha == 32
    assert set(chosen.target_modules or ()) == {"q_proj", "v_proj"} and chosen.lora_dropout == 0.1
    assert chosen.task_type == "SEQ_CLS"


def test_training_arguments_map_the_spec() -> None:
    training = TrainingSpec(
        max_steps=30, checkpoint_every=7, warmup_steps=3, scheduler="linear", seed=5, gradient_checkpointing=True
    )

    arguments = common_arguments(training, Path("/tmp/out"), "bf16", on_cuda=False)

    assert arguments["max_steps"] == 30 and arguments["save_steps"] == 7 and arguments["warmup_steps"] == 3
    assert arguments["lr_scheduler_type"] == "linear" and arguments["seed"] == 5
    assert arguments["use_cpu"] and arguments["bf16"] and not arguments["fp16"]
    assert arguments["activation_checkpointing"] and arguments["report_to"] == "none"
    assert not arguments["logging_nan_inf_filter"]
    assert common_arguments(TrainingSpec(), Path("/tmp/out"), "no", on_cuda=True)["max_steps"] == -1


def test_sft_config_carries_loss_masking_packing_and_length(tmp_path: Path) -> None:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "org/model"},
            "dataset": {"train": "s3://bucket/train.jsonl", "maxLength": 200},
            "training": {"packing": True, "completionOnlyLoss": False, "checkpointEvery": 9},
            "output": {"uri": "s3://bucket/out"},
        }
    )

    config = build_sft_config(spec, tmp_path, "no", on_cuda=False)

    assert config.max_length == 200 and config.packing and config.completion_only_loss is False
    assert config.save_steps == 9 and config.report_to == [] and config.use_cpu
    # A packed batch on the CPU is batchSize rows at once, as on CUDA; its real tokens are counted from the collator.
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 1)
    assert config.include_num_input_tokens_seen == "non_padding"
    unpacked = build_sft_config(spec.model_copy(update={"training": TrainingSpec()}), tmp_path, "no", on_cuda=False)
    assert unpacked.include_num_input_tokens_seen == "non_padding"


# ----------------------------------------------------------------------------------------------------------------------
# Records


@pytest.mark.parametrize(("packing", "on_cuda"), [(True, False), (True, True), (False, False), (False, True)])
def test_the_sft_batch_is_batch_size_rows_with_or_without_packing_on_either_device(
    packing: bool, on_cuda: bool
) -> None:
    training = TrainingSpec(batch_size=8, gradient_accumulation_steps=3, packing=packing)

    assert sft_batch_shape(training, on_cuda) == (8, 3)


@pytest.mark.parametrize(
    ("packing", "on_cuda", "expected"),
    # Padding-free packed rows (CUDA) are all real tokens; the others carry an attention mask or, packed on the CPU,
    # their real-token counts (which the packed trainer adds instead).
    [(True, True, "all"), (True, False, "non_padding"), (False, True, "non_padding"), (False, False, "non_padding")],
)
def test_how_real_tokens_are_counted(packing: bool, on_cuda: bool, expected: str) -> None:
    assert counted_input_tokens(packing, on_cuda) == expected


def test_chat_examples_become_conversational_prompt_completion() -> None:
    example = Example(prompt=CHAT_PROMPT, completion="Paris", input_text="Capital of France?", line=3)

    assert record_kind("question-answer", example) == "chat"
    assert sft_record(example, "chat") == {
        "prompt": CHAT_PROMPT,
        "completion": [{"role": "assistant", "content": "Paris"}],
    }


def test_template_examples_become_string_prompt_completion_and_text_becomes_text() -> None:
    templated = Example(prompt="Q: Capital of France?\nA:", completion=" Paris", input_text="", line=1)
    text = Example(prompt="", completion="Some document.", input_text="Some document.", line=2)

    assert sft_records("prompt-completion", [templated]) == [
        {"prompt": "Q: Capital of France?\nA:", "completion": " Paris"}
    ]
    assert sft_records("text", [text]) == [{"text": "Some document."}]


def test_no_examples_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no examples"):
        sft_records("text", [])


def test_classification_records_index_the_labels_and_name_the_line_of_an_unknown_one() -> None:
    examples = [
        Example(prompt=CHAT_PROMPT, completion="Sports", input_text="A late goal.", line=1),
        Example(prompt=CHAT_PROMPT, completion="World", input_text="Talks resume.", line=2),
    ]

    assert classification_records(examples, ["Sports", "World"]) == [
        {"text": "A late goal.", "label": 0},
        {"text": "Talks resume.", "label": 1},
    ]
    with pytest.raises(DataError, match=r"line 2: label 'World' is not in \['Sports'\]"):
        classification_records(examples, ["Sports"])
