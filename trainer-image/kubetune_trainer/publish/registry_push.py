"""The registry export: the adapter folder pushed as an OCI artifact (oras), one layer per file, titled by file name.

`oras pull REPOSITORY:TAG` restores the folder; the serving side (KAITO's adapters, an init container, a person) needs
nothing of kubetune to use it. Credentials come from a mounted kubernetes.io/dockerconfigjson Secret and never
appear in logs, errors or status.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api import RegistryExport
from kubetune.conditions import TRAINER_REASON_EXPORT_ERROR

log = logging.getLogger(__name__)

# The artifact's own types (its config's media type is the artifact type, as OCI 1.0 registries expect): a client
# can tell a kubetune adapter from a container image without pulling it.
ADAPTER_CONFIG_MEDIA_TYPE = "application/vnd.kubetune.adapter.config.v1+json"
ADAPTER_FILE_MEDIA_TYPE = "application/vnd.kubetune.adapter.file.v1"
DOCKER_CONFIG_KEY = ".dockerconfigjson"
# Seconds each request of the access check may take.
ACCESS_TIMEOUT = 10.0


class RegistryPushError(RuntimeError):
    """The push failed; the message names the repository and what the registry said, never the credentials."""

    reason = TRAINER_REASON_EXPORT_ERROR


@dataclass(frozen=True)
class Credentials:
    """A registry user and password; repr hides the password."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def registry_host(repository: str) -> str:
    """host[:port] of an OCI repository reference (its first path component)."""
    return repository.split("/", 1)[0]


def target_reference(export: RegistryExport, job_name: str) -> str:
    """repository:tag pushed: the spec's tag, else the job's name."""
    return f"{export.repository}:{export.tag or job_name}"


def _config_keys(host: str) -> list[str]:
    # Docker writes `host`, older clients `https://host/v1/`, some `http://host`.
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"http://{host}/v1/"]


def credentials_for(config: Mapping[str, Any], host: str) -> Credentials | None:
    """The credentials a docker config.json holds for `host` (`auth` as base64 user:password, or the two fields)."""
    auths = config.get("auths") or {}
    for key in _config_keys(host):
        entry = auths.get(key)
        if not isinstance(entry, Mapping):
            continue
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]))
        encoded = entry.get("auth")
        if encoded:
            username, _, password = base64.b64decode(str(encoded)).decode("utf-8").partition(":")
            return Credentials(username, password)
    return None


def read_credentials(config_path: Path, host: str) -> Credentials:
    """The credentials for `host` from a mounted dockerconfigjson; a clear error when the file holds none."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RegistryPushError(f"registry credentials {config_path}: not a docker config.json ({error})") from None
    credentials = credentials_for(config, host) if isinstance(config, Mapping) else None
    if credentials is None:
        raise RegistryPushError(
            f"registry credentials {config_path}: no entry for {host} under `auths` "
            "(create the Secret with `kubectl create secret docker-registry NAME --docker-server=" + host + " ...`)"
        )
    return credentials


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A WWW-Authenticate header as (scheme, parameters): `Bearer realm="...",service="..."` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    parameters = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), parameters


def check_access(export: RegistryExport, credentials: Credentials | None, timeout: float = ACCESS_TIMEOUT) -> None:
    """Ask the registry, before any training, whether these credentials may push to the repository, the way `docker
    login` does: its /v2/ with the password (Basic) or a push token from its token service (Bearer). Raises
    RegistryPushError naming the registry and what it said."""
    import requests

    host = registry_host(export.repository)
    scheme = "http" if export.insecure else "https"
    repository = export.repository.split("/", 1)[1]
    auth = (credentials.username, credentials.password) if credentials else None
    try:
        probe = requests.get(f"{scheme}://{host}/v2/", timeout=timeout)
        if probe.status_code == 200:
            return
        challenge_scheme, parameters = parse_challenge(probe.headers.get("WWW-Authenticate", ""))
        if probe.status_code != 401 or challenge_scheme not in ("basic", "bearer"):
            raise RegistryPushError(f"registry {host}: /v2/ answered HTTP {probe.status_code}, not an OCI registry?")
        if challenge_scheme == "basic":
            if auth is None:
                raise RegistryPushError(
                    f"registry {host} asks for a password: set output.registry.credentialsSecretRef"
                )
            answer = requests.get(f"{scheme}://{host}/v2/", auth=auth, timeout=timeout)
        else:
            query = {"scope": f"repository:{repository}:push,pull"}
            if "service" in parameters:
                query["service"] = parameters["service"]
            answer = requests.get(parameters.get("realm", ""), params=query, auth=auth, timeout=timeout)
    except requests.RequestException as error:
        raise RegistryPushError(f"registry {host} cannot be reached: {_describe(error)}") from None
    if answer.status_code in (401, 403):
        raise RegistryPushError(
            f"registry {host} refused the credentials of output.registry.credentialsSecretRef "
            f"(HTTP {answer.status_code})"
        )
    if not answer.ok:
        raise RegistryPushError(f"registry {host}: HTTP {answer.status_code} while checking the credentials")


def adapter_files(adapter_dir: Path) -> list[Path]:
    """Every file of the adapter folder, in name order (layers in a stable order give a stable manifest)."""
    return sorted(path for path in adapter_dir.iterdir() if path.is_file())


def push_adapter(
    adapter_dir: Path,
    export: RegistryExport,
    job_name: str,
    annotations: Mapping[str, str],
    config: Mapping[str, Any],
    credentials: Credentials | None = None,
) -> str:
    """Push the adapter folder with `config` (what it is: base model, job) as the artifact's config blob; returns
    repository:tag@sha256:digest of the manifest the registry stored."""
    import tempfile

    import oras.provider
    import requests

    host = registry_host(export.repository)
    target = target_reference(export, job_name)
    # Registries that answer with a Basic challenge (htpasswd) take the password itself; the others hand out tokens.
    client = oras.provider.Registry(
        hostname=host, insecure=export.insecure, auth_backend="basic" if credentials else "token"
    )
    if credentials is not None:
        client.auth.set_basic_auth(credentials.username, credentials.password)
    files = [f"{path}:{ADAPTER_FILE_MEDIA_TYPE}" for path in adapter_files(adapter_dir)]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            config_file = Path(scratch) / "config.json"
            config_file.write_text(json.dumps(config, sort_keys=True), encoding="utf-8")
            response = client.push(
                target,
                files=files,
                disable_path_validation=True,
                manifest_config=f"{config_file}:{ADAPTER_CONFIG_MEDIA_TYPE}",
                manifest_annotations=dict(annotations),
                quiet=True,
            )
    except (requests.RequestException, ValueError) as error:
        raise RegistryPushError(f"push of the adapter to {target} failed: {_describe(error)}") from None
    if not response.ok:
        raise RegistryPushError(f"push of the adapter to {target} failed: HTTP {response.status_code}")
    digest = response.headers.get("Docker-Content-Digest", "")
    if not digest.startswith("sha256:"):
        raise RegistryPushError(f"{target}: the registry gave no manifest digest")
    log.info("pushed the adapter (%d files) to %s@%s", len(files), target, digest)
    return f"{target}@{digest}"


def _describe(error: Exception) -> str:
    """What went wrong without the request's headers (they carry the credentials)."""
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} from {response.url.split('?', 1)[0]}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
