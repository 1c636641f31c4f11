"""The adapter's model card (adapter/README.md): what it was tuned from and on, how, how it scored against prompting,
what it is for, and the manifest that reproduces it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from kubetune.api import DatasetStatus, EvaluationStatus, FineTuneJob, FineTuneJobSpec
from kubetune_trainer.data.formats import FORMATS
from kubetune_trainer.publish.manifest import BaseModelRecord

MODEL_CARD_FILE = "README.md"
# What the card shows of the spec as hyperparameters: how the adapter was made, not where its files went.
RECIPE_FIELDS = ("method", "lora", "quantization", "training")
# The report's own title; the card has its own headings.
REPORT_TITLE_PREFIX = "# "


@dataclass(frozen=True)
class CardFacts:
    """What the card states, gathered by the publish stage."""

    job: FineTuneJob
    base_model: BaseModelRecord
    dataset: DatasetStatus
    steps: int
    final_loss: float | None
    evaluation: EvaluationStatus | None
    report_markdown: str | None
    image: str | None


def front_matter(facts: CardFacts) -> str:
    """YAML metadata in the form model hubs read (library, base model, tags)."""
    spec = facts.job.spec
    meta = {
        "library_name": "peft",
        "base_model": spec.model.name or spec.model.uri,
        "tags": ["kubetune", "lora", spec.method, spec.training.objective],
        "pipeline_tag": "text-classification"
        if spec.training.objective == "sequence-classification"
        else "text-generation",
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def base_model_section(record: BaseModelRecord) -> list[str]:
    lines = ["## Base model", ""]
    lines.append(f"- {record.name or record.uri}")
    if record.revision:
        lines.append(f"- revision: `{record.revision}`")
    for path, digest in sorted(record.weights_sha256.items()):
        lines.append(f"- `{path}` sha256 `{digest}`")
    return lines


def data_section(job: FineTuneJob, dataset: DatasetStatus) -> list[str]:
    spec = job.spec.dataset
    lines = [
        "## Data",
        "",
        f"- train: `{spec.train}`" + (f", validation: `{spec.validation}`" if spec.validation else ""),
    ]
    lines.append(
        f"- format: {dataset.format}; {dataset.train_rows} rows trained on, {dataset.validation_rows} held out"
    )
    if dataset.sha256:
        lines.append(f"- sha256 of the data: `{dataset.sha256}`")
    if dataset.token_lengths is not None:
        lengths = dataset.token_lengths
        truncated = dataset.truncated_fraction or 0.0
        lines.append(
            f"- tokens per row: p50 {lengths.p50}, p95 {lengths.p95}, max {lengths.max}; "
            f"{truncated:.1%} longer than maxLength {spec.max_length}"
        )
    return lines


def recipe_of(spec: FineTuneJobSpec) -> dict[str, object]:
    """How the adapter was made, with the defaults in effect filled in (LoRA shape, quantization)."""
    resolved = spec.model_copy(update={"lora": spec.resolved_lora(), "quantization": spec.resolved_quantization()})
    wire = resolved.model_dump(by_alias=True, exclude_none=True, mode="json")
    return {name: wire[name] for name in RECIPE_FIELDS if name in wire}


def training_section(facts: CardFacts) -> list[str]:
    recipe = recipe_of(facts.job.spec)
    loss = f", final loss {facts.final_loss:.4f}" if facts.final_loss is not None else ""
    lines = ["## Training", "", f"{facts.steps} optimizer steps{loss}. The resolved hyperparameters:", ""]
    lines += ["```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    if facts.image:
        lines += ["", f"Trainer image: `{facts.image}`"]
    return lines


def evaluation_section(facts: CardFacts) -> list[str]:
    lines = ["## Evaluation", ""]
    if facts.report_markdown:
        kept = [line for line in facts.report_markdown.splitlines() if not line.startswith(REPORT_TITLE_PREFIX)]
        body = "\n".join(kept).strip().splitlines()
        lines += [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body]
    elif facts.evaluation is not None and facts.evaluation.tuned is not None:
        lines.append(f"{facts.evaluation.metric}: tuned {facts.evaluation.tuned}")
    else:
        lines.append("Not evaluated (evaluation.enabled is false).")
    return lines


def intended_use_section(job: FineTuneJob, dataset: DatasetStatus) -> list[str]:
    spec = job.spec
    labelled = dataset.format in FORMATS and FORMATS[dataset.format].labelled
    classifies = spec.training.objective == "sequence-classification" or labelled
    task = (
        "labelling inputs like the training rows with one of their labels"
        if classifies
        else f"answering prompts like the training rows ({dataset.format} rows) in their form"
    )
    return [
        "## Intended use",
        "",
        f"For {task}, loaded on {spec.model.name or spec.model.uri} with PEFT. Fine-tuning taught the form of the "
        "answers, not new facts: the scores above hold for inputs like the held-out rows and say nothing of others.",
    ]


def reproduce_section(job: FineTuneJob) -> list[str]:
    manifest = {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": {"name": job.metadata.name},
        "spec": job.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }
    return [
        "## Reproduce",
        "",
        "The FineTuneJob as it ran, defaults filled in (`kubectl apply -f job.yaml` on a cluster with kubetune, or "
        "`kubetune train -f job.yaml` on one machine):",
        "",
        "```yaml",
        yaml.safe_dump(json.loads(json.dumps(manifest)), sort_keys=False).rstrip(),
        "```",
    ]


def render_model_card(facts: CardFacts) -> str:
    """The card as markdown with hub-style YAML front matter."""
    spec = facts.job.spec
    title = f"# {facts.job.metadata.name}: a {spec.method} adapter of {spec.model.short_name}"
    sections: list[list[str]] = [
        [title],
        base_model_section(facts.base_model),
        data_section(facts.job, facts.dataset),
        training_section(facts),
        evaluation_section(facts),
        intended_use_section(facts.job, facts.dataset),
        reproduce_section(facts.job),
    ]
    return front_matter(facts) + "\n" + "\n\n".join("\n".join(section) for section in sections) + "\n"


def card_metadata(card: str) -> Mapping[str, object]:
    """The front matter of a card, parsed (what a hub reads)."""
    _, meta, _ = card.split("---\n", 2)
    loaded = yaml.safe_load(meta)
    return loaded if isinstance(loaded, dict) else {}
