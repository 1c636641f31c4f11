"""kubetune_trainer.storage on local paths, URI handling and settings: everything that needs no S3 server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune_trainer import storage
from kubetune_trainer.storage import StorageError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "parts", "expected"),
    [
        ("s3://bucket/out/", ("adapter", "config.json"), "s3://bucket/out/adapter/config.json"),
        ("s3://bucket", ("/eval/", "report.json"), "s3://bucket/eval/report.json"),
        ("s3://bucket/out", (), "s3://bucket/out"),
        ("/data/out", ("checkpoints", "step-5/"), "/data/out/checkpoints/step-5"),
        ("out", ("manifest.json",), "out/manifest.json"),
    ],
)
def test_join(uri: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(uri, *parts) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/key", "unsupported scheme"),
        ("https://example.com/train.jsonl", "unsupported scheme"),
        ("", "empty URI"),
        ("s3:///key", "an S3 URI needs a bucket"),
        ("s3://bucket/", "names a bucket or prefix, not an object"),
    ],
)
def test_bad_uris_are_refused_before_any_request(uri: str, message: str) -> None:
    with pytest.raises(StorageError, match=message) as caught:
        storage.read_bytes(uri)
    assert caught.value.reason == storage.REASON_INVALID_URI
    assert caught.value.uri == uri


def test_local_write_creates_parents_and_replaces_the_file(tmp_path: Path) -> None:
    target = str(tmp_path / "out" / "eval" / "report.json")
    storage.write_bytes(target, b"first")
    storage.write_bytes(target, b"second")
    assert storage.read_bytes(target) == b"second"
    assert sorted(path.name for path in (tmp_path / "out" / "eval").iterdir()) == ["report.json"]


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"half of the new "
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_file_atomically(target, chunks())
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_write_returns_the_sha256(tmp_path: Path) -> None:
    digest = storage.write_file_atomically(tmp_path / "x.bin", [b"ab", b"cd"])
    assert digest == hashlib.sha256(b"abcd").hexdigest()


def test_reading_a_missing_local_file_is_no_such_key(tmp_path: Path) -> None:
    uri = str(tmp_path / "missing.jsonl")
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(uri)
    assert (caught.value.reason, str(caught.value)) == (storage.REASON_NO_SUCH_KEY, f"{uri}: no such file")


def test_reading_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is a directory, not a file") as caught:
        storage.read_bytes(str(tmp_path))
    assert caught.value.reason == storage.REASON_LOCAL_IO


def test_local_exists_and_list_prefix(tmp_path: Path) -> None:
    for name in ("b.txt", "a/2.txt", "a/1.txt"):
        storage.write_bytes(str(tmp_path / "out" / name), name.encode())
    assert storage.exists(str(tmp_path / "out" / "a"))
    assert not storage.exists(str(tmp_path / "out" / "c"))
    assert storage.list_prefix(str(tmp_path / "out")) == [
        str(tmp_path / "out" / "a" / "1.txt"),
        str(tmp_path / "out" / "a" / "2.txt"),
        str(tmp_path / "out" / "b.txt"),
    ]
    assert storage.list_prefix(str(tmp_path / "nothing")) == []


def test_local_upload_and_download_dir_report_hashes(tmp_path: Path) -> None:
    files = {"adapter_config.json": b"{}", "nested/weights.bin": b"\x00\x01" * 1000}
    for relative, content in files.items():
        (tmp_path / "src" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / relative).write_bytes(content)
    expected = {relative: hashlib.sha256(content).hexdigest() for relative, content in files.items()}
    assert storage.upload_dir(tmp_path / "src", str(tmp_path / "published")) == expected
    assert storage.download_dir(str(tmp_path / "published"), tmp_path / "back") == expected
    assert (tmp_path / "back" / "nested" / "weights.bin").read_bytes() == files["nested/weights.bin"]


def test_uploading_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such directory to upload"):
        storage.upload_dir(tmp_path / "absent", str(tmp_path / "out"))


def test_downloading_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such directory"):
        storage.download_dir(str(tmp_path / "absent"), tmp_path / "out")


def test_settings_come_from_the_standard_aws_variables() -> None:
    settings = storage.settings_from_env(
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-west-2"}
    )
    assert settings == storage.S3Settings("http://127.0.0.1:9000", "eu-west-1", storage.DEFAULT_MAX_ATTEMPTS)
    fallback = storage.settings_from_env({"AWS_DEFAULT_REGION": "us-west-2", "AWS_MAX_ATTEMPTS": "3"})
    assert fallback == storage.S3Settings(None, "us-west-2", 3)
    assert storage.settings_from_env({}).region == "us-east-1"


@pytest.mark.parametrize("value", ["many", "0"])
def test_bad_attempt_bound_is_refused(value: str) -> None:
    with pytest.raises(StorageError, match=f"AWS_MAX_ATTEMPTS='{value}'"):
        storage.settings_from_env({"AWS_MAX_ATTEMPTS": value})
