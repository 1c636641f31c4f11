"""A check of the trainer on a GPU machine lent by the `device` tool: `kubetune train` (the trainer pod's code path),
qLoRA with bitsandbytes nf4 on CUDA, then evaluation against both prompting baselines.

    python -m bench.gpu_check prepare        # here: fills .gpu/ (ignored by git)
    device run: `bash .gpu/run.sh`, carry [".gpu"]

Why a prepared folder: nothing can be fetched on the device machine, and what travels there is limited to 64 MiB. Its
image has torch for CUDA 13.0, accelerate and the scientific stack (Python 3.12), but not bitsandbytes, trl, datasets,
pydantic or boto3. Those travel as Python 3.12 wheels at the versions the trainer image pins
(trainer-image/requirements.txt), bitsandbytes unpacked with only its CPU and CUDA 13.0 libraries (4.5 MB of a 43 MB
wheel). The model is SmolLM2's architecture at 2 layers of width 64, with its tokenizer and random weights (~10 MB):
the check is of the GPU code path (4-bit loading, LoRA, the training loop, generation), not of quality; the 135M
model's 270 MB cannot travel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ".gpu"  # relative to the repository root, where the device runs the command
REQUIREMENTS = REPO_ROOT / "trainer-image" / "requirements.txt"
# What the trainer imports that the device image lacks (or has at other versions than the trainer image pins).
CARRIED = (
    "trl", "transformers", "peft", "huggingface-hub", "httpx2", "httpcore2", "truststore", "datasets", "dill",
    "multiprocess", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "boto3", "botocore",
    "s3transfer", "jmespath",
)  # fmt: skip
BITSANDBYTES = "bitsandbytes"
DEVICE_CUDA = "130"  # the device image's torch is built for CUDA 13.0
DEVICE_PYTHON = "3.12"
# pip matches each manylinux tag exactly; these cover the carried wheels.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TRAIN_ROWS = 200
HELD_OUT_ROWS = 40
TINY_MODEL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
}  # fmt: skip

RUN_SH = """\
#!/usr/bin/env bash
# On the device machine, from the repository root: install what travelled, check one nf4 layer on CUDA, then train and
# evaluate with `kubetune train` (written by `python -m bench.gpu_check prepare`).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl \\
  || exit 3
cp -r .gpu/bitsandbytes/* /tmp/site/
export PYTHONPATH=/tmp/site:$PWD:$PWD/trainer-image
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m bench.gpu_check cuda-layer 2>&1 | tee "$OUT/cuda-layer.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 4
SECONDS=0
python3 -c 'from kubetune_cli.cli import main; main()' train -f .gpu/job.yaml --output-uri /tmp/gpu-out/ -v \\
  > "$OUT/train.log" 2>&1
rc=$?
echo "kubetune train: exit $rc after $SECONDS s"
tail -40 "$OUT/train.log"
cp /tmp/gpu-out/eval/report.json /tmp/gpu-out/manifest.json "$OUT/" 2>/dev/null
exit $rc
"""


def pinned_versions(requirements_text: str) -> dict[str, str]:
    """`name==version` lines of a requirements file, by lower-case name."""
    pins = {}
    for line in requirements_text.splitlines():
        requirement = line.split("#", 1)[0].strip()
        name, separator, version = requirement.partition("==")
        if separator:
            pins[name.strip().lower()] = version.strip()
    return pins


def wheel_specs(pins: Mapping[str, str], names: tuple[str, ...] = CARRIED) -> list[str]:
    """`name==version` for each carried package, at the trainer image's pin."""
    missing = [name for name in names if name not in pins]
    if missing:
        raise click.ClickException(f"{REQUIREMENTS} pins no version of {', '.join(missing)}")
    return [f"{name}=={pins[name]}" for name in names]


def kept_bitsandbytes_file(path: str, cuda: str = DEVICE_CUDA) -> bool:
    """Whether a file of the bitsandbytes wheel travels: all but the native libraries of other CUDA, ROCm and XPU
    versions (each 1-27 MB), which the device's torch never loads."""
    name = path.rsplit("/", 1)[-1]
    if not (name.startswith("libbitsandbytes_") and name.endswith(".so")):
        return True
    return name in (f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so")


def job_manifest() -> dict[str, Any]:
    """The FineTuneJob the device trains: qLoRA, 20 steps, both baselines on 20 held-out rows; paths relative to the
    repository root."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gpu-check"},
        "spec": {
            "model": {"uri": f"{GPU_DIR}/model"},
            "dataset": {
                "train": f"{GPU_DIR}/data/train.jsonl",
                "validation": f"{GPU_DIR}/data/test.jsonl",
                "format": "classification",
                "maxLength": 256,
            },
            "method": "qlora",
            "training": {
                "maxSteps": 20,
                "batchSize": 8,
                "learningRate": 6.0e-4,
                "warmupSteps": 2,
                "checkpointEvery": 10,
            },
            "evaluation": {
                "metrics": ["loss", "accuracy", "f1"],
                "baselines": ["zeroShot", "fewShot"],
                "fewShotK": 3,
                "maxSamples": 20,
            },
            "output": {"uri": f"{GPU_DIR}/out/"},
        },
    }


def download_wheels(specs: list[str], into: Path) -> None:
    """Python 3.12 manylinux wheels of exactly these versions, without their dependencies."""
    # The project's venv is made by uv and has no pip; the system Python's pip downloads for any target.
    python = shutil.which("python3") or sys.executable
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [
        python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
        DEVICE_PYTHON, "--implementation", "cp", *platforms, "--dest", str(into), *specs,
    ]  # fmt: skip
    subprocess.run(command, check=True)


def unpack_bitsandbytes(wheel: Path, into: Path) -> None:
    """The wheel's files but the native libraries the device never loads (kept_bitsandbytes_file)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if kept_bitsandbytes_file(member):
                archive.extract(member, into)


def write_tiny_model(source: Path, into: Path) -> None:
    """SmolLM2's configuration at TINY_MODEL's sizes, random weights in bf16, and SmolLM2's tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.update(TINY_MODEL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(into)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, into / name)


def write_rows(source: Path, target: Path, rows: int) -> None:
    """The first `rows` lines of a JSONL file."""
    with source.open(encoding="utf-8") as lines:
        head = [line for _, line in zip(range(rows), lines, strict=False)]
    target.write_text("".join(head), encoding="utf-8")


@click.group()
def main() -> None:
    """Prepare (here) and run (on the device) the GPU check of the trainer."""


@main.command()
@click.option(
    "--into", type=click.Path(file_okay=False, path_type=Path), default=REPO_ROOT / GPU_DIR, show_default=True
)
def prepare(into: Path) -> None:
    """Fill the folder the device run carries: wheels, trimmed bitsandbytes, the tiny model, data, job, run.sh."""
    from tests.testbed.shared_data import shared_sample
    from tests.testbed.smollm2 import convert_smollm2

    if into.exists():
        shutil.rmtree(into)
    (into / "wheels").mkdir(parents=True)
    (into / "data").mkdir()
    pins = pinned_versions(REQUIREMENTS.read_text(encoding="utf-8"))
    download_wheels(wheel_specs(pins), into / "wheels")
    download_wheels(wheel_specs(pins, (BITSANDBYTES,)), into)
    (wheel,) = into.glob(f"{BITSANDBYTES}-*.whl")
    unpack_bitsandbytes(wheel, into / BITSANDBYTES)
    wheel.unlink()
    write_tiny_model(convert_smollm2(), into / "model")
    write_rows(shared_sample("ag_news", "train"), into / "data" / "train.jsonl", TRAIN_ROWS)
    write_rows(shared_sample("ag_news", "test"), into / "data" / "test.jsonl", HELD_OUT_ROWS)
    (into / "job.yaml").write_text(json.dumps(job_manifest(), indent=2) + "\n", encoding="utf-8")
    (into / "run.sh").write_text(RUN_SH, encoding="utf-8")
    size = sum(path.stat().st_size for path in into.rglob("*") if path.is_file())
    click.echo(f"prepared {into} ({size / 2**20:.1f} MiB); on the device: `bash {GPU_DIR}/run.sh`, carry [{GPU_DIR!r}]")


@main.command("cuda-layer")
def cuda_layer() -> None:
    """On the device: the versions in use, and one nf4 Linear4bit forward and backward on CUDA in bf16."""
    from importlib.metadata import version

    import bitsandbytes
    import torch

    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "pydantic"):
        click.echo(f"{name} {version(name)}")
    if not torch.cuda.is_available():
        raise click.ClickException("torch sees no CUDA device")
    click.echo(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
    layer = bitsandbytes.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    inputs = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outputs = layer(inputs)
    outputs.float().sum().backward()
    if inputs.grad is None or not torch.isfinite(inputs.grad).all():
        raise click.ClickException("the nf4 layer's backward gave no finite gradient")
    click.echo(f"nf4 Linear4bit on CUDA: output {tuple(outputs.shape)} {outputs.dtype}, gradient finite")


if __name__ == "__main__":
    main()
