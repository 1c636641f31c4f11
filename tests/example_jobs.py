"""The example manifests under examples/, what each must hold, and the local copies of the data they read from S3."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.api import DatasetSpec, FineTuneJob
from kubetune.manifests import load_finetunejobs
from tests.testbed.shared_data import MISSING_DATA_HINT, SHARED_DATA_DIR, SharedDataMissingError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
EXAMPLE_DATA_DIR = EXAMPLES_DIR / "data"

# Each S3 prefix the manifests read data from, and the local directory holding the same files.
DATA_MIRRORS: dict[str, Path] = {
    "s3://kubetune-data/ag_news/": SHARED_DATA_DIR / "ag_news",
    "s3://kubetune-data/banking77/": SHARED_DATA_DIR / "banking77",
    "s3://kubetune-data/examples/": EXAMPLE_DATA_DIR,
}


@dataclass(frozen=True)
class ExampleJob:
    """One example manifest and what its data must turn out to be."""

    file: str
    data_format: str  # declared in the manifest, and what the data must be
    objective: str
    train_rows: int  # after the validation split, when there is one
    validation_rows: int
    labels: int | None = None  # size of the label set, for classification

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.file

    @property
    def name(self) -> str:
        return self.path.stem


EXAMPLE_JOBS: list[ExampleJob] = [
    ExampleJob("agnews-qlora.yaml", "classification", "causal-lm", 2000, 500, labels=4),
    ExampleJob("agnews-multinode-queued.yaml", "classification", "causal-lm", 2000, 500, labels=4),
    ExampleJob("banking77-seqcls.yaml", "classification", "sequence-classification", 2000, 500, labels=77),
    ExampleJob("chat-messages.yaml", "messages", "causal-lm", 24, 6),
    ExampleJob("alpaca-instruction.yaml", "instruction", "causal-lm", 24, 6),
    ExampleJob("extraction-json.yaml", "prompt-completion", "causal-lm", 24, 6),
]


def load_example(example: ExampleJob) -> FineTuneJob:
    """The one FineTuneJob in an example file."""
    jobs = load_finetunejobs(example.path)
    assert len(jobs) == 1, f"{example.file} holds {len(jobs)} FineTuneJobs; an example holds exactly one"
    return jobs[0]


def local_path(uri: str) -> Path:
    """The local copy of a file an example reads from S3."""
    for prefix, directory in DATA_MIRRORS.items():
        if uri.startswith(prefix):
            path = directory / uri[len(prefix) :]
            if directory.is_relative_to(SHARED_DATA_DIR) and not path.is_file():
                raise SharedDataMissingError(f"{uri} is mirrored by {path}, which is missing ({MISSING_DATA_HINT})")
            return path
    raise AssertionError(f"{uri} is under no prefix of DATA_MIRRORS; add the local copy of its data there")


def local_dataset(dataset: DatasetSpec) -> DatasetSpec:
    """The dataset spec with its S3 URIs replaced by the local copies, as a user does to run an example locally."""
    wire = dataset.to_wire()
    wire["train"] = str(local_path(dataset.train))
    if dataset.validation is not None:
        wire["validation"] = str(local_path(dataset.validation))
    return DatasetSpec.model_validate(wire)
