"""How a trainer failure becomes a summary reason, a short message and an exit code that says whether to retry.

Exit codes of `python -m kubetune_trainer run`:

- 0: succeeded (also when the evaluation gate failed: the operator applies gate.failJob from the summary).
- 65 (EXIT_CODE_PERMANENT): the job's inputs cannot work, so a retry would fail the same way: ConfigError, DataError,
  ModelError, OutOfMemory, TrainingDiverged, EvaluationError. The operator can end the Job at once with a
  podFailurePolicy rule `FailJob` on this exit code instead of spending runPolicy.backoffLimit on it.
- 75 (EXIT_CODE_RETRYABLE, sysexits' EX_TEMPFAIL): a fault that may pass: StorageError (after the storage layer's own
  retries), InternalError. The Job retries the pod, which resumes from the newest checkpoint.
- 143 (kubetune.contract.EXIT_CODE_PREEMPTED): SIGTERM; the checkpoint of the last finished step is uploaded and the
  Job retries the pod, which resumes from it.
- 2: the command line itself was wrong (click's usage error).
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.conditions import (
    TRAINER_FAILURE_REASONS,
    TRAINER_REASON_CONFIG_ERROR,
    TRAINER_REASON_DATA_ERROR,
    TRAINER_REASON_EVALUATION_ERROR,
    TRAINER_REASON_INTERNAL_ERROR,
    TRAINER_REASON_OUT_OF_MEMORY,
    TRAINER_REASON_STORAGE_ERROR,
)
from kubetune.contract import EXIT_CODE_PERMANENT, EXIT_CODE_RETRYABLE, TrainerSummary
from kubetune.manifests import ManifestError
from kubetune_trainer.data.rows import DataError
from kubetune_trainer.storage import StorageError

EXIT_CODE_SUCCEEDED = 0
RETRYABLE_REASONS = frozenset({TRAINER_REASON_STORAGE_ERROR, TRAINER_REASON_INTERNAL_ERROR})
# Summary messages stay short: the termination message holds 4 KB in all, and the log has the details.
MESSAGE_LIMIT = 2048
# Retryable: a multi-process run restarts as a whole and resumes from its newest complete checkpoint.
PEER_LOST_HINT = "the processes restart together from the newest complete checkpoint while retries remain"
OUT_OF_MEMORY_HINT = (
    "lower training.batchSize (raising gradientAccumulationSteps keeps the effective batch), lower "
    "dataset.maxLength, set training.gradientCheckpointing, or ask for more memory (resources.memory, a larger GPU)"
)


class ConfigError(ValueError):
    """The job cannot be run as given: no manifest, a malformed one, or settings the trainer does not run."""

    reason = TRAINER_REASON_CONFIG_ERROR


class EvaluationError(Exception):
    """The evaluation could not run on this data or with these settings (after training succeeded)."""

    reason = TRAINER_REASON_EVALUATION_ERROR


@dataclass(frozen=True)
class Failure:
    """A failure as the summary reports it."""

    reason: str
    message: str

    @property
    def retryable(self) -> bool:
        """Whether the Job should retry the pod (the fault may pass) rather than fail at once."""
        return self.reason in RETRYABLE_REASONS


def shortened(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """At most `limit` characters, the beginning kept (where the message says what went wrong)."""
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA or the CPU allocator), MemoryError, or a RuntimeError that says out of memory."""
    if isinstance(error, MemoryError):
        return True
    # Matched by name so that classifying a failure never imports torch.
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def is_peer_lost(error: BaseException) -> bool:
    """A collective that failed because another process of the launch is gone (killed, its node lost): torch's
    DistBackendError (matched by name: classifying never imports torch), or a socket the peer closed."""
    if any(cls.__name__ == "DistBackendError" for cls in type(error).__mro__):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def classify_failure(error: BaseException) -> Failure:
    """The summary reason and a message naming what is wrong (and where) for an exception that ended the run."""
    if is_out_of_memory(error):
        return Failure(
            TRAINER_REASON_OUT_OF_MEMORY, shortened(f"out of memory ({first_line(error)}); {OUT_OF_MEMORY_HINT}")
        )
    if isinstance(error, DataError):
        return Failure(TRAINER_REASON_DATA_ERROR, shortened(str(error)))
    if isinstance(error, StorageError):
        return Failure(TRAINER_REASON_STORAGE_ERROR, shortened(str(error)))
    if isinstance(error, ManifestError):
        return Failure(TRAINER_REASON_CONFIG_ERROR, shortened(str(error)))
    if is_peer_lost(error):
        message = f"lost another process of this run ({first_line(error)}); {PEER_LOST_HINT}"
        return Failure(TRAINER_REASON_INTERNAL_ERROR, shortened(message))
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason in TRAINER_FAILURE_REASONS:
        # ModelError, CheckpointError (StorageError), TrainingDiverged, ConfigError, EvaluationError carry their own.
        return Failure(reason, shortened(str(error) or type(error).__name__))
    return Failure(TRAINER_REASON_INTERNAL_ERROR, shortened(f"{type(error).__name__}: {first_line(error)}"))


def failed_summary(failure: Failure, **known: object) -> TrainerSummary:
    """The summary of a failed run; `known` keeps what the stages that finished found (dataset, usage, metrics)."""
    return TrainerSummary.model_validate(
        {"outcome": "Failed", "reason": failure.reason, "message": failure.message, **known}
    )


def exit_code(summary: TrainerSummary) -> int:
    """The process exit status for a summary (see the module docstring)."""
    if summary.outcome == "Succeeded":
        return EXIT_CODE_SUCCEEDED
    return EXIT_CODE_RETRYABLE if summary.reason in RETRYABLE_REASONS else EXIT_CODE_PERMANENT
