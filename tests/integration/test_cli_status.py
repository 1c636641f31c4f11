"""`kubetune status NAME` against a real API server: the FineTuneJob's status as a person reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.crd import CRD_NAME
from kubetune_cli.cli import main
from tests.testbed.controlplane import ControlPlane

pytestmark = pytest.mark.integration

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"


@pytest.fixture(scope="module")
def crd(kube: ControlPlane) -> str:
    result = kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    assert result.returncode == 0, result.stderr
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", check=True)
    return CRD_NAME


def test_status_prints_phase_progress_conditions_evaluation_and_artifacts(
    kube: ControlPlane, crd: str, namespace: str
) -> None:
    from kubernetes import client

    kube.apply(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "news", "namespace": namespace},
            "spec": {
                "model": {"uri": "s3://models/tiny"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://runs/news"},
            },
        }
    )
    status = {
        "phase": "Evaluating",
        "message": "scoring the adapter against the baselines",
        "progress": {"stage": "evaluate", "step": 40, "totalSteps": 40, "percent": 100.0, "loss": 0.4321},
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "Evaluating",
                "message": "evaluating",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "evaluation": {"metric": "accuracy", "tuned": 0.75, "baselines": {"zeroShot": 0.25}, "samples": 8},
        "artifacts": {"adapter": "s3://runs/news/adapter"},
    }
    api = client.CustomObjectsApi(kube.api_client())
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "news", {"status": status})

    result = CliRunner().invoke(main, ["status", "news", "-n", namespace, "--kubeconfig", kube.kubeconfig])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"FineTuneJob {namespace}/news"
    assert "Phase:       Evaluating" in lines
    assert "Progress:    stage evaluate, step 40/40 (100.0%), loss 0.4321" in lines
    assert any(line.split()[:3] == ["Running", "True", "Evaluating"] for line in lines)
    assert "Evaluation:  accuracy on 8 samples: tuned 0.75, zeroShot 0.25 (lift +0.5)" in lines
    assert "  adapter      s3://runs/news/adapter" in lines


def test_evaluation_progress_reaches_the_status_kubectl_and_kubetune_status(
    kube: ControlPlane, crd: str, namespace: str
) -> None:
    from kubernetes import client
    from kubetune_trainer.progress.reporter import Reporter, StatusPatcher

    kube.apply(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "evaluating", "namespace": namespace},
            "spec": {
                "model": {"uri": "s3://models/tiny"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://runs/evaluating"},
            },
        }
    )
    api = client.CustomObjectsApi(kube.api_client())
    # The trainer's own channel, through the real API server: the CRD schema must keep (not prune) the new fields.
    patcher = StatusPatcher(api, namespace, "evaluating", interval=3600)
    reporter = Reporter([patcher])
    reporter.enter_stage("evaluate")
    for done in range(1, 121):
        reporter.report_evaluation(done, 480)
    patcher.close()

    progress = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "evaluating")["status"]["progress"]
    assert (progress["stage"], progress["evalDone"], progress["evalTotal"], progress["evalPercent"]) == (
        "evaluate",
        120,
        480,
        25.0,
    )
    # What a person reads: progress in words with its unit.
    table = kube.kubectl("get", "ftj", "evaluating", "-n", namespace, check=True).stdout
    header, row = table.splitlines()
    assert header.split() == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "METRIC", "SCORE", "AGE"]
    assert row[header.index("PROGRESS") :].startswith("evaluate 25% (120/480 samples)")
    result = CliRunner().invoke(main, ["status", "evaluating", "-n", namespace, "--kubeconfig", kube.kubeconfig])
    assert result.exit_code == 0, result.output
    progress_line = next(line for line in result.stdout.splitlines() if line.startswith("Progress:"))
    assert (
        progress_line
        == f"Progress:    stage evaluate, evaluated 120/480 samples (25.0%), updated {progress['updatedAt']}"
    )


def test_status_of_a_missing_job_says_so_and_fails(kube: ControlPlane, crd: str, namespace: str) -> None:
    result = CliRunner().invoke(main, ["status", "absent", "-n", namespace, "--kubeconfig", kube.kubeconfig])

    assert result.exit_code == 1
    assert result.stderr == f"FineTuneJob {namespace}/absent: not found\n"
