"""Resumable checkpoints in <output.uri>/checkpoints/step-N/: COMPLETE marker written last, hashes checked on resume."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubetune.conditions import TRAINER_REASON_STORAGE_ERROR
from kubetune_trainer import storage

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
MARKER_FORMAT_VERSION = 1
# Written into a local copy once its hashes matched, so that other ranks on the node reuse it.
VERIFIED_MARKER = ".kubetune-verified"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(Exception):
    """A checkpoint could not be written or read back intact."""

    reason = TRAINER_REASON_STORAGE_ERROR


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint in storage whose COMPLETE marker exists."""

    step: int
    uri: str


def checkpoints_uri(output_uri: str) -> str:
    """<output.uri>/checkpoints."""
    return storage.join(output_uri, CHECKPOINTS_DIR)


def checkpoint_uri(output_uri: str, step: int) -> str:
    """<output.uri>/checkpoints/step-N."""
    return storage.join(output_uri, CHECKPOINTS_DIR, f"step-{step}")


def complete_marker(step: int, hashes: dict[str, str]) -> bytes:
    """The COMPLETE marker: the step and the sha256 of every file in the checkpoint."""
    body = {"version": MARKER_FORMAT_VERSION, "step": step, "files": dict(sorted(hashes.items()))}
    return json.dumps(body, indent=1).encode()


def parse_complete_marker(data: bytes, uri: str) -> dict[str, str]:
    """{relative path: sha256} from a COMPLETE marker; CheckpointError naming the marker when it is malformed."""
    try:
        body = json.loads(data)
    except ValueError as error:
        raise CheckpointError(f"{uri}: COMPLETE marker is not JSON: {error}") from error
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{uri}: COMPLETE marker has no 'files' map")
    if not all(isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
        raise CheckpointError(f"{uri}: COMPLETE marker 'files' must map paths to sha256 strings")
    return files


def complete_steps(object_uris: list[str], prefix_uri: str) -> list[RemoteCheckpoint]:
    """Checkpoints in a listing of <output>/checkpoints that have a COMPLETE marker, newest first."""
    prefix = prefix_uri.rstrip("/") + "/"
    found: list[RemoteCheckpoint] = []
    for uri in object_uris:
        if not uri.startswith(prefix):
            continue
        parts = uri[len(prefix) :].split("/")
        match = _STEP_DIR.match(parts[0])
        if match and len(parts) == 2 and parts[1] == COMPLETE_MARKER:
            step = int(match.group(1))
            found.append(RemoteCheckpoint(step=step, uri=prefix + parts[0]))
    return sorted(found, key=lambda checkpoint: checkpoint.step, reverse=True)


def verify_files(local_dir: Path, hashes: dict[str, str]) -> list[str]:
    """What differs between a local copy and the marker's hashes: missing files and mismatched content."""
    problems = []
    for relative, expected in sorted(hashes.items()):
        path = local_dir.joinpath(*relative.split("/"))
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif storage.file_sha256(path) != expected:
            problems.append(f"{relative}: sha256 differs from the COMPLETE marker")
    return problems


def upload_checkpoint(
    local_dir: Path, output_uri: str, step: int, other_nodes: Mapping[str, str] | None = None
) -> RemoteCheckpoint:
    """Upload checkpoint-N to <output>/checkpoints/step-N, then the COMPLETE marker with every file's sha256.

    `other_nodes`: {path: sha256} of the files the other nodes of a multi-node run uploaded there already
    (upload_node_files); the marker covers them too. The marker goes last, so a run killed mid-upload leaves a prefix
    that list_checkpoints ignores. A step that is already complete is left alone: the first finished upload wins.
    """
    uri = checkpoint_uri(output_uri, step)
    marker_uri = storage.join(uri, COMPLETE_MARKER)
    if storage.exists(marker_uri):
        log.info("checkpoint step %d is already complete at %s", step, uri)
        return RemoteCheckpoint(step=step, uri=uri)
    check_fresh(local_dir)
    hashes = {**(other_nodes or {}), **storage.upload_dir(local_dir, uri)}
    storage.write_bytes(marker_uri, complete_marker(step, hashes))
    log.info("checkpoint step %d uploaded to %s (%d files)", step, uri, len(hashes))
    return RemoteCheckpoint(step=step, uri=uri)


def upload_node_files(local_dir: Path, output_uri: str, step: int) -> dict[str, str]:
    """Upload what this node (not rank 0's) wrote of checkpoint-N, e.g. its ranks' rng_state_<rank>.pth, before rank
    0 writes the marker; {path: sha256} for it. Nothing once the step is complete: its files are final."""
    uri = checkpoint_uri(output_uri, step)
    if not local_dir.is_dir() or storage.exists(storage.join(uri, COMPLETE_MARKER)):
        return {}
    check_fresh(local_dir)
    return storage.upload_dir(local_dir, uri)


def check_fresh(local_dir: Path) -> None:
    """A checkpoint written by this run: no marker in it (a downloaded one has both)."""
    stray = [path.name for path in local_dir.iterdir() if path.name in (COMPLETE_MARKER, VERIFIED_MARKER)]
    if stray:
        raise CheckpointError(f"{local_dir}: a fresh checkpoint must not contain {', '.join(stray)}")


def list_checkpoints(output_uri: str) -> list[RemoteCheckpoint]:
    """Complete checkpoints under <output>/checkpoints, newest first (none when the prefix does not exist yet)."""
    prefix = checkpoints_uri(output_uri)
    return complete_steps(storage.list_prefix(prefix), prefix)


def download_checkpoint(checkpoint: RemoteCheckpoint, local_dir: Path) -> Path:
    """Download a checkpoint and check every file against its COMPLETE marker; CheckpointError when they differ."""
    marker_uri = storage.join(checkpoint.uri, COMPLETE_MARKER)
    hashes = parse_complete_marker(storage.read_bytes(marker_uri), marker_uri)
    if (local_dir / VERIFIED_MARKER).exists() and not verify_files(local_dir, hashes):
        return local_dir
    if local_dir.exists():
        shutil.rmtree(local_dir)
    storage.download_dir(checkpoint.uri, local_dir)
    problems = verify_files(local_dir, hashes)
    if problems:
        raise CheckpointError(f"{checkpoint.uri} does not match its COMPLETE marker: {'; '.join(problems)}")
    (local_dir / VERIFIED_MARKER).write_text(checkpoint.uri)
    return local_dir


def fetch_latest_checkpoint(output_uri: str, local_root: Path) -> tuple[RemoteCheckpoint, Path] | None:
    """The newest complete checkpoint that verifies, downloaded under local_root; None when there is none.

    A checkpoint whose files do not match its marker is skipped with a warning in favour of the next older one,
    since resuming a little earlier beats failing the retry.
    """
    for checkpoint in list_checkpoints(output_uri):
        try:
            return checkpoint, download_checkpoint(checkpoint, local_root / f"step-{checkpoint.step}")
        except (CheckpointError, storage.StorageError) as error:
            log.warning("skipping checkpoint step %d: %s", checkpoint.step, error)
    return None
