"""The trainer admission policy on the real kube-apiserver: a trainer pod's token may patch its own job's progress
and dataset, and nothing else: not another job, not the operator's fields, not without a pod binding."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.crd import CRD_NAME
from tests.testbed.controlplane import ControlPlane
from tests.testbed.trainer_credentials import (
    SETTINGS,
    install_trainer_policy,
    pod_bound_kubeconfig,
    trainer_kubeconfig,
    trainer_pod,
)
from tools.crds import CRD_FILE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def crd(kube: ControlPlane) -> str:
    result = kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    assert result.returncode == 0, result.stderr
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)
    return CRD_NAME


def create_job(kube: ControlPlane, namespace: str, name: str) -> None:
    spec = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://runs/out"},
    }
    kube.apply(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def status_api(kube: ControlPlane, kubeconfig: str | None = None) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(kube.api_client(kubeconfig))


def patch_status(api: Any, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
    )
    return result


def refusal(api: Any, namespace: str, name: str, status: dict[str, Any]) -> tuple[int, str]:
    """(HTTP status, message) of a patch that must be refused."""
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        patch_status(api, namespace, name, status)
    return refused.value.status, str(refused.value.body)


@pytest.fixture
def trainer(kube: ControlPlane, crd: str, namespace: str) -> Any:
    """The status API as the trainer pod of FineTuneJob `news` (jobs `news` and `news-x` exist)."""
    create_job(kube, namespace, "news")
    create_job(kube, namespace, "news-x")
    return status_api(kube, trainer_kubeconfig(kube, namespace, "news"))


def test_a_trainer_patches_its_own_jobs_progress_and_dataset(kube: ControlPlane, trainer: Any, namespace: str) -> None:
    patch_status(trainer, namespace, "news", {"progress": {"stage": "train", "step": 3}, "dataset": {"trainRows": 8}})

    stored = status_api(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "news")
    assert stored["status"]["progress"] == {"stage": "train", "step": 3}
    assert stored["status"]["dataset"] == {"trainRows": 8}


@pytest.mark.parametrize("other", ["news-x", "policy-probe"])
def test_a_trainer_may_not_patch_another_job(trainer: Any, namespace: str, other: str) -> None:
    code, message = refusal(trainer, namespace, other, {"progress": {"step": 1}})

    assert code == 403
    assert f"is not a trainer pod of FineTuneJob {other}" in message


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Succeeded"},
        {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed"}]},
        {"artifacts": {"adapter": "s3://elsewhere/adapter/"}},
        {"evaluation": {"passed": True}},
        {"fineTunedModel": "ft:forged"},
        {"progress": {"step": 2}, "message": "all good"},
    ],
    ids=",".join,
)
def test_a_trainer_may_not_write_the_operators_fields_of_its_own_job(
    trainer: Any, namespace: str, status: dict[str, Any]
) -> None:
    code, message = refusal(trainer, namespace, "news", status)

    assert code == 403
    assert "a trainer may write status.progress and status.dataset only" in message


def test_the_operators_fields_stay_the_operators_once_set(kube: ControlPlane, trainer: Any, namespace: str) -> None:
    patch_status(status_api(kube), namespace, "news", {"phase": "Running", "message": "training"})

    code, _ = refusal(trainer, namespace, "news", {"phase": None})
    patch_status(trainer, namespace, "news", {"progress": {"step": 5}})

    stored = status_api(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "news")
    assert code == 403
    assert (stored["status"]["phase"], stored["status"]["progress"]["step"]) == ("Running", 5)


def test_an_empty_patch_reads_the_trainers_own_job_only(trainer: Any, namespace: str) -> None:
    own = trainer.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "news", {}, _content_type="application/merge-patch+json"
    )
    code, _ = refusal(trainer, namespace, "news-x", {})

    assert own["metadata"]["name"] == "news"
    assert own["spec"]["output"]["uri"] == "s3://runs/out"
    assert code == 403


def test_a_token_not_bound_to_a_pod_is_refused(kube: ControlPlane, crd: str, namespace: str) -> None:
    create_job(kube, namespace, "news")
    install_trainer_policy(kube, namespace)
    unbound = status_api(kube, kube.service_account_kubeconfig(namespace, SETTINGS.trainer_service_account))

    code, message = refusal(unbound, namespace, "news", {"progress": {"step": 1}})

    assert code == 403
    assert "this token is not bound to a pod" in message


def test_a_pod_whose_name_only_starts_like_the_trainers_is_refused(
    kube: ControlPlane, crd: str, namespace: str
) -> None:
    create_job(kube, namespace, "news")
    install_trainer_policy(kube, namespace)
    lookalike = trainer_pod(namespace, "news", suffix="t3st0-extra")
    kube.apply(lookalike)

    code, message = refusal(status_api(kube, pod_bound_kubeconfig(kube, lookalike)), namespace, "news", {})

    assert code == 403
    assert "news-trainer-t3st0-extra is not a trainer pod of FineTuneJob news" in message


def test_other_users_are_not_the_policys_subject(kube: ControlPlane, crd: str, namespace: str) -> None:
    create_job(kube, namespace, "news")
    install_trainer_policy(kube, namespace)

    patched = patch_status(status_api(kube), namespace, "news", {"phase": "Pending", "progress": {"step": 0}})

    assert patched["status"]["phase"] == "Pending"
