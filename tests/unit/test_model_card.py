"""The adapter's model card: base model, data, recipe, the evaluation table, intended use, and a manifest that
reproduces the run."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from kubetune_trainer.publish.manifest import BaseModelRecord
from kubetune_trainer.publish.model_card import CardFacts, card_metadata, render_model_card

from kubetune.api import DatasetStatus, EvaluationStatus, FineTuneJob, TokenLengths
from tests.example_jobs import EXAMPLE_JOBS, load_example

pytestmark = pytest.mark.unit

REPORT = """# Evaluation: news-qlora

## Scores (500 held-out rows)

| model | accuracy |
| --- | ---: |
| tuned | 0.9040 |
| retrievalFewShot | 0.7160 |
"""


def facts(job: FineTuneJob) -> CardFacts:
    return CardFacts(
        job=job,
        base_model=BaseModelRecord(
            uri="s3://models/smollm2", revision="abc123", weights_sha256={"model.safetensors": "f" * 64}
        ),
        dataset=DatasetStatus(
            format="classification",
            train_rows=2000,
            validation_rows=500,
            sha256="d" * 64,
            token_lengths=TokenLengths(p50=60, p95=110, max=180),
            truncated_fraction=0.004,
        ),
        steps=250,
        final_loss=0.2302547,
        evaluation=EvaluationStatus(metric="accuracy", tuned=0.904),
        report_markdown=REPORT,
        image="registry.example/kubetune/trainer@sha256:" + "e" * 64,
    )


def test_the_card_states_what_the_adapter_came_from_and_how_it_scored() -> None:
    job = load_example(EXAMPLE_JOBS[0])

    card = render_model_card(facts(job))

    meta = card_metadata(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == job.spec.model.name or job.spec.model.uri
    assert "kubetune" in meta["tags"]  # type: ignore[operator]
    assert f"# {job.metadata.name}: a {job.spec.method} adapter of {job.spec.model.short_name}" in card
    assert "- revision: `abc123`" in card
    assert f"- `model.safetensors` sha256 `{'f' * 64}`" in card
    assert "- format: classification; 2000 rows trained on, 500 held out" in card
    assert f"- sha256 of the data: `{'d' * 64}`" in card
    assert "250 optimizer steps, final loss 0.2303." in card
    # The report's table, under the card's own heading levels.
    assert "### Scores (500 held-out rows)" in card and "| retrievalFewShot | 0.7160 |" in card
    assert "# Evaluation: news-qlora" not in card
    assert "## Intended use" in card and "labelling inputs like the training rows" in card


def test_the_recipe_and_the_reproducing_manifest_are_the_spec_as_it_ran() -> None:
    job = load_example(EXAMPLE_JOBS[0])
    card = render_model_card(facts(job))
    recipe, manifest = (yaml.safe_load(block.split("```")[0]) for block in card.split("```yaml\n")[1:])

    lora = job.spec.resolved_lora()
    assert lora is not None and recipe["lora"] == lora.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert recipe["method"] == job.spec.method and "quantization" in recipe
    assert recipe["training"]["learningRate"] == job.spec.training.learning_rate
    rerun = FineTuneJob.model_validate(manifest)
    assert rerun.spec == job.spec
    assert rerun.metadata.name == job.metadata.name


def test_without_an_evaluation_the_card_says_so() -> None:
    job = load_example(EXAMPLE_JOBS[2])

    card = render_model_card(dataclasses.replace(facts(job), report_markdown=None, evaluation=None))

    assert "Not evaluated (evaluation.enabled is false)." in card
    assert "## Evaluation" in card
