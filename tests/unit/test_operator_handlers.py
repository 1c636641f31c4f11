"""The few pure parts of the kopf glue: kopf configuration, the backend filter, validation messages, body copies,
the in-memory view of trainer Jobs and pods, and which of two FineTuneJob bodies is the newer."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from kubetune_operator import handlers
from kubetune_operator.builders import build_trainer_job
from kubetune_operator.handlers import (
    HANDLER_THREADS,
    Children,
    NoDiffBase,
    OperatorContext,
    compact,
    compact_job,
    configure_kopf,
    ensure_namespace_identity,
    format_validation_error,
    newer_body,
)
from kubetune_operator.lifecycle import job_condition, jobset_as_job
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.queueing import QueueState, queue_state_of, trainer_owner
from kubetune_operator.serving import build_check_job, build_serving
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status_queue import DeferredQueue
from kubetune_operator.trainer_identity import IDENTITY_SELECTOR
from pydantic import ValidationError

from kubetune.api import ArtifactsStatus, FineTuneJob, FineTuneJobStatus

pytestmark = pytest.mark.unit


def configured(settings: OperatorSettings, standalone_flag: bool = False) -> kopf.OperatorSettings:
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.peering.standalone = standalone_flag  # what `kopf run --standalone` would have set
    configure_kopf(kopf_settings, settings)
    return kopf_settings


def test_kopf_builds_no_diff_base_and_would_keep_any_state_in_kubetune_annotations() -> None:
    kopf_settings = configured(OperatorSettings())
    progress = kopf_settings.persistence.progress_storage
    diffbase = kopf_settings.persistence.diffbase_storage
    assert isinstance(progress, kopf.AnnotationsProgressStorage)
    assert progress.prefix == "kubetune.io"
    assert isinstance(diffbase, NoDiffBase)
    body = kopf.Body({"metadata": {"name": "x", "annotations": {"a": "b"}}, "spec": {"big": list(range(100))}})
    assert diffbase.build(body=body) == {}
    assert diffbase.fetch(body=body) is None
    assert kopf_settings.persistence.finalizer.startswith("kubetune.io/")


def selects(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether a label selector of the forms used here (`k=v`, `k`, `k in (a,b)`) selects these labels."""
    for requirement in re.split(r",(?![^(]*\))", selector):
        key, _, values = requirement.partition(" in ")
        if values:
            if labels.get(key) not in values.strip("()").split(","):
                return False
        elif "=" in requirement:
            key, value = requirement.split("=", 1)
            if labels.get(key) != value:
                return False
        elif requirement not in labels:
            return False
    return True


def watched_selectors(kopf_settings: kopf.OperatorSettings) -> dict[tuple[str, str, str], str]:
    watched: list[tuple[Any, str]] = list(kopf_settings.watching.label_selectors.items())  # keys are kopf Selectors
    return {(key.group, key.version, key.any_name): value for key, value in watched}


def test_kopf_watches_only_the_objects_kubetune_made_and_follows_and_scans_nothing() -> None:
    settings = OperatorSettings(trainer_image="registry.example.com/kubetune/trainer:1")
    kopf_settings = configured(settings)
    assert kopf_settings.scanning.disabled is True
    selectors = watched_selectors(kopf_settings)
    jobs, pods = selectors["batch", "v1", "jobs"], selectors["", "v1", "pods"]
    deployments = selectors["apps", "v1", "deployments"]
    assert selectors["", "v1", "serviceaccounts"] == IDENTITY_SELECTOR
    assert selectors["rbac.authorization.k8s.io", "v1", "rolebindings"] == IDENTITY_SELECTOR

    ftj = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "news", "namespace": "ml"},
            "spec": {
                "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://out/news", "gguf": {"quantization": "q8_0"}},
                "serving": {"runtime": "llamaCpp"},
            },
        }
    )
    trainer = build_trainer_job(ftj, settings)
    check = build_check_job(ftj, settings, "http://10.96.0.12:8080/v1")
    status = FineTuneJobStatus(phase="Succeeded", artifacts=ArtifactsStatus(gguf="s3://out/news/gguf/model-q8_0.gguf"))
    deployment, _ = build_serving(ftj, status, settings)

    def labels(obj: Mapping[str, Any]) -> dict[str, str]:
        return dict(obj["metadata"]["labels"])

    # What the operator follows: trainer Jobs and pods, check pods, endpoint Deployments.
    assert selects(jobs, labels(trainer)) and selects(pods, labels(trainer["spec"]["template"]))
    assert selects(pods, labels(check["spec"]["template"])) and selects(deployments, labels(deployment))
    # Not its own objects' other parts (a check Job is not a trainer; servers are followed through their Deployment),
    # nor another manager's pods.
    assert not selects(jobs, labels(check))
    assert not selects(pods, labels(deployment["spec"]["template"]))
    assert not selects(pods, {**labels(trainer["spec"]["template"]), "app.kubernetes.io/managed-by": "someone-else"})


@pytest.mark.parametrize(
    ("ours", "cli_standalone", "standalone", "mandatory"),
    [
        (OperatorSettings(peering_name="team", peering_priority=7), False, False, True),
        (OperatorSettings(standalone=True), False, True, False),
        (OperatorSettings(standalone=False), True, True, False),
    ],
    ids=["peering is mandatory", "standalone by setting", "standalone by kopf's flag"],
)
def test_peering(ours: OperatorSettings, cli_standalone: bool, standalone: bool, mandatory: bool) -> None:
    peering = configured(ours, cli_standalone).peering
    assert (peering.standalone, peering.mandatory) == (standalone, mandatory)
    assert (peering.name, peering.priority) == (ours.peering_name, ours.peering_priority)


def test_validation_errors_name_each_field() -> None:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team"},
        "spec": {"model": {"name": "m"}, "dataset": {"train": "s3://data/x"}, "output": {}, "training": {"epochs": 0}},
    }
    with pytest.raises(ValidationError) as raised:
        FineTuneJob.model_validate(body)
    message = format_validation_error(raised.value)
    assert message.startswith("invalid FineTuneJob: ")
    assert "spec.output.uri: Field required" in message
    assert "spec.training.epochs: Input should be greater than 0" in message


def test_kopf_runs_sync_handlers_on_as_many_threads_as_the_client_has_connections() -> None:
    kopf_settings = configured(OperatorSettings())
    assert kopf_settings.execution.max_workers == HANDLER_THREADS


def body(version: str, phase: str | None = None, name: str = "demo") -> dict[str, Any]:
    status = {"phase": phase} if phase else {}
    return {"metadata": {"name": name, "namespace": "team", "resourceVersion": version}, "status": status}


def test_the_newer_body_wins_by_resource_version_and_unordered_versions_give_none() -> None:
    older, newer = body("99", "Pending"), body("100", "Running")
    assert newer_body(older, newer) is newer  # an event still on its way after our patch's answer
    assert newer_body(newer, older) is newer
    assert newer_body(older, None) is older
    assert newer_body(body("abc"), newer) is None
    assert newer_body(newer, body("")) is None


def test_the_context_keeps_the_newest_body_per_job_until_it_is_deleted() -> None:
    context = OperatorContext(settings=OperatorSettings(), metrics=OperatorMetrics())
    patched = body("10", "Pending")
    assert context.remember_body(patched) is patched
    assert context.remember_body(body("9")) is patched
    assert context.known_body("team", "demo") is patched
    assert context.remember_body(body("x")) is None and context.known_body("team", "demo") is None
    context.remember_body(patched)
    context.set_children_ensured("uid-1", True)
    assert context.children_ensured("uid-1")
    context.forget_job("team", "demo", "uid-1")
    assert context.known_body("team", "demo") is None and not context.children_ensured("uid-1")


def job(name: str, uid: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid, "resourceVersion": version}, "spec": {"suspend": False}}


def pod(name: str, owner_uid: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "ownerReferences": [{"kind": "Job", "uid": owner_uid}]}}


def test_children_are_read_from_the_indexes_by_job_name_and_owner() -> None:
    current, stray = job("demo-trainer", "u2", "20"), job("other-name", "u9", "30")
    children = Children(
        jobs={("team", "demo"): [job("demo-trainer", "u1", "5"), current, stray]},
        pods={("team", "demo"): [pod("a", "u1"), pod("b", "u2")]},
    )
    assert children.trainer_job("team", "demo") is current
    assert children.trainer_job("team", "nope") is None
    assert [p["metadata"]["name"] for p in children.trainer_pods("team", "demo", current)] == ["b"]
    assert len(children.trainer_pods("team", "demo", None)) == 2
    assert children.trainer_pods("other", "demo", current) == []


def jobset_pod(name: str, jobset_uid: str) -> dict[str, Any]:
    labels = {"jobset.sigs.k8s.io/jobset-uid": jobset_uid}
    return {"metadata": {"name": name, "labels": labels, "ownerReferences": [{"kind": "Job", "uid": "child-job"}]}}


def workload(owner_kind: str, owner_name: str, owner_uid: str, *conditions: dict[str, str]) -> dict[str, Any]:
    api = {"Job": "batch/v1", "JobSet": "jobset.x-k8s.io/v1alpha2"}.get(owner_kind, "example.com/v1")
    owner = {"apiVersion": api, "kind": owner_kind, "name": owner_name, "uid": owner_uid}
    return {"metadata": {"name": "job-x", "ownerReferences": [owner]}, "status": {"conditions": list(conditions)}}


def test_a_multi_node_trainer_is_its_jobset_and_its_pods_are_the_jobset_s() -> None:
    raw = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "demo-trainer", "uid": "js-2"},
        "spec": {"suspend": False, "replicatedJobs": [{"name": "node"}]},
        "status": {"conditions": [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}]},
    }
    children = Children(
        jobs={},
        pods={("team", "demo"): [jobset_pod("earlier", "js-1"), jobset_pod("n0", "js-2"), jobset_pod("n1", "js-2")]},
        jobsets={("team", "demo"): [jobset_as_job(raw)]},
    )

    trainer = children.trainer_job("team", "demo")

    assert trainer is not None and trainer["kind"] == "JobSet"
    assert job_condition(trainer, "Complete") is not None, "JobSet's Completed reads as a Job's Complete"
    assert [p["metadata"]["name"] for p in children.trainer_pods("team", "demo", trainer)] == ["n0", "n1"]
    assert children.unfinished_in("team") is False


def test_kueue_s_word_is_read_for_the_current_trainer_only() -> None:
    waiting = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota"}
    admitted = {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""}
    states = {}
    for body in (
        workload("Job", "demo-trainer", "u1", admitted),
        workload("Job", "demo-trainer", "u2", waiting),
        workload("Deployment", "demo-trainer", "u3", waiting),
    ):
        owner = trainer_owner(body)
        if owner is not None:
            states.setdefault(("team", owner[0]), []).append(queue_state_of(body, owner[1]))
    children = Children(jobs={}, pods={}, queue_states=states)

    assert len(states[("team", "demo")]) == 2, "a Workload of another kind of owner is not a trainer's"
    assert children.queue_state("team", "demo", job("demo-trainer", "u2", "1")) == QueueState(
        "u2", False, "Pending", "insufficient quota"
    )
    assert children.queue_state("team", "demo", job("demo-trainer", "u1", "1")) == QueueState("u1", True)
    assert children.queue_state("team", "demo", job("demo-trainer", "u9", "1")) is None
    assert children.queue_state("team", "demo", None) is None


def test_an_eviction_outranks_the_quota_kueue_could_not_reserve() -> None:
    evicted = {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate"}
    unreserved = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota"}

    state = queue_state_of(workload("JobSet", "demo-trainer", "u1", unreserved, evicted), "u1")

    assert state == QueueState("u1", False, "Preempted", "Preempted to accommodate", evicted=True)
    assert trainer_owner(workload("JobSet", "demo-trainer", "u1")) == ("demo", "u1")
    assert trainer_owner(workload("Job", "demo-server", "u1")) is None


def test_an_indexed_job_keeps_no_pod_template_and_no_managed_fields() -> None:
    raw = {
        "metadata": {"name": "demo-trainer", "managedFields": [{"manager": "kubetune"}]},
        "spec": {"suspend": True, "template": {"spec": {"containers": []}}},
        "status": {"active": 1},
    }
    assert compact_job(raw) == {
        "metadata": {"name": "demo-trainer"},
        "spec": {"suspend": True},
        "status": {"active": 1},
    }
    assert "template" in raw["spec"]
    assert raw["metadata"]["managedFields"] == [{"manager": "kubetune"}]


def test_a_compacted_kopf_body_is_a_dict_whose_nested_values_are_the_bodys_own() -> None:
    raw: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}]},
        "spec": {"model": {"name": "m"}},
        "status": {"conditions": [{"type": "Ready"}]},
    }
    body = kopf.Body(raw)  # what a handler gets: a read-only view, not a dict

    copy = compact(body)

    assert type(copy) is dict and type(copy["metadata"]) is dict
    assert copy == {
        "apiVersion": "kubetune.io/v1alpha1",
        "metadata": {"name": "p", "labels": {"a": "b"}},
        "spec": {"model": {"name": "m"}},
        "status": {"conditions": [{"type": "Ready"}]},
    }
    # Shallow below metadata and spec: shared, not copied (nothing changes a received body).
    assert copy["status"] is raw["status"] and copy["metadata"]["labels"] is raw["metadata"]["labels"]
    assert copy["spec"] is raw["spec"]
    assert raw["metadata"]["managedFields"] == [{"manager": "x"}]  # the body keeps what the copy drops


def test_the_first_jobs_of_a_burst_create_the_namespace_identity_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first jobs of a burst reach a new namespace together; they all used to create its ServiceAccount and
    # RoleBinding, and all but one lost with a 409.
    creates: list[tuple[str, str]] = []

    async def post_object(_context: Any, manifest: dict[str, Any]) -> bool:
        creates.append((manifest["kind"], manifest["metadata"]["namespace"]))
        await asyncio.sleep(0.02)  # a create takes a while: the other jobs arrive meanwhile
        return True

    monkeypatch.setattr(handlers, "post_object", post_object)
    context = OperatorContext(settings=OperatorSettings(), metrics=OperatorMetrics())
    logger = logging.getLogger("test")

    async def burst() -> None:
        await asyncio.gather(
            *(ensure_namespace_identity(context, namespace, logger) for namespace in ["team-a"] * 8 + ["team-b"] * 8)
        )

    asyncio.run(burst())

    assert sorted(creates) == [
        ("RoleBinding", "team-a"),
        ("RoleBinding", "team-b"),
        ("ServiceAccount", "team-a"),
        ("ServiceAccount", "team-b"),
    ]
    assert context.identity_ensured("team-a") and context.identity_ensured("team-b")


def test_children_are_created_in_their_kinds_collections() -> None:
    assert handlers.collection_url("Job", "team-a") == "/apis/batch/v1/namespaces/team-a/jobs"
    assert handlers.collection_url("ServiceAccount", "team-a") == "/api/v1/namespaces/team-a/serviceaccounts"
    assert handlers.collection_url("RoleBinding", "team-a") == (
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings"
    )
    assert handlers.finetunejob_url("team-a", "x") == "/apis/kubetune.io/v1alpha1/namespaces/team-a/finetunejobs/x"


def test_a_failing_handler_is_counted_and_still_raises_and_an_unknown_name_is_refused() -> None:
    context = OperatorContext(settings=OperatorSettings(), metrics=OperatorMetrics())

    @handlers.counted("trainer_pod_event")
    async def failing(**_: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(failing(memo={handlers.MEMO_KEY: context}))
    registry = context.metrics.registry
    assert registry.get_sample_value("kubetune_handler_errors_total", {"handler": "trainer_pod_event"}) == 1
    with pytest.raises(ValueError, match="'no_such_handler' is missing"):
        handlers.counted("no_such_handler")


def test_a_failed_job_is_retried_with_a_doubling_delay_or_the_longer_one_a_temporary_error_asks_for() -> None:
    context = OperatorContext(settings=OperatorSettings(), metrics=OperatorMetrics())
    waiting = kopf.TemporaryError("owned by a deleted FineTuneJob; waiting for garbage collection", delay=10)

    async def failures() -> list[float]:
        delays = [context.retry_later("team", "demo", "uid-1") for _ in range(3)]
        delays.append(context.retry_later("team", "demo", "uid-1", waiting))  # the 4th failure alone would wait 8 s
        delays.append(context.retry_later("team", "other", "uid-2", RuntimeError("HTTP 500")))
        delays.append(context.retry_later("team", "third", "uid-3", kopf.TemporaryError("no delay", delay=0)))
        for _ in range(5):
            delays.append(context.retry_later("team", "demo", "uid-1"))
        return delays

    delays = asyncio.run(failures())
    assert delays[:6] == [1.0, 2.0, 4.0, 10.0, 1.0, 1.0]
    assert delays[6:] == [16.0, 32.0, 60.0, 60.0, 60.0], "doubling, at most a minute"


def test_a_failed_status_derivation_is_queued_again_after_the_backoff_and_counted() -> None:
    context = OperatorContext(settings=OperatorSettings(), metrics=OperatorMetrics())
    attempts: list[float] = []

    async def flaky(_key: tuple[str, str]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("HTTP 503: the API server is busy")

    async def scenario() -> None:
        context.status_queue = DeferredQueue(
            flaky, workers=1, quiet_seconds=0.0, on_error=lambda key, _error: context.retry_status_later(key)
        ).start()
        context.status_queue.put(("team", "demo"))
        deadline = time.monotonic() + 10
        while len(attempts) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await context.status_queue.stop()

    asyncio.run(scenario())

    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= handlers.RETRY_FIRST_SECONDS
    registry = context.metrics.registry
    assert registry.get_sample_value("kubetune_handler_errors_total", {"handler": "reconcile_status"}) == 1
