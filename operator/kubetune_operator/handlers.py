"""kopf glue: create a FineTuneJob's children, follow its trainer Job and pods, write its status, post Events.

Everything here reads the cluster, calls a pure builder or lifecycle function, and writes the result. Handlers on Jobs
and Pods return None (a returned value would be patched into those objects). There are no delete handlers, hence no
finalizers: deleting a FineTuneJob never waits for the operator, and its children go by owner-reference GC.

Backends: both run as the same trainer Job, so one set of handlers serves them. `local` trains in the pod; `openai`
drives hosted fine-tuning from a pod without GPUs (kubetune_trainer.backends.hosted), so the operator never reads the
API key.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar, cast

import kopf
from kubernetes_asyncio.client import ApiClient as AsyncApiClient
from kubernetes_asyncio.client.exceptions import ApiException as AsyncApiException
from pydantic import ValidationError

from kubetune.api import (
    GROUP,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    EndpointCheckStatus,
    FineTuneJob,
    FineTuneJobStatus,
    utc_now,
)
from kubetune_operator.builders import (
    COMPONENT_TRAINER,
    JOBSET_API_VERSION,
    LABEL_COMPONENT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGER,
    is_multi_node,
    total_gpus,
    trainer_kind,
    trainer_resource_name,
)
from kubetune_operator.lifecycle import (
    PhaseTransition,
    StatusChange,
    invalid_spec_status,
    is_owned_by,
    is_pod_of,
    job_condition,
    jobset_as_job,
    jobset_missing_status,
)
from kubetune_operator.metrics import HANDLERS, MetricsServer, OperatorMetrics
from kubetune_operator.queueing import KUEUE_GROUP, KUEUE_VERSION, QueueState, queue_state_of, trainer_owner
from kubetune_operator.rbac import KOPF_PEERING_GROUP
from kubetune_operator.reconcile import Observed, child_changes, status_change
from kubetune_operator.serving import (
    COMPONENT_ENDPOINT_CHECK,
    COMPONENT_SERVING,
    LABEL_SERVED_JOB,
    build_check_job,
    check_base_url,
    check_name,
    check_result,
    needs_check,
    serving_name,
)
from kubetune_operator.settings import OperatorSettings, SettingsError
from kubetune_operator.status_queue import DeferredQueue
from kubetune_operator.trainer_identity import (
    COMPONENT_TRAINER_IDENTITY,
    IDENTITY_SELECTOR,
    build_namespace_identity,
)

MEMO_KEY = "kubetune"
JOBSET_RESOURCE = (*JOBSET_API_VERSION.split("/"), "jobsets")
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_JOB_NAME}"
# Pods of both kinds the operator reads: trainers and endpoint checks (not the endpoint's servers, which it follows
# through their Deployment).
POD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_COMPONENT} in ({COMPONENT_TRAINER},{COMPONENT_ENDPOINT_CHECK})"
SERVING_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_COMPONENT}={COMPONENT_SERVING}"
MERGE_PATCH = "application/merge-patch+json"
# kopf's executor, for its few sync handlers (the probe); every watch event is handled on kopf's loop.
HANDLER_THREADS = 4
# Creates in flight at once on kopf's loop (each holds one keep-alive connection): as many as a 16-thread client's.
CREATES_IN_FLIGHT = 16
# Status derivations in progress at once (status_queue.DeferredQueue), behind the creates: each waits on its patch.
STATUS_WORKERS = 8
# Backoff of a failed create or suspend (kopf does not retry event handlers).
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
CONFLICT_RETRY_SECONDS = 10
JSON = "application/json"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class OperatorContext:
    """What the handlers share: settings, an API client, metrics, and one lock per FineTuneJob."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    metrics_server: MetricsServer | None = None
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    # The newest FineTuneJob each job's status derivation has seen: a watch event's body or a status patch's answer.
    _bodies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # uids of FineTuneJobs whose children this replica has created or found: a repeated create pass is skipped.
    _children_ensured: set[str] = field(default_factory=set)
    _serving_ensured: set[str] = field(default_factory=set)
    # Namespaces whose trainer ServiceAccount and RoleBinding this replica has created or found.
    _identities_ensured: set[str] = field(default_factory=set)
    # One lock per namespace around creating its trainer identity: the first jobs of a burst wait for one create.
    _identity_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # The asynchronous API client of the writes on kopf's event loop (made by the startup handler, on the loop).
    async_api: AsyncApiClient | None = None
    # A cap on creates in flight.
    create_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CREATES_IN_FLIGHT))
    # Retries waiting on the event loop (a reference keeps each task alive until it ends).
    _background: set[asyncio.Future[None]] = field(default_factory=set)
    # Status derivations, deferred behind trainer Job creates and coalesced per job (started by the startup handler).
    status_queue: DeferredQueue[tuple[str, str]] | None = None
    # kopf's indexes of trainer Jobs and pods, as the first handler call handed them over (live views).
    _children: Children | None = None
    # Failed creates or suspends waiting for their retry: uid -> attempts so far.
    _retries: dict[str, int] = field(default_factory=dict)
    # Failed status derivations waiting for their retry: (namespace, name) -> attempts so far.
    _status_retries: dict[tuple[str, str], int] = field(default_factory=dict)

    def attach_children(self, children: Children) -> None:
        """Called by every handler first: keep kopf's indexes for the status derivations, and start the status
        workers from the first handler, so that they run in a copy of its context (kopf.event needs the context
        variables kopf sets for its handlers, not yet set for the startup handler)."""
        with self._locks_guard:
            if self._children is None:
                self._children = children
        if self.status_queue is not None and not self.status_queue.started:
            self.status_queue.start()

    def children(self) -> Children:
        """kopf's indexes of trainer Jobs and pods."""
        if self._children is None:
            raise RuntimeError("no handler has run yet: kopf's indexes are unknown")
        return self._children

    async def request_status(self, namespace: str, name: str) -> None:
        """Derive and write the job's status soon (at once when no queue runs, e.g. in unit tests)."""
        if self.status_queue is None:
            await reconcile_status(self, namespace, name, job_logger(namespace, name), self.children())
        else:
            self.status_queue.put((namespace, name))

    async def derive_status_of(self, key: tuple[str, str]) -> None:
        """One queued status derivation; a success ends the job's status retries."""
        await reconcile_status(self, key[0], key[1], job_logger(*key), self.children())
        self._status_retries.pop(key, None)

    def retry_status_later(self, key: tuple[str, str]) -> None:
        """A status derivation failed (the API server refused or did not answer its reads or patch): queue it again
        after the doubling backoff, as for a failed create. Level-triggered: the retry derives from what is current
        then."""
        self.metrics.record_handler_error("reconcile_status")
        attempts = self._status_retries.get(key, 0)
        self._status_retries[key] = attempts + 1
        if self.status_queue is not None:
            asyncio.get_running_loop().call_later(retry_delay(attempts), self.status_queue.put, key)

    @contextmanager
    def status_queue_creating(self) -> Iterator[None]:
        """Hold status derivations back while a trainer Job is being created."""
        if self.status_queue is None:
            yield
        else:
            with self.status_queue.creating():
                yield

    def retry_later(self, namespace: str, name: str, uid: str, error: Exception | None = None) -> float:
        """Handle the job again after a delay that doubles per failure (1 s to 60 s), or the delay a
        kopf.TemporaryError asks for when longer; returns the delay. Call on kopf's event loop: the retry runs there,
        in the caller's context variables (kopf.event needs them)."""
        with self._locks_guard:
            attempts = self._retries.get(uid, 0)
            self._retries[uid] = attempts + 1
        delay = max(retry_delay(attempts), requested_delay(error))
        asyncio.get_running_loop().call_later(
            delay, lambda: self.in_background(retry_finetunejob(self, namespace, name, uid))
        )
        return float(delay)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine as a task of the loop, kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def retry_done(self, uid: str) -> None:
        """The job's create (or suspend) went through: the next failure starts the backoff over."""
        with self._locks_guard:
            self._retries.pop(uid, None)

    @asynccontextmanager
    async def job_lock(self, namespace: str, name: str) -> AsyncIterator[None]:
        """Serialise status derivations of one job: a derivation waits on its patch while the next event comes."""
        with self._locks_guard:
            lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            yield

    @property
    def tracked_jobs(self) -> int:
        """FineTuneJobs this replica has derived a status for and not yet seen deleted."""
        with self._locks_guard:
            return len(self._locks)

    def forget_job(self, namespace: str, name: str, uid: str | None) -> None:
        """Forget a deleted job: its lock, its body, its children's record."""
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            self._bodies.pop((namespace, name), None)
            self._children_ensured.discard(uid or "")
            self._serving_ensured.discard(uid or "")
            self._status_retries.pop((namespace, name), None)

    def serving_ensured(self, uid: str) -> bool:
        """Whether this replica has created or found the endpoint (spec.serving) of the job with this uid."""
        with self._locks_guard:
            return uid in self._serving_ensured

    def set_serving_ensured(self, uid: str, ensured: bool) -> None:
        """Record that the endpoint exists, or that it must be created again (its Deployment or Service is gone)."""
        with self._locks_guard:
            if ensured:
                self._serving_ensured.add(uid)
            else:
                self._serving_ensured.discard(uid)

    def remember_body(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Keep the newer of `body` and the one known for its job and return it; None when the two cannot be
        ordered (then only a GET tells which is current)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._locks_guard:
            newest = newer_body(body, self._bodies.get(key))
            if newest is None:
                self._bodies.pop(key, None)
            else:
                self._bodies[key] = newest
            return newest

    def known_body(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest FineTuneJob body seen for the job, if any."""
        with self._locks_guard:
            return self._bodies.get((namespace, name))

    def observed(self, namespace: str, name: str, uid: str) -> Observed:
        """What this replica knows of the job's children: its trainer Job (kopf's index), whether this replica has
        created or found it, whether its endpoint exists."""
        trainer_job = self.children().trainer_job(namespace, name)
        if trainer_job is not None and is_owned_by(trainer_job, uid):
            self.set_children_ensured(uid, True)
        return Observed(trainer_job, trainer_created=self.children_ensured(uid), serving=self.serving_ensured(uid))

    def children_ensured(self, uid: str) -> bool:
        """Whether this replica has already created or found every child of the FineTuneJob with this uid."""
        with self._locks_guard:
            return uid in self._children_ensured

    def identity_ensured(self, namespace: str) -> bool:
        """Whether this replica has already created or found the namespace's trainer identity."""
        with self._locks_guard:
            return namespace in self._identities_ensured

    def identity_lock(self, namespace: str) -> asyncio.Lock:
        """The lock that serialises creating one namespace's trainer identity (on kopf's loop)."""
        return self._identity_locks.setdefault(namespace, asyncio.Lock())

    def set_identity_ensured(self, namespace: str, ensured: bool = True) -> None:
        """Record that the namespace's trainer identity exists, or that it must be created again (a part is gone)."""
        with self._locks_guard:
            if ensured:
                self._identities_ensured.add(namespace)
            else:
                self._identities_ensured.discard(namespace)

    def set_children_ensured(self, uid: str, ensured: bool) -> None:
        """Record that the children exist (after a create pass), or that a pass must run again (a child is gone)."""
        with self._locks_guard:
            if ensured:
                self._children_ensured.add(uid)
            else:
                self._children_ensured.discard(uid)


def retry_delay(attempts: int) -> float:
    """The backoff after `attempts` earlier failures of one job: 1 s, doubling, at most 60 s."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2**attempts)


def requested_delay(error: Exception | None) -> float:
    """The delay a kopf.TemporaryError names (e.g. a child owned by a deleted job, waiting for garbage collection);
    0 for any other error. Event handlers are not retried by kopf, so the operator honours it itself."""
    if isinstance(error, kopf.TemporaryError) and error.delay:
        return float(error.delay)
    return 0.0


def operator_context(memo: Any) -> OperatorContext:
    """The context the startup handler put into kopf's memo."""
    context = memo.get(MEMO_KEY)
    if not isinstance(context, OperatorContext):
        raise kopf.PermanentError("the kubetune startup handler has not run")
    return context


def counted(handler: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Count the (coroutine) handler's failures in kubetune_handler_errors_total{handler}."""
    if handler not in HANDLERS:
        raise ValueError(f"handler {handler!r} is missing from kubetune_operator.metrics.HANDLERS")

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await function(*args, **kwargs)
            except Exception:
                memo: Any = kwargs.get("memo")
                context = memo.get(MEMO_KEY) if memo is not None else None
                if isinstance(context, OperatorContext):
                    context.metrics.record_handler_error(handler)
                raise

        return wrapper

    return decorate


def resource_version(body: Mapping[str, Any]) -> int | None:
    """metadata.resourceVersion as an integer, None when it is not one."""
    value = (body.get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def newer_body(seen: dict[str, Any], known: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newer of two bodies of one object; None when they cannot be ordered.

    Kubernetes calls resourceVersions opaque, but kube-apiserver's are etcd revisions: integers that grow with every
    write. A watch event can be older than a status patch's answer (the event for the patch is still on its way), and
    deriving from it would write and announce a transition twice. A non-integer version sends the caller to a GET.
    """
    if known is None:
        return seen
    seen_version, known_version = resource_version(seen), resource_version(known)
    if seen_version is None or known_version is None:
        return None
    return seen if seen_version >= known_version else known


def compact(body: Mapping[str, Any], drop_from_spec: tuple[str, ...] = ()) -> dict[str, Any]:
    """The object as a dict without metadata.managedFields, which nothing here reads (memory of the indexes), nor the
    `drop_from_spec` keys of its spec. What is dropped is never copied: it is most of a Job's body.

    Shallow: the top level, metadata and spec are new dicts; every other value is the body's own. Safe because nothing
    changes a body once received: kopf's bodies are read-only views of the dicts each watch event decoded afresh, the
    API client's answers are ours alone, and everything here only reads them. A deep copy would cost several times
    as much per event, for nothing (docs/decisions/0002-operator-compact-bodies-and-gc.md).
    """
    pruned = dict(body)
    metadata = pruned.get("metadata")
    if isinstance(metadata, Mapping):
        pruned["metadata"] = {key: value for key, value in metadata.items() if key != "managedFields"}
    spec = pruned.get("spec")
    if drop_from_spec and isinstance(spec, Mapping):
        pruned["spec"] = {key: value for key, value in spec.items() if key not in drop_from_spec}
    return pruned


def compact_job(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer Job as the status derivation reads it: without its pod template (most of its size), which is ours."""
    return compact(body, drop_from_spec=("template",))


@dataclass(frozen=True)
class Children:
    """The trainer Jobs and pods kopf's indexes hold in memory (filled from the watches before any handler runs):
    a status derivation reads them here instead of a GET of the Job and a LIST of pods. Read on kopf's loop only,
    which is also where kopf changes them."""

    jobs: Mapping[tuple[str, str], Iterable[dict[str, Any]]]
    pods: Mapping[tuple[str, str], Iterable[dict[str, Any]]]
    # Multi-node trainers' JobSets, each as the Job view the status derivation reads (lifecycle.jobset_as_job).
    jobsets: Mapping[tuple[str, str], Iterable[dict[str, Any]]] = field(default_factory=dict)
    # Kueue's word on each queued trainer (queueing.queue_state_of its Workload).
    queue_states: Mapping[tuple[str, str], Iterable[QueueState]] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Children:
        """The indexes kopf passes to every handler under their ids (the index functions' names)."""
        return cls(
            jobs=kwargs["trainer_jobs_index"],
            pods=kwargs["trainer_pods_index"],
            jobsets=kwargs.get("trainer_jobsets_index", {}),
            queue_states=kwargs.get("trainer_workloads_index", {}),
        )

    def trainer_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job's trainer (its Job, or its JobSet's Job view), None when no watch has seen one (or saw it
        deleted)."""
        job_name = trainer_resource_name(name)
        found = [
            job
            for index in (self.jobs, self.jobsets)
            for job in index.get((namespace, name), ())
            if job["metadata"]["name"] == job_name
        ]
        # Two of that name only while a Job deleted and created again waits for its DELETED event: the index holds
        # them in the order the watch brought them.
        return found[-1] if found else None

    def queue_state(self, namespace: str, name: str, trainer_job: Mapping[str, Any] | None) -> QueueState | None:
        """What Kueue says of this trainer's Workload, None when it has none (not queued, or not seen yet)."""
        uid = (trainer_job or {}).get("metadata", {}).get("uid")
        found = [state for state in self.queue_states.get((namespace, name), ()) if state.owner_uid == uid]
        return found[-1] if uid and found else None

    def unfinished_in(self, namespace: str) -> bool:
        """Whether a trainer of the namespace has neither completed nor failed (its pods may yet be created)."""
        return any(
            not (job_condition(job, "Complete") or job_condition(job, "Failed"))
            for index in (self.jobs, self.jobsets)
            for (job_namespace, _), jobs in index.items()
            if job_namespace == namespace
            for job in jobs
        )

    def trainer_pods(self, namespace: str, name: str, trainer_job: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """The pods of this job's current trainer Job (not of an earlier Job of the same name)."""
        return pods_of(list(self.pods.get((namespace, name), ())), trainer_job)


def in_namespace(namespace: str | None) -> str:
    """The namespace of a namespaced object (FineTuneJobs, Jobs and Pods all are)."""
    if not namespace:
        raise kopf.PermanentError("kubetune handles namespaced objects only")
    return namespace


def format_validation_error(error: ValidationError) -> str:
    """Pydantic errors as `field.path: what is wrong`, one per problem, joined by semicolons."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        problems.append(f"{where}: {item['msg']}")
    return "invalid FineTuneJob: " + "; ".join(problems)


def as_kopf_body(raw: Mapping[str, Any]) -> kopf.Body:
    """A plain object dict as the kopf.Body that kopf.event and kopf.adopt expect."""
    return kopf.Body(cast(kopf.RawBody, dict(raw)))


# ---------------------------------------------------------------------------------------------------------------------
# API access: kubernetes_asyncio on kopf's event loop, one request per call, answers unparsed unless read.


def api_error_status(error: Exception) -> int | None:
    """The HTTP status of an API error, None for anything else."""
    if isinstance(error, AsyncApiException):
        return int(error.status)
    return None


def api_error_message(error: Exception) -> str:
    """What the API server said in its Status answer (what was refused and why), else the HTTP reason."""
    body = getattr(error, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return str(message or getattr(error, "reason", "") or "")


def pods_of(pods: list[dict[str, Any]], trainer_job: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The pods of this trainer (all of them when the trainer is unknown)."""
    if trainer_job is None or not (trainer_job.get("metadata") or {}).get("uid"):
        return pods
    return [pod for pod in pods if is_pod_of(pod, trainer_job)]


async def patch_finetunejob_status(
    context: OperatorContext, namespace: str, name: str, patch: dict[str, Any]
) -> dict[str, Any] | None:
    """A merge patch through the status subresource; the patched object, None when it is gone meanwhile."""
    try:
        data = await api_request(context, "PATCH", f"{finetunejob_url(namespace, name)}/status", patch, MERGE_PATCH)
    except AsyncApiException as error:
        if error.status == 404:
            return None
        raise
    patched: dict[str, Any] = json.loads(data)
    return patched


# Where each kind of child is created: kind -> (API group path, plural).
CHILD_PATHS: dict[str, tuple[str, str]] = {
    "ServiceAccount": ("api/v1", "serviceaccounts"),
    "RoleBinding": ("apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("apis/batch/v1", "jobs"),
    "JobSet": (f"apis/{JOBSET_API_VERSION}", "jobsets"),
    "Deployment": ("apis/apps/v1", "deployments"),
    "Service": ("api/v1", "services"),
}


def collection_url(kind: str, namespace: str) -> str:
    """The URL (from the API root) of the namespaced collection an object of this kind is created in."""
    group_path, plural = CHILD_PATHS[kind]
    return f"/{group_path}/namespaces/{namespace}/{plural}"


async def api_request(
    context: OperatorContext, method: str, url: str, body: object = None, content_type: str = JSON
) -> bytes:
    """One request with the asynchronous client, once, its answer's body unparsed; an ApiException for any answer but
    2xx. A failure goes back to the caller at once, whose job is handled again with a growing delay
    (OperatorContext.retry_later): retrying inside a create would hold back every status derivation meanwhile
    (status_queue), and would retry a 403 (a terminating namespace, a quota) that waiting seconds does not mend.
    Nothing here needs a created or patched object (the watches bring them), and decoding each answer into the
    client's models was a tenth of the operator's CPU in a burst."""
    if context.async_api is None:
        raise RuntimeError("the startup handler has not made the API client")
    response = await context.async_api.call_api(
        url,
        method,
        header_params={"Accept": JSON, "Content-Type": content_type},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
    )
    async with response:
        data = await response.read()
    if not 200 <= response.status <= 299:
        error = AsyncApiException(status=response.status, reason=response.reason)
        error.body = data.decode("utf-8", errors="replace")
        raise error
    return bytes(data)


async def merge_patch(context: OperatorContext, url: str, body: Mapping[str, Any]) -> None:
    """A JSON merge patch."""
    await api_request(context, "PATCH", url, body, content_type=MERGE_PATCH)


async def post_object(context: OperatorContext, manifest: Mapping[str, Any]) -> bool:
    """Create the object; True when created, False when it exists (409)."""
    url = collection_url(manifest["kind"], manifest["metadata"]["namespace"])
    try:
        async with context.create_slots:
            await api_request(context, "POST", url, manifest)
    except AsyncApiException as error:
        if error.status == 409:
            return False
        raise
    return True


async def read_object(context: OperatorContext, url: str) -> dict[str, Any] | None:
    """GET; None when the object is gone (404)."""
    try:
        data = await api_request(context, "GET", url)
    except AsyncApiException as error:
        if error.status == 404:
            return None
        raise
    found: dict[str, Any] = json.loads(data)
    return found


async def ensure_namespace_identity(context: OperatorContext, namespace: str, logger: Any) -> None:
    """The trainer ServiceAccount and its RoleBinding in this namespace, created once per namespace and replica
    (409 is success: whoever made them, they serve the namespace's trainers).

    The first jobs of a burst arrive together: one creates, the others wait for it (they all raced before, and all but
    one lost with a 409: 30 wasted writes, RoleBinding escalation checks included, per namespace).
    """
    if context.identity_ensured(namespace):
        return
    async with context.identity_lock(namespace):
        if context.identity_ensured(namespace):
            return
        created = [
            f"{manifest['kind']} {manifest['metadata']['name']}"
            for manifest in build_namespace_identity(namespace, context.settings)
            if await post_object(context, manifest)
        ]
        context.set_identity_ensured(namespace)
    if created:
        logger.info("created the namespace's trainer identity: %s", ", ".join(created))


async def create_child(context: OperatorContext, manifest: dict[str, Any], owner_uid: str, logger: Any) -> bool:
    """Create one child; True when created, False when it existed and is ours (409 is success).

    An existing object owned by someone else (e.g. a deleted FineTuneJob of the same name whose children GC has not
    removed yet) is a temporary conflict: retry later rather than adopt it.
    """
    if await post_object(context, manifest):
        return True
    kind, namespace, name = manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    existing = await read_object(context, f"{collection_url(kind, namespace)}/{name}")
    if existing is None:
        # Deleted between the refused create and the read: creating it again can work at once.
        raise kopf.TemporaryError(
            f"{kind} {namespace}/{name} was deleted while being created", delay=RETRY_FIRST_SECONDS
        )
    if not is_owned_by(existing, owner_uid):
        raise kopf.TemporaryError(
            f"{kind} {namespace}/{name} exists but is not owned by this FineTuneJob (uid {owner_uid}); waiting for "
            "it to be garbage-collected",
            delay=CONFLICT_RETRY_SECONDS,
        )
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Reconciling a FineTuneJob's status.


def post_transition_events(body: Mapping[str, Any], transitions: tuple[PhaseTransition, ...]) -> None:
    """One Kubernetes Event per phase transition, on the FineTuneJob."""
    for transition in transitions:
        kopf.event(
            as_kopf_body(body),
            type="Warning" if transition.is_warning else "Normal",
            reason=transition.reason,
            message=f"{transition.from_phase or 'New'} → {transition.to_phase}: {transition.message}",
        )


async def apply_status_change(
    context: OperatorContext, body: Mapping[str, Any], change: StatusChange, gpus: int
) -> None:
    """Write the patch (once), post Events and count transitions, refresh the job's metrics."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if not change.is_empty:
        patched = await patch_finetunejob_status(context, namespace, name, change.patch)
        if patched is None:
            return
        context.remember_body(compact(patched))
    post_transition_events(body, change.transitions)
    for transition in change.transitions:
        context.metrics.record_transition(transition.from_phase, transition.to_phase)
    context.metrics.observe_job(namespace, name, change.status, gpus, datetime.now(UTC))


async def current_finetunejob(
    context: OperatorContext, namespace: str, name: str, seen: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The newest FineTuneJob known: `seen` (an event's body) or the last status patch's answer, whichever is newer;
    a GET only when neither is known or they cannot be ordered. None when it is gone."""
    newest = context.remember_body(seen) if seen is not None else context.known_body(namespace, name)
    if newest is not None:
        return newest
    body = await read_object(context, finetunejob_url(namespace, name))
    if body is not None:
        body = compact(body)
        context.remember_body(body)
    return body


async def reconcile_status(
    context: OperatorContext,
    namespace: str,
    name: str,
    logger: kopf.Logger,
    children: Children,
    seen: dict[str, Any] | None = None,
) -> None:
    """Derive the status from the newest FineTuneJob and its trainer Job and pods (all in memory); write what
    changed."""
    async with context.job_lock(namespace, name):
        with context.metrics.timed_reconcile():
            body = await current_finetunejob(context, namespace, name, seen)
            if body is None:
                return
            trainer_job = children.trainer_job(namespace, name)
            if trainer_job is None and not (body.get("status") or {}).get("phase"):
                return  # nothing created yet: the create handler is at work and writes the first status itself
            try:
                job = FineTuneJob.model_validate(body)
            except ValidationError:
                return  # the create handler has reported it as InvalidSpec
            observed = Observed(
                trainer_job,
                children.trainer_pods(namespace, name, trainer_job),
                queue=children.queue_state(namespace, name, trainer_job),
            )
            change = status_change(job, observed, utc_now())
            if change.transitions:
                logger.info(
                    "phase %s -> %s (%s)",
                    job.status.phase if job.status else None,
                    change.status.phase,
                    change.transitions[0].reason,
                )
            await apply_status_change(context, body, change, total_gpus(job))


# ---------------------------------------------------------------------------------------------------------------------
# Operator start and stop.


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps and builds no diff base. kopf builds one (a deep copy of the body's essence) for every event of every
    object, to detect changes for change-detecting handlers; kubetune has none (only event handlers), so every such
    copy would be work thrown away."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """kopf's settings for kubetune: no dynamic scanning, filtered watches, peering, quiet Events."""
    # Only event handlers, which keep no state on the object and need no finalizer (see NoDiffBase). The progress
    # storage and finalizer are unused; named for clarity, should a change-detecting handler ever be added.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
    kopf_settings.persistence.finalizer = f"{GROUP}/finalizer"
    kopf_settings.execution.max_workers = HANDLER_THREADS
    # Exact namespaces or cluster-wide only, resolved once at start: no list/watch on namespaces and CRDs needed.
    kopf_settings.scanning.disabled = True
    # Server-side filtering: watch only kubetune's trainer Jobs, its pods and endpoints, not every Job, pod and
    # Deployment in the cluster. Each handler's own label filter must fall within its resource's selector.
    kopf_settings.watching.label_selectors["batch/v1", "jobs"] = CHILD_SELECTOR
    kopf_settings.watching.label_selectors[JOBSET_API_VERSION, "jobsets"] = CHILD_SELECTOR
    kopf_settings.watching.label_selectors["v1", "pods"] = POD_SELECTOR
    kopf_settings.watching.label_selectors["apps/v1", "deployments"] = SERVING_SELECTOR
    kopf_settings.watching.label_selectors["v1", "serviceaccounts"] = IDENTITY_SELECTOR
    kopf_settings.watching.label_selectors["rbac.authorization.k8s.io/v1", "rolebindings"] = IDENTITY_SELECTOR
    # Our own Events cover phase transitions; kopf's per-handler INFO chatter would drown them.
    kopf_settings.posting.level = logging.WARNING
    standalone = kopf_settings.peering.standalone or settings.standalone
    kopf_settings.peering.standalone = standalone
    # Mandatory: a missing peering object must stop the start, not silently let two replicas act on one job.
    kopf_settings.peering.mandatory = not standalone
    kopf_settings.peering.name = settings.peering_name
    kopf_settings.peering.priority = settings.peering_priority


async def ensure_peering_object(context: OperatorContext, settings: OperatorSettings, logger: kopf.Logger) -> None:
    """Create the peering object(s) kopf keeps alive in, when the chart has not (409 is success)."""
    targets: list[tuple[str, str]] = (
        [(f"/apis/{KOPF_PEERING_GROUP}/v1/clusterkopfpeerings", "ClusterKopfPeering")]
        if settings.clusterwide
        else [
            (f"/apis/{KOPF_PEERING_GROUP}/v1/namespaces/{namespace}/kopfpeerings", "KopfPeering")
            for namespace in settings.namespaces
        ]
    )
    for url, kind in targets:
        body = {"apiVersion": f"{KOPF_PEERING_GROUP}/v1", "kind": kind, "metadata": {"name": settings.peering_name}}
        try:
            await api_request(context, "POST", url, body)
        except AsyncApiException as error:
            if error.status == 409:
                continue
            if error.status == 404:
                raise kopf.PermanentError(
                    "the kopf peering CRDs are not installed: apply operator/kubetune_operator/peering.yaml "
                    "(the Helm chart does), or run a single replica with KUBETUNE_STANDALONE=true"
                ) from error
            raise
        logger.info("created %s %s", kind, settings.peering_name)


async def new_async_api_client() -> AsyncApiClient:
    """The asynchronous client, from the in-cluster service account, else from KUBECONFIG / ~/.kube/config; made on
    kopf's event loop (its aiohttp session belongs to it)."""
    from kubernetes_asyncio import config
    from kubernetes_asyncio.client import Configuration

    configuration = Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        await config.load_kube_config(client_configuration=configuration)
    # One keep-alive connection per create in flight, and a few for the reads and patches beside them.
    configuration.connection_pool_maxsize = CREATES_IN_FLIGHT + 4
    return AsyncApiClient(configuration)


@kopf.on.startup()
async def start_operator(*, settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Read and check the settings, configure kopf, serve metrics, make sure peering can work."""
    try:
        ours = memo.get("operator_settings") or OperatorSettings.from_env(os.environ)
    except SettingsError as error:
        raise kopf.PermanentError(str(error)) from error
    configure_kopf(settings, ours)
    context = OperatorContext(settings=ours, metrics=OperatorMetrics(), async_api=await new_async_api_client())
    if ours.metrics_port:
        context.metrics_server = context.metrics.serve(ours.metrics_port, ours.listen_address)
        logger.info("metrics on %s:%d/metrics", ours.listen_address, context.metrics_server.port)
    if not settings.peering.standalone:
        await ensure_peering_object(context, ours, logger)
    context.status_queue = DeferredQueue(
        context.derive_status_of,
        workers=STATUS_WORKERS,
        on_error=lambda key, _error: context.retry_status_later(key),
    )  # started by the first handler (OperatorContext.attach_children)
    memo[MEMO_KEY] = context


@kopf.on.cleanup()
async def stop_operator(*, memo: kopf.Memo, **_: Any) -> None:
    """Stop the status workers, the metrics endpoint and the asynchronous client."""
    context = memo.get(MEMO_KEY)
    if not isinstance(context, OperatorContext):
        return
    if context.status_queue is not None:
        await context.status_queue.stop()
    if context.metrics_server is not None:
        context.metrics_server.stop()
    if context.async_api is not None:
        await context.async_api.close()


@kopf.on.probe(id="trackedJobs")
def tracked_jobs(*, memo: kopf.Memo, **_: Any) -> int:
    """For /healthz: how many FineTuneJobs this replica has derived a status for."""
    context = memo.get(MEMO_KEY)
    return context.tracked_jobs if isinstance(context, OperatorContext) else 0


# ---------------------------------------------------------------------------------------------------------------------
# Indexes: the trainer Jobs and pods, in memory, by (namespace, FineTuneJob name).
# Async so that kopf runs them on its event loop, not through the thread pool, for every Job and pod event.


@kopf.index("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: kopf.PRESENT})
async def trainer_jobs_index(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each trainer Job under its FineTuneJob."""
    return {(in_namespace(namespace), labels[LABEL_JOB_NAME]): compact_job(body)}


@kopf.index(*JOBSET_RESOURCE, labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: kopf.PRESENT})
async def trainer_jobsets_index(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each multi-node trainer's JobSet under its FineTuneJob, as the Job view the status derivation reads."""
    return {(in_namespace(namespace), labels[LABEL_JOB_NAME]): jobset_as_job(body)}


@kopf.index(KUEUE_GROUP, KUEUE_VERSION, "workloads")
async def trainer_workloads_index(
    *, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], QueueState] | None:
    """Kueue's word on each trainer it queues (its Workload's conditions), under the trainer's FineTuneJob. Workloads
    carry none of the trainer's labels: the owner reference says whose it is."""
    owner = trainer_owner(body)
    if owner is None:
        return None
    job_name, owner_uid = owner
    return {(in_namespace(namespace), job_name): queue_state_of(body, owner_uid)}


@kopf.index("v1", "pods", labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: kopf.PRESENT})
async def trainer_pods_index(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each trainer pod under its FineTuneJob."""
    return {(in_namespace(namespace), labels[LABEL_JOB_NAME]): compact(body)}


# ---------------------------------------------------------------------------------------------------------------------
# FineTuneJob handlers.
# Only event handlers, level-triggered: every event of a FineTuneJob compares what exists (the kopf indexes of trainer
# Jobs and pods) with what the spec asks for, creates the missing trainer Job, mirrors runPolicy.suspend onto it and
# asks for a status derivation. kopf's change-detecting handlers (on.create/on.update/on.resume) would keep their
# bookkeeping in annotations: one more FineTuneJob write per job and per change, and a FineTuneJob write costs the API
# server more than a trainer Job create (docs/decisions/0001-operator-burst-design.md). Nothing is written to a
# FineTuneJob but its status.


@kopf.on.event(GROUP, VERSION, PLURAL)
@counted("finetunejob_event")
async def finetunejob_event(
    *,
    type: str,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    """A FineTuneJob appeared (or was listed at start), changed, or went.

    A coroutine: the checks and builders are pure and quick, and the creates go through the asynchronous client on
    kopf's loop. Handler threads and a synchronous client's urllib3 requests cost a burst more CPU than the creates
    themselves, and the threads took the GIL from the event loop that reads the watches.
    """
    context = operator_context(memo)
    namespace = in_namespace(namespace)
    context.attach_children(Children.from_kwargs(kwargs))
    if type == "DELETED":
        context.metrics.forget_job(namespace, name)
        context.forget_job(namespace, name, body.get("metadata", {}).get("uid"))
        return
    await reconcile_finetunejob(context, compact(body), logger)


async def reconcile_finetunejob(context: OperatorContext, raw: dict[str, Any], logger: Any) -> None:
    """Create what the job lacks and mirror its suspend (reconcile.child_changes), then queue a status derivation."""
    metadata = raw["metadata"]
    namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
    context.remember_body(raw)
    try:
        job = FineTuneJob.model_validate(raw)
    except ValidationError as error:
        phase = (raw.get("status") or {}).get("phase")
        if phase not in TERMINAL_PHASES and not metadata.get("deletionTimestamp"):
            await refuse_invalid_spec(context, raw, format_validation_error(error))
        return
    changes = child_changes(job, context.observed(namespace, name, uid), context.settings)
    if changes.creates_trainer:
        try:
            created = await create_trainer(context, changes.create, raw, logger)
        except Exception as error:
            context.metrics.record_handler_error("ensure_trainer")
            delay = context.retry_later(namespace, name, uid, error)
            kind = trainer_kind(job)
            logger.warning("cannot create the trainer %s (retrying in %.0f s): %s", kind, delay, describe_error(error))
            if is_multi_node(job) and api_error_status(error) == 404:
                # The API server does not know the JobSet kind: say so on the job rather than only in this log.
                await apply_status_change(context, raw, jobset_missing_status(job, utc_now()), gpus=0)
            return
        context.retry_done(uid)
        if created:
            return  # the Job watch's ADDED event derives the first status
    elif changes.create:
        await create_serving(context, changes.create, raw, logger)
    if changes.suspend is not None:
        try:
            await apply_suspend(context, namespace, name, trainer_kind(job), changes.suspend, logger)
        except Exception as error:
            context.metrics.record_handler_error("apply_suspend")
            delay = context.retry_later(namespace, name, uid, error)
            logger.warning("cannot suspend or resume the trainer Job (retrying in %.0f s): %s", delay, error)
        else:
            context.retry_done(uid)
    await context.request_status(namespace, name)


def describe_error(error: Exception) -> str:
    """An API error's status and reason, else the exception's text."""
    status = api_error_status(error)
    if status is None:
        return str(error)
    return f"HTTP {status}: {api_error_message(error)}"


async def create_trainer(
    context: OperatorContext, children: Iterable[dict[str, Any]], raw: dict[str, Any], logger: Any
) -> bool:
    """Create the trainer Job (and, once per namespace, the trainer identity); True when something was created.

    The Job index is filled from the watch before any handler runs, so a job whose Job exists (an operator restart,
    a repeated event) never gets here. A Job that exists but is not in the index yet answers 409, which is success.
    """
    metadata = raw["metadata"]
    with context.status_queue_creating():
        await ensure_namespace_identity(context, metadata["namespace"], logger)
        created_any = False
        for child in children:
            kopf.adopt(child, owner=as_kopf_body(raw))
            if await create_child(context, child, metadata["uid"], logger):
                logger.info("created %s %s", child["kind"], child["metadata"]["name"])
                created_any = True
    context.set_children_ensured(metadata["uid"], True)
    return created_any


async def create_serving(
    context: OperatorContext, children: Iterable[dict[str, Any]], raw: dict[str, Any], logger: Any
) -> None:
    """Create the endpoint of a succeeded job (its Deployment and Service).

    A failure is logged and counted; the next event of the job (its status write, a Deployment event) tries again.
    """
    uid = raw["metadata"]["uid"]
    try:
        for child in children:
            kopf.adopt(child, owner=as_kopf_body(raw))
            if await create_child(context, child, uid, logger):
                logger.info("created %s %s", child["kind"], child["metadata"]["name"])
    except Exception as error:
        context.metrics.record_handler_error("ensure_serving")
        logger.warning("cannot create the endpoint: %s", describe_error(error))
        return
    context.set_serving_ensured(uid, True)


async def refuse_invalid_spec(context: OperatorContext, raw: dict[str, Any], message: str) -> None:
    """Mark the job Failed/InvalidSpec (what the CRD schema and CEL could not refuse); it is never handled again."""
    try:
        current = FineTuneJobStatus.model_validate(raw.get("status") or {})
    except ValidationError:
        current = FineTuneJobStatus()
    change = invalid_spec_status(current, raw["metadata"].get("generation"), message, utc_now())
    await apply_status_change(context, raw, change, gpus=0)


async def apply_suspend(
    context: OperatorContext, namespace: str, name: str, kind: str, suspend: bool, logger: Any
) -> None:
    """Set the trainer's spec.suspend (reconcile.child_changes decides when it must mirror runPolicy.suspend)."""
    trainer_name = trainer_resource_name(name)
    await merge_patch(context, f"{collection_url(kind, namespace)}/{trainer_name}", {"spec": {"suspend": suspend}})
    logger.info("trainer %s %s %s", kind, trainer_name, "suspended" if suspend else "resumed")


def finetunejob_url(namespace: str, name: str) -> str:
    """The FineTuneJob's URL from the API root."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


async def retry_finetunejob(context: OperatorContext, namespace: str, name: str, uid: str) -> None:
    """A retry after a failed create or suspend: the FineTuneJob as it is now, handled as if an event came."""
    logger = job_logger(namespace, name)
    try:
        body = await read_object(context, finetunejob_url(namespace, name))
    except Exception as error:  # a failed read backs off like a failed create
        context.metrics.record_handler_error("ensure_trainer")
        delay = context.retry_later(namespace, name, uid)
        logger.warning("cannot read the FineTuneJob to retry (retrying in %.0f s): %s", delay, describe_error(error))
        return
    if body is not None:
        await reconcile_finetunejob(context, compact(body), logger)


class JobLogger(logging.LoggerAdapter):
    """Prefixes each line with `[namespace/name]`, as kopf's per-object loggers do."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['job'] if self.extra else '?'}] {msg}", kwargs


def job_logger(namespace: str, name: str) -> JobLogger:
    """A logger naming the job, for work outside kopf's handlers (retries, the status queue)."""
    return JobLogger(logging.getLogger("kubetune_operator"), {"job": f"{namespace}/{name}"})


# ---------------------------------------------------------------------------------------------------------------------
# Trainer Job and Pod handlers: they only ask for a status derivation of the owning FineTuneJob and return None.
# Coroutines, so that kopf runs them on its event loop: a thread-pool round trip per Job and pod event cost more than
# the queue put they do.


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: kopf.PRESENT})
@counted("trainer_job_event")
async def trainer_job_event(
    *,
    type: str,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """A trainer Job changed (started, suspended, completed, failed) or was deleted."""
    await on_trainer_event(operator_context(memo), Children.from_kwargs(kwargs), type, namespace, labels)


async def on_trainer_event(
    context: OperatorContext, children: Children, type: str, namespace: str | None, labels: Mapping[str, str]
) -> None:
    """A trainer (Job or JobSet) changed: derive the status again; put it back if it was deleted."""
    context.attach_children(children)
    namespace, name = in_namespace(namespace), labels[LABEL_JOB_NAME]
    if type == "DELETED":
        await restore_trainer_job(context, namespace, name, job_logger(namespace, name))
        return
    await context.request_status(namespace, name)


async def restore_trainer_job(context: OperatorContext, namespace: str, name: str, logger: Any) -> None:
    """A trainer Job was deleted: put it back while its FineTuneJob runs (the trainer resumes from its checkpoint).
    reconcile_finetunejob leaves finished and deleted FineTuneJobs alone."""
    body = await read_object(context, finetunejob_url(namespace, name))
    if body is not None:
        context.set_children_ensured(body["metadata"]["uid"], False)
        await reconcile_finetunejob(context, compact(body), logger)


@kopf.on.event(*JOBSET_RESOURCE, labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: kopf.PRESENT})
@counted("trainer_job_event")
async def trainer_jobset_event(
    *,
    type: str,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """A multi-node trainer's JobSet changed (started, suspended, restarted, completed, failed) or was deleted."""
    await on_trainer_event(operator_context(memo), Children.from_kwargs(kwargs), type, namespace, labels)


@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "workloads")
@counted("workload_event")
async def trainer_workload_event(*, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
    """Kueue queued, admitted or evicted a trainer: its FineTuneJob's Queued condition says so."""
    owner = trainer_owner(body)
    if owner is None:
        return
    context = operator_context(memo)
    context.attach_children(Children.from_kwargs(kwargs))
    await context.request_status(in_namespace(namespace), owner[0])


@kopf.on.event("v1", "pods", labels={LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: kopf.PRESENT})
@counted("trainer_pod_event")
async def trainer_pod_event(
    *, namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **kwargs: Any
) -> None:
    """A trainer pod changed (scheduled, image pull, running, terminated with its summary)."""
    context = operator_context(memo)
    context.attach_children(Children.from_kwargs(kwargs))
    await context.request_status(in_namespace(namespace), labels[LABEL_JOB_NAME])


# ---------------------------------------------------------------------------------------------------------------------
# The trainer identity's handlers: a ServiceAccount or RoleBinding of it deleted (by hand, or with its namespace) is
# created again at once while a trainer Job there may still start pods, and otherwise before the namespace's next one.


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGER, LABEL_COMPONENT: COMPONENT_SERVING})
@counted("serving_event")
async def serving_event(*, type: str, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """An endpoint's Deployment changed or went: its ready replicas go to status.serving; one deleted while its job
    still wants it is created again."""
    context = operator_context(memo)
    namespace = in_namespace(namespace)
    job_name = (body.get("metadata", {}).get("labels") or {}).get(LABEL_SERVED_JOB)
    if not job_name:
        return
    logger = job_logger(namespace, job_name)
    raw = await read_object(context, finetunejob_url(namespace, job_name))
    if raw is None or not any(
        is_owner(reference, raw) for reference in body.get("metadata", {}).get("ownerReferences", [])
    ):
        return  # the job is gone (garbage collection follows) or this Deployment is another job's
    if type == "DELETED":
        context.set_serving_ensured(raw["metadata"]["uid"], False)
        await reconcile_finetunejob(context, compact(raw), logger)
        return
    ready = int((body.get("status") or {}).get("readyReplicas") or 0)
    if ((raw.get("status") or {}).get("serving") or {}).get("readyReplicas") != ready:
        await patch_serving(context, namespace, job_name, {"readyReplicas": ready})
    await ensure_check(context, raw, ready, logger)


async def patch_serving(context: OperatorContext, namespace: str, job_name: str, serving: dict[str, Any]) -> None:
    """Merge fields into status.serving (ready replicas, the endpoint check) through the status subresource."""
    await merge_patch(context, f"{finetunejob_url(namespace, job_name)}/status", {"status": {"serving": serving}})


async def ensure_check(context: OperatorContext, raw: dict[str, Any], ready: int, logger: Any) -> None:
    """Start the endpoint check once the endpoint answers: status.serving.check Running (which keeps a second one from
    starting), then its Job, owned by the job. The state goes first so that a result can never arrive before it; if the
    Job cannot be created, the state is taken back and the next Deployment event tries again."""
    if raw["metadata"].get("deletionTimestamp"):
        return
    try:
        job = FineTuneJob.model_validate(raw)
    except ValidationError:
        return
    if not needs_check(job, ready):
        return
    namespace, name = in_namespace(job.metadata.namespace), job.metadata.name
    await patch_serving(context, namespace, name, {"check": {"state": "Running", "job": check_name(name)}})
    try:
        service = await read_object(context, f"{collection_url('Service', namespace)}/{serving_name(name)}")
        check_job = build_check_job(job, context.settings, check_base_url(job, service))
        kopf.adopt(check_job, owner=as_kopf_body(raw))
        if await create_child(context, check_job, raw["metadata"]["uid"], logger):
            logger.info("created Job %s: the endpoint check", check_name(name))
    except Exception as error:
        context.metrics.record_handler_error("ensure_check")
        logger.warning("cannot start the endpoint check: %s", describe_error(error))
        await patch_serving(context, namespace, name, {"check": None})


@kopf.on.event("v1", "pods", labels={LABEL_MANAGED_BY: MANAGER, LABEL_COMPONENT: COMPONENT_ENDPOINT_CHECK})
@counted("endpoint_check_event")
async def endpoint_check_event(*, type: str, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """An endpoint check pod finished (or went): its result goes to status.serving.check, with an Event."""
    context = operator_context(memo)
    namespace = in_namespace(namespace)
    job_name = (body.get("metadata", {}).get("labels") or {}).get(LABEL_SERVED_JOB)
    if not job_name:
        return
    pod = dict(body)
    result = check_result(pod)
    if result is None and type == "DELETED":
        result = EndpointCheckStatus(state="Failed", message="the endpoint check pod was deleted before it finished")
    if result is None:
        return
    raw = await read_object(context, finetunejob_url(namespace, job_name))
    check = (((raw or {}).get("status") or {}).get("serving") or {}).get("check") or {}
    if raw is None or check.get("state") != "Running":
        return  # the job is gone, or this result is recorded already
    result = result.model_copy(update={"job": check.get("job")})
    await patch_serving(context, namespace, job_name, {"check": result.to_wire()})
    passed = result.state == "Succeeded"
    kopf.event(
        as_kopf_body(raw),
        type="Normal" if passed else "Warning",
        reason="EndpointChecked" if passed else "EndpointCheckFailed",
        message=result.message or result.state,
    )


def is_owner(reference: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
    """Whether an ownerReference names this FineTuneJob (by uid: a job recreated under the same name is another)."""
    return bool(reference.get("uid") == raw["metadata"]["uid"] and reference.get("kind") == "FineTuneJob")


@kopf.on.event("v1", "serviceaccounts", labels={LABEL_COMPONENT: COMPONENT_TRAINER_IDENTITY})
@counted("trainer_identity_event")
async def trainer_service_account_event(
    *, type: str, namespace: str | None, name: str, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any
) -> None:
    """The trainer ServiceAccount of a namespace changed or was deleted."""
    await on_identity_event(operator_context(memo), Children.from_kwargs(kwargs), type, namespace, name, logger)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels={LABEL_COMPONENT: COMPONENT_TRAINER_IDENTITY})
@counted("trainer_identity_event")
async def trainer_role_binding_event(
    *, type: str, namespace: str | None, name: str, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any
) -> None:
    """The trainer RoleBinding of a namespace changed or was deleted."""
    await on_identity_event(operator_context(memo), Children.from_kwargs(kwargs), type, namespace, name, logger)


async def on_identity_event(
    context: OperatorContext, children: Children, event: str, namespace: str | None, name: str, logger: Any
) -> None:
    """Forget a deleted identity, and create it again now if a trainer Job of the namespace is unfinished."""
    if event != "DELETED" or name != context.settings.trainer_service_account:
        return
    context.attach_children(children)
    namespace = in_namespace(namespace)
    context.set_identity_ensured(namespace, False)
    if not children.unfinished_in(namespace):
        return
    try:
        await ensure_namespace_identity(context, namespace, logger)
    except Exception as error:  # a terminating namespace refuses creates; its next job tries again
        context.metrics.record_handler_error("trainer_identity_event")
        logger.warning("cannot create the namespace's trainer identity again: %s", describe_error(error))
