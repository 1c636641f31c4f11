"""The model stage: resolve the base model to a local directory and load it for qLoRA, LoRA or full fine-tuning."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubetune.api import FineTuneJobSpec, LoraSpec, ModelSpec, QuantizationSpec
from kubetune.conditions import TRAINER_REASON_MODEL_ERROR
from kubetune_trainer import storage

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Objective = Literal["causal-lm", "sequence-classification"]
MixedPrecision = Literal["bf16", "fp16", "no"]

# Written last into an s3:// model's cache directory: its presence means the download finished.
DOWNLOAD_COMPLETE_MARKER = ".kubetune-download-complete"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TRUTHY = frozenset({"1", "true", "yes", "on"})
# Heads that sequence classification trains in full; they must stay out of 4-bit quantization to be trainable.
CLASSIFIER_HEADS = ("score", "classifier")


class ModelError(Exception):
    """The base model is missing, unreadable or cannot be loaded; the message names the source and the cause."""

    reason = TRAINER_REASON_MODEL_ERROR


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for a trainer: PEFT-wrapped for lora/qlora, plain for full; its tokenizer has a pad token."""

    model: Any
    tokenizer: Any
    objective: Objective
    method: str
    mixed_precision: MixedPrecision


# ----------------------------------------------------------------------------------------------------------------------
# Resolving model.name / model.uri to a local directory


def hub_offline(env: dict[str, str] | None = None) -> bool:
    """Whether HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) asks for the local hub cache only."""
    source = os.environ if env is None else env
    return any(source.get(name, "").strip().lower() in TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_source(model: ModelSpec) -> str:
    """How the spec names the model, for messages: `model.name X` or `model.uri Y`."""
    if model.name is not None:
        revision = f"@{model.revision}" if model.revision else ""
        return f"model.name {model.name}{revision}"
    return f"model.uri {model.uri}"


def cache_dir_name(uri: str) -> str:
    """A stable directory name for one model URI: readable tail plus a hash of the whole URI."""
    tail = storage.name_of(uri.rstrip("/")) or "model"
    safe_tail = "".join(char if char.isalnum() or char in "-_." else "-" for char in tail)[:64]
    return f"{safe_tail}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def check_model_dir(path: Path, source: str) -> Path:
    """The directory when it looks like a transformers model (config.json and weights); ModelError otherwise."""
    if not path.exists():
        raise ModelError(f"{source}: no such directory {path}")
    if not path.is_dir():
        raise ModelError(f"{source}: {path} is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"{source}: {path} has no config.json, so it is not a transformers model directory")
    if not any(child.suffix in WEIGHT_SUFFIXES for child in path.iterdir()):
        raise ModelError(
            f"{source}: {path} has no weight files ({', '.join('*' + suffix for suffix in WEIGHT_SUFFIXES)})"
        )
    return path


def fetch_s3_model(uri: str, cache_dir: Path, source: str) -> Path:
    """Download an s3:// model prefix once into cache_dir; later calls (and other processes) reuse it."""
    target = cache_dir / cache_dir_name(uri)
    if (target / DOWNLOAD_COMPLETE_MARKER).exists():
        log.info("model %s already in the local cache %s", uri, target)
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    except OSError as error:
        raise ModelError(f"{source}: cannot create the model cache in {cache_dir}: {error}") from error
    try:
        storage.download_dir(uri, staging)
        (staging / DOWNLOAD_COMPLETE_MARKER).write_text(uri)
        # Renaming a finished download into place is atomic: a concurrent reader sees all of it or nothing. When
        # another process won the race, its copy is as good as ours.
        staging.rename(target)
    except storage.StorageError as error:
        raise ModelError(f"{source}: cannot download the model: {error.message} ({error.reason})") from error
    except OSError as error:
        if not (target / DOWNLOAD_COMPLETE_MARKER).exists():
            raise ModelError(f"{source}: cannot write the model to {target}: {error}") from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_hub_model(name: str, revision: str | None, hub_cache_dir: Path | None, source: str) -> Path:
    """The snapshot directory of a hub model; offline (HF_HUB_OFFLINE) it must already be in the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        snapshot = snapshot_download(repo_id=name, revision=revision, cache_dir=hub_cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError as error:
        where = hub_cache_dir or os.environ.get("HF_HUB_CACHE") or "the default hub cache"
        hint = f"it is not in the offline hub cache ({where})" if offline else "the hub cannot be reached"
        raise ModelError(f"{source}: {hint}: {error}") from error
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ModelError(f"{source}: cannot fetch the model from the hub: {error}") from error
    return Path(snapshot)


def resolve_model_dir(model: ModelSpec, cache_dir: Path, hub_cache_dir: Path | None = None) -> Path:
    """A local directory holding the base model: from the hub (or its offline cache), from S3, or a local path."""
    source = model_source(model)
    if model.name is not None:
        path = resolve_hub_model(model.name, model.revision, hub_cache_dir, source)
    elif model.uri is not None and storage.is_s3(model.uri):
        path = fetch_s3_model(model.uri, cache_dir, source)
    elif model.uri is not None:
        path = Path(model.uri).expanduser()
    else:
        raise ModelError("exactly one of model.name or model.uri must be set")
    return check_model_dir(path, source)


# ----------------------------------------------------------------------------------------------------------------------
# Factories: spec → library objects


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a QuantizationSpec.compute_dtype name."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def build_bnb_config(quantization: QuantizationSpec, keep_full_precision: Sequence[str] = ()) -> BitsAndBytesConfig:
    """bitsandbytes settings for the frozen base; keep_full_precision names modules left unquantized (trained heads)."""
    from transformers import BitsAndBytesConfig

    skip = list(keep_full_precision) or None
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def build_lora_config(lora: LoraSpec, task_type: str) -> LoraConfig:
    """The LoRA adapter; task type SEQ_CLS makes PEFT train and save the classification head with it."""
    from peft import LoraConfig

    targets = lora.target_modules
    # PEFT takes the literal string "all-linear", not a one-element list holding it.
    target_modules: str | list[str] = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        task_type=task_type,
        bias="none",
    )


def lora_task_type(objective: Objective) -> str:
    """PEFT's task type for a training objective."""
    return "SEQ_CLS" if objective == "sequence-classification" else "CAUSAL_LM"


# ----------------------------------------------------------------------------------------------------------------------
# Devices and precision


def cuda_available() -> bool:
    """Whether a CUDA device is usable."""
    import torch

    return bool(torch.cuda.is_available())


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU feature flags listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def mixed_precision(on_cuda: bool, cuda_bf16: bool, cpu_bf16: bool) -> MixedPrecision:
    """The autocast mode the trainer uses: bf16 where the device has it, fp16 on older GPUs, none on plain CPUs."""
    if on_cuda:
        return "bf16" if cuda_bf16 else "fp16"
    return "bf16" if cpu_bf16 else "no"


def detect_mixed_precision() -> MixedPrecision:
    """mixed_precision() for this machine."""
    import torch

    on_cuda = cuda_available()
    return mixed_precision(on_cuda, on_cuda and bool(torch.cuda.is_bf16_supported()), cpu_has_native_bf16())


def base_dtype_name(method: str, precision: MixedPrecision, quantization: QuantizationSpec | None) -> str:
    """dtype the base weights are loaded in: 16-bit for lora, fp32 master weights for full, compute dtype for qlora."""
    if method == "qlora" and quantization is not None:
        return quantization.compute_dtype
    if method == "lora":
        return {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[precision]
    return "float32"


def device_map(method: str, on_cuda: bool) -> dict[str, Any] | None:
    """Where from_pretrained puts the weights: bitsandbytes needs an explicit device (this process's GPU under DDP)."""
    if method != "qlora":
        return None  # the Trainer moves the model to its device
    if not on_cuda:
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(model_dir: Path, source: str = "model") -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"{source}: cannot load the tokenizer from {model_dir}: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{source}: the tokenizer in {model_dir} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """id2label and label2id for a classification head, in the data's label order."""
    return dict(enumerate(labels)), {label: index for index, label in enumerate(labels)}


def load_base_model(
    model_dir: Path,
    *,
    objective: Objective,
    labels: Sequence[str] | None,
    dtype_name: str,
    quantization: Any,
    placement: dict[str, Any] | None,
    pad_token_id: int,
    source: str,
) -> PreTrainedModel:
    """from_pretrained with the head the objective needs; ModelError naming the source when it fails."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype_name)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if placement is not None:
        kwargs["device_map"] = placement
    try:
        if objective == "sequence-classification":
            if not labels:
                raise ModelError(f"{source}: sequence-classification needs the data's labels, and there are none")
            id2label, label2id = label_maps(labels)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (ModelError, MemoryError):
        raise
    except Exception as error:
        # Out of memory is the OutOfMemory failure, not a broken model; anything else from_pretrained raises is.
        if type(error).__name__ == "OutOfMemoryError":
            raise
        raise ModelError(
            f"{source}: cannot load the model from {model_dir}: {type(error).__name__}: {error}"
        ) from error
    # Llama-style classifiers find each row's last real token through pad_token_id.
    model.config.pad_token_id = pad_token_id
    return model


def load_model_for_training(spec: FineTuneJobSpec, model_dir: Path, labels: Sequence[str] | None) -> LoadedModel:
    """The base model set up for spec.method: qlora (4-bit + LoRA), lora (16-bit + LoRA) or full (every weight)."""
    source = model_source(spec.model)
    objective: Objective = spec.training.objective
    checkpointing = spec.training.gradient_checkpointing
    on_cuda = cuda_available()
    precision = detect_mixed_precision()
    quantization_spec = spec.resolved_quantization()
    heads = CLASSIFIER_HEADS if objective == "sequence-classification" else ()
    bnb_config = build_bnb_config(quantization_spec, heads) if quantization_spec is not None else None
    tokenizer = load_tokenizer(model_dir, source)
    model = load_base_model(
        model_dir,
        objective=objective,
        labels=labels,
        dtype_name=base_dtype_name(spec.method, precision, quantization_spec),
        quantization=bnb_config,
        placement=device_map(spec.method, on_cuda),
        pad_token_id=tokenizer.pad_token_id,
        source=source,
    )
    lora_spec = spec.resolved_lora()
    if lora_spec is None:
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return LoadedModel(model, tokenizer, objective, spec.method, precision)
    from peft import get_peft_model, prepare_model_for_kbit_training

    if bnb_config is not None and upcasts_unquantized_weights(precision):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings would cut the graph before the first checkpointed block, leaving LoRA without gradients.
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, build_lora_config(lora_spec, lora_task_type(objective)))
    except (ValueError, KeyError) as error:
        raise ModelError(
            f"{source}: lora.targetModules {lora_spec.target_modules} do not fit this model: {error}"
        ) from error
    keep_trainable_weights_in_fp32(peft_model)
    return LoadedModel(peft_model, tokenizer, objective, spec.method, precision)


def upcasts_unquantized_weights(precision: MixedPrecision) -> bool:
    """Whether a 4-bit base's unquantized weights (embeddings, norms, heads) are copied to fp32 before training.

    PEFT's prepare_model_for_kbit_training does, for fp16's narrow range. Under bf16 autocast they stay bf16, as a
    plain TRL script leaves them: fp32 copies make the residual stream and its saved activations fp32 (on SmolLM2-135M
    here, batch 8 x 256 tokens: 5.9 GB peak RSS instead of 5.3 GB, and slower steps; bench/trainer_throughput.py).
    """
    return precision != "bf16"


def keep_trainable_weights_in_fp32(model: Any) -> None:
    """fp32 master copies of what is trained (LoRA, a classification head copied from a 16-bit base).

    AdamW steps on bf16 weights round small updates away; autocast still runs their matmuls in 16 bits. (TRL casts the
    LoRA weights of a 4-bit base back to bf16 for causal-lm training, following the QLoRA paper; the plain Trainer of
    sequence classification keeps these.)
    """
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
