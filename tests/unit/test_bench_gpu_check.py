"""The GPU check's preparation: wheels at the trainer image's pins, bitsandbytes trimmed to what the device loads, a
valid job, a tiny model of SmolLM2's shape (the device run itself needs a lent GPU machine)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import click
import pytest

from bench.gpu_check import (
    CARRIED,
    REQUIREMENTS,
    TINY_MODEL,
    job_manifest,
    kept_bitsandbytes_file,
    pinned_versions,
    unpack_bitsandbytes,
    wheel_specs,
    write_rows,
    write_tiny_model,
)
from kubetune.api import FineTuneJob
from kubetune.rules import rule_violations

pytestmark = pytest.mark.unit


def test_every_carried_wheel_is_pinned_by_the_trainer_image_and_taken_at_that_pin() -> None:
    pins = pinned_versions(REQUIREMENTS.read_text(encoding="utf-8"))

    specs = wheel_specs(pins)

    assert [spec.partition("==")[0] for spec in specs] == list(CARRIED)
    assert all(spec == f"{name}=={pins[name]}" for spec, name in zip(specs, CARRIED, strict=True))
    assert pinned_versions("# a comment\nTorch==2.13.0  # why\n\nplain-name\n") == {"torch": "2.13.0"}
    with pytest.raises(click.ClickException, match="pins no version of nowhere"):
        wheel_specs(pins, ("trl", "nowhere"))


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("bitsandbytes/libbitsandbytes_cuda130.so", True),
        ("bitsandbytes/libbitsandbytes_cpu.so", True),
        ("bitsandbytes/libbitsandbytes_cuda128.so", False),
        ("bitsandbytes/libbitsandbytes_rocm72.so", False),
        ("bitsandbytes/libbitsandbytes_xpu2025.so", False),
        ("bitsandbytes/nn/modules.py", True),
        ("bitsandbytes-0.50.2.dist-info/METADATA", True),
    ],
)
def test_bitsandbytes_travels_with_its_cpu_and_cuda_13_libraries_only(path: str, kept: bool) -> None:
    assert kept_bitsandbytes_file(path) is kept


def test_unpacking_bitsandbytes_leaves_the_other_libraries_in_the_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in (
            "bitsandbytes/__init__.py",
            "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/libbitsandbytes_cuda118.so",
        ):
            archive.writestr(name, "x")

    unpack_bitsandbytes(wheel, tmp_path / "out")

    found = sorted(path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").rglob("*.*"))
    assert found == ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cuda130.so"]


def test_the_device_job_is_a_valid_qlora_job_with_both_baselines() -> None:
    job = FineTuneJob.model_validate(job_manifest())

    assert rule_violations(job.spec) == []
    assert job.spec.method == "qlora" and job.spec.model.uri == ".gpu/model"
    assert job.spec.evaluation.baselines == ["zeroShot", "fewShot"]


def test_rows_are_the_first_lines_of_the_sample(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n" for i in range(5)), encoding="utf-8")

    write_rows(source, tmp_path / "out.jsonl", 3)

    assert [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        "t0",
        "t1",
        "t2",
    ]


def test_the_tiny_model_has_smollm2s_shape_at_the_small_sizes_and_its_tokenizer(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tiny_model(smollm2_dir, tmp_path / "model")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    source = json.loads((smollm2_dir / "config.json").read_text())
    config = model.config.to_dict()
    assert {key: config[key] for key in TINY_MODEL} == TINY_MODEL
    assert (config["model_type"], config["vocab_size"]) == (source["model_type"], source["vocab_size"])
    assert sum(path.stat().st_size for path in (tmp_path / "model").iterdir()) < 12 * 2**20
    ids = tokenizer("World news", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], source["vocab_size"])
