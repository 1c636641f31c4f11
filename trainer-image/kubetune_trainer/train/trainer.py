"""The training stage: Examples → TRL dataset, SFT (or a classification head), progress, checkpoints, resume."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from kubetune.api import FineTuneJobSpec, QuantizationSpec, TrainingSpec
from kubetune.conditions import TRAINER_REASON_TRAINING_DIVERGED
from kubetune.contract import EXIT_CODE_PREEMPTED
from kubetune_trainer.data.formats import FORMATS
from kubetune_trainer.data.rows import DataError, Example, PreparedData
from kubetune_trainer.modeling import (
    CLASSIFIER_HEADS,
    LoadedModel,
    MixedPrecision,
    base_dtype_name,
    cuda_available,
    label_maps,
    load_model_for_training,
    torch_dtype,
)
from kubetune_trainer.train.checkpoints import fetch_latest_checkpoint
from kubetune_trainer.train.progress import (
    DEFAULT_PROGRESS_INTERVAL_SECONDS,
    ProgressSink,
    ProgressTracker,
    StepSink,
)

if TYPE_CHECKING:
    from kubetune_trainer.train.callbacks import RunFlags

log = logging.getLogger(__name__)

RecordKind = Literal["chat", "template", "text"]
CHECKPOINTS_SUBDIR = "checkpoints"
RESUME_SUBDIR = "resume"
ADAPTER_SUBDIR = "adapter"
MERGED_SUBDIR = "merged"
LABELS_FILE = "labels.json"
# Local copies kept by the trainer: every one is in storage once saved, so only the newest two stay on disk.
LOCAL_CHECKPOINTS_KEPT = 2


class TrainingDiverged(Exception):  # noqa: N818 - named like its failure reason, TrainingDiverged
    """The loss became NaN or infinite; training stopped without saving the broken weights."""

    reason = TRAINER_REASON_TRAINING_DIVERGED


class TrainingPreempted(Exception):  # noqa: N818 - an outcome the entry point maps to an exit code
    """SIGTERM arrived: a checkpoint of the last finished step is in storage; exit with `exit_code` to be retried."""

    exit_code = EXIT_CODE_PREEMPTED

    def __init__(self, step: int, checkpoint_uploaded: bool) -> None:
        where = "its checkpoint is uploaded" if checkpoint_uploaded else "no checkpoint was uploaded"
        super().__init__(f"preempted (SIGTERM) after step {step}; {where}, and a retried pod resumes from it")
        self.step = step


@dataclass(frozen=True)
class TrainResult:
    """What training produced. adapter_dir holds the LoRA adapter (or, for method full, the whole model).

    trained_tokens counts the real (non-pad) input tokens of every step, prompts included, across all ranks and
    attempts; train_loss is the mean over this attempt's steps, final_loss the last logged value.
    """

    steps: int
    total_steps: int
    train_loss: float | None
    final_loss: float | None
    trained_tokens: int
    runtime_seconds: float
    resumed_from_step: int | None
    adapter_dir: Path
    merged_dir: Path | None
    checkpoint_steps: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------------
# Datasets


def record_kind(data_format: str, example: Example) -> RecordKind:
    """How an example becomes a TRL row: chat messages, a rendered template string, or plain text."""
    if not FORMATS[data_format].prompted:
        return "text"
    return "chat" if isinstance(example.prompt, list) else "template"


def sft_record(example: Example, kind: RecordKind) -> dict[str, Any]:
    """One TRL row: conversational prompt/completion, string prompt/completion, or {"text"} for language modelling."""
    if kind == "text":
        return {"text": example.completion}
    if kind == "chat":
        return {"prompt": list(example.prompt), "completion": [{"role": "assistant", "content": example.completion}]}
    return {"prompt": example.prompt, "completion": example.completion}


def sft_records(data_format: str, examples: Sequence[Example]) -> list[dict[str, Any]]:
    """TRL rows for every example; one kind for the whole set, taken from the first example."""
    if not examples:
        raise DataError("dataset.train has no examples left to train on")
    kind = record_kind(data_format, examples[0])
    return [sft_record(example, kind) for example in examples]


def classification_records(examples: Sequence[Example], labels: Sequence[str]) -> list[dict[str, Any]]:
    """{"text", "label" (index)} rows for a classification head; DataError naming the line of an unknown label."""
    if not examples:
        raise DataError("dataset.train has no examples left to train on")
    _, label2id = label_maps(labels)
    records = []
    for example in examples:
        if example.completion not in label2id:
            raise DataError(f"dataset.train line {example.line}: label {example.completion!r} is not in {list(labels)}")
        records.append({"text": example.input_text, "label": label2id[example.completion]})
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Trainer configuration


def common_arguments(
    training: TrainingSpec, output_dir: Path, precision: MixedPrecision, on_cuda: bool
) -> dict[str, Any]:
    """TrainingArguments shared by SFT and classification, straight from the spec."""
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": training.epochs,
        "max_steps": training.max_steps if training.max_steps is not None else -1,
        "per_device_train_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.scheduler,
        "warmup_steps": training.warmup_steps,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "activation_checkpointing": training.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if training.gradient_checkpointing else None,
        "seed": training.seed,
        "data_seed": training.seed,
        "save_strategy": "steps",
        "save_steps": training.checkpoint_every,
        "save_total_limit": LOCAL_CHECKPOINTS_KEPT,
        "logging_strategy": "steps",
        "logging_steps": training.logging_steps,
        # The divergence guard needs to see NaN; the default filter would log the running average instead.
        "logging_nan_inf_filter": False,
        "include_num_input_tokens_seen": "non_padding",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not on_cuda,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # LoRA on every linear layer uses every trainable parameter each step, so DDP needs no unused-parameter search.
        "ddp_find_unused_parameters": False,
        "dataloader_num_workers": 0,
    }


def build_sft_config(
    spec: FineTuneJobSpec, output_dir: Path, precision: MixedPrecision, on_cuda: bool
) -> Any:  # trl.SFTConfig
    """trl's SFTConfig from the spec: completion-only loss, packing, max_length from dataset.maxLength."""
    from trl import SFTConfig

    arguments = common_arguments(spec.training, output_dir, precision, on_cuda)
    arguments["include_num_input_tokens_seen"] = counted_input_tokens(spec.training.packing, on_cuda)
    batch_size, accumulation = sft_batch_shape(spec.training, on_cuda)
    arguments["per_device_train_batch_size"] = batch_size
    arguments["gradient_accumulation_steps"] = accumulation
    return SFTConfig(
        **arguments,
        max_length=spec.dataset.max_length,
        packing=spec.training.packing,
        completion_only_loss=spec.training.completion_only_loss,
        dataset_text_field="text",
    )


def sft_batch_shape(training: TrainingSpec, on_cuda: bool) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) of the SFT trainer: batchSize and gradientAccumulationSteps.

    Packing needs no other shape on either device. On CUDA, TRL concatenates a batch's packed rows into one
    padding-free row that flash attention splits at the packed examples. On the CPU, whose attention has no such
    kernel, BlockDiagonalPackedCollator feeds them as one [batchSize, longest row] batch with block-diagonal attention:
    batchSize x maxLength^2 of attention rather than the concatenated row's (batchSize x maxLength)^2, and the 4-bit
    base dequantised once per forward rather than once per packed row (docs/decisions/0007-packing-on-cpu.md).
    """
    return training.batch_size, training.gradient_accumulation_steps


def counted_input_tokens(packing: bool, on_cuda: bool) -> str:
    """How the trainer counts trained (real) tokens for usage and tokens/s.

    A padding-free packed batch (TRL's bfd packing on CUDA: one row, no pad, no attention mask) is all real tokens;
    "non_padding" would count by pad id there and miss every EOS token of a model whose pad token is its EOS (SmolLM2).
    Unpacked batches carry an attention mask, which "non_padding" sums. Packed batches on the CPU have a pad tail and
    no attention mask, so neither count fits: BlockDiagonalPackedSFTTrainer adds the collator's per-row real-token
    counts instead, and "non_padding" here only keeps the count (and its log lines) on.
    """
    return "all" if packing and on_cuda else "non_padding"


def build_classification_arguments(
    spec: FineTuneJobSpec, output_dir: Path, precision: MixedPrecision, on_cuda: bool
) -> Any:  # transformers.TrainingArguments
    """transformers' TrainingArguments for the sequence-classification objective."""
    from transformers import TrainingArguments

    return TrainingArguments(**common_arguments(spec.training, output_dir, precision, on_cuda))


def build_trainer(
    spec: FineTuneJobSpec,
    *,
    data: PreparedData,
    loaded: LoadedModel,
    checkpoints_dir: Path,
    flags: RunFlags,
    callbacks: Sequence[Any] = (),
) -> Any:  # transformers.Trainer
    """The trainer for the spec's objective, with our callbacks and without transformers' own console printers."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, PrinterCallback
    from transformers import ProgressCallback as ConsoleProgressCallback

    from kubetune_trainer.train.callbacks import WatchedSFTTrainer, WatchedTrainer
    from kubetune_trainer.train.cpu_speedups import block_diagonal_packed_sft_trainer, score_labelled_positions_only

    on_cuda = cuda_available()
    trainer: Any
    if loaded.objective == "sequence-classification":
        labels = data.labels or []
        tokenizer = loaded.tokenizer
        rows = Dataset.from_list(classification_records(data.train, labels))
        max_length = spec.dataset.max_length
        tokenized = rows.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        ).rename_column("label", "labels")
        trainer = WatchedTrainer(
            model=loaded.model,
            args=build_classification_arguments(spec, checkpoints_dir, loaded.mixed_precision, on_cuda),
            train_dataset=tokenized,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            callbacks=list(callbacks),
            run_flags=flags,
        )
    else:
        if not on_cuda:
            score_labelled_positions_only()
        packed_on_cpu = spec.training.packing and not on_cuda
        sft_trainer = block_diagonal_packed_sft_trainer() if packed_on_cpu else WatchedSFTTrainer
        trainer = sft_trainer(
            model=loaded.model,
            args=build_sft_config(spec, checkpoints_dir, loaded.mixed_precision, on_cuda),
            train_dataset=Dataset.from_list(sft_records(data.format, data.train)),
            processing_class=loaded.tokenizer,
            callbacks=list(callbacks),
            run_flags=flags,
        )
    check_examples_left(len(data.train), len(trainer.train_dataset), spec.dataset.max_length, spec.training.packing)
    # Progress goes out as our JSON lines; transformers' printers would interleave Python dict reprs with them.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ConsoleProgressCallback)
    return trainer


def check_examples_left(examples: int, rows: int, max_length: int, packing: bool) -> None:
    """TRL drops examples whose prompt alone fills max_length (nothing left to learn); say so, and fail if all went."""
    if rows == 0:
        raise DataError(
            f"no training example fits dataset.maxLength={max_length} tokens with room for its completion; "
            "raise dataset.maxLength or shorten the prompts"
        )
    if not packing and rows < examples:
        log.warning(
            "%d of %d training examples dropped: their prompt fills dataset.maxLength=%d tokens",
            examples - rows,
            examples,
            max_length,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Preemption


@contextlib.contextmanager
def sigterm_requests_checkpoint(flags: RunFlags) -> Iterator[None]:
    """While training, SIGTERM only sets a flag: the step in flight finishes, is saved, uploaded, then the run exits."""
    if threading.current_thread() is not threading.main_thread():
        # Signal handlers can only be installed from the main thread; embedded callers keep their own handling.
        yield
        return

    def request_checkpoint(signum: int, frame: FrameType | None) -> None:
        # The flag first: logging from a signal handler can raise when the signal lands mid-write.
        flags.preempt_requested = True
        log.warning("SIGTERM: saving a checkpoint at the end of the current step, then exiting")

    previous = signal.signal(signal.SIGTERM, request_checkpoint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def save_outputs(trainer: Any, loaded: LoadedModel, labels: Sequence[str] | None, adapter_dir: Path) -> None:
    """The adapter (safetensors + adapter_config.json) or full model, the tokenizer, and labels.json for a head."""
    # save_model is collective under some distributed setups; it writes on the main process only.
    trainer.save_model(str(adapter_dir))
    if not trainer.is_world_process_zero():
        return
    loaded.tokenizer.save_pretrained(adapter_dir)
    if loaded.objective == "sequence-classification" and labels:
        id2label, _ = label_maps(labels)
        (adapter_dir / LABELS_FILE).write_text(json.dumps({"id2label": id2label}, indent=1))


def merge_adapter(
    model_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    loaded: LoadedModel,
    labels: Sequence[str] | None,
    quantization: QuantizationSpec | None = None,
) -> Path:
    """The base in 16 bits with the adapter merged in (merge_and_unload), saved as safetensors.

    After qLoRA the base is the 16-bit copy of the 4-bit weights the adapter was trained against (loaded quantized as
    in training, then dequantized), not the original 16-bit checkpoint: the adapter learned to correct the quantized
    weights, so merged into the original it answers otherwise than the model the evaluation measured
    (docs/decisions/0021, bench/results/qlora-merge.md).
    """
    from peft import PeftModel

    from kubetune_trainer.modeling import build_bnb_config, load_base_model

    dtype_name = base_dtype_name("lora", loaded.mixed_precision, None)
    heads = CLASSIFIER_HEADS if loaded.objective == "sequence-classification" else ()
    base = load_base_model(
        model_dir,
        objective=loaded.objective,
        labels=labels,
        dtype_name=dtype_name,
        quantization=build_bnb_config(quantization, heads) if quantization is not None else None,
        placement=None,
        pad_token_id=loaded.tokenizer.pad_token_id,
        source="merge",
    )
    if quantization is not None:
        base = base.dequantize().to(torch_dtype(dtype_name))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(merged_dir)
    loaded.tokenizer.save_pretrained(merged_dir)
    return merged_dir


def last_logged_loss(log_history: Sequence[dict[str, Any]]) -> float | None:
    """The most recent training loss the trainer logged."""
    for entry in reversed(log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The stage


def train(
    spec: FineTuneJobSpec,
    data: PreparedData,
    model_dir: Path,
    work_dir: Path,
    *,
    progress: ProgressSink | None = None,
    on_step: StepSink | None = None,
    progress_interval_seconds: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
    extra_callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train per the spec, checkpointing to <output.uri>/checkpoints and resuming from the newest complete one.

    Under `accelerate launch` every rank calls this; only rank 0 uploads, reports progress and writes the outputs.
    Raises TrainingDiverged on a non-finite loss and TrainingPreempted after SIGTERM (once the checkpoint is up).
    """
    from kubetune_trainer.train.callbacks import (
        CheckpointUploadCallback,
        ProgressCallback,
        RunFlags,
        RunGuardCallback,
        leave_process_group,
    )

    flags = RunFlags()
    loaded = load_model_for_training(spec, model_dir, data.labels)
    tracker = ProgressTracker(sink=progress, on_step=on_step, min_interval=progress_interval_seconds)
    guard = RunGuardCallback(flags)
    uploader = CheckpointUploadCallback(spec.output.uri)
    trainer = build_trainer(
        spec,
        data=data,
        loaded=loaded,
        checkpoints_dir=work_dir / CHECKPOINTS_SUBDIR,
        flags=flags,
        callbacks=[guard, uploader, ProgressCallback(tracker), *extra_callbacks],
    )
    # The first process on each node downloads; the others find the verified copy and reuse it.
    with trainer.args.main_process_first(local=True, desc="fetch the newest checkpoint"):
        found = fetch_latest_checkpoint(spec.output.uri, work_dir / RESUME_SUBDIR)
    resumed_from = found[0].step if found else None
    if found:
        log.info("resuming from checkpoint step %d (%s)", found[0].step, found[0].uri)
    with sigterm_requests_checkpoint(flags):
        output = trainer.train(resume_from_checkpoint=str(found[1]) if found else None)
    state = trainer.state
    if flags.diverged:
        raise TrainingDiverged(
            f"the training loss became {flags.diverged_loss} at step {flags.diverged_step}; nothing was saved after "
            "it. Lower training.learningRate, raise training.warmupSteps or check the data for empty completions"
        )
    if guard.stopped_for_preemption and state.global_step < state.max_steps:
        leave_process_group()
        raise TrainingPreempted(state.global_step, state.global_step in uploader.uploaded_steps)
    adapter_dir = work_dir / ADAPTER_SUBDIR
    save_outputs(trainer, loaded, data.labels, adapter_dir)
    # Nothing collective comes after saving: rank 0 alone merges, evaluates and publishes.
    leave_process_group()
    merged_dir = None
    # The GGUF export converts the merged model, so it merges even when merged/ itself is not asked for.
    wants_merged = spec.output.merge_adapter or spec.output.gguf is not None
    if wants_merged and spec.method != "full" and trainer.is_world_process_zero():
        merged_dir = merge_adapter(
            model_dir, adapter_dir, work_dir / MERGED_SUBDIR, loaded, data.labels, spec.resolved_quantization()
        )
    return TrainResult(
        steps=state.global_step,
        total_steps=state.max_steps,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        final_loss=last_logged_loss(state.log_history),
        trained_tokens=int(state.num_input_tokens_seen or 0),
        runtime_seconds=float(output.metrics.get("train_runtime", 0.0)),
        resumed_from_step=resumed_from,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        checkpoint_steps=tuple(uploader.uploaded_steps),
    )
