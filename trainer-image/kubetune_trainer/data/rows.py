"""The data stage's contract with training and evaluation: Example, PreparedData, DataStats and DataError."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.api import DatasetStatus, TokenLengths

# How many bad rows a DataError message lists before it only counts the rest.
LISTED_ROW_ERRORS = 10

ChatMessages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    prompt: chat messages (system/user[/assistant few-shot turns]) without the answer, or a rendered template string;
    "" for format text. completion: the target text (for classification the label). input_text: the raw input (the
    text to classify, the question, the instruction) for reports and sequence classification. line: the 1-based source
    line (JSONL, CSV) or row (JSON, Parquet) the example came from. system_prompt: the systemPrompt at the head of a
    template prompt, so few_shot_prompt can keep it once ("" for chat prompts, which carry it as a message).
    """

    prompt: ChatMessages | str
    completion: str
    input_text: str
    line: int
    system_prompt: str = ""


@dataclass(frozen=True)
class DataStats:
    """Token lengths of the training examples as the objective feeds them: causal-lm the full example (prompt +
    completion, chat template applied), sequence-classification the input text alone."""

    measured: int
    p50: int
    p95: int
    max: int
    truncated_fraction: float
    max_length: int


@dataclass(frozen=True)
class PreparedData:
    """The validated, split and measured dataset.

    sha256 is the digest of the raw train file's bytes, followed by the validation file's bytes when one is given.
    """

    format: str
    train: list[Example]
    validation: list[Example]
    labels: list[str] | None
    sha256: str
    stats: DataStats | None

    def dataset_status(self) -> DatasetStatus:
        """The FineTuneJob status.dataset block for this data."""
        lengths = None
        if self.stats is not None:
            lengths = TokenLengths(p50=self.stats.p50, p95=self.stats.p95, max=self.stats.max)
        return DatasetStatus(
            format=self.format,
            train_rows=len(self.train),
            validation_rows=len(self.validation),
            sha256=self.sha256,
            token_lengths=lengths,
            truncated_fraction=self.stats.truncated_fraction if self.stats is not None else None,
        )


@dataclass(frozen=True)
class RowError:
    """One bad row: where it is and what is wrong with it."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(ValueError):
    """The dataset cannot be used; the message says what is wrong and where (file, line, field)."""

    def __init__(self, message: str, row_errors: list[RowError] | None = None) -> None:
        super().__init__(message)
        self.row_errors: list[RowError] = row_errors or []


@dataclass
class RowErrors:
    """Bad rows collected while reading a file, raised together so that one run reports them all."""

    errors: list[RowError] = field(default_factory=list)

    def add(self, file: str, line: int, reason: str) -> None:
        """Record one bad row."""
        self.errors.append(RowError(file, line, reason))

    def raise_if_any(self) -> None:
        """DataError listing the first LISTED_ROW_ERRORS rows as FILE:LINE: reason and counting the rest."""
        if not self.errors:
            return
        total = len(self.errors)
        listed = "\n".join(f"  {error}" for error in self.errors[:LISTED_ROW_ERRORS])
        rest = f"\n  ... and {total - LISTED_ROW_ERRORS} more" if total > LISTED_ROW_ERRORS else ""
        noun = "row" if total == 1 else "rows"
        raise DataError(f"{total} bad {noun}:\n{listed}{rest}", list(self.errors))
