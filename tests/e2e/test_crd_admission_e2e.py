"""CRD admission through the API (the emulation, or a real cluster with FTJ_E2E_KUBECONFIG).

The CRD a real v1.36.2 server refused (issue 10) is refused here with the same errors, and every CRD the
project ships passes admission (a server-side dry run, so nothing installed is changed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
REFUSED = ROOT / "tests" / "api" / "fixtures" / "finetunejobs-refused-by-v1.36.2.yaml"
SHIPPED = sorted((ROOT / "crds").glob("*.yaml")) + sorted((ROOT / "charts" / "finetune-operator" / "crds").glob("*.yaml"))


def test_the_refused_crd_gets_422_with_the_servers_four_errors(api):
    crd = yaml.safe_load(REFUSED.read_text())
    # Another group, so the installed CRD is untouched whatever the answer.
    crd["spec"]["group"] = "refused.finetune.dev"
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.refused.finetune.dev"
    try:
        api.extensions.create_custom_resource_definition(crd)
    except ApiException as err:
        status, body = err.status, json.loads(err.body)
    else:
        api.extensions.delete_custom_resource_definition(crd["metadata"]["name"])
        pytest.fail("the refused CRD was accepted")
    assert status == 422 and body["reason"] == "Invalid"
    fields = sorted(cause["field"] for cause in body["details"]["causes"])
    base = "spec.validation.openAPIV3Schema"
    assert fields == sorted([f"{base}.properties[spec].properties[lora].default",
                             f"{base}.properties[spec].properties[earlyStopping].default",
                             f"{base}.x-kubernetes-validations[0].fieldPath",
                             f"{base}.x-kubernetes-validations[1].fieldPath"])
    assert "no such key: enabled evaluating rule: rank must be > 0 when LoRA is enabled" in body["message"]
    assert "no such key: mode evaluating rule: mode contradicts the metric" in body["message"]
    assert body["message"].count('Invalid value: ".metadata.name": ') == 2 and "must be a valid path" in body["message"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_crd_passes_admission(api, path):
    for crd in (d for d in yaml.safe_load_all(path.read_text()) if d):
        name = crd["metadata"]["name"]
        try:
            current = api.extensions.read_custom_resource_definition(name)
        except ApiException as err:
            assert err.status == 404
            api.extensions.create_custom_resource_definition(crd, dry_run="All")
            continue
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        api.extensions.replace_custom_resource_definition(name, crd, dry_run="All")
