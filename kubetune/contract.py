"""The contract between the operator and the trainer image's pods: environment variables, the trainer's final summary
and the endpoint check's result, both in the pod's termination message."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api import ArtifactsStatus, DatasetStatus, EndpointCheckStatus, EvaluationStatus, UsageStatus

Message = TypeVar("Message", bound=BaseModel)

# The trainer Job is `<FineTuneJob name>-trainer`; its pods `<FineTuneJob name>-trainer-xxxxx`.
TRAINER_JOB_SUFFIX = "-trainer"
# The label on every child of a FineTuneJob (the trainer Job and its pods) holding the FineTuneJob's name.
LABEL_JOB_NAME = "kubetune.io/job-name"

# Environment the operator sets on the trainer container.
ENV_JOB_MANIFEST = "KUBETUNE_JOB_MANIFEST"  # the resolved FineTuneJob (YAML)
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"  # FineTuneJob name, for status.progress patches
ENV_JOB_NAMESPACE = "KUBETUNE_JOB_NAMESPACE"
ENV_METRICS_PORT = "KUBETUNE_METRICS_PORT"  # the trainer's Prometheus endpoint; unset or 0 = off
ENV_TERMINATION_MESSAGE_PATH = "KUBETUNE_TERMINATION_MESSAGE_PATH"  # default /dev/termination-log
ENV_JUDGE_API_KEY = "KUBETUNE_JUDGE_API_KEY"  # from evaluation.judge.apiKeySecretRef


def contender_api_key_env(index: int) -> str:
    """The variable holding evaluation.contenders[index]'s API key (from its apiKeySecretRef)."""
    return f"KUBETUNE_CONTENDER_{index}_API_KEY"


ENV_OPENAI_API_KEY = "OPENAI_API_KEY"  # from openai.apiKeySecretRef
ENV_PROGRESS_INTERVAL = "KUBETUNE_PROGRESS_INTERVAL_SECONDS"  # least seconds between status.progress patches
ENV_IMAGE = "KUBETUNE_IMAGE"  # the trainer container's image, recorded in manifest.json
# Multi-node runs: this pod's node rank (its Job completion index) and where rank 0's pod listens for the rendezvous.
ENV_NODE_RANK = "KUBETUNE_NODE_RANK"
ENV_MAIN_ADDRESS = "KUBETUNE_MAIN_ADDRESS"
MAIN_PORT = 29500
# output.registry.credentialsSecretRef: the Secret's .dockerconfigjson, mounted read-only as a docker config.json.
ENV_REGISTRY_CONFIG = "KUBETUNE_REGISTRY_CONFIG"
REGISTRY_CONFIG_DIR = "/var/run/kubetune/registry"
REGISTRY_CONFIG_FILE = "config.json"
# S3: the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT_BYTES = 4096


class TrainerSummary(BaseModel):
    """What the trainer leaves in its termination message (<= 4 KB) and the operator copies into status."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    outcome: Literal["Succeeded", "Failed"]
    reason: str = Field(default="Completed", description="Completed, or a TRAINER_REASON_* constant on failure.")
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset: DatasetStatus | None = None
    evaluation: EvaluationStatus | None = None
    artifacts: ArtifactsStatus | None = None
    usage: UsageStatus | None = None
    fine_tuned_model: str | None = Field(
        default=None, description="backend openai: the hosted fine-tuned model's name (status.fineTunedModel)."
    )

    def to_termination_message(self) -> str:
        """Compact JSON that fits the kubelet's 4 KB limit: the message is cut first, then metrics dropped."""
        data = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT_BYTES:
            return text
        data["message"] = data.get("message", "")[:512]
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT_BYTES:
            return text
        data["metrics"] = {}
        return json.dumps(data, separators=(",", ":"))[:TERMINATION_MESSAGE_LIMIT_BYTES]

    @classmethod
    def from_termination_message(cls, text: str) -> TrainerSummary | None:
        """Parse a termination message; None when it is not a summary (e.g. the log tail of a crash)."""
        return parse_termination_message(cls, text)


def parse_termination_message(model: type[Message], text: str) -> Message | None:
    """A termination message as the model it was written from; None when it is not one (e.g. the log tail of a
    crash, which the kubelet puts there under FallbackToLogsOnError)."""
    try:
        return model.model_validate_json(text)
    except ValueError:
        return None


def check_termination_message(check: EndpointCheckStatus) -> str:
    """The endpoint check pod's result as its termination message: compact JSON of status.serving.check, a few
    hundred bytes (the message is cut first)."""
    short = check.model_copy(update={"message": (check.message or "")[:1024] or None})
    return short.model_dump_json(by_alias=True, exclude_none=True)


# The trainer pod's command. One process per GPU above one GPU, started by accelerate's launcher.
TRAINER_ENTRY = ("-m", "kubetune_trainer", "run")
# backend openai: a small pod (0 GPUs) that drives the hosted fine-tuning job; trainer_command(0, entry=...).
HOSTED_TRAINER_ENTRY = ("-m", "kubetune_trainer", "hosted")
# Exit status after SIGTERM once the checkpoint of the last finished step is uploaded (128 + SIGTERM, as a shell
# reports it): non-zero, so the Job retries the pod, which resumes from that checkpoint. Under `accelerate launch`
# (gpus > 1) the launcher receives the SIGTERM, passes it to every rank, gives them 30 s (torch elastic's shutdown
# timeout) to finish the step, save and upload, and itself exits 1.
# `accelerate launch` that exits with the trainer's code (trainer-image/kubetune_trainer/launch.py).
LAUNCHER_MODULE = "kubetune_trainer.launch"
EXIT_CODE_PREEMPTED = 143  # SIGTERM: checkpoint saved, the Job retries and resumes
EXIT_CODE_PERMANENT = 65  # sysexits EX_DATAERR: the inputs cannot work; the Job must not retry (podFailurePolicy)
EXIT_CODE_RETRYABLE = 75  # sysexits EX_TEMPFAIL: a fault that may pass; the Job retries


def trainer_command(
    gpus: int,
    python: str = "python",
    entry: Sequence[str] = TRAINER_ENTRY,
    nodes: int = 1,
    node_rank: str = f"$({ENV_NODE_RANK})",
    main_address: str = f"$({ENV_MAIN_ADDRESS})",
    main_port: int = MAIN_PORT,
) -> list[str]:
    """The trainer container's argv: `python -m kubetune_trainer run`, under `accelerate launch` when it runs more
    than one process (gpus > 1, or nodes > 1).

    `entry` is what python (or accelerate) runs: `-m module args...` or `script.py args...`; tests swap in a script.
    accelerate's `--multi_gpu` launcher is torch.distributed.run underneath: it starts one process per GPU and sets
    RANK/WORLD_SIZE for each. The same flags start real processes on a CPU-only machine too (gloo), whereas `--cpu`
    picks accelerate's simple launcher, which starts a single process unless MPI is configured. It runs through
    `kubetune_trainer.launch`, which ends with the trainer's exit code (accelerate's own ends with 1 whatever the
    processes said), so that podFailurePolicy and the operator read a launch as they read one process.

    Across nodes each pod runs one launcher with its node rank; they meet at rank 0's address (static rendezvous).
    The defaults are `$(VAR)` references, which the kubelet expands from the container's environment.
    """
    if gpus <= 1 and nodes == 1:
        return [python, *entry]
    per_node = max(gpus, 1)
    if nodes == 1:
        # 0 = a free port: nothing else in the pod listens, and tests on one host do not collide.
        machines = ["--num_machines", "1", "--main_process_port", "0"]
    else:
        machines = [
            "--num_machines",
            str(nodes),
            "--machine_rank",
            node_rank,
            "--main_process_ip",
            main_address,
            "--main_process_port",
            str(main_port),
        ]
    return [
        python,
        "-m",
        LAUNCHER_MODULE,
        "--multi_gpu",
        "--num_processes",
        str(per_node * nodes),
        *machines,
        # The trainer sets bf16/fp16 itself (TrainingArguments override this); passing it silences a warning.
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *entry,
    ]
