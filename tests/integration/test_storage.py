"""kubetune_trainer.storage against moto's S3 server over HTTP with real boto3: round trips, listings, failures."""

from __future__ import annotations

import hashlib
import logging
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import storage
from kubetune_trainer.storage import StorageError

pytestmark = pytest.mark.integration

SECRET_ACCESS_KEY = "integration-secret-never-logged"  # loopback-only test credential


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh moto S3 server on a free loopback port, the environment pointed at it, and an empty bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its state per process, not per server: start from, and leave behind, an empty store.
    reset_moto(f"http://{host}:{port}")
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "integration-key",
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    storage.s3_client().create_bucket(Bucket="kubetune")
    yield "s3://kubetune"
    reset_moto(f"http://{host}:{port}")
    server.stop()


def reset_moto(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 16}',
        "adapter_model.safetensors": bytes(range(256)) * 64,
        "checkpoints/step-5/trainer_state.json": b'{"global_step": 5}',
        "empty.txt": b"",
    }
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def test_bytes_round_trip_and_exists(s3: str) -> None:
    uri = storage.join(s3, "jobs/demo", "eval/report.json")
    assert uri == "s3://kubetune/jobs/demo/eval/report.json"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b'{"accuracy": 0.9}')
    assert storage.read_bytes(uri) == b'{"accuracy": 0.9}'
    assert storage.exists(uri)
    assert storage.exists("s3://kubetune/jobs/demo/eval")
    assert not storage.exists("s3://kubetune/jobs/demo/ev")
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"


def test_list_prefix_is_recursive_sorted_and_bounded_by_the_prefix(s3: str) -> None:
    for key in ("out/b.txt", "out/a/2.txt", "out/a/1.txt", "outside.txt", "other/x.txt"):
        storage.write_bytes(f"{s3}/{key}", key.encode())
    assert storage.list_prefix(f"{s3}/out") == [f"{s3}/out/a/1.txt", f"{s3}/out/a/2.txt", f"{s3}/out/b.txt"]
    assert storage.list_prefix(f"{s3}/out/") == storage.list_prefix(f"{s3}/out")
    assert storage.list_prefix(f"{s3}/nothing-here") == []
    assert len(storage.list_prefix(s3)) == 5


def test_upload_and_download_dir_round_trip_with_hashes(s3: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "adapter")
    expected = {relative: hashlib.sha256(content).hexdigest() for relative, content in files.items()}
    uploaded = storage.upload_dir(tmp_path / "adapter", f"{s3}/run-1/adapter/")
    assert uploaded == expected
    assert storage.list_prefix(f"{s3}/run-1/adapter") == sorted(f"{s3}/run-1/adapter/{name}" for name in files)
    downloaded = storage.download_dir(f"{s3}/run-1/adapter", tmp_path / "copy")
    assert downloaded == expected
    for relative, content in files.items():
        assert (tmp_path / "copy" / relative).read_bytes() == content
    assert not list((tmp_path / "copy").rglob("*.tmp"))


def test_missing_bucket_is_named(s3: str) -> None:
    for operation in (
        lambda: storage.read_bytes("s3://no-such-bucket/data/train.jsonl"),
        lambda: storage.write_bytes("s3://no-such-bucket/data/train.jsonl", b"x"),
        lambda: storage.exists("s3://no-such-bucket/data/train.jsonl"),
        lambda: storage.list_prefix("s3://no-such-bucket/data"),
    ):
        with pytest.raises(StorageError) as caught:
            operation()
        assert caught.value.reason == storage.REASON_NO_SUCH_BUCKET
        assert "no such bucket 'no-such-bucket'" in str(caught.value)
        assert str(caught.value).startswith("s3://no-such-bucket/data")


def test_missing_key_is_named(s3: str) -> None:
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(f"{s3}/data/missing.jsonl")
    assert (caught.value.reason, str(caught.value)) == (
        storage.REASON_NO_SUCH_KEY,
        "s3://kubetune/data/missing.jsonl: no such key",
    )
    with pytest.raises(StorageError, match="nothing under this prefix") as empty:
        storage.download_dir(f"{s3}/no-checkpoints", Path("/nonexistent-target"))
    assert empty.value.reason == storage.REASON_NO_SUCH_KEY


def test_upload_to_a_missing_bucket_is_a_storage_error(s3: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "adapter")
    with pytest.raises(StorageError) as caught:
        storage.upload_dir(tmp_path / "adapter", "s3://no-such-bucket/run/adapter")
    assert caught.value.reason == storage.REASON_NO_SUCH_BUCKET


def test_rejected_credentials_are_access_denied_and_the_secret_is_not_shown(
    s3: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from moto import settings

    storage.write_bytes(f"{s3}/private.txt", b"secret data")
    # Turns on moto's IAM checks: the test key is unknown to its IAM, so S3 answers 403 InvalidAccessKeyId.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(f"{s3}/private.txt")
    assert caught.value.reason == storage.REASON_ACCESS_DENIED
    assert "access denied (InvalidAccessKeyId" in str(caught.value)
    assert SECRET_ACCESS_KEY not in str(caught.value)
    assert SECRET_ACCESS_KEY not in caplog.text


def test_missing_credentials_are_named(s3: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # Keep botocore from finding credentials elsewhere on this machine (files, instance metadata).
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(f"{s3}/anything.txt")
    assert caught.value.reason == storage.REASON_NO_CREDENTIALS
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(caught.value)


def test_unreachable_endpoint_fails_after_the_bounded_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "integration-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    sent: list[str] = []

    def count_attempt(request: Any, **_: Any) -> None:
        sent.append(request.url)

    client = storage.s3_client()
    client.meta.events.register("before-send.s3", count_attempt)
    try:
        with pytest.raises(StorageError) as caught:
            storage.read_bytes("s3://kubetune/data/train.jsonl")
    finally:
        client.meta.events.unregister("before-send.s3", count_attempt)
    assert len(sent) == 3
    assert caught.value.reason == storage.REASON_ENDPOINT_UNREACHABLE
    assert str(caught.value) == (
        f"s3://kubetune/data/train.jsonl: S3 endpoint {endpoint} unreachable after 3 attempts (EndpointConnectionError)"
    )


def test_download_refuses_keys_that_would_escape_the_target(s3: str, tmp_path: Path) -> None:
    storage.s3_client().put_object(Bucket="kubetune", Key="run/../../escape.txt", Body=b"x")
    with pytest.raises(StorageError) as caught:
        storage.download_dir(f"{s3}/run", tmp_path / "target")
    assert caught.value.reason == storage.REASON_INVALID_URI
    assert not (tmp_path / "escape.txt").exists()
