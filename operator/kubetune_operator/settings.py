"""The operator's settings: one typed object read from KUBETUNE_* environment variables, refused at start when bad."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubetune.api import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, URL_PATTERN, Toleration

ENV_PREFIX = "KUBETUNE_"
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
# spec.serving's default server images: kubetune's llama.cpp server image, and vLLM's own OpenAI-compatible image.
DEFAULT_LLAMA_CPP_IMAGE = "ghcr.io/kubetune/kubetune-llama-server:0.1.0"
DEFAULT_VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.11.0"
DEFAULT_TRAINER_SERVICE_ACCOUNT = "kubetune-trainer"
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# Priorities drawn by `auto`: distinct per replica with near certainty, so exactly one replica acts (kopf pauses
# every peer that sees a higher priority, and pauses all peers on a tie).
AUTO_PRIORITY_RANGE = (1, 1_000_000)

Port = Annotated[int, Field(ge=0, le=65535)]


class SettingsError(ValueError):
    """The environment holds a bad KUBETUNE_* value; the message names each variable and what is wrong."""


class OperatorSettings(BaseModel):
    """Everything the operator is told by its environment. Each field is read from KUBETUNE_<FIELD NAME IN CAPS>."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trainer_image: str = Field(
        default=DEFAULT_TRAINER_IMAGE,
        min_length=1,
        max_length=512,
        pattern=r"^\S+$",
        description="Trainer image used when a FineTuneJob has no spec.image.",
    )
    llama_cpp_image: str = Field(
        default=DEFAULT_LLAMA_CPP_IMAGE,
        min_length=1,
        max_length=512,
        pattern=r"^\S+$",
        description="Server image of spec.serving.runtime llamaCpp when the job names none.",
    )
    vllm_image: str = Field(
        default=DEFAULT_VLLM_IMAGE,
        min_length=1,
        max_length=512,
        pattern=r"^\S+$",
        description="Server image of spec.serving.runtime vllm when the job names none.",
    )
    namespaces: tuple[Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)], ...] = Field(
        default=(),
        description="Namespaces watched, comma-separated exact names; empty watches all namespaces (cluster-wide).",
    )
    metrics_port: Port = Field(default=8080, description="Port of the operator's Prometheus /metrics; 0 = off.")
    health_port: Port = Field(default=8081, description="Port of the liveness endpoint /healthz; 0 = off.")
    listen_address: str = Field(
        default="0.0.0.0",
        pattern=r"^[0-9a-fA-F.:]+$",
        description="Address the metrics and health endpoints bind to (an IP, e.g. 127.0.0.1 in tests).",
    )
    s3_endpoint: str | None = Field(
        default=None,
        max_length=1024,
        pattern=URL_PATTERN,
        description="S3 endpoint URL given to trainers whose FineTuneJob has no spec.s3.endpoint; unset = AWS.",
    )
    s3_region: str | None = Field(
        default=None, max_length=64, description="S3 region given to trainers whose FineTuneJob has no spec.s3.region."
    )
    s3_credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret (in the job's namespace) with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, used when "
        "spec.s3.credentialsSecretRef is unset; unset = the pod's own identity (e.g. IRSA).",
    )
    progress_interval_seconds: float = Field(
        default=15.0, ge=1, le=3600, description="Least seconds between the trainer's status.progress patches."
    )
    trainer_metrics_port: Port = Field(default=9090, description="Port of the trainer's own /metrics; 0 = off.")
    trainer_service_account: str = Field(
        default=DEFAULT_TRAINER_SERVICE_ACCOUNT,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="ServiceAccount trainer pods run as, created by the operator in each job namespace; the chart's "
        "admission policy matches this name, so both must agree (the chart sets both).",
    )
    trainer_cluster_role: str = Field(
        default=DEFAULT_TRAINER_SERVICE_ACCOUNT,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="The chart's ClusterRole for trainers (patch FineTuneJob status), bound to the trainer "
        "ServiceAccount in each job namespace.",
    )
    gpu_node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=lambda: dict(DEFAULT_GPU_NODE_SELECTOR),
        description="Node labels required by trainer pods that ask for GPUs (key=value,...); the job's "
        "resources.nodeSelector wins on the same key. Empty: none.",
    )
    gpu_tolerations: tuple[Toleration, ...] = Field(
        default_factory=lambda: tuple(Toleration.model_validate(item) for item in DEFAULT_GPU_TOLERATIONS),
        description="Tolerations (a JSON list of core/v1 Tolerations) added to trainer pods that ask for GPUs.",
    )
    peering_name: str = Field(
        default="kubetune",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="kopf peering object shared by the operator replicas; only the highest priority acts.",
    )
    peering_priority: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="This replica's peering priority; `auto` (the default) draws a random one so replicas differ.",
    )
    standalone: bool = Field(
        default=False, description="Run without peering (one replica only, e.g. tests and local runs)."
    )
    log_level: Literal["debug", "info", "warning"] = Field(
        default="info", description="Operator log level: debug (every handler and API call), info or warning."
    )

    @field_validator("gpu_node_selector")
    @classmethod
    def _check_label_keys(cls, selector: dict[str, str]) -> dict[str, str]:
        for key in selector:
            if not re.fullmatch(r"([a-z0-9.\-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key):
                raise ValueError(f"{key!r} is not a valid label key")
        return selector

    @property
    def clusterwide(self) -> bool:
        """True when every namespace is watched."""
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str | None:
        """kopf's --liveness URL, or None when the health endpoint is off."""
        if not self.health_port:
            return None
        host = f"[{self.listen_address}]" if ":" in self.listen_address else self.listen_address
        return f"http://{host}:{self.health_port}/healthz"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """Read the settings; a bad value raises SettingsError naming every offending variable."""
        raw, problems = raw_values_from_env(environ)
        try:
            settings = cls.model_validate(raw)
        except ValidationError as error:
            problems.extend(_describe_validation_error(error, environ))
            raise SettingsError(_problem_report(problems)) from None
        if problems:
            raise SettingsError(_problem_report(problems))
        return settings


def env_name(field_name: str) -> str:
    """The environment variable of a settings field, e.g. metrics_port -> KUBETUNE_METRICS_PORT."""
    return ENV_PREFIX + field_name.upper()


def parse_mapping(text: str) -> dict[str, str]:
    """`a=b,c=d` (or a JSON object) as a dict; raises ValueError naming the bad item."""
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("expected a JSON object of strings")
        return value
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"item {item!r} is not key=value")
        mapping[key.strip()] = value.strip()
    return mapping


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off; raises ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def parse_priority(text: str, rng: random.Random | None = None) -> int:
    """An integer, or `auto` for a random priority in AUTO_PRIORITY_RANGE."""
    if text.strip().lower() == "auto":
        return (rng or random.SystemRandom()).randint(*AUTO_PRIORITY_RANGE)
    return int(text)


def parse_tolerations(text: str) -> list[Any]:
    """A JSON list of tolerations (validated field by field later)."""
    value = json.loads(text) if text.strip() else []
    if not isinstance(value, list):
        raise ValueError("expected a JSON list of tolerations")
    return value


_PARSERS: dict[str, Any] = {
    "namespaces": lambda text: [part.strip() for part in text.split(",") if part.strip()],
    "gpu_node_selector": parse_mapping,
    "gpu_tolerations": parse_tolerations,
    "standalone": parse_bool,
    "peering_priority": parse_priority,
    "s3_endpoint": lambda text: text.strip() or None,
    "s3_region": lambda text: text.strip() or None,
    "s3_credentials_secret": lambda text: text.strip() or None,
}


def raw_values_from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The KUBETUNE_* values converted for validation, plus problems found while parsing them."""
    raw: dict[str, Any] = {}
    problems: list[str] = []
    for name in OperatorSettings.model_fields:
        variable = env_name(name)
        if name == "peering_priority" and variable not in environ:
            raw[name] = parse_priority("auto")
            continue
        if variable not in environ:
            continue
        text = environ[variable]
        try:
            raw[name] = _PARSERS.get(name, str.strip)(text)
        except ValueError as error:
            problems.append(f"{variable}={text!r}: {error}")
    return raw, problems


def _describe_validation_error(error: ValidationError, environ: Mapping[str, str]) -> list[str]:
    problems = []
    for item in error.errors():
        field_name = str(item["loc"][0])
        where = ".".join(str(part) for part in item["loc"][1:])
        shown = environ.get(env_name(field_name))
        detail = f" (at {where})" if where else ""
        problems.append(f"{env_name(field_name)}={shown!r}: {item['msg']}{detail}")
    return problems


def _problem_report(problems: list[str]) -> str:
    return "bad operator settings in the environment:\n  " + "\n  ".join(problems)
