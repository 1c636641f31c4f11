"""Condition types, reasons and the trainer's failure reasons shared by the operator and the trainer."""

from __future__ import annotations

# Condition types on FineTuneJob.status.conditions (metav1.Condition keyed by type).
CONDITION_VALIDATED = "Validated"
CONDITION_QUEUED = "Queued"
CONDITION_RUNNING = "Running"
CONDITION_SUSPENDED = "Suspended"
CONDITION_SUCCEEDED = "Succeeded"
CONDITION_FAILED = "Failed"
CONDITION_EVAL_PASSED = "EvalPassed"
# Set False when part of the evaluation scored too little to mean anything (status.evaluation.problems).
CONDITION_SCORED = "Scored"

# Reasons the operator derives from the trainer Job and its Pod.
REASON_JOB_CREATED = "JobCreated"
REASON_WAITING_FOR_QUEUE = "WaitingForQueue"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_IMAGE_PULL_BACKOFF = "ImagePullBackOff"
REASON_OOM_KILLED = "OOMKilled"
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"
REASON_BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
REASON_VALIDATING = "Validating"  # the trainer's pre-flight of spec and data, before any model load
REASON_TRAINING = "Training"
REASON_EVALUATING = "Evaluating"
REASON_COMPLETED = "Completed"
REASON_SUSPENDED_BY_USER = "SuspendedByUser"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_GATE_PASSED = "GatePassed"
REASON_GATE_FAILED = "GateFailed"
REASON_TOO_FEW_SCORED = "TooFewScored"
REASON_TRAINER_JOB_MISSING = "TrainerJobMissing"
REASON_JOBSET_MISSING = "JobSetMissing"  # resources.nodes > 1 on a cluster that does not serve JobSet
REASON_RESUMING = "Resuming"
REASON_JOB_FAILED = "JobFailed"
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"
# A trainer pod stopped by the cluster, not by its own failure (the pod's DisruptionTarget condition): the Job does
# not count it against backoffLimit, and the next pod resumes from the newest checkpoint.
REASON_NODE_LOST = "NodeLost"
REASON_EVICTED = "Evicted"
REASON_PREEMPTED = "Preempted"
REASON_DISRUPTED = "Disrupted"

# Reasons the trainer reports in its summary when it fails (status.conditions[Failed].reason).
TRAINER_REASON_CONFIG_ERROR = "ConfigError"
TRAINER_REASON_DATA_ERROR = "DataError"
TRAINER_REASON_MODEL_ERROR = "ModelError"
TRAINER_REASON_STORAGE_ERROR = "StorageError"
TRAINER_REASON_OUT_OF_MEMORY = "OutOfMemory"
TRAINER_REASON_TRAINING_DIVERGED = "TrainingDiverged"
TRAINER_REASON_EVALUATION_ERROR = "EvaluationError"
TRAINER_REASON_INTERNAL_ERROR = "InternalError"
TRAINER_REASON_EXPORT_ERROR = "ExportError"  # the GGUF conversion or the registry push (credentials, refusal) failed
# backend openai: failures of the hosted fine-tuning service, each with the service's own code in the message.
TRAINER_REASON_HOSTED_AUTH_ERROR = "HostedAuthError"  # 401/403: the API key is wrong or lacks access
TRAINER_REASON_HOSTED_QUOTA_EXCEEDED = "HostedQuotaExceeded"  # 429 insufficient_quota: billing, not load
TRAINER_REASON_HOSTED_REQUEST_REJECTED = "HostedRequestRejected"  # 4xx on upload or create, e.g. a rejected file
TRAINER_REASON_HOSTED_JOB_FAILED = "HostedJobFailed"  # the hosted job ended in status failed
TRAINER_REASON_HOSTED_JOB_CANCELLED = "HostedJobCancelled"  # cancelled by someone other than kubetune
TRAINER_REASON_HOSTED_UNAVAILABLE = "HostedServiceUnavailable"  # 429/5xx/connection errors outlasting every retry
TRAINER_FAILURE_REASONS = frozenset(
    {
        TRAINER_REASON_CONFIG_ERROR,
        TRAINER_REASON_DATA_ERROR,
        TRAINER_REASON_MODEL_ERROR,
        TRAINER_REASON_STORAGE_ERROR,
        TRAINER_REASON_OUT_OF_MEMORY,
        TRAINER_REASON_TRAINING_DIVERGED,
        TRAINER_REASON_EVALUATION_ERROR,
        TRAINER_REASON_INTERNAL_ERROR,
        TRAINER_REASON_EXPORT_ERROR,
        TRAINER_REASON_HOSTED_AUTH_ERROR,
        TRAINER_REASON_HOSTED_QUOTA_EXCEEDED,
        TRAINER_REASON_HOSTED_REQUEST_REJECTED,
        TRAINER_REASON_HOSTED_JOB_FAILED,
        TRAINER_REASON_HOSTED_JOB_CANCELLED,
        TRAINER_REASON_HOSTED_UNAVAILABLE,
    }
)
