"""Trainer failures → summary reason, short message and exit code (retry or not)."""

from __future__ import annotations

import json

import pytest
from kubetune_trainer.data.rows import DataError
from kubetune_trainer.failures import (
    EXIT_CODE_PERMANENT,
    EXIT_CODE_RETRYABLE,
    EXIT_CODE_SUCCEEDED,
    MESSAGE_LIMIT,
    ConfigError,
    EvaluationError,
    classify_failure,
    exit_code,
    failed_summary,
    is_out_of_memory,
)
from kubetune_trainer.modeling import ModelError
from kubetune_trainer.storage import REASON_NO_SUCH_BUCKET, StorageError
from kubetune_trainer.train.checkpoints import CheckpointError
from kubetune_trainer.train.trainer import TrainingDiverged

from kubetune.api import DatasetStatus, UsageStatus
from kubetune.contract import TERMINATION_MESSAGE_LIMIT_BYTES, TrainerSummary
from kubetune.manifests import ManifestError, ManifestProblem

pytestmark = pytest.mark.unit


class DistBackendError(RuntimeError):
    """Named like torch.distributed.DistBackendError, which a collective raises when a peer is gone."""


class OutOfMemoryError(RuntimeError):
    """Named like torch.OutOfMemoryError (torch.cuda.OutOfMemoryError), which the classifier matches by name."""


@pytest.mark.parametrize(
    ("error", "reason", "in_message"),
    [
        (DataError("train.jsonl:3: malformed JSON"), "DataError", "train.jsonl:3"),
        (ModelError("model.uri s3://b/m: no such key"), "ModelError", "model.uri s3://b/m"),
        (StorageError("s3://out/x", REASON_NO_SUCH_BUCKET, "no such bucket 'out'"), "StorageError", "s3://out/x"),
        (CheckpointError("s3://o/checkpoints/step-2 does not match"), "StorageError", "step-2"),
        (TrainingDiverged("the training loss became nan at step 7"), "TrainingDiverged", "step 7"),
        (ConfigError("no job to run"), "ConfigError", "no job to run"),
        (EvaluationError("validation line 4: label x"), "EvaluationError", "line 4"),
        (ManifestError([ManifestProblem("job.yaml", 3, 5, "spec.model", "bad")]), "ConfigError", "job.yaml:3:5"),
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "OutOfMemory", "training.batchSize"),
        (MemoryError(), "OutOfMemory", "out of memory"),
        (RuntimeError("CUDA error: out of memory"), "OutOfMemory", "CUDA error"),
        (KeyError("input_ids"), "InternalError", "KeyError"),
        (
            RuntimeError("[gloo/transport/tcp/pair.cc:538] Read error [10.200.0.6]:4321: Connection reset by peer"),
            "InternalError",
            "lost another process of this run ([gloo",
        ),
        (DistBackendError("NCCL communicator was aborted on rank 0"), "InternalError", "restart together"),
        (ZeroDivisionError("division by zero\n  more detail"), "InternalError", "ZeroDivisionError: division"),
    ],
)
def test_each_failure_gets_its_reason_and_a_message_saying_what_is_wrong(
    error: BaseException, reason: str, in_message: str
) -> None:
    failure = classify_failure(error)

    assert failure.reason == reason
    assert in_message in failure.message


def test_an_internal_error_keeps_only_the_first_line_of_its_message() -> None:
    failure = classify_failure(ValueError("first line\nTraceback-ish detail"))

    assert failure.message == "ValueError: first line"


def test_long_messages_are_cut_to_the_summary_limit() -> None:
    failure = classify_failure(DataError("x" * 10_000))

    assert len(failure.message) == MESSAGE_LIMIT
    assert failure.message.endswith("…")


def test_out_of_memory_is_matched_by_name_or_message_only() -> None:
    assert is_out_of_memory(OutOfMemoryError("boom"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("DataError", EXIT_CODE_PERMANENT),
        ("ConfigError", EXIT_CODE_PERMANENT),
        ("ModelError", EXIT_CODE_PERMANENT),
        ("OutOfMemory", EXIT_CODE_PERMANENT),
        ("TrainingDiverged", EXIT_CODE_PERMANENT),
        ("EvaluationError", EXIT_CODE_PERMANENT),
        ("StorageError", EXIT_CODE_RETRYABLE),
        ("InternalError", EXIT_CODE_RETRYABLE),
    ],
)
def test_permanent_failures_and_retryable_failures_exit_differently(reason: str, code: int) -> None:
    summary = TrainerSummary(outcome="Failed", reason=reason, message="m")

    assert exit_code(summary) == code
    assert code not in (EXIT_CODE_SUCCEEDED, 1, 2, 143)


def test_success_exits_zero() -> None:
    assert exit_code(TrainerSummary(outcome="Succeeded")) == EXIT_CODE_SUCCEEDED


def test_a_failed_summary_keeps_what_is_known_and_fits_the_termination_message() -> None:
    failure = classify_failure(DataError("bad rows:\n" + "\n".join(f"  train.jsonl:{n}: bad" for n in range(2000))))
    dataset = DatasetStatus(format="classification", train_rows=10, sha256="ab" * 32)

    summary = failed_summary(failure, dataset=dataset, usage=UsageStatus(wall_seconds=3.0))
    message = summary.to_termination_message()

    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT_BYTES
    parsed = json.loads(message)
    assert parsed["outcome"] == "Failed"
    assert parsed["reason"] == "DataError"
    assert parsed["dataset"]["trainRows"] == 10
    assert parsed["message"].startswith("bad rows:")
