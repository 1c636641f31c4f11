"""`kubetune logs NAME` against a real control plane: the API server fetches the log from the real node's kubelet."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kubetune_operator.builders import trainer_labels, trainer_resource_name

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.crd import CRD_NAME
from kubetune_cli.cli import main
from tests.conftest import KwokCluster
from tests.testbed.processes import wait_for

pytestmark = pytest.mark.integration

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"


@pytest.fixture(scope="module")
def crd(kwok_cluster: KwokCluster) -> str:
    kube = kwok_cluster.kube
    result = kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    assert result.returncode == 0, result.stderr
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)
    return CRD_NAME


def create_finetunejob(cluster: KwokCluster, namespace: str, name: str, trainer_job: str | None) -> None:
    from kubernetes import client

    cluster.kube.apply(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "model": {"uri": "s3://models/tiny"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": f"s3://runs/{name}"},
            },
        }
    )
    if trainer_job is not None:
        api = client.CustomObjectsApi(cluster.kube.api_client())
        status = {"phase": "Running", "trainer": {"jobName": trainer_job, "attempts": 1}}
        api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})


def run_trainer_pod(cluster: KwokCluster, namespace: str, name: str, script: str, backoff_limit: int = 0) -> str:
    """A batch Job labelled as the operator labels a trainer Job, on the real node, running `script` in the trainer
    image's Python."""
    job_name = trainer_resource_name(name)
    manifest: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name, "namespace": namespace, "labels": trainer_labels(name)},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": trainer_labels(name)},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/hostname": cluster.node_name},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {"name": "trainer", "image": cluster.images.trainer, "command": ["python", "-c", script]}
                    ],
                },
            },
        },
    }
    cluster.kube.apply(manifest)
    return job_name


def pods_of(cluster: KwokCluster, namespace: str, name: str) -> list[Any]:
    from kubernetes import client

    core = client.CoreV1Api(cluster.kube.api_client())
    return list(core.list_namespaced_pod(namespace, label_selector=f"kubetune.io/job-name={name}").items)


def pod_phases(cluster: KwokCluster, namespace: str, name: str) -> list[str]:
    return sorted(str(pod.status.phase) for pod in pods_of(cluster, namespace, name))


def logs(cluster: KwokCluster, *args: str) -> Any:
    return CliRunner().invoke(main, ["logs", *args, "--kubeconfig", cluster.kubeconfig])


PRINT_TWO_LINES = "print('step 1 loss 2.5', flush=True); print('step 2 loss 1.9', flush=True)"


def test_logs_print_the_trainer_pods_log(kwok_cluster: KwokCluster, crd: str, namespace: str) -> None:
    name = f"logs-{uuid.uuid4().hex[:6]}"
    job_name = run_trainer_pod(kwok_cluster, namespace, name, PRINT_TWO_LINES)
    create_finetunejob(kwok_cluster, namespace, name, job_name)
    wait_for(lambda: pod_phases(kwok_cluster, namespace, name) == ["Succeeded"], 90, "the real node to run the pod")

    result = logs(kwok_cluster, name, "-n", namespace)

    assert result.exit_code == 0, result.output
    assert result.stdout == "step 1 loss 2.5\nstep 2 loss 1.9\n"
    pod = pods_of(kwok_cluster, namespace, name)[0].metadata.name
    assert result.stderr == f"pod {pod} (attempt 1)\n"
    tail = logs(kwok_cluster, name, "-n", namespace, "--tail", "1")
    assert tail.stdout == "step 2 loss 1.9\n"


def test_follow_streams_until_the_trainer_exits(kwok_cluster: KwokCluster, crd: str, namespace: str) -> None:
    name = f"follow-{uuid.uuid4().hex[:6]}"
    script = "import time\nprint('started', flush=True)\ntime.sleep(4)\nprint('finished', flush=True)"
    job_name = run_trainer_pod(kwok_cluster, namespace, name, script)
    create_finetunejob(kwok_cluster, namespace, name, job_name)
    wait_for(lambda: pod_phases(kwok_cluster, namespace, name) == ["Running"], 90, "the trainer pod to run")

    result = logs(kwok_cluster, name, "-n", namespace, "--follow")

    # Started while the process slept: a follow that returned early would miss the second line.
    assert result.exit_code == 0, result.output
    assert result.stdout == "started\nfinished\n"


def test_previous_is_the_attempt_before_the_newest(kwok_cluster: KwokCluster, crd: str, namespace: str) -> None:
    name = f"retry-{uuid.uuid4().hex[:6]}"
    # Each attempt prints a line and fails retryably: the Job runs a second pod, and the stderr names which is which.
    script = "import sys; print('attempt', flush=True); sys.exit(75)"
    job_name = run_trainer_pod(kwok_cluster, namespace, name, script, backoff_limit=1)
    create_finetunejob(kwok_cluster, namespace, name, job_name)
    wait_for(lambda: pod_phases(kwok_cluster, namespace, name) == ["Failed", "Failed"], 120, "two failed attempts")
    newest, older = sorted(
        pods_of(kwok_cluster, namespace, name),
        key=lambda pod: (pod.metadata.creation_timestamp, pod.metadata.name),
        reverse=True,
    )

    current = logs(kwok_cluster, name, "-n", namespace)
    before = logs(kwok_cluster, name, "-n", namespace, "--previous")

    assert (current.exit_code, before.exit_code) == (0, 0), current.output + before.output
    assert current.stderr == f"pod {newest.metadata.name} (attempt 2)\n"
    assert before.stderr == f"pod {older.metadata.name} (attempt 1)\n"
    assert current.stdout == before.stdout == "attempt\n"


def test_missing_job_or_pod_is_a_clear_error_naming_the_job(
    kwok_cluster: KwokCluster, crd: str, namespace: str
) -> None:
    absent = logs(kwok_cluster, "absent", "-n", namespace)
    assert absent.exit_code == 1
    assert absent.stderr == f"Error: FineTuneJob {namespace}/absent: not found\n"

    create_finetunejob(kwok_cluster, namespace, "no-trainer", None)
    fresh = logs(kwok_cluster, "no-trainer", "-n", namespace)
    assert fresh.exit_code == 1
    assert fresh.stderr == (
        f"Error: FineTuneJob {namespace}/no-trainer: no trainer Job yet (the operator has not created it)\n"
    )

    create_finetunejob(kwok_cluster, namespace, "no-pod", "no-pod-trainer")
    no_pod = logs(kwok_cluster, "no-pod", "-n", namespace)
    assert no_pod.exit_code == 1
    assert no_pod.stderr == f"Error: FineTuneJob {namespace}/no-pod: trainer Job no-pod-trainer has no pod yet\n"
    one = logs(kwok_cluster, "no-pod", "-n", namespace, "--previous")
    assert "no-pod-trainer has no pod yet" in one.stderr
