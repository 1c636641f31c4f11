"""The model and training stages on a tiny random Llama, with checkpoints in moto's S3 server over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import storage
from kubetune_trainer.data.prepare import prepare_data
from kubetune_trainer.data.rows import DataError, PreparedData
from kubetune_trainer.modeling import ModelError, detect_mixed_precision, load_model_for_training, resolve_model_dir
from kubetune_trainer.train.callbacks import RunFlags
from kubetune_trainer.train.checkpoints import (
    COMPLETE_MARKER,
    RemoteCheckpoint,
    checkpoint_uri,
    fetch_latest_checkpoint,
    list_checkpoints,
    upload_checkpoint,
    upload_node_files,
)
from kubetune_trainer.train.progress import TrainingStep
from kubetune_trainer.train.trainer import (
    RESUME_SUBDIR,
    TrainingDiverged,
    TrainResult,
    build_trainer,
    train,
)
from transformers import TrainerCallback

from kubetune.api import FineTuneJobSpec, ModelSpec, ProgressStatus
from kubetune.contract import EXIT_CODE_PREEMPTED, trainer_command
from tests.testbed.processes import free_port
from tests.testbed.shared_data import shared_sample
from tests.testbed.tiny_models import build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.integration

DRIVER = Path(__file__).with_name("training_driver.py")
REGION = "us-east-1"
TRAIN_ROWS = 40


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: moto's S3 server, a tiny model, a small classification dataset


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "training-test-key",
        "AWS_SECRET_ACCESS_KEY": "training-test-secret",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return env


@pytest.fixture
def bucket(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    import boto3

    name = "train-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name=REGION)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer", vocab_size=512)
    return build_tiny_llama(root / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in shared_sample("ag_news").read_text().splitlines()[:TRAIN_ROWS]]
    # Short texts keep every step cheap; the labels are the point here, not the news.
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": row["text"][:80], "label": row["label"]}) + "\n" for row in rows))
    return path


def job_spec(model_dir: Path, train_path: Path, output_uri: str, **overrides: Any) -> FineTuneJobSpec:
    """A small, fast spec; overrides replace top-level sections (training is merged)."""
    wire: dict[str, Any] = {
        "model": {"uri": str(model_dir)},
        "dataset": {"train": str(train_path), "format": "classification", "maxLength": 256, "validationSplit": 0.1},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {
            "maxSteps": 4,
            "batchSize": 4,
            "learningRate": 5e-3,
            "warmupSteps": 0,
            "checkpointEvery": 2,
            "loggingSteps": 1,
            "scheduler": "constant",
        },
        "output": {"uri": output_uri},
    }
    training = overrides.pop("training", {})
    wire["training"].update(training)
    wire.update(overrides)
    if wire["method"] == "full":
        wire.pop("lora", None)
    return FineTuneJobSpec.model_validate(wire)


def prepared(spec: FineTuneJobSpec) -> PreparedData:
    return prepare_data(spec.dataset, spec.training.seed)


class WeightSnapshots(TrainerCallback):
    """Copies of every parameter (and 4-bit packed weight) at the start and the end of training."""

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @staticmethod
    def capture(model: Any) -> dict[str, Any]:
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.before = self.capture(model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.after = self.capture(model)

    def changed(self, name: str) -> bool:
        import torch

        return not torch.equal(self.before[name], self.after[name])


def object_bytes(uri: str) -> bytes:
    return storage.read_bytes(uri)


def assert_checkpoint_verifies(output_uri: str, step: int) -> dict[str, str]:
    """The COMPLETE marker of step-N lists every uploaded file, and each object's sha256 matches it."""
    prefix = checkpoint_uri(output_uri, step)
    marker = json.loads(object_bytes(storage.join(prefix, COMPLETE_MARKER)))
    assert marker["step"] == step
    uploaded = {uri[len(prefix) + 1 :] for uri in storage.list_prefix(prefix)} - {COMPLETE_MARKER}
    assert uploaded == set(marker["files"])
    for relative, digest in marker["files"].items():
        assert hashlib.sha256(object_bytes(storage.join(prefix, relative))).hexdigest() == digest, relative
    return dict(marker["files"])


def safetensors_keys(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


# ----------------------------------------------------------------------------------------------------------------------
# Methods


def test_qlora_trains_the_adapter_and_leaves_the_4bit_base_alone(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    spec = job_spec(
        tiny_model, train_file, f"s3://{bucket}/qlora", method="qlora", training={"gradientCheckpointing": True}
    )
    snapshots = WeightSnapshots()

    result = train(spec, prepared(spec), tiny_model, tmp_path / "work", extra_callbacks=[snapshots])

    quantized = [name for name in snapshots.before if name.endswith("q_proj.base_layer.weight")]
    assert quantized, "expected LoRA-wrapped 4-bit projections"
    assert all(str(snapshots.before[name].dtype) == "torch.uint8" for name in quantized), "base is not 4-bit packed"
    lora_b = [name for name in snapshots.before if "lora_B" in name]
    assert lora_b and all(snapshots.changed(name) for name in lora_b)
    frozen = [name for name in snapshots.before if "lora_" not in name]
    assert frozen and not [name for name in frozen if snapshots.changed(name)]
    # Under bf16 autocast the unquantized weights stay in the base's bf16 (as TRL leaves them); elsewhere fp32.
    embedding = next(name for name in snapshots.before if name.endswith("embed_tokens.weight"))
    expected = "torch.bfloat16" if detect_mixed_precision() == "bf16" else "torch.float32"
    assert str(snapshots.before[embedding].dtype) == expected
    assert result.steps == 4
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["task_type"] == "CAUSAL_LM"
    saved = safetensors_keys(result.adapter_dir / "adapter_model.safetensors")
    assert any("lora_B" in key for key in saved) and not any("base_layer" in key for key in saved)
    assert (result.adapter_dir / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_fine_tuning_run_and_save(
    method: str, tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    output = {"uri": f"s3://{bucket}/{method}", "mergeAdapter": method != "full"}
    spec = job_spec(tiny_model, train_file, "unused", method=method, output=output)
    snapshots = WeightSnapshots()

    result = train(spec, prepared(spec), tiny_model, tmp_path / "work", extra_callbacks=[snapshots])

    assert result.steps == 4 and result.total_steps == 4
    assert result.trained_tokens > 0 and result.final_loss is not None and result.train_loss is not None
    embed = next(name for name in snapshots.before if name.endswith("embed_tokens.weight"))
    if method == "full":
        assert snapshots.changed(embed)
        assert (result.adapter_dir / "model.safetensors").is_file()
        assert (result.adapter_dir / "config.json").is_file()
    else:
        assert not snapshots.changed(embed)
        assert any(snapshots.changed(name) for name in snapshots.before if "lora_B" in name)
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()
        assert_merged_model_matches_adapter(tiny_model, result)


def assert_merged_model_matches_adapter(base_dir: Path, result: TrainResult) -> None:
    """The merged checkpoint computes what the base plus the saved adapter computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert result.merged_dir is not None and (result.merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), result.adapter_dir
    )
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        merged_logits, adapted_logits = merged(tokens).logits, adapted(tokens).logits
        plain_logits = plain(tokens).logits
    # The merge happens in 16 bits, so agreement is to bf16 precision, while the adapter's effect is far larger.
    assert torch.allclose(merged_logits, adapted_logits, atol=0.05)
    assert not torch.allclose(plain_logits, adapted_logits, atol=0.05)


def test_a_qlora_adapter_is_merged_into_the_weights_it_was_trained_against(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    import torch
    from kubetune_trainer.modeling import build_bnb_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = {"uri": f"s3://{bucket}/qlora", "mergeAdapter": True}
    spec = job_spec(tiny_model, train_file, "unused", method="qlora", output=output)
    quantization = spec.resolved_quantization()
    assert spec.method == "qlora" and quantization is not None

    result = train(spec, prepared(spec), tiny_model, tmp_path / "work")

    assert result.merged_dir is not None
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None  # 16-bit weights, loadable anywhere
    # What the evaluation ran: the 4-bit base with the adapter.
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(
            tiny_model, quantization_config=build_bnb_config(quantization), dtype=torch.float32
        ),
        result.adapter_dir,
    )
    # The adapter on the original 16-bit checkpoint: what a merge into it would compute.
    on_original = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), result.adapter_dir
    )
    tokens = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        merged_logits, trained_logits = merged(tokens).logits, trained(tokens).logits
        original_logits = on_original(tokens).logits
    gap_to_trained = (merged_logits - trained_logits).abs().max().item()
    gap_to_original = (original_logits - trained_logits).abs().max().item()
    assert gap_to_trained < 0.1, gap_to_trained
    assert gap_to_trained < gap_to_original / 2, (gap_to_trained, gap_to_original)


def test_sequence_classification_trains_the_head_and_saves_it_with_the_adapter(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    spec = job_spec(tiny_model, train_file, f"s3://{bucket}/seqcls", training={"objective": "sequence-classification"})
    data = prepared(spec)
    snapshots = WeightSnapshots()

    result = train(spec, data, tiny_model, tmp_path / "work", extra_callbacks=[snapshots])

    head = next(name for name in snapshots.before if name.endswith("score.modules_to_save.default.weight"))
    original = next(name for name in snapshots.before if name.endswith("score.original_module.weight"))
    assert snapshots.changed(head) and not snapshots.changed(original)
    # The fresh head learns in fp32 master weights even though the base it was copied from is 16-bit.
    assert str(snapshots.before[head].dtype) == "torch.float32"
    assert tuple(snapshots.after[head].shape) == (len(data.labels or []), 64)
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    saved = safetensors_keys(result.adapter_dir / "adapter_model.safetensors")
    saved_head = next(tensor for key, tensor in saved.items() if "score" in key)
    assert saved_head.float().allclose(snapshots.after[head].float())
    labels = json.loads((result.adapter_dir / "labels.json").read_text())
    assert list(labels["id2label"].values()) == data.labels


def test_packed_text_trains_with_gradient_checkpointing(tiny_model: Path, bucket: str, tmp_path: Path) -> None:
    rows = [json.loads(line)["text"] for line in shared_sample("ag_news").read_text().splitlines()[:TRAIN_ROWS]]
    text_file = tmp_path / "text.jsonl"
    text_file.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    dataset = {"train": str(text_file), "format": "text", "maxLength": 128}
    training = {"packing": True, "gradientCheckpointing": True}
    spec = job_spec(tiny_model, text_file, f"s3://{bucket}/packed", dataset=dataset, training=training)
    data = prepared(spec)
    snapshots = WeightSnapshots()

    result = train(spec, data, tiny_model, tmp_path / "work", extra_callbacks=[snapshots])

    assert result.steps == 4 and result.final_loss is not None
    assert any(snapshots.changed(name) for name in snapshots.before if "lora_B" in name)
    # Packed rows are max_length tokens with no padding: 4 steps of 4 rows of 128 tokens, or fewer at the tail.
    assert 0 < result.trained_tokens <= 4 * 4 * 128


# ----------------------------------------------------------------------------------------------------------------------
# Completion-only loss


@pytest.mark.parametrize("template", [None, "Text: {text}\nTopic:"])
def test_completion_only_loss_masks_the_prompt(
    template: str | None, tiny_model: Path, train_file: Path, tmp_path: Path
) -> None:
    dataset = {"train": str(train_file), "format": "classification", "maxLength": 256}
    if template:
        dataset["template"] = template
    spec = job_spec(tiny_model, train_file, str(tmp_path / "out"), dataset=dataset)
    data = prepared(spec)
    loaded = load_model_for_training(spec, tiny_model, data.labels)
    trainer = build_trainer(spec, data=data, loaded=loaded, checkpoints_dir=tmp_path / "checkpoints", flags=RunFlags())
    tokenizer = loaded.tokenizer

    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(3)])

    assert len(trainer.train_dataset) == len(data.train), "no example may be dropped, or rows no longer line up"
    for row, example in enumerate(data.train[:3]):
        if template:
            prompt_ids = tokenizer(example.prompt)["input_ids"]
        else:
            rendered = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, return_dict=True)
            prompt_ids = rendered["input_ids"]
        real = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row].tolist()
        input_ids = batch["input_ids"][row].tolist()
        assert input_ids[: len(prompt_ids)] == list(prompt_ids)
        assert all(label == -100 for label in labels[: len(prompt_ids)]), "the prompt contributes to the loss"
        assert labels[len(prompt_ids) : real] == input_ids[len(prompt_ids) : real], "the completion is masked"
        assert all(label == -100 for label in labels[real:]), "padding contributes to the loss"
        answer = tokenizer.decode(input_ids[len(prompt_ids) : real])
        assert answer.startswith(example.completion)


def test_full_sequence_loss_when_completion_only_loss_is_off(
    tiny_model: Path, train_file: Path, tmp_path: Path
) -> None:
    spec = job_spec(tiny_model, train_file, str(tmp_path / "out"), training={"completionOnlyLoss": False})
    data = prepared(spec)
    loaded = load_model_for_training(spec, tiny_model, data.labels)
    trainer = build_trainer(spec, data=data, loaded=loaded, checkpoints_dir=tmp_path / "checkpoints", flags=RunFlags())

    batch = trainer.data_collator([trainer.train_dataset[0]])

    real = int(batch["attention_mask"][0].sum())
    assert batch["labels"][0].tolist()[:real] == batch["input_ids"][0].tolist()[:real]


def test_prompts_that_fill_max_length_leave_nothing_to_train_and_say_so(
    tiny_model: Path, train_file: Path, tmp_path: Path
) -> None:
    dataset = {"train": str(train_file), "format": "classification", "maxLength": 16}
    spec = job_spec(tiny_model, train_file, str(tmp_path / "out"), dataset=dataset)
    data = prepared(spec)
    loaded = load_model_for_training(spec, tiny_model, data.labels)

    with pytest.raises(DataError, match=r"no training example fits dataset.maxLength=16 tokens"):
        build_trainer(spec, data=data, loaded=loaded, checkpoints_dir=tmp_path / "checkpoints", flags=RunFlags())


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoints_are_uploaded_with_complete_markers_whose_hashes_verify(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    output = f"s3://{bucket}/run"
    spec = job_spec(tiny_model, train_file, output, training={"maxSteps": 5, "checkpointEvery": 2})

    result = train(spec, prepared(spec), tiny_model, tmp_path / "work")

    # Every checkpointEvery steps, and the last step too.
    assert result.checkpoint_steps == (2, 4, 5)
    assert [checkpoint.step for checkpoint in list_checkpoints(output)] == [5, 4, 2]
    files = assert_checkpoint_verifies(output, 4)
    for needed in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert needed in files
    assert_checkpoint_verifies(output, 2)
    state = json.loads(object_bytes(storage.join(checkpoint_uri(output, 4), "trainer_state.json")))
    assert state["global_step"] == 4


def test_checkpoints_without_complete_marker_or_with_wrong_hashes_are_not_resumed(bucket: str, tmp_path: Path) -> None:
    output = f"s3://{bucket}/run"
    local = tmp_path / "checkpoint"
    local.mkdir()
    (local / "trainer_state.json").write_text('{"global_step": 2}')
    (local / "adapter_model.safetensors").write_bytes(b"weights")
    upload_checkpoint(local, output, 2)
    # step-6: an upload killed before its marker; step-4: complete, but an object changed after the fact.
    storage.upload_dir(local, checkpoint_uri(output, 6))
    upload_checkpoint(local, output, 4)
    storage.write_bytes(storage.join(checkpoint_uri(output, 4), "adapter_model.safetensors"), b"tampered")

    assert list_checkpoints(output) == [
        RemoteCheckpoint(4, checkpoint_uri(output, 4)),
        RemoteCheckpoint(2, checkpoint_uri(output, 2)),
    ]
    found = fetch_latest_checkpoint(output, tmp_path / "resume")

    assert found is not None
    checkpoint, path = found
    assert checkpoint.step == 2
    assert (path / "adapter_model.safetensors").read_bytes() == b"weights"
    assert fetch_latest_checkpoint(f"s3://{bucket}/elsewhere", tmp_path / "none") is None


def test_the_files_of_another_node_are_in_the_checkpoint_and_its_marker_and_never_rewritten(
    bucket: str, tmp_path: Path
) -> None:
    output = f"s3://{bucket}/nodes"
    rank0, node1 = tmp_path / "node0" / "checkpoint-2", tmp_path / "node1" / "checkpoint-2"
    rank0.mkdir(parents=True)
    node1.mkdir(parents=True)
    (rank0 / "adapter_model.safetensors").write_bytes(b"weights")
    (rank0 / "rng_state_0.pth").write_bytes(b"rng of rank 0")
    (node1 / "rng_state_1.pth").write_bytes(b"rng of rank 1")

    node_files = upload_node_files(node1, output, 2)
    upload_checkpoint(rank0, output, 2, node_files)
    found = fetch_latest_checkpoint(output, tmp_path / "resume")

    assert set(node_files) == {"rng_state_1.pth"}
    assert found is not None
    assert (found[1] / "rng_state_1.pth").read_bytes() == b"rng of rank 1"
    # The marker checks node 1's file like rank 0's: a changed copy is refused.
    storage.write_bytes(storage.join(checkpoint_uri(output, 2), "rng_state_1.pth"), b"tampered")
    assert fetch_latest_checkpoint(output, tmp_path / "again") is None
    # A step already complete is final: a node that saves it again (a retry) uploads nothing over it.
    (node1 / "rng_state_1.pth").write_bytes(b"rng of a later attempt")
    assert upload_node_files(node1, output, 2) == {}
    assert object_bytes(storage.join(checkpoint_uri(output, 2), "rng_state_1.pth")) == b"tampered"


def launch_driver(
    config: dict[str, Any], tmp_path: Path, env: dict[str, str], name: str, processes: int = 1
) -> subprocess.Popen[bytes]:
    """The driver started the way the operator starts the trainer: trainer_command() for this many processes."""
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(config))
    command = trainer_command(processes, python=sys.executable, entry=[str(DRIVER), str(config_path)])
    with (tmp_path / f"{name}.log").open("wb") as log_file:
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def log_tail(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:]


def sigterm_after_checkpoint(process: subprocess.Popen[bytes], output: str, step: int, log: Path) -> int:
    """Wait until checkpoint `step` is complete in storage, send SIGTERM, return the exit status."""
    try:
        deadline = time.monotonic() + 300
        while not storage.exists(storage.join(checkpoint_uri(output, step), COMPLETE_MARKER)):
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, f"no complete checkpoint at step {step} in time"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()


def driver_env(s3_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **s3_env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def recorded_steps(record_dir: Path, rank: int = 0) -> list[int]:
    path = record_dir / f"steps-rank{rank}.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_sigterm_checkpoints_and_the_next_run_resumes_without_repeating_a_step(
    tiny_model: Path, train_file: Path, bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    output = f"s3://{bucket}/preempted"
    spec = job_spec(tiny_model, train_file, output, training={"maxSteps": 10, "checkpointEvery": 3})
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    base = {"spec": spec.to_wire(), "model_dir": str(tiny_model), "progress_interval": 0}
    process = launch_driver(
        {**base, "work_dir": str(first / "work"), "record_dir": str(first), "step_delay": 0.5},
        tmp_path,
        driver_env(s3_env),
        "first",
    )
    returncode = sigterm_after_checkpoint(process, output, 3, tmp_path / "first.log")
    assert returncode == EXIT_CODE_PREEMPTED, log_tail(tmp_path, "first")
    first_steps = recorded_steps(first)
    stopped_at = first_steps[-1]
    assert 3 <= stopped_at < 10 and first_steps == list(range(1, stopped_at + 1))
    assert list_checkpoints(output)[0].step == stopped_at
    assert_checkpoint_verifies(output, stopped_at)
    # A later upload that died before its marker must not be picked up.
    storage.write_bytes(storage.join(checkpoint_uri(output, 9), "adapter_model.safetensors"), b"partial")

    progress: list[ProgressStatus] = []
    result = train(
        spec, prepared(spec), tiny_model, second / "work", progress=progress.append, progress_interval_seconds=0
    )

    assert result.resumed_from_step == stopped_at
    assert result.steps == 10
    resumed_steps = [report.step for report in progress]
    assert resumed_steps == [*range(stopped_at + 1, 11), 10], "each step once, then the final state"
    assert result.trained_tokens > 0


# ----------------------------------------------------------------------------------------------------------------------
# Failures


def test_a_nan_loss_raises_training_diverged_and_saves_nothing(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(broken)
    output = f"s3://{bucket}/nan"
    spec = job_spec(broken, train_file, output, training={"checkpointEvery": 1})

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 1"):
        train(spec, prepared(spec), broken, tmp_path / "work")

    assert list_checkpoints(output) == []
    assert not (tmp_path / "work" / "adapter").exists()


def test_missing_or_broken_models_raise_model_error(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=r"model.uri /nonexistent/model: no such directory"):
        resolve_model_dir(ModelSpec(uri="/nonexistent/model"), cache)
    with pytest.raises(ModelError, match=r"has no config.json"):
        resolve_model_dir(ModelSpec(uri=str(train_file.parent)), cache)
    with pytest.raises(ModelError, match=rf"model.uri s3://{bucket}/absent: cannot download the model"):
        resolve_model_dir(ModelSpec(uri=f"s3://{bucket}/absent"), cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"model.name kubetune-tests/absent: it is not in the offline hub cache"):
        resolve_model_dir(ModelSpec(name="kubetune-tests/absent"), cache, hub_cache_dir=tmp_path / "hub")

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_model):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    spec = job_spec(broken, train_file, str(tmp_path / "out"))
    with pytest.raises(ModelError, match=r"cannot load the model from"):
        load_model_for_training(spec, resolve_model_dir(spec.model, cache), ["a", "b"])


def test_models_resolve_from_s3_once_and_from_the_offline_hub_cache(
    tiny_model: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{bucket}/models/tiny"
    storage.upload_dir(tiny_model, uri)
    cache = tmp_path / "cache"

    first = resolve_model_dir(ModelSpec(uri=uri), cache)
    for listed in storage.list_prefix(uri):
        storage.s3_client().delete_object(Bucket=bucket, Key=storage.parse_s3_uri(listed).key)
    second = resolve_model_dir(ModelSpec(uri=uri), cache)

    assert first == second and (second / "config.json").is_file()
    assert storage.list_prefix(uri) == [], "the second resolve must come from the local cache"

    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kubetune-tests--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(tiny_model):
        (snapshot / name).write_bytes((tiny_model / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    resolved = resolve_model_dir(ModelSpec(name="kubetune-tests/tiny"), cache, hub_cache_dir=tmp_path / "hub")

    assert resolved == snapshot


# ----------------------------------------------------------------------------------------------------------------------
# Progress


def test_progress_reaches_the_sink_at_a_bounded_rate_with_throughput_and_eta(
    tiny_model: Path, train_file: Path, bucket: str, tmp_path: Path
) -> None:
    spec = job_spec(tiny_model, train_file, f"s3://{bucket}/progress", training={"maxSteps": 6})
    reports: list[ProgressStatus] = []
    steps: list[TrainingStep] = []

    result = train(
        spec,
        prepared(spec),
        tiny_model,
        tmp_path / "work",
        progress=reports.append,
        on_step=steps.append,
        progress_interval_seconds=3600,
    )

    # An hour between reports: the first step goes out, then nothing until the final state.
    assert [report.step for report in reports] == [1, 6]
    first, final = reports
    assert first.stage == "train" and first.total_steps == 6 and first.percent == pytest.approx(16.7)
    assert first.tokens_per_second is not None and first.tokens_per_second > 0
    assert first.eta_seconds is not None and first.eta_seconds >= 0
    assert first.learning_rate == pytest.approx(5e-3)
    assert final.percent == 100.0 and final.eta_seconds == 0 and final.loss is not None
    assert final.tokens_per_second is not None and final.tokens_per_second > 0
    # Every optimizer step reaches on_step (the gauges and the bar), the tokens growing with it.
    assert [step.step for step in steps] == [1, 2, 3, 4, 5, 6] and all(step.total_steps == 6 for step in steps)
    assert 0 < steps[0].trained_tokens < steps[-1].trained_tokens == result.trained_tokens


# ----------------------------------------------------------------------------------------------------------------------
# Two processes


def test_two_process_run_trains_in_step_and_only_rank_zero_writes(
    tiny_model: Path, train_file: Path, bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    output = f"s3://{bucket}/ddp"
    spec = job_spec(tiny_model, train_file, output, training={"maxSteps": 4, "checkpointEvery": 2})
    config = {
        "spec": spec.to_wire(),
        "model_dir": str(tiny_model),
        "work_dir": str(tmp_path / "work"),
        "record_dir": str(tmp_path),
        "progress_interval": 0,
    }

    process = launch_driver(config, tmp_path, driver_env(s3_env), "ddp", processes=2)

    assert process.wait(timeout=600) == 0, log_tail(tmp_path, "ddp")
    worlds = [json.loads((tmp_path / f"world-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(world["rank"], world["world_size"], world["backend"]) for world in worlds] == [
        (0, 2, "gloo"),
        (1, 2, "gloo"),
    ]
    assert worlds[0]["pid"] != worlds[1]["pid"]
    assert recorded_steps(tmp_path, 0) == recorded_steps(tmp_path, 1) == [1, 2, 3, 4]
    assert [checkpoint.step for checkpoint in list_checkpoints(output)] == [4, 2]
    files = assert_checkpoint_verifies(output, 4)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)
    progress = [json.loads(line) for line in (tmp_path / "progress-rank0.jsonl").read_text().splitlines()]
    assert [report["step"] for report in progress] == [1, 2, 3, 4, 4]
    assert not (tmp_path / "progress-rank1.jsonl").exists(), "only rank 0 reports progress"
    result: dict[str, Any] = json.loads((tmp_path / "result-rank0.json").read_text())
    assert result["steps"] == 4
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()


# Two ranks of a real gloo group; rank 0 comes to the teardown `late` seconds after rank 1, which waits at most 2 s.
TEARDOWN_SCRIPT = """
import json, sys, time
import torch.distributed as dist
from kubetune_trainer.commands import leave_launch
from kubetune_trainer.train.callbacks import leave_process_group
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(float(sys.argv[1]))
started = time.monotonic()
left = leave_process_group(timeout=2.0)
print(json.dumps({"left": left, "seconds": time.monotonic() - started}))
leave_launch(0)
"""


@pytest.mark.parametrize(("late", "leaves_together"), [(0.0, True), (10.0, False)])
def test_a_rank_waits_for_the_teardown_of_the_process_group_only_so_long(late: float, leaves_together: bool) -> None:
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", TEARDOWN_SCRIPT, str(late)],
            env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    rank1_out, rank1_err = ranks[1].communicate(timeout=60)
    rank0_finished_first = ranks[0].poll() is not None
    ranks[0].communicate(timeout=120)

    assert ranks[1].returncode == 0, rank1_err
    outcome = json.loads(rank1_out)
    assert outcome["left"] is leaves_together
    if not leaves_together:
        # Rank 1 gave up after its 2 s and went on while rank 0 was still away, and said why.
        assert 2 <= outcome["seconds"] < 10 and not rank0_finished_first
        assert "did not leave the process group together (still waiting after 2 s)" in rank1_err
    assert ranks[0].returncode == 0


@pytest.mark.slow
def test_two_process_run_preempted_by_sigterm_resumes_on_both_ranks(
    tiny_model: Path, train_file: Path, bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    output = f"s3://{bucket}/ddp-preempted"
    spec = job_spec(tiny_model, train_file, output, training={"maxSteps": 12, "checkpointEvery": 3})
    base = {"spec": spec.to_wire(), "model_dir": str(tiny_model), "progress_interval": 0}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    env = driver_env(s3_env)

    process = launch_driver(
        {**base, "work_dir": str(first / "work"), "record_dir": str(first), "step_delay": 0.5},
        tmp_path,
        env,
        "first",
        processes=2,
    )
    # SIGTERM goes to the launcher, as the kubelet sends it to the container's main process; the launcher passes it
    # on to both ranks, which agree on the step to stop at, save, upload, and exit.
    returncode = sigterm_after_checkpoint(process, output, 3, tmp_path / "first.log")

    assert returncode != 0, log_tail(tmp_path, "first")
    stopped_at = recorded_steps(first, 0)[-1]
    assert recorded_steps(first, 1) == recorded_steps(first, 0) == list(range(1, stopped_at + 1))
    assert 3 <= stopped_at < 12
    assert list_checkpoints(output)[0].step == stopped_at
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(assert_checkpoint_verifies(output, stopped_at))

    process = launch_driver(
        {**base, "work_dir": str(second / "work"), "record_dir": str(second)}, tmp_path, env, "second", processes=2
    )

    assert process.wait(timeout=600) == 0, log_tail(tmp_path, "second")
    assert recorded_steps(second, 0) == recorded_steps(second, 1) == list(range(stopped_at + 1, 13))
    result = json.loads((second / "result-rank0.json").read_text())
    assert result["resumed_from_step"] == stopped_at and result["steps"] == 12


# ----------------------------------------------------------------------------------------------------------------------
# Several nodes: one launcher per pod, each with its node rank, meeting at rank 0's address (as JobSet runs them)


def launch_nodes(
    config: dict[str, Any], tmp_path: Path, env: dict[str, str], name: str, nodes: int = 2
) -> list[subprocess.Popen[bytes]]:
    """One launcher per node, started with trainer_command() as the operator renders it for a JobSet, each with a
    work directory of its own (pods share no disk); the node rank and rank 0's address are what the kubelet would
    substitute for $(KUBETUNE_NODE_RANK) and $(KUBETUNE_MAIN_ADDRESS)."""
    port = free_port()
    launchers = []
    for node in range(nodes):
        node_config = {**config, "work_dir": f"{config['work_dir']}-node{node}"}
        config_path = tmp_path / f"{name}-node{node}.json"
        config_path.write_text(json.dumps(node_config))
        command = trainer_command(
            1,
            python=sys.executable,
            entry=[str(DRIVER), str(config_path)],
            nodes=nodes,
            node_rank=str(node),
            main_address="127.0.0.1",
            main_port=port,
        )
        with (tmp_path / f"{name}-node{node}.log").open("wb") as log_file:
            launchers.append(subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT))
    return launchers


def node_logs(tmp_path: Path, name: str, nodes: int = 2) -> str:
    return "\n".join(log_tail(tmp_path, f"{name}-node{node}") for node in range(nodes))


def logged_losses(progress_file: Path) -> list[float]:
    """The training loss of each progress report that carried one."""
    reports = [json.loads(line) for line in progress_file.read_text().splitlines()]
    return [report["loss"] for report in reports if report.get("loss") is not None]


def test_two_nodes_train_in_lockstep_the_loss_falls_and_only_rank_zero_writes(
    tiny_model: Path, train_file: Path, bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    output = f"s3://{bucket}/two-nodes"
    spec = job_spec(tiny_model, train_file, output, training={"maxSteps": 8, "checkpointEvery": 4})
    config = {
        "spec": spec.to_wire(),
        "model_dir": str(tiny_model),
        "work_dir": str(tmp_path / "work"),
        "record_dir": str(tmp_path),
        "progress_interval": 0,
    }

    launchers = launch_nodes(config, tmp_path, driver_env(s3_env), "nodes")

    assert [launcher.wait(timeout=600) for launcher in launchers] == [0, 0], node_logs(tmp_path, "nodes")
    worlds = [json.loads((tmp_path / f"world-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(world["rank"], world["world_size"], world["backend"]) for world in worlds] == [
        (0, 2, "gloo"),
        (1, 2, "gloo"),
    ]
    assert recorded_steps(tmp_path, 0) == recorded_steps(tmp_path, 1) == list(range(1, 9))
    losses = logged_losses(tmp_path / "progress-rank0.jsonl")
    assert len(losses) >= 2 and losses[-1] < losses[0], f"the loss did not fall: {losses}"
    assert not (tmp_path / "progress-rank1.jsonl").exists(), "only rank 0 reports progress"
    assert [checkpoint.step for checkpoint in list_checkpoints(output)] == [8, 4]
    # Node 1 shares no disk with rank 0: it uploads its rank's RNG state, and rank 0's marker covers it.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(assert_checkpoint_verifies(output, 8))
    assert (Path(f"{config['work_dir']}-node0") / "adapter" / "adapter_model.safetensors").is_file()
    assert not (Path(f"{config['work_dir']}-node1") / "adapter").exists(), "only rank 0 writes the adapter"
    result = json.loads((tmp_path / "result-rank0.json").read_text())
    assert result["steps"] == 8


@pytest.mark.parametrize("signalled_node", [0, 1])
def test_sigterm_to_either_node_checkpoints_and_the_group_resumes(
    signalled_node: int, tiny_model: Path, train_file: Path, bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    output = f"s3://{bucket}/two-nodes-preempted-{signalled_node}"
    spec = job_spec(tiny_model, train_file, output, training={"maxSteps": 12, "checkpointEvery": 3})
    base = {"spec": spec.to_wire(), "model_dir": str(tiny_model), "progress_interval": 0}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    env = driver_env(s3_env)

    launchers = launch_nodes(
        {**base, "work_dir": str(first / "work"), "record_dir": str(first), "step_delay": 0.5}, tmp_path, env, "first"
    )
    # The kubelet stops one pod (its node drained, the pod evicted): only that node's launcher gets SIGTERM. The ranks
    # agree on the step to stop at, rank 0 uploads the checkpoint, and every node exits.
    sigterm_after_checkpoint(launchers[signalled_node], output, 3, tmp_path / f"first-node{signalled_node}.log")
    other = launchers[1 - signalled_node]
    other.wait(timeout=120)

    stopped_at = recorded_steps(first, 0)[-1]
    assert recorded_steps(first, 1) == recorded_steps(first, 0) == list(range(1, stopped_at + 1)), node_logs(
        tmp_path, "first"
    )
    assert 3 <= stopped_at < 12
    assert list_checkpoints(output)[0].step == stopped_at
    assert_checkpoint_verifies(output, stopped_at)

    # JobSet restarts the whole group: every node starts again and resumes from the newest complete checkpoint.
    launchers = launch_nodes(
        {**base, "work_dir": str(second / "work"), "record_dir": str(second)}, tmp_path, env, "second"
    )

    assert [launcher.wait(timeout=600) for launcher in launchers] == [0, 0], node_logs(tmp_path, "second")
    assert recorded_steps(second, 0) == recorded_steps(second, 1) == list(range(stopped_at + 1, 13))
    result = json.loads((second / "result-rank0.json").read_text())
    assert result["resumed_from_step"] == stopped_at and result["steps"] == 12
    # Node 1 resumed from a copy that holds its rank's RNG state (uploaded by node 1, verified against the marker).
    resumed_on_node1 = Path(f"{second / 'work'}-node1") / RESUME_SUBDIR / f"step-{stopped_at}"
    assert (resumed_on_node1 / "rng_state_1.pth").is_file()
