"""The operator-scale bench's bare controller against the real API server: each new FineTuneJob gets its Job, owned."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bench.operator_scale import READY_LINE, bare_controller, children_of, finetunejob_manifest, job_names
from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.crd import CRD_NAME, render_crd_yaml
from tests.testbed.controlplane import ControlPlane
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def with_crd(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> ControlPlane:
    path: Path = tmp_path_factory.mktemp("crd") / "crd.yaml"
    path.write_text(render_crd_yaml())
    kube.kubectl("apply", "--server-side", "-f", str(path), check=True)
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)
    return kube


def test_the_bare_controller_creates_each_new_finetunejobs_prebuilt_job_owned_by_it(
    with_crd: ControlPlane, namespace: str
) -> None:
    from kubernetes import client
    from kubetune_operator.settings import OperatorSettings

    kube = with_crd
    names = job_names(3)
    jobs = {name: children_of(name, namespace, OperatorSettings.from_env({}))[0] for name in names}
    lines: list[str] = []
    created: list[int] = []
    controller = threading.Thread(
        target=lambda: created.append(bare_controller(kube.kubeconfig, namespace, jobs, 2, 60.0, lines.append)),
        daemon=True,
    )
    controller.start()
    wait_for(lambda: READY_LINE in lines, 30, "the bare controller to watch")
    custom = client.CustomObjectsApi(kube.api_client())
    owners = {
        name: custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, finetunejob_manifest(name, namespace)
        )["metadata"]["uid"]
        for name in names
    }

    controller.join(60)

    assert created == [3]
    found = client.BatchV1Api(kube.api_client()).list_namespaced_job(namespace).items
    assert sorted(job.metadata.name for job in found) == sorted(job["metadata"]["name"] for job in jobs.values())
    for job in found:
        owner_name = job.metadata.labels["kubetune.io/job-name"]
        (reference,) = job.metadata.owner_references
        assert (reference.kind, reference.name, reference.uid) == ("FineTuneJob", owner_name, owners[owner_name])
        assert reference.controller is True
