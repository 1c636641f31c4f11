"""The FineTuneJob API (kubetune.io/v1alpha1): the one typed spec behind the CRD, operator, trainer and CLI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kubetune.rules import RuleViolation, broken_rules, class_rules, rule_violations

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
# status.evaluation.problems: at most this many, each at most this long.
MAX_PROBLEMS = 8
PROBLEM_LIMIT = 1024
# The error type of a spec that breaks the CRD's CEL rules; its context lists each (path below spec, message).
RULES_ERROR = "x_kubernetes_validations"

# Patterns shared with the CRD schema so that the API server and `kubetune validate` refuse the same strings.
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*|\./.*|[A-Za-z0-9_.\-][^:]*)$"
S3_OR_PATH_HELP = "an s3://bucket/prefix URI or a local path (absolute, or relative to the working directory)"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
HF_MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$"
URL_PATTERN = r"^https?://[^\s]+$"
# An OCI repository with its registry host: host[:port]/path, lowercase path components (the distribution spec).
OCI_REPOSITORY_PATTERN = r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+$"
OCI_TAG_PATTERN = r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$"
# An OCI image reference as the distribution project's grammar has it: [registry[:port]/]path[:tag][@digest].
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE_PATTERN = (
    rf"^(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
# A FineTuneJob's trainer pods are named `<name>-trainer-<5 random characters>` (the Job controller's generateName),
# which must fit a 63-character DNS label uncut: the admission policy that keeps each trainer to its own job's status
# recognises the trainer pod by that exact name (kubetune_operator.trainer_identity).
MAX_JOB_NAME_LENGTH = 49
# A multi-node trainer's pods are <name>-trainer-node-0-<node index>-<5 characters>: 24 more, within 63.
MAX_MULTI_NODE_JOB_NAME_LENGTH = 39
MAX_NODES = 32
MULTI_NODE_NAME_MESSAGE = (
    f"at most {MAX_MULTI_NODE_JOB_NAME_LENGTH} characters when resources.nodes > 1: the trainer pods "
    "are named <name>-trainer-node-0-<node index>-<5 characters>, which must fit 63"
)

ShortText = Annotated[str, Field(max_length=253)]
LongText = Annotated[str, Field(max_length=8192)]
Uri = Annotated[str, Field(max_length=1024, pattern=URI_PATTERN)]


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry; the CRD generator copies these into the schema verbatim."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def immutable(name: str) -> dict[str, Any]:
    """A transition rule refusing any change to a field after creation."""
    return cel("self == oldSelf", f"{name} is immutable after creation")


def utc_now() -> str:
    """Now as RFC 3339 UTC with seconds: the form of metav1.Time, which status timestamps use."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@overload
def significant(value: float, digits: int = 4) -> float: ...
@overload
def significant(value: None, digits: int = 4) -> None: ...
def significant(value: float | None, digits: int = 4) -> float | None:
    """value rounded to `digits` significant digits (0.23025472164 -> 0.2303): what a status column shows."""
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def short_model_name(reference: str) -> str:
    """The last part of a hub id or URI, without a trailing slash: `s3://models/smollm2-135m/` -> `smollm2-135m`."""
    return reference.rstrip("/").rsplit("/", 1)[-1]


class SecretKeyRef(ApiModel):
    """A key in a Secret in the job's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="Name of the Secret.")
    key: str = Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret.")


class ModelSpec(ApiModel):
    """The base model to fine-tune: a hub id or a URI, never both."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.name) != has(self.uri)", "exactly one of model.name or model.uri must be set"),
            ]
        }
    )

    name: str | None = Field(
        default=None,
        max_length=253,
        pattern=HF_MODEL_ID_PATTERN,
        description="Hugging Face hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct. Resolved from the offline cache "
        "when HF_HUB_OFFLINE is set.",
    )
    uri: Uri | None = Field(
        default=None, description=f"Where the model files (config, tokenizer, safetensors) are: {S3_OR_PATH_HELP}."
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Hub revision (branch, tag or commit) when name is set."
    )

    @property
    def short_name(self) -> str:
        """What a person calls the model: the hub id's or the URI's last part (`SmolLM2-135M-Instruct`)."""
        return short_model_name(self.name or self.uri or "")


DatasetFormat = Literal[
    "auto", "messages", "prompt-completion", "instruction", "question-answer", "text", "classification"
]


class DatasetSpec(ApiModel):
    """Training data and how to read it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.validation) && has(self.validationSplit))",
                    "set dataset.validation or dataset.validationSplit, not both",
                ),
            ]
        }
    )

    train: Uri = Field(description=f"Training file (JSONL, JSON, CSV or Parquet): {S3_OR_PATH_HELP}.")
    validation: Uri | None = Field(
        default=None,
        description="Held-out file used for evaluation. When absent, validationSplit of train is held out.",
    )
    validation_split: float | None = Field(
        default=None,
        gt=0,
        lt=0.5,
        description="Share of train held out (deterministically, by seed) when no validation file is given. "
        "Default 0.1.",
    )
    format: DatasetFormat = Field(
        default="auto",
        description="Row format. auto detects it from the columns: messages; prompt/completion; "
        "instruction/input/output (alpaca); question/answer; text; text/label (classification).",
    )
    columns: dict[str, Annotated[str, Field(max_length=128)]] = Field(
        default_factory=dict,
        max_length=16,
        description="Maps the format's column names to the file's, e.g. {text: sentence, label: intent}.",
    )
    labels: list[Annotated[str, Field(max_length=128)]] | None = Field(
        default=None,
        max_length=1024,
        description="classification: the label set, in order. Default: the sorted distinct labels of train.",
    )
    template: LongText | None = Field(
        default=None,
        description="Prompt template with {column} placeholders, e.g. '### Question:\\n{question}\\n\\n### Answer:'. "
        "When absent the model's chat template is used.",
    )
    system_prompt: LongText | None = Field(default=None, description="System message put before every prompt.")
    max_length: int = Field(
        default=512, ge=16, le=131072, description="Tokens per example; longer examples are truncated (and counted)."
    )


class LoraSpec(ApiModel):
    """LoRA adapter shape."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator (the update is scaled by alpha/r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt; all-linear adapts every linear layer except the output head.",
    )


class QuantizationSpec(ApiModel):
    """bitsandbytes quantization of the frozen base (qlora only)."""

    bits: Literal[4, 8] = Field(default=4, description="Bits per base weight; qlora requires 4.")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too (saves memory).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="dtype of the matmuls on dequantized weights."
    )


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(self.packing && self.objective == 'sequence-classification')",
                    "training.packing applies to objective causal-lm only",
                ),
            ]
        }
    )

    objective: Literal["causal-lm", "sequence-classification"] = Field(
        default="causal-lm",
        description="causal-lm: supervised fine-tuning on completions. sequence-classification: a label head on the "
        "base (LoRA task SEQ_CLS), for classification data.",
    )
    epochs: float = Field(default=1.0, gt=0, le=100, description="Passes over train; ignored when maxSteps is set.")
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Total optimizer steps.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Steps accumulated per update.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(default=10, ge=0, le=100_000, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000, description="Gradient clipping norm.")
    packing: bool = Field(default=False, description="Pack short examples into full-length rows (causal-lm).")
    completion_only_loss: bool = Field(default=True, description="Train on the completion tokens only, not the prompt.")
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for data order, splits and initialisation.")
    checkpoint_every: int = Field(
        default=50, ge=1, le=1_000_000, description="Save a resumable checkpoint to output.uri every N steps."
    )
    logging_steps: int = Field(default=5, ge=1, le=10_000, description="Report loss every N steps.")


EvaluationMetric = Literal["loss", "accuracy", "f1", "exactMatch", "json", "rougeL", "judge"]
BaselineName = Literal["zeroShot", "fewShot", "retrievalFewShot"]
DEFAULT_BASELINES: tuple[BaselineName, ...] = ("zeroShot", "fewShot")


@dataclass(frozen=True)
class Score:
    """A figure an evaluation metric reports: its name in the report and status, its range, its direction."""

    name: str
    low: float
    high: float | None = None
    lower_is_better: bool = False


def _unit(name: str, lower_is_better: bool = False) -> Score:
    return Score(name, 0.0, 1.0, lower_is_better)


# Each evaluation metric and the scores it reports, its headline score first: the gate's rules and the trainer's
# scoring read this one table.
METRIC_SCORES: dict[str, tuple[Score, ...]] = {
    "loss": (Score("loss", 0.0, None, True), Score("perplexity", 1.0, None, True)),
    "accuracy": (_unit("accuracy"), _unit("unparsed", lower_is_better=True)),
    "f1": tuple(
        _unit(f"{average}{kind}") for average in ("macro", "weighted") for kind in ("F1", "Precision", "Recall")
    ),
    "exactMatch": (_unit("exactMatch"),),
    "json": (_unit("jsonF1"), _unit("jsonValid"), _unit("jsonPrecision"), _unit("jsonRecall")),
    "rougeL": (_unit("rougeL"),),
    "judge": (Score("judge", 0.0, 100.0), _unit("judgeUnjudged", lower_is_better=True)),
}
# What evaluation.metrics empty means, per dataset.format: the metrics the trainer may infer from the data.
INFERABLE_METRICS: dict[str, tuple[str, ...]] = {
    "text": ("loss",),
    "classification": ("loss", "accuracy", "f1"),
    "auto": ("loss", "accuracy", "f1", "json", "exactMatch", "rougeL"),
    **{
        name: ("loss", "json", "exactMatch", "rougeL")
        for name in ("messages", "prompt-completion", "instruction", "question-answer")
    },
}
# The hosted backend scores the fine-tuned model's replies; the provider gives no per-token loss.
HOSTED_UNSCORED_METRICS: tuple[str, ...] = ("loss",)


def scores_of(metric: str) -> list[str]:
    """The names a gate may use for what `metric` reports: the metric's own name and each of its scores."""
    return list(dict.fromkeys([metric, *(score.name for score in METRIC_SCORES[metric])]))


def gate_metric_names() -> list[str]:
    """Every name evaluation.gate.metric accepts."""
    return list(dict.fromkeys(name for metric in METRIC_SCORES for name in scores_of(metric)))


def cel_list(values: Sequence[str]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


def _gate_rules() -> list[Any]:
    names = gate_metric_names()
    rules = [
        cel(
            f"self.metric in {cel_list(names)}",
            "evaluation.gate.metric must name a metric or a score: " + ", ".join(names),
            ".metric",
        )
    ]
    # A threshold outside a score's range is one no model can reach (or every model reaches).
    ranges: dict[tuple[float, float | None], list[str]] = {}
    for scores in METRIC_SCORES.values():
        for score in scores:
            ranges.setdefault((score.low, score.high), []).append(score.name)
    for metric, scores in METRIC_SCORES.items():
        ranges[(scores[0].low, scores[0].high)].append(metric)
    for (low, high), members in ranges.items():
        bound = f"self.threshold >= {low}" + ("" if high is None else f" && self.threshold <= {high}")
        span = f"from {low:g} upwards" if high is None else f"from {low:g} to {high:g}"
        rules.append(
            {
                **cel(
                    f"!has(self.threshold) || !(self.metric in {cel_list(sorted(set(members)))}) || ({bound})",
                    f"evaluation.gate.threshold is out of reach: the metric's scores range {span}",
                    ".threshold",
                ),
                # (string(self.threshold) would be cheaper to read but the API server prices a double's string as
                # unbounded and refuses the CRD.)
                "messageExpression": f"'evaluation.gate.threshold is out of reach: ' + self.metric + ' ranges {span}'",
            }
        )
    return rules


def _evaluation_rules() -> list[Any]:
    produced_by = "{" + ", ".join(f"'{metric}': {cel_list(scores_of(metric))}" for metric in METRIC_SCORES) + "}"
    metric_of = "{" + ", ".join(f"'{name}': '{metric}'" for metric in METRIC_SCORES for name in scores_of(metric)) + "}"
    return [
        cel("!('judge' in self.metrics) || has(self.judge)", "evaluation.metrics has judge: set evaluation.judge"),
        cel("!has(self.gate) || self.enabled", "evaluation.gate needs evaluation.enabled: true", ".gate"),
        {
            **cel(
                "!has(self.gate) || !(self.gate.metric in " + cel_list(gate_metric_names()) + ") || "
                f"size(self.metrics) == 0 || self.metrics.exists(m, self.gate.metric in {produced_by}[m])",
                "evaluation.gate.metric is not computed by evaluation.metrics",
                ".gate.metric",
            ),
            "messageExpression": "'evaluation.gate.metric ' + self.gate.metric + ' is not computed by "
            f"evaluation.metrics: add ' + {metric_of}[self.gate.metric] + ' to them'",
        },
        cel(
            "!has(self.gate) || self.gate.mustBeat.all(b, b in self.baselines || "
            "self.contenders.exists(c, c.name == b))",
            "evaluation.gate.mustBeat names a baseline or contender that the evaluation does not run",
            ".gate.mustBeat",
        ),
        cel(
            f"self.contenders.all(c, !(c.name in {cel_list(RESERVED_ARM_NAMES)}))",
            "evaluation.contenders[].name must not be tuned, zeroShot, fewShot or retrievalFewShot",
            ".contenders",
        ),
        cel(
            "self.contenders.all(c, self.contenders.exists_one(d, d.name == c.name))",
            "evaluation.contenders[].name must be unique",
            ".contenders",
        ),
    ]


class JudgeSpec(ApiModel):
    """An OpenAI-compatible model that grades outputs 0-100."""

    base_url: str | None = Field(
        default=None, max_length=1024, pattern=URL_PATTERN, description="OpenAI-compatible base URL; default OpenAI."
    )
    model: str = Field(max_length=253, description="Judge model name.")
    api_key_secret_ref: SecretKeyRef = Field(description="Secret key holding the API key.")
    rubric: LongText | None = Field(
        default=None, description="What a good answer is; the judge sees it with each case."
    )
    concurrency: int = Field(default=4, ge=1, le=64, description="Requests in flight.")
    max_retries: int = Field(default=3, ge=0, le=10, description="Retries per case on malformed replies or 429/5xx.")


ContenderPrompting = Literal["zeroShot", "fewShot", "retrievalFewShot"]
RESERVED_ARM_NAMES = ("tuned", "zeroShot", "fewShot", "retrievalFewShot")


class ContenderSpec(ApiModel):
    """A model to compare the tuned adapter with: any OpenAI-compatible endpoint, on the same rows, prompted the way
    people prompt it, scored by the same metrics, with what each answer costs."""

    name: str = Field(
        max_length=40, pattern=r"^[a-zA-Z][a-zA-Z0-9-]*$", description="How the report and status name it."
    )
    base_url: str | None = Field(
        default=None, max_length=1024, pattern=URL_PATTERN, description="OpenAI-compatible base URL; default OpenAI."
    )
    model: str = Field(max_length=253, description="The endpoint's model name.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key (none for an endpoint without auth)."
    )
    prompting: ContenderPrompting = Field(
        default="retrievalFewShot",
        description="zeroShot (the bare prompt), fewShot (the same fewShotK random train rows before each) or "
        "retrievalFewShot (each row's fewShotK most similar train rows).",
    )
    concurrency: int = Field(default=4, ge=1, le=64, description="Requests in flight.")
    max_retries: int = Field(default=3, ge=0, le=10, description="Retries of a request on 429, 5xx or a timeout.")
    price_per_million_input_tokens: float | None = Field(
        default=None, ge=0, le=10_000, description="Price (any currency) per million prompt tokens."
    )
    price_per_million_output_tokens: float | None = Field(
        default=None, ge=0, le=10_000, description="Price per million completion tokens."
    )


class GateSpec(ApiModel):
    """A pass/fail rule on the evaluation, reported as the EvalPassed condition."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _gate_rules()})

    metric: str = Field(
        max_length=64,
        description="A metric (e.g. f1, its headline macroF1) or one of its scores (e.g. weightedF1, jsonValid); "
        "it must be one the evaluation computes.",
    )
    threshold: float | None = Field(default=None, description="The tuned model's metric must reach this value.")
    must_beat: list[Annotated[str, Field(max_length=40)]] = Field(
        default_factory=list, max_length=7, description="Baselines and contenders the tuned model must beat on metric."
    )
    fail_job: bool = Field(
        default=False, description="Mark the job Failed when the gate fails (artifacts are kept either way)."
    )


class EvaluationSpec(ApiModel):
    """How the tuned adapter is compared with prompting the base model."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _evaluation_rules()})

    enabled: bool = Field(default=True, description="Run the evaluation after training.")
    metrics: list[EvaluationMetric] = Field(
        default_factory=list, max_length=8, description="Metrics to compute; empty infers them from the format."
    )
    baselines: list[BaselineName] = Field(
        default_factory=lambda: list(DEFAULT_BASELINES),
        max_length=3,
        description="Prompting baselines scored on the same samples: zeroShot (the bare prompt), fewShot (the same "
        "fewShotK train rows before every prompt, chosen with the seed) and retrievalFewShot (for each row, the "
        "fewShotK train rows most like it, by TF-IDF cosine of their inputs).",
    )
    contenders: list[ContenderSpec] = Field(
        default_factory=list,
        max_length=4,
        description="Models behind OpenAI-compatible endpoints that answer the same rows, e.g. a big hosted model "
        "prompted with retrieved examples.",
    )
    self_served_price_per_hour: float | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="Price of one hour of the hardware the trainer pod evaluates on (e.g. one GPU), for the cost "
        "per 1,000 requests of the models it serves itself, from the throughput this evaluation measured (an upper "
        "bound: a serving engine batches more).",
    )
    few_shot_k: int = Field(default=5, ge=1, le=64, description="Examples (from train) in a few-shot prompt.")
    max_samples: int = Field(default=200, ge=1, le=100_000, description="Validation rows scored.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=8192, description="Generation cap; default from the reference lengths."
    )
    batch_size: int = Field(default=16, ge=1, le=1024, description="Prompts generated per batch.")
    judge: JudgeSpec | None = Field(default=None, description="LLM judge, required when metrics has judge.")
    gate: GateSpec | None = Field(default=None, description="Pass/fail rule.")


GgufQuantization = Literal["f16", "bf16", "q8_0"]


class GgufExport(ApiModel):
    """The merged model as one GGUF file, for llama.cpp, Ollama and other CPU and edge runtimes."""

    quantization: GgufQuantization = Field(
        default="q8_0",
        description="Weight type of the file: q8_0 (8-bit, about half of f16's size), f16 or bf16.",
    )


class RegistryExport(ApiModel):
    """The adapter pushed as an OCI artifact (one layer per file, `oras pull` restores the folder)."""

    repository: str = Field(
        max_length=255,
        pattern=OCI_REPOSITORY_PATTERN,
        description="Registry host (with port if any) and repository, no tag: e.g. registry.example.com/team/adapters.",
    )
    tag: str | None = Field(
        default=None, max_length=128, pattern=OCI_TAG_PATTERN, description="Tag pushed; default the job's name."
    )
    credentials_secret_ref: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="A kubernetes.io/dockerconfigjson Secret of the job's namespace with the registry's credentials "
        "(`kubectl create secret docker-registry`); mounted into the trainer, never copied.",
    )
    insecure: bool = Field(default=False, description="Plain HTTP, for a registry on a private network without TLS.")


class OutputSpec(ApiModel):
    """Where everything a run produces goes, and which exports are written beside the adapter."""

    uri: Uri = Field(description=f"Prefix for adapter/, checkpoints/, eval/ and manifest.json: {S3_OR_PATH_HELP}.")
    merge_adapter: bool = Field(
        default=False, description="Also write the 16-bit base with the adapter merged in (merged/, safetensors)."
    )
    gguf: GgufExport | None = Field(default=None, description="Also write the merged model as GGUF (gguf/).")
    registry: RegistryExport | None = Field(default=None, description="Also push the adapter to an OCI registry.")


ServingRuntime = Literal["llamaCpp", "vllm"]


class ServingSpec(ApiModel):
    """An endpoint for the tuned model, started once the job succeeds (and its gate passed), removed with the job."""

    runtime: ServingRuntime = Field(
        description="llamaCpp: llama.cpp's OpenAI-compatible server on the GGUF export (CPU, needs output.gguf); "
        "vllm: vLLM with the adapter loaded on its base model (GPU)."
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        pattern=IMAGE_REFERENCE_PATTERN,
        description="The server's image; default from the operator's settings for the runtime.",
    )
    replicas: int = Field(default=1, ge=1, le=16, description="Server pods behind the Service.")
    gpus: int | None = Field(default=None, ge=0, le=8, description="GPUs per server pod; default 1 for vllm, 0 else.")
    cpu: str | None = Field(default=None, max_length=64, pattern=QUANTITY_PATTERN, description="CPU request.")
    memory: str | None = Field(default=None, max_length=64, pattern=QUANTITY_PATTERN, description="Memory request.")
    when_gate_fails: bool = Field(
        default=False, description="Serve even when evaluation.gate failed (by default a failed gate starts nothing)."
    )
    check: bool = Field(
        default=True,
        description="Once the endpoint is ready, send it the held-out rows the evaluation scored and score its answers "
        "the same way (status.serving.check, eval/endpoint.json and the report).",
    )


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(
        default=None,
        max_length=316,
        description="Taint key the toleration matches; empty with operator Exists matches every taint.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists matches any value; Equal (the default) matches value."
    )
    value: str | None = Field(default=None, max_length=253, description="Taint value the toleration matches.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction; absent = forever."
    )


class ResourcesSpec(ApiModel):
    """What the trainer pod asks for and where it may run."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="GPUs (nvidia.com/gpu) per node. Above 1 the trainer runs one process per GPU.",
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=MAX_NODES,
        description="Nodes the trainer spans, one pod each with `gpus` GPUs. Above 1 the pods form one distributed "
        "job through JobSet (jobset.x-k8s.io), which the cluster must run; rank 0 writes every result.",
        json_schema_extra={"x-kubernetes-validations": [immutable("resources.nodes")]},
    )
    cpu: str | None = Field(default=None, max_length=64, pattern=QUANTITY_PATTERN, description="CPU request, e.g. 4.")
    memory: str | None = Field(default=None, max_length=64, pattern=QUANTITY_PATTERN, description="Memory, e.g. 32Gi.")
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Node labels the pod requires."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Taints the pod tolerates.")
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="PriorityClass of the pod."
    )


class S3Spec(ApiModel):
    """The S3 endpoint and credentials the trainer uses."""

    endpoint: str | None = Field(
        default=None, max_length=1024, pattern=URL_PATTERN, description="Endpoint URL for S3-compatible stores."
    )
    region: str | None = Field(default=None, max_length=64, description="Region, e.g. us-east-1.")
    credentials_secret_ref: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (passed by reference, never copied).",
    )


class RunPolicy(ApiModel):
    """Retries, deadlines and suspension of the trainer Job."""

    backoff_limit: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Pod retries; a retried pod resumes from the newest checkpoint.",
        json_schema_extra={"x-kubernetes-validations": [immutable("runPolicy.backoffLimit")]},
    )
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit of the trainer Job.")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished trainer Job (not the FineTuneJob) after this long."
    )
    suspend: bool = Field(default=False, description="Pause the job (pods stop; resumes from checkpoint). Mutable.")


class OpenAIHyperparameters(ApiModel):
    """Hosted fine-tuning hyperparameters; absent means auto."""

    n_epochs: int | None = Field(default=None, ge=1, le=50, description="Epochs; absent = auto.")
    batch_size: int | None = Field(default=None, ge=1, le=256, description="Batch size; absent = auto.")
    learning_rate_multiplier: float | None = Field(default=None, gt=0, le=100, description="Absent = auto.")


class OpenAISpec(ApiModel):
    """backend openai: hosted fine-tuning through the OpenAI API (or a compatible service)."""

    model: str = Field(max_length=253, description="Hosted base model, e.g. gpt-4o-mini-2024-07-18.")
    base_url: str | None = Field(default=None, max_length=1024, pattern=URL_PATTERN, description="API base URL.")
    api_key_secret_ref: SecretKeyRef = Field(description="Secret key holding the API key.")
    suffix: str | None = Field(default=None, max_length=64, description="Suffix of the fine-tuned model name.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Seed of the hosted job.")
    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


def _spec_rules(schema: dict[str, Any], spec_class: type[BaseModel]) -> None:
    """The spec's own rules, set into its JSON schema (pydantic calls this with the class, so the optional fields
    are read from the model rather than listed by hand)."""
    optional = [
        field.alias or name
        for name, field in spec_class.model_fields.items()
        if not field.is_required() and field.default is None
    ]
    # Per-field `self == oldSelf` rules only run when a field exists before and after; adding or removing an
    # optional field is caught here instead.
    presence = " && ".join(f"has(self.{name}) == has(oldSelf.{name})" for name in optional)
    inferable = (
        "{"
        + ", ".join(
            f"'{name}': {cel_list([score for metric in metrics for score in scores_of(metric)])}"
            for name, metrics in INFERABLE_METRICS.items()
        )
        + "}"
    )
    hosted_unscored = cel_list([score for metric in HOSTED_UNSCORED_METRICS for score in scores_of(metric)])
    schema["x-kubernetes-validations"] = [
        {"rule": presence, "message": "optional spec fields cannot be added or removed after creation"},
        cel(
            "self.method != 'qlora' || !has(self.quantization) || self.quantization.bits == 4",
            "method qlora requires quantization.bits 4",
            ".quantization.bits",
        ),
        cel(
            "self.method == 'qlora' || !has(self.quantization)",
            "quantization applies to method qlora only",
            ".quantization",
        ),
        cel("self.backend != 'openai' || has(self.openai)", "backend openai requires spec.openai", ".openai"),
        cel("self.backend == 'openai' || !has(self.openai)", "spec.openai requires backend openai", ".openai"),
        cel(
            "self.backend != 'openai' || self.resources.nodes == 1",
            "backend openai trains with the provider: resources.nodes must be 1",
            ".resources.nodes",
        ),
        cel(
            "self.training.objective != 'sequence-classification' || self.dataset.format in ['classification', 'auto']",
            "training.objective sequence-classification requires dataset.format classification (or auto)",
            ".training.objective",
        ),
        cel(
            "self.backend != 'openai' || (!has(self.output.gguf) && !has(self.output.registry) && "
            "!self.output.mergeAdapter)",
            "backend openai keeps the tuned weights with the provider: output.gguf, output.registry and "
            "output.mergeAdapter need backend local",
            ".output",
        ),
        cel(
            "!has(self.serving) || self.serving.runtime != 'llamaCpp' || has(self.output.gguf)",
            "serving.runtime llamaCpp serves the GGUF export: set output.gguf",
            ".serving.runtime",
        ),
        cel(
            "!has(self.serving) || self.serving.runtime != 'vllm' || self.method != 'full'",
            "serving.runtime vllm loads the adapter on its base model: method lora or qlora",
            ".serving.runtime",
        ),
        cel(
            "!has(self.serving) || (self.backend == 'local' && self.training.objective == 'causal-lm')",
            "serving needs a generating model of backend local (a hosted model is served by its provider; a "
            "classification head answers no chat requests)",
            ".serving",
        ),
        cel(
            "self.training.objective != 'sequence-classification' || !has(self.output.gguf)",
            "output.gguf holds a generating model for llama.cpp; a sequence-classification head has no GGUF form",
            ".output.gguf",
        ),
        cel(
            "self.method != 'full' || !has(self.lora) ",
            "lora settings apply to methods lora and qlora only",
            ".lora",
        ),
        {
            # With evaluation.metrics empty the trainer infers them from the format: a gate on anything else would
            # be found out only after training.
            **cel(
                "!has(self.evaluation.gate) || size(self.evaluation.metrics) > 0 || "
                f"!(self.evaluation.gate.metric in {cel_list(gate_metric_names())}) || "
                f"self.evaluation.gate.metric in {inferable}[self.dataset.format]",
                "evaluation.gate.metric is never inferred for this dataset.format: list it in evaluation.metrics",
                ".evaluation.gate.metric",
            ),
            "messageExpression": "'evaluation.gate.metric ' + self.evaluation.gate.metric + ' is never inferred for "
            "dataset.format ' + self.dataset.format + ': list its metric in evaluation.metrics'",
        },
        cel(
            f"self.backend != 'openai' || !has(self.evaluation.gate) || !(self.evaluation.gate.metric in "
            f"{hosted_unscored})",
            "backend openai reports no loss for the hosted model: gate on a metric of its replies",
            ".evaluation.gate.metric",
        ),
        cel(
            "self.backend != 'openai' || !self.evaluation.enabled || size(self.evaluation.metrics) == 0 || "
            f"self.evaluation.metrics.exists(m, !(m in {cel_list(HOSTED_UNSCORED_METRICS)}))",
            "backend openai: loss needs the model's probabilities of the reference tokens, which a hosted model does "
            "not give; add accuracy, f1, exactMatch, json, rougeL or judge",
            ".evaluation.metrics",
        ),
    ]


def refuse_violations(violations: Sequence[RuleViolation]) -> None:
    """The broken CEL rules as one validation error that keeps each rule's path (the manifest loader points at it)."""
    if violations:
        raise PydanticCustomError(
            RULES_ERROR,
            "{summary}",
            {
                "summary": "; ".join(str(v) for v in violations),
                "violations": [(v.path, v.message) for v in violations],
            },
        )


def _immutable_field(description: str, name: str, **kwargs: Any) -> Any:
    return Field(description=description, json_schema_extra={"x-kubernetes-validations": [immutable(name)]}, **kwargs)


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what, how, and where the results go. Immutable after creation except runPolicy.suspend."""

    model_config = ConfigDict(json_schema_extra=_spec_rules)

    model: ModelSpec = _immutable_field("The base model.", "model")
    dataset: DatasetSpec = _immutable_field("Training data and its format.", "dataset")
    method: Literal["qlora", "lora", "full"] = _immutable_field(
        "qlora: LoRA on a 4-bit base; lora: LoRA on a 16-bit base; full: every weight.", "method", default="qlora"
    )
    lora: LoraSpec | None = _immutable_field("LoRA shape (lora and qlora).", "lora", default=None)
    quantization: QuantizationSpec | None = _immutable_field(
        "Base quantization (qlora; defaults to 4-bit nf4 with double quantization).", "quantization", default=None
    )
    training: TrainingSpec = _immutable_field("Optimisation settings.", "training", default_factory=TrainingSpec)
    evaluation: EvaluationSpec = _immutable_field(
        "Comparison with prompting baselines.", "evaluation", default_factory=EvaluationSpec
    )
    output: OutputSpec = _immutable_field("Where artifacts go.", "output")
    resources: ResourcesSpec = _immutable_field(
        "Pod resources and placement.", "resources", default_factory=ResourcesSpec
    )
    image: str | None = _immutable_field(
        "Trainer image reference ([registry/]path[:tag][@sha256:digest]); default from the operator's settings.",
        "image",
        default=None,
        max_length=512,
        pattern=IMAGE_REFERENCE_PATTERN,
    )
    s3: S3Spec | None = _immutable_field("S3 endpoint and credentials.", "s3", default=None)
    queue_name: str | None = _immutable_field(
        "Kueue LocalQueue; the trainer Job is created suspended for Kueue to admit.",
        "queueName",
        default=None,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadlines, suspension.")
    backend: Literal["local", "openai"] = _immutable_field(
        "local: trainer pods on this cluster; openai: hosted fine-tuning.", "backend", default="local"
    )
    openai: OpenAISpec | None = _immutable_field(
        "Hosted fine-tuning settings (backend openai).", "openai", default=None
    )
    serving: ServingSpec | None = _immutable_field(
        "An endpoint for the tuned model once the job succeeds (Deployment and Service, owned by the job).",
        "serving",
        default=None,
    )

    @model_validator(mode="after")
    def _check_rules(self) -> FineTuneJobSpec:
        # The CRD's own CEL rules, evaluated here too: `kubetune validate`, `kubetune train`, the trainer and the
        # operator refuse what the API server refuses.
        refuse_violations(rule_violations(self))
        return self

    def resolved_quantization(self) -> QuantizationSpec | None:
        """The quantization in effect: the spec's, the qlora default, or none."""
        if self.method != "qlora":
            return None
        return self.quantization or QuantizationSpec()

    def resolved_lora(self) -> LoraSpec | None:
        """The LoRA shape in effect: the spec's, the default, or none for full fine-tuning."""
        if self.method == "full":
            return None
        return self.lora or LoraSpec()


# ----------------------------------------------------------------------------------------------------------------------
# Status: written by the operator (phase, conditions, artifacts) and the trainer (progress, results).

Phase = Literal["Pending", "Validating", "Queued", "Running", "Evaluating", "Succeeded", "Failed", "Cancelled"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})


class Condition(ApiModel):
    """A metav1.Condition."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=316, description="Condition type, e.g. Running, Succeeded, EvalPassed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase cause, e.g. BackoffLimitExceeded.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="metadata.generation this reflects.")


class ProgressStatus(ApiModel):
    """Live training progress (and evaluation progress), reported by the trainer at a bounded rate."""

    model_config = ConfigDict(extra="ignore")

    stage: str | None = Field(default=None, description="Trainer stage: data, model, train, evaluate, publish.")
    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Fractional epoch reached.")
    percent: float | None = Field(default=None, description="Training progress 0-100.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Real (non-pad) tokens per second.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds until training ends.")
    eval_done: int | None = Field(
        default=None,
        description="Evaluation samples scored so far, summed over every pass (each model's outputs, loss, judge).",
    )
    eval_total: int | None = Field(
        default=None, description="Evaluation samples to score, summed over every pass: the samples times the passes."
    )
    eval_percent: float | None = Field(default=None, description="Evaluation progress 0-100.")
    summary: str | None = Field(
        default=None,
        max_length=80,
        description="The latest progress in words with its unit, e.g. `train 40% (120/300 steps)`.",
    )
    updated_at: str | None = Field(default=None, description="When the trainer last reported (RFC 3339).")


class TokenLengths(ApiModel):
    """Token-length percentiles of the training rows."""

    model_config = ConfigDict(extra="ignore")

    p50: int | None = Field(default=None, description="Median tokens per row.")
    p95: int | None = Field(default=None, description="95th percentile of tokens per row.")
    max: int | None = Field(default=None, description="Longest row in tokens.")


class DatasetStatus(ApiModel):
    """What pre-flight found in the data."""

    model_config = ConfigDict(extra="ignore")

    format: str | None = Field(default=None, description="Row format in effect (detected when auto).")
    train_rows: int | None = Field(default=None, description="Rows trained on.")
    validation_rows: int | None = Field(default=None, description="Held-out rows.")
    sha256: str | None = Field(default=None, description="SHA-256 of the training file(s).")
    token_lengths: TokenLengths | None = None
    truncated_fraction: float | None = Field(default=None, description="Share of rows longer than maxLength.")


class GateStatus(ApiModel):
    """The result of evaluation.gate."""

    model_config = ConfigDict(extra="ignore")

    passed: bool | None = Field(default=None, description="Whether the tuned adapter met evaluation.gate.")
    message: str | None = Field(default=None, description="Why the gate passed or failed.")


class EvaluationStatus(ApiModel):
    """Tuned adapter vs prompting baselines on the same held-out samples."""

    model_config = ConfigDict(extra="ignore")

    metric: str | None = Field(default=None, description="Headline metric, e.g. accuracy.")
    tuned: float | None = Field(default=None, description="Tuned adapter's headline score.")
    baselines: dict[str, float] = Field(
        default_factory=dict, description="Headline score of each baseline and contender."
    )
    lift: dict[str, float] = Field(default_factory=dict, description="tuned minus each baseline.")
    samples: int | None = Field(default=None, description="Validation rows scored.")
    gate: GateStatus | None = None
    cost_per_1k_requests: dict[str, float] = Field(
        default_factory=dict,
        # "1k", not the "1K" the camelCase generator would make of it.
        alias="costPer1kRequests",
        description="What 1,000 requests cost each model that has a price (contenders: from their token prices).",
    )
    problems: list[Annotated[str, Field(max_length=PROBLEM_LIMIT)]] = Field(
        default_factory=list,
        max_length=MAX_PROBLEMS,
        description="What scored too little to mean anything (e.g. a judge that graded under half the outputs).",
    )


class ArtifactsStatus(ApiModel):
    """Where the results are."""

    model_config = ConfigDict(extra="ignore")

    adapter: str | None = Field(default=None, description="URI of the trained adapter.")
    checkpoint: str | None = Field(default=None, description="URI of the newest resumable checkpoint.")
    report: str | None = Field(default=None, description="URI of the evaluation report.")
    manifest: str | None = Field(default=None, description="URI of manifest.json (spec, versions, hashes).")
    merged_model: str | None = Field(default=None, description="URI of the merged model (output.mergeAdapter).")
    gguf: str | None = Field(default=None, description="URI of the GGUF file (output.gguf).")
    adapter_image: str | None = Field(
        default=None, description="The pushed adapter artifact, repository:tag@sha256:digest (output.registry)."
    )


class UsageStatus(ApiModel):
    """What the run consumed."""

    model_config = ConfigDict(extra="ignore")

    trained_tokens: int | None = Field(default=None, description="Real (non-pad) tokens trained on.")
    gpu_seconds: float | None = Field(default=None, description="GPU time, summed over GPUs.")
    wall_seconds: float | None = Field(default=None, description="Wall-clock seconds of the run.")


class TrainerStatus(ApiModel):
    """The trainer Job."""

    model_config = ConfigDict(extra="ignore")

    job_name: str | None = Field(default=None, description="Name of the trainer Job.")
    attempts: int | None = Field(default=None, description="Trainer pods started so far.")
    disruptions: int | None = Field(
        default=None,
        description="Trainer pods the cluster stopped (eviction, preemption, a lost node): not failures, not counted "
        "against runPolicy.backoffLimit; each next pod resumed from the newest checkpoint.",
    )
    disrupted_pods: list[str] | None = Field(
        default=None,
        max_length=20,
        description="Names of the newest trainer pods the cluster stopped (at most 20).",
    )
    start_time: str | None = Field(default=None, description="When the trainer Job started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the trainer Job finished (RFC 3339).")


EndpointCheckState = Literal["Running", "Succeeded", "Failed"]


class EndpointCheckStatus(ApiModel):
    """The endpoint check: the served model's answers on the evaluated rows, scored as in-process."""

    model_config = ConfigDict(extra="ignore")

    state: EndpointCheckState = Field(description="Running, Succeeded or Failed.")
    job: str | None = Field(default=None, description="The batch/v1 Job running the check.")
    metric: str | None = Field(default=None, description="The score shown: the headline metric when text-scored.")
    score: float | None = Field(default=None, description="The endpoint's score on the evaluated rows.")
    in_process_score: float | None = Field(default=None, description="The same metric of the in-process evaluation.")
    agreement: float | None = Field(default=None, description="Share of rows both answered alike (0-1).")
    rows: int | None = Field(default=None, description="Held-out rows sent.")
    latency_p50_seconds: float | None = Field(default=None, description="Median seconds per request.")
    prompt_tokens_mean: float | None = Field(default=None, description="Prompt tokens per request, as served.")
    completion_tokens_mean: float | None = Field(default=None, description="Completion tokens per request.")
    failed_requests: int | None = Field(default=None, description="Requests the endpoint did not answer.")
    uri: str | None = Field(default=None, description="eval/endpoint.json: every score and the serving cost.")
    message: str | None = Field(default=None, description="The check in one line, or why it failed.")


class ServingStatus(ApiModel):
    """The endpoint of spec.serving."""

    model_config = ConfigDict(extra="ignore")

    url: str | None = Field(default=None, description="OpenAI-compatible base URL of the Service, inside the cluster.")
    model: str | None = Field(default=None, description="The model name requests use.")
    deployment: str | None = Field(default=None, description="The server's Deployment.")
    ready_replicas: int | None = Field(default=None, description="Server pods ready to answer.")
    message: str | None = Field(default=None, description="Why there is no endpoint (e.g. the gate failed).")
    check: EndpointCheckStatus | None = None


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(
        default=None, description="Pending, Validating, Queued, Running, Evaluating, Succeeded, Failed or Cancelled."
    )
    message: str | None = Field(default=None, description="The latest human-readable word on the job.")
    model: str | None = Field(
        default=None, description="The base model's short name (its hub id's or URI's last part)."
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation the status reflects.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations, one per type.")
    progress: ProgressStatus | None = None
    dataset: DatasetStatus | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Final training and evaluation metrics.")
    evaluation: EvaluationStatus | None = None
    artifacts: ArtifactsStatus | None = None
    usage: UsageStatus | None = None
    trainer: TrainerStatus | None = None
    fine_tuned_model: str | None = Field(default=None, description="backend openai: the hosted model's name.")
    serving: ServingStatus | None = None


class ObjectMeta(BaseModel):
    """The parts of metadata a manifest needs."""

    model_config = ConfigDict(extra="allow")

    # maxLength for the CRD's schema; the check below says why (pydantic's own would only give the number).
    name: str = Field(pattern=DNS_LABEL_PATTERN, json_schema_extra={"maxLength": MAX_JOB_NAME_LENGTH})
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)

    @field_validator("name")
    @classmethod
    def _name_fits_the_trainer_pods(cls, name: str) -> str:
        if len(name) > MAX_JOB_NAME_LENGTH:
            raise ValueError(
                f"at most {MAX_JOB_NAME_LENGTH} characters ({len(name)} given): the trainer pods are named "
                f"<name>-trainer-<5 characters>, which must fit 63"
            )
        return name


class FineTuneJob(BaseModel):
    """A whole FineTuneJob manifest."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.spec.resources) || !has(self.spec.resources.nodes) || self.spec.resources.nodes == 1 "
                    f"|| size(self.metadata.name) <= {MAX_MULTI_NODE_JOB_NAME_LENGTH}",
                    MULTI_NODE_NAME_MESSAGE,
                    ".metadata.name",
                )
            ]
        },
    )

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="after")
    def _check_rules(self) -> FineTuneJob:
        # The CRD's rules on the whole object (the spec checked its own): refused here as by the API server.
        wire = {"metadata": {"name": self.metadata.name}, "spec": self.spec.to_wire()}
        refuse_violations(list(broken_rules(class_rules(FineTuneJob), wire, ())))
        return self
