"""Spec changes after start (refused and named, except the few the running job honours) and the output condition."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from ftj_builders import manifest
from test_operator_status import T0, batch_job, pod, reasons, run, running

from finetune_operator.api.constants import Condition, Reason
from finetune_operator.api.validation import (
    MUTABLE_AFTER_START,
    immutable_groups,
    immutable_hash,
    validate_manifest,
)
from finetune_operator.plan.conditions import find
from finetune_operator.plan.status import SPEC_HASH_MAX, spec_fingerprint


def edited(obj, generation=2, **spec):
    out = copy.deepcopy(obj)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(out["spec"].get(key), dict):
            out["spec"][key] = {**out["spec"][key], **value}
        else:
            out["spec"][key] = value
    out["metadata"]["generation"] = generation
    return out


def refusal(st):
    return find(st["conditions"], Condition.SPEC_CHANGE_REFUSED)


def test_mid_run_learning_rate_edit_is_refused_and_named():
    obj = manifest(hyperparameters={"epochs": 5, "batchSize": 16, "learningRate": 5e-5})
    st = running(obj)
    lr = edited(obj, hyperparameters={"learningRate": 1e-3})
    st2, events = run(lr, st, batch_job(active=1, start=T0), [pod()])
    cond = refusal(st2)
    assert cond["status"] == "True" and cond["reason"] == Reason.IMMUTABLE_FIELD
    assert cond["message"].startswith("spec.hyperparameters.learningRate cannot change after training started")
    assert "spec.hyperparameters.epochs" not in cond["message"]
    assert [e.type for e in events if e.reason == Reason.IMMUTABLE_FIELD] == ["Warning"]
    assert st2["specHash"] == st["specHash"]  # the running job's fingerprint is kept
    # Level-based: the next pass keeps the condition and posts no second Event.
    st3, events = run(lr, st2, batch_job(active=1, start=T0), [pod()])
    assert refusal(st3)["status"] == "True" and Reason.IMMUTABLE_FIELD not in reasons(events)
    # Reverting the edit clears it.
    st4, _ = run(edited(obj, generation=3), st3, batch_job(active=1, start=T0), [pod()])
    assert refusal(st4)["status"] == "False" and refusal(st4)["reason"] == Reason.NO_CHANGE_REFUSED


@pytest.mark.parametrize(("change", "named"), [
    ({"hyperparameters": {"epochs": 9}}, "spec.hyperparameters.epochs"),
    ({"hyperparameters": {"optimizer": {"name": "sgd"}}}, "spec.hyperparameters.optimizer"),
    ({"preset": "fast"}, "spec.preset"),
    ({"model": {"name": "package:other/model"}}, "spec.model.name"),
    ({"distributed": {"nodes": 2}}, "spec.distributed.nodes"),
    ({"lora": {"enabled": True}}, "spec.lora.enabled"),
    ({"earlyStopping": {"patience": 7}}, "spec.earlyStopping.patience"),
    ({"output": {"uri": "s3://bucket/x"}}, "spec.output.uri"),
    ({"output": {"retain": False}}, "spec.output.retain"),
    ({"terminationGracePeriodSeconds": 60}, "spec.terminationGracePeriodSeconds"),
    ({"image": "registry.example/trainer:2"}, "spec.image"),
    ({"env": {"X": "1"}}, "spec.env"),
    ({"backoffLimit": 9}, "spec.backoffLimit"),
])
def test_every_field_the_running_trainer_cannot_honour_is_refused(change, named):
    obj = manifest()
    st = running(obj)
    st2, _ = run(edited(obj, **change), st, batch_job(active=1, start=T0), [pod()])
    cond = refusal(st2)
    assert cond and cond["status"] == "True", f"{named} was accepted"
    assert cond["message"].split(" cannot change")[0].split(", ") == [named]


@pytest.mark.parametrize("change", [
    {"suspend": True},
    {"stop": True},
    {"earlyStopping": {"stopGracePeriodSeconds": 60}},
    {"watchdog": {"stallTimeoutSeconds": 60}},
])
def test_the_mutable_fields_are_accepted(change):
    obj = manifest()
    st = running(obj)
    st2, _ = run(edited(obj, **change), st, batch_job(active=1, start=T0), [pod()])
    assert refusal(st2) is None


def test_mutable_list_is_what_the_groups_leave_out():
    groups = immutable_groups()
    assert not set(MUTABLE_AFTER_START) & set(groups)
    assert {"hyperparameters.learningRate", "model.name", "output.uri", "terminationGracePeriodSeconds"} <= set(groups)


def test_defaults_written_by_the_api_server_or_a_newer_operator_change_nothing():
    # The API server fills CRD defaults; an upgraded operator adds fields with defaults: neither is an edit.
    plain = validate_manifest(manifest())
    filled = validate_manifest(manifest(terminationGracePeriodSeconds=600, output={"path": "/output", "retain": True},
                                        suspend=False))
    assert spec_fingerprint(plain) == spec_fingerprint(filled)


def test_a_fingerprint_from_release_0_1_is_read_and_upgraded():
    obj = manifest()
    resolved = validate_manifest(obj).spec

    def digest(key):
        value = getattr(resolved, key)
        data = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:6]

    legacy = immutable_hash(resolved) + "/" + ".".join(digest(k) for k in ("model", "task", "dataset", "distributed"))
    st = running(obj)
    st["specHash"] = legacy
    st2, events = run(obj, st, batch_job(active=1, start=T0), [pod()])
    assert refusal(st2) is None and not events
    assert st2["specHash"] == spec_fingerprint(validate_manifest(obj))  # now the wider fingerprint
    st["specHash"] = legacy
    st3, _ = run(edited(obj, dataset={"maxLength": 128}), st, batch_job(active=1, start=T0), [pod()])
    assert refusal(st3)["message"].startswith("spec.dataset cannot change")


def test_fingerprint_fits_the_status_field():
    busy = manifest(
        hyperparameters={"epochs": 3, "batchSize": 8, "learningRate": 1e-4, "weightDecay": 0.1, "maxGradNorm": 1.0,
                         "dropout": 0.2, "labelSmoothing": 0.1, "seed": 3, "mixedPrecision": "bf16"},
        lora={"enabled": True, "rank": 4, "alpha": 8.0, "dropout": 0.1, "targetModules": ["query"]},
        earlyStopping={"metric": "val_accuracy", "patience": 3, "minDelta": 0.01},
        env={"A": "1"}, nodeSelector={"pool": "gpu"}, image="x:1", backoffLimit=5, priorityClassName="high",
    )
    fingerprint = spec_fingerprint(validate_manifest(busy))
    assert len(fingerprint) <= SPEC_HASH_MAX
    st = running(busy)
    st2, _ = run(edited(busy, hyperparameters={"seed": 4}), st, batch_job(active=1, start=T0), [pod()])
    assert refusal(st2)["message"].startswith("spec.hyperparameters.seed cannot change")


def test_ephemeral_output_warns_once():
    obj = manifest(output={"ephemeral": True})
    st, events = run(obj, {})
    cond = find(st["conditions"], Condition.OUTPUT_EPHEMERAL)
    assert cond["status"] == "True" and cond["reason"] == Reason.EPHEMERAL_OUTPUT
    assert "will not survive the pod" in cond["message"]
    assert [e.type for e in events if e.reason == Reason.EPHEMERAL_OUTPUT] == ["Warning"]
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()])
    assert Reason.EPHEMERAL_OUTPUT not in reasons(events)
    uploaded, _ = run(manifest(output={"ephemeral": True, "uri": "s3://b/p"}), {})
    assert "uploaded to s3://b/p" in find(uploaded["conditions"], Condition.OUTPUT_EPHEMERAL)["message"]


def test_durable_output_has_no_warning():
    st, events = run(manifest(), {})
    assert find(st["conditions"], Condition.OUTPUT_EPHEMERAL) is None
    assert Reason.EPHEMERAL_OUTPUT not in reasons(events)
