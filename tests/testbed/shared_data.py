"""Where the shared AG News and Banking77 samples are: shared/data beside the checkout, or $KUBETUNE_SHARED_DATA."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tests.testbed.processes import REPO_ROOT

ENV_VAR = "KUBETUNE_SHARED_DATA"


def configured_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$KUBETUNE_SHARED_DATA when set, else shared/data beside the checkout (where CI and sessions keep it)."""
    override = environ.get(ENV_VAR, "").strip()
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


# The samples are not in the repository (they are the project's shared material), so every reader goes through here.
SHARED_DATA_DIR = configured_dir()
MISSING_DATA_HINT = f"keep the checkout beside shared/, or set {ENV_VAR} to the shared data folder"


class SharedDataMissingError(FileNotFoundError):
    """A shared sample file is not where the tests, the demo and the benches look for it."""


def shared_sample(dataset: str, split: str = "train", data_dir: Path | None = None) -> Path:
    """shared/data/<dataset>/<split>.jsonl; SharedDataMissingError names the path and the fix when it is absent."""
    root = SHARED_DATA_DIR if data_dir is None else data_dir
    path = root / dataset / f"{split}.jsonl"
    if not path.is_file():
        raise SharedDataMissingError(f"the shared {dataset} {split} sample is not at {path}: {MISSING_DATA_HINT}")
    return path
