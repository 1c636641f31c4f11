"""Loading what training saved for the evaluation: the base with the trained adapter, and a base for the baselines."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune_trainer.modeling import (
    CLASSIFIER_HEADS,
    ModelError,
    base_dtype_name,
    build_bnb_config,
    cuda_available,
    detect_mixed_precision,
    device_map,
    load_base_model,
    load_tokenizer,
    model_source,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunedModel:
    """The model the evaluation scores, its tokenizer, and (when the tuned model cannot give them) a baseline base.

    For lora/qlora causal LMs the baselines run on the same weights with the adapter disabled, so baseline_model is
    None. A classification head or a fully fine-tuned model has no adapter to disable: the base causal LM is loaded
    separately for the prompting baselines when the spec asks for any.
    """

    model: Any
    tokenizer: Any
    baseline_model: Any | None


def release_memory() -> None:
    """Give the memory of the finished training back before the evaluation loads its models."""
    gc.collect()
    if cuda_available():
        import torch

        torch.cuda.empty_cache()


def load_base(
    spec: FineTuneJobSpec, model_dir: Path, *, objective: str, labels: Sequence[str] | None, pad_token_id: int
) -> Any:
    """The base model as training loaded it (4-bit for qlora, 16-bit for lora), for the given objective."""
    quantization = spec.resolved_quantization()
    heads = CLASSIFIER_HEADS if objective == "sequence-classification" else ()
    precision = detect_mixed_precision()
    return load_base_model(
        model_dir,
        objective="sequence-classification" if objective == "sequence-classification" else "causal-lm",
        labels=labels,
        dtype_name=base_dtype_name(spec.method, precision, quantization),
        quantization=build_bnb_config(quantization, heads) if quantization is not None else None,
        placement=device_map(spec.method, cuda_available()),
        pad_token_id=pad_token_id,
        source=model_source(spec.model),
    )


def load_tuned_model(
    spec: FineTuneJobSpec, model_dir: Path, adapter_dir: Path, labels: Sequence[str] | None
) -> TunedModel:
    """The trained adapter on its base (or the fully fine-tuned model) ready for run_evaluation."""
    source = model_source(spec.model)
    tokenizer = load_tokenizer(adapter_dir, f"{source} (trained adapter)")
    objective = spec.training.objective
    needs_separate_baseline = bool(spec.evaluation.baselines) and (
        spec.method == "full" or objective == "sequence-classification"
    )
    model: Any
    if spec.method == "full":
        model = load_base_model(
            adapter_dir,
            objective=objective,
            labels=labels,
            dtype_name=base_dtype_name("lora", detect_mixed_precision(), None),
            quantization=None,
            placement=None,
            pad_token_id=tokenizer.pad_token_id,
            source=f"{source} (fully fine-tuned)",
        )
    else:
        from peft import PeftModel

        base = load_base(spec, model_dir, objective=objective, labels=labels, pad_token_id=tokenizer.pad_token_id)
        try:
            model = PeftModel.from_pretrained(base, adapter_dir)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelError(f"{source}: cannot load the trained adapter from {adapter_dir}: {error}") from error
    baseline = None
    if needs_separate_baseline:
        log.info("loading the base causal LM for the prompting baselines")
        baseline = load_base(spec, model_dir, objective="causal-lm", labels=None, pad_token_id=tokenizer.pad_token_id)
    return TunedModel(model=on_compute_device(model), tokenizer=tokenizer, baseline_model=on_compute_device(baseline))


def on_compute_device(model: Any) -> Any:
    """The model on the GPU when there is one; models loaded without a device map (lora, full) start on the CPU."""
    if model is None or not cuda_available() or getattr(model, "hf_device_map", None):
        return model
    return model.to("cuda")
