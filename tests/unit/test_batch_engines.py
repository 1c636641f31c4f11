"""The test bed's JobSet and Kueue wiring: their webhook configurations pointed at the host-run controllers."""

from __future__ import annotations

import pytest

from tests.testbed.batch_engines import JOBSET_POD_SELECTOR, KUEUE_WEBHOOK_RESOURCES, url_webhooks

pytestmark = pytest.mark.unit

MANIFESTS = """
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: mutating-webhook-configuration
webhooks:
- name: mjob.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}}
  rules: [{apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}]
- name: mpod.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
- name: mrayjob.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-ray-io-v1-rayjob}}
  rules: [{apiGroups: [ray.io], apiVersions: [v1], operations: [CREATE], resources: [rayjobs]}]
"""


def test_kueue_keeps_the_webhooks_of_its_integrations_in_use_pointed_at_the_host() -> None:
    (configuration,) = url_webhooks(MANIFESTS, "kueue", 9443, "Q0E=", KUEUE_WEBHOOK_RESOURCES)

    assert configuration["metadata"] == {"name": "kueue-mutating-webhook-configuration"}
    assert [webhook["name"] for webhook in configuration["webhooks"]] == ["mjob.kb.io"]
    assert configuration["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job",
        "caBundle": "Q0E=",
    }


def test_jobset_s_pod_webhooks_see_jobset_pods_only() -> None:
    (configuration,) = url_webhooks(MANIFESTS, "jobset", 9444, "Q0E=")

    webhooks = {webhook["name"]: webhook for webhook in configuration["webhooks"]}
    assert webhooks["mpod.kb.io"]["objectSelector"] == JOBSET_POD_SELECTOR
    assert "objectSelector" not in webhooks["mjob.kb.io"]
    assert configuration["metadata"]["name"] == "jobset-mutating-webhook-configuration"
