"""Reading and writing s3://bucket/key URIs and local paths, with every failure raised as one StorageError."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
CHUNK_BYTES = 8 * 1024 * 1024

# Reasons carried by StorageError; callers branch on these, people read the message.
REASON_INVALID_URI = "InvalidUri"
REASON_NO_SUCH_BUCKET = "NoSuchBucket"
REASON_NO_SUCH_KEY = "NoSuchKey"
REASON_ACCESS_DENIED = "AccessDenied"
REASON_NO_CREDENTIALS = "NoCredentials"
REASON_ENDPOINT_UNREACHABLE = "EndpointUnreachable"
REASON_LOCAL_IO = "LocalIOError"
REASON_INVALID_CONFIG = "InvalidConfig"

# Bounded retries: botocore's standard mode backs off with jitter (50 ms doubling, capped at 20 s) between attempts.
DEFAULT_MAX_ATTEMPTS = 6
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 60.0

_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_ACCESS_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)
_NO_SUCH_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class StorageError(Exception):
    """A storage operation failed; `reason` is one of the REASON_* constants or the S3 error code."""

    def __init__(self, uri: str, reason: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class S3Location:
    """A parsed s3://bucket/key URI; key may be empty (the whole bucket) or end in / (a prefix)."""

    bucket: str
    key: str


@dataclass(frozen=True)
class S3Settings:
    """What the S3 client is built from: the standard AWS environment variables (credentials stay in botocore)."""

    endpoint_url: str | None
    region: str
    max_attempts: int


def is_s3(uri: str) -> bool:
    """Whether the URI names S3 rather than a local path."""
    return uri.startswith(S3_SCHEME)


def parse_s3_uri(uri: str) -> S3Location:
    """Split s3://bucket/key into its parts; StorageError for a URI without a bucket."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(uri, REASON_INVALID_URI, "an S3 URI needs a bucket: s3://bucket/key")
    return S3Location(bucket=bucket, key=key)


def check_uri(uri: str) -> None:
    """Refuse URIs that are neither s3:// nor a local path (gs://, http://, an empty string)."""
    if not uri:
        raise StorageError(uri, REASON_INVALID_URI, "empty URI")
    if not is_s3(uri) and _OTHER_SCHEME.match(uri):
        raise StorageError(uri, REASON_INVALID_URI, "unsupported scheme: use s3://bucket/key or a local path")
    if is_s3(uri):
        parse_s3_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI with single slashes, e.g. join('s3://b/out/', 'adapter', 'x.bin')."""
    clean = [part.strip("/") for part in parts if part.strip("/")]
    if not clean:
        return uri
    if is_s3(uri):
        base = uri.rstrip("/")
        if base == S3_SCHEME.rstrip("/"):
            raise StorageError(uri, REASON_INVALID_URI, "an S3 URI needs a bucket: s3://bucket/key")
        return "/".join([base, *clean])
    return str(Path(uri, *clean))


def name_of(uri: str) -> str:
    """The last path component of a URI (the file name)."""
    return PurePosixPath(uri[len(S3_SCHEME) :] if is_s3(uri) else uri).name


def settings_from_env(env: dict[str, str] | None = None) -> S3Settings:
    """Endpoint, region and attempt bound from AWS_ENDPOINT_URL, AWS_REGION/AWS_DEFAULT_REGION and AWS_MAX_ATTEMPTS."""
    source = os.environ if env is None else env
    raw_attempts = source.get("AWS_MAX_ATTEMPTS", "")
    try:
        max_attempts = int(raw_attempts) if raw_attempts else DEFAULT_MAX_ATTEMPTS
    except ValueError:
        raise StorageError(
            "s3://", REASON_INVALID_CONFIG, f"AWS_MAX_ATTEMPTS={raw_attempts!r} is not an integer"
        ) from None
    if max_attempts < 1:
        raise StorageError("s3://", REASON_INVALID_CONFIG, f"AWS_MAX_ATTEMPTS={raw_attempts!r} must be at least 1")
    return S3Settings(
        endpoint_url=source.get("AWS_ENDPOINT_URL_S3") or source.get("AWS_ENDPOINT_URL") or None,
        region=source.get("AWS_REGION") or source.get("AWS_DEFAULT_REGION") or "us-east-1",
        max_attempts=max_attempts,
    )


def s3_client() -> Any:
    """The boto3 S3 client for the current environment (one per distinct setting, reused across calls)."""
    return _client_for(settings_from_env(), _credential_fingerprint())


def _credential_fingerprint() -> str:
    # Keys the client cache so that a credential change in the environment builds a new client; only a hash is kept.
    material = "\0".join(
        os.environ.get(name, "")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return hashlib.sha256(material.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _client_for(settings: S3Settings, credential_fingerprint: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
    )
    # A fresh session reads credentials from the environment as it is now, not as it was at import.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def storage_error_from(uri: str, error: BaseException) -> StorageError:
    """Translate a botocore/boto3 exception into a StorageError with a message a person can act on."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    cause = _innermost_botocore_error(error)
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", "Unknown"))
        detail = str(cause.response.get("Error", {}).get("Message", "")) or code
        location = parse_s3_uri(uri) if is_s3(uri) else None
        bucket = location.bucket if location else uri
        if code == "NoSuchBucket":
            return StorageError(uri, REASON_NO_SUCH_BUCKET, f"no such bucket {bucket!r}")
        if code in _NO_SUCH_KEY_CODES:
            return StorageError(uri, REASON_NO_SUCH_KEY, "no such key")
        if code in _ACCESS_DENIED_CODES:
            return StorageError(uri, REASON_ACCESS_DENIED, f"access denied ({code}: {detail}); check the credentials")
        return StorageError(uri, code, f"S3 error {code}: {detail}")
    if isinstance(cause, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            uri, REASON_NO_CREDENTIALS, "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(cause, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError):
        settings = settings_from_env()
        endpoint = settings.endpoint_url or "the AWS S3 endpoint"
        return StorageError(
            uri,
            REASON_ENDPOINT_UNREACHABLE,
            f"S3 endpoint {endpoint} unreachable after {settings.max_attempts} attempts ({type(cause).__name__})",
        )
    return StorageError(uri, type(cause).__name__, f"S3 request failed: {cause}")


def _innermost_botocore_error(error: BaseException) -> BaseException:
    # boto3's managed transfers wrap the ClientError that says what happened (S3UploadFailedError's context).
    from botocore.exceptions import BotoCoreError, ClientError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ClientError | BotoCoreError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def _s3_call(uri: str, operation: str, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(s3_client(), operation)(**kwargs)
    except (ClientError, BotoCoreError) as error:
        raise storage_error_from(uri, error) from error


def _local_error(uri: str, error: OSError) -> StorageError:
    if isinstance(error, FileNotFoundError):
        return StorageError(uri, REASON_NO_SUCH_KEY, "no such file")
    if isinstance(error, PermissionError):
        return StorageError(uri, REASON_ACCESS_DENIED, "permission denied")
    if isinstance(error, IsADirectoryError):
        return StorageError(uri, REASON_LOCAL_IO, "is a directory, not a file")
    return StorageError(uri, REASON_LOCAL_IO, error.strerror or str(error))


def _object_location(uri: str) -> S3Location:
    location = parse_s3_uri(uri)
    if not location.key or location.key.endswith("/"):
        raise StorageError(uri, REASON_INVALID_URI, "names a bucket or prefix, not an object")
    return location


def read_bytes(uri: str) -> bytes:
    """The whole content of the object or file at `uri`."""
    check_uri(uri)
    if is_s3(uri):
        location = _object_location(uri)
        response = _s3_call(uri, "get_object", Bucket=location.bucket, Key=location.key)
        return bytes(_read_body(uri, response["Body"]))
    try:
        return Path(uri).read_bytes()
    except OSError as error:
        raise _local_error(uri, error) from error


def _read_body(uri: str, body: Any) -> bytes:
    from botocore.exceptions import BotoCoreError

    try:
        return bytes(body.read())
    except BotoCoreError as error:
        raise storage_error_from(uri, error) from error


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`; a local file is replaced atomically, so readers never see half of it."""
    check_uri(uri)
    if is_s3(uri):
        location = _object_location(uri)
        _s3_call(uri, "put_object", Bucket=location.bucket, Key=location.key, Body=data)
        return
    try:
        write_file_atomically(Path(uri), [data])
    except OSError as error:
        raise _local_error(uri, error) from error


def write_file_atomically(path: Path, chunks: Iterator[bytes] | list[bytes]) -> str:
    """Write chunks to a temp file beside `path`, fsync, rename over `path`; returns the content's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            for chunk in chunks:
                digest.update(chunk)
                temp_file.write(chunk)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def exists(uri: str) -> bool:
    """Whether an object/file, or a non-empty prefix/directory, is at `uri`; a missing bucket is an error."""
    check_uri(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    location = parse_s3_uri(uri)
    # HEAD has no body, so a 404 cannot tell a missing key from a missing bucket: the listing below can.
    if _is_object(uri):
        return True
    prefix = _as_prefix(location.key)
    response = _s3_call(uri, "list_objects_v2", Bucket=location.bucket, Prefix=prefix, MaxKeys=1)
    return bool(response.get("KeyCount", 0))


def _as_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def list_prefix(uri: str) -> list[str]:
    """URIs of every object (or file) under the prefix (or directory) `uri`, recursively, sorted."""
    check_uri(uri)
    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            return []
        return sorted(str(path) for path in root.rglob("*") if path.is_file())
    location = parse_s3_uri(uri)
    prefix = _as_prefix(location.key)
    keys: list[str] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": location.bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        response = _s3_call(uri, "list_objects_v2", **kwargs)
        keys.extend(item["Key"] for item in response.get("Contents", []))
        if not response.get("IsTruncated"):
            break
        token = response.get("NextContinuationToken")
    return sorted(f"{S3_SCHEME}{location.bucket}/{key}" for key in keys)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a local file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upload_dir(local_dir: str | Path, uri: str) -> dict[str, str]:
    """Copy every file under `local_dir` to the prefix `uri`; returns {relative posix path: sha256}."""
    check_uri(uri)
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(str(root), REASON_NO_SUCH_KEY, "no such directory to upload")
    hashes: dict[str, str] = {}
    for path in sorted(candidate for candidate in root.rglob("*") if candidate.is_file()):
        relative = path.relative_to(root).as_posix()
        target = join(uri, relative)
        try:
            hashes[relative] = file_sha256(path)
        except OSError as error:
            raise _local_error(str(path), error) from error
        _copy_file_to(path, target)
    log.info("uploaded %d files from %s to %s", len(hashes), root, uri)
    return hashes


def _copy_file_to(path: Path, target: str) -> None:
    if not is_s3(target):
        try:
            with path.open("rb") as source:
                write_file_atomically(Path(target), _chunks(source))
        except OSError as error:
            raise _local_error(target, error) from error
        return
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    location = _object_location(target)
    try:
        # Managed transfer: multipart above the threshold, so multi-GB weights do not need to fit in memory.
        s3_client().upload_file(
            str(path), location.bucket, location.key, Config=TransferConfig(multipart_threshold=64 * 1024 * 1024)
        )
    except (ClientError, BotoCoreError, Boto3Error) as error:
        raise storage_error_from(target, error) from error


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: handle.read(CHUNK_BYTES), b"")


def download_dir(uri: str, local_dir: str | Path) -> dict[str, str]:
    """Copy every object under the prefix `uri` into `local_dir`; returns {relative posix path: sha256}."""
    check_uri(uri)
    root = Path(local_dir)
    sources = list_prefix(uri)
    if not sources:
        if is_s3(uri) or Path(uri).is_dir():
            raise StorageError(uri, REASON_NO_SUCH_KEY, "nothing under this prefix to download")
        raise StorageError(uri, REASON_NO_SUCH_KEY, "no such directory")
    hashes: dict[str, str] = {}
    for source in sources:
        relative = _relative_to_prefix(uri, source)
        target = root.joinpath(*relative.split("/"))
        try:
            hashes[relative] = write_file_atomically(target, _source_chunks(source))
        except OSError as error:
            raise _local_error(str(target), error) from error
    log.info("downloaded %d files from %s to %s", len(hashes), uri, root)
    return hashes


def download(uri: str, target: str | Path) -> dict[str, str]:
    """One object to the file `target`, or every object under a prefix into the directory `target`; returns
    {path under target ('' for a single file): sha256}."""
    check_uri(uri)
    single = _is_object(uri) if is_s3(uri) else Path(uri).is_file()
    if not single:
        return download_dir(uri, target)
    try:
        digest = write_file_atomically(Path(target), _source_chunks(uri))
    except OSError as error:
        raise _local_error(str(target), error) from error
    log.info("downloaded %s to %s", uri, target)
    return {"": digest}


def _is_object(uri: str) -> bool:
    """Whether an S3 URI names one object (rather than a prefix or nothing)."""
    from botocore.exceptions import BotoCoreError, ClientError

    location = parse_s3_uri(uri)
    if not location.key or location.key.endswith("/"):
        return False
    try:
        s3_client().head_object(Bucket=location.bucket, Key=location.key)
        return True
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in _NO_SUCH_KEY_CODES:
            return False
        raise storage_error_from(uri, error) from error
    except BotoCoreError as error:
        raise storage_error_from(uri, error) from error


def _relative_to_prefix(uri: str, source: str) -> str:
    if is_s3(uri):
        prefix = _as_prefix(parse_s3_uri(uri).key)
        relative = parse_s3_uri(source).key[len(prefix) :]
    else:
        relative = Path(source).relative_to(Path(uri)).as_posix()
    parts = relative.split("/")
    # An object key such as "../x" must not escape the target directory.
    if not relative or any(part in ("", ".", "..") for part in parts):
        raise StorageError(source, REASON_INVALID_URI, f"refusing to download a key with path {relative!r}")
    return relative


def _source_chunks(uri: str) -> Iterator[bytes]:
    if not is_s3(uri):
        with Path(uri).open("rb") as handle:
            yield from _chunks(handle)
        return
    from botocore.exceptions import BotoCoreError

    location = _object_location(uri)
    body = _s3_call(uri, "get_object", Bucket=location.bucket, Key=location.key)["Body"]
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    except BotoCoreError as error:
        raise storage_error_from(uri, error) from error
