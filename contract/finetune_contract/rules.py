"""Cross-field rules, each written once as a CEL rule (for the CRD, enforced at `kubectl apply`)
and as the same predicate in Python (for the operator and `finetune run`, which also see
manifests that never went through an API server). A test evaluates both forms on the
same manifests and fails when they disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLASSIFICATION_METRICS = ["val_loss", "val_accuracy", "val_f1", "train_loss"]
CAUSAL_LM_METRICS = ["val_loss", "val_perplexity", "train_loss"]
EMBEDDING_METRICS = ["val_loss", "val_recall_at_1", "train_loss"]
MAX_METRICS = ["val_accuracy", "val_f1", "val_recall_at_1"]


@dataclass(frozen=True)
class Rule:
    owner: str  # the API type (class name) the rule is attached to
    cel: str
    message: str  # says what is wrong and how to fix it
    field: str  # JSON path of the offending field, relative to the owner (`.a.b`)
    ok: Callable[[Any], bool]

    def crd(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": self.field}


def _set(x: Any) -> bool:
    return x is not None


def _loss(spec: Any) -> str | None:
    loss = spec.hyperparameters.loss
    return loss.name if loss is not None else None


def _metrics_for(task: str) -> list[str]:
    return {"sequence-classification": CLASSIFICATION_METRICS, "causal-lm": CAUSAL_LM_METRICS}.get(task, EMBEDDING_METRICS)


# Credentials in clear text (issue 12): values shaped like the common tokens (a CEL rule, below) and env names that
# say "credential" with a literal value (the operator's check, `credential_problems`). The same regular expressions
# in CEL (RE2) and in Python (re): both read `(?i)`, classes and bounded repeats alike.
SECRET_NAME = r"(?i)(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|APIKEY|KEY|CREDENTIALS?)(_|$)"
SECRET_VALUE = (r"(hf_[A-Za-z0-9]{30,}|A[KS]IA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,}"
                r"|xox[abposr]-[A-Za-z0-9-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----)")
_FIX = ("store it in a Secret and reference it with secretEnv (NAME: {name: <secret>, key: <key>}, a secretKeyRef) "
        "or envFrom (- secretRef: {name: <secret>})")
SECRET_VALUE_MESSAGE = f"env holds a value shaped like a token or private key (hf_..., AKIA..., ghp_..., xox...-, -----BEGIN ... PRIVATE KEY): {_FIX}"
SECRET_NAME_MESSAGE = f"the name says credential (*TOKEN*, *SECRET*, *PASSWORD*, *KEY*) and the value is in clear text: {_FIX}"
BOTH_ENV_MESSAGE = "set in both env and secretEnv: keep it in one (a credential in secretEnv)"
TOKEN_SECRET_MESSAGE = "HF_TOKEN is set by model.tokenSecret: remove it here or there"


def credential_problems(spec: Any) -> list[tuple[str, str]]:
    """(field relative to the spec, message) for credentials passed by name in clear text.

    Not a CEL rule: a CRD cannot bound the length of a map's keys, so the API server's static cost estimate of
    any rule that reads them (`k.matches(...)`, `k in self.env`) is 402,654,279 against a limit of 10,000,000
    (tests/e2e/crd_admission.py's estimator) and the CRD would be refused. The operator (condition Valid=False
    and a Warning Event), `finetune validate` and `finetune run` refuse it instead, naming the variable.
    """
    out = [(f".env.{k}", SECRET_NAME_MESSAGE) for k, v in sorted(spec.env.items()) if v and re.search(SECRET_NAME, k)]
    out += [(f".secretEnv.{k}", BOTH_ENV_MESSAGE) for k in sorted(set(spec.env) & set(spec.secret_env))]
    if spec.model.token_secret is not None and "HF_TOKEN" in spec.secret_env:
        out.append((".secretEnv.HF_TOKEN", TOKEN_SECRET_MESSAGE))
    return out


RULES: list[Rule] = [
    Rule(
        "SchedulerSpec",
        "!(has(self.warmupRatio) && has(self.warmupSteps))",
        "set warmupRatio or warmupSteps, not both",
        ".warmupSteps",
        lambda s: not (_set(s.warmup_ratio) and _set(s.warmup_steps)),
    ),
    Rule(
        "OptimizerSpec",
        "!has(self.momentum) || (has(self.name) && self.name == 'sgd')",
        "momentum applies only to optimizer sgd: remove it or set name: sgd",
        ".momentum",
        lambda o: not _set(o.momentum) or o.name == "sgd",
    ),
    Rule(
        "OptimizerSpec",
        "!has(self.nesterov) || (has(self.name) && self.name == 'sgd')",
        "nesterov applies only to optimizer sgd: remove it or set name: sgd",
        ".nesterov",
        lambda o: not _set(o.nesterov) or o.name == "sgd",
    ),
    Rule(
        "OptimizerSpec",
        "!(has(self.nesterov) && self.nesterov && has(self.momentum) && self.momentum == 0.0)",
        "nesterov needs momentum > 0: raise momentum or set nesterov: false",
        ".nesterov",
        lambda o: not (o.nesterov and _set(o.momentum) and o.momentum == 0.0),
    ),
    Rule(
        "OptimizerSpec",
        "!(has(self.betas) || has(self.eps)) || !has(self.name) || self.name != 'sgd'",
        "betas and eps apply only to adam/adamw: remove them for sgd",
        ".betas",
        lambda o: not (_set(o.betas) or _set(o.eps)) or o.name != "sgd",
    ),
    Rule(
        "LossSpec",
        "!(has(self.focalAlpha) || has(self.focalGamma)) || (has(self.name) && self.name == 'focal')",
        "focalAlpha and focalGamma apply only to loss focal: remove them or set name: focal",
        ".focalGamma",
        lambda s: not (_set(s.focal_alpha) or _set(s.focal_gamma)) or s.name == "focal",
    ),
    Rule(
        "LossSpec",
        "!(has(self.margin) || has(self.miner)) || (has(self.name) && self.name == 'triplet')",
        "margin and miner apply only to loss triplet: remove them or set name: triplet",
        ".margin",
        lambda s: not (_set(s.margin) or _set(s.miner)) or s.name == "triplet",
    ),
    Rule(
        "LoraSpec",
        "!self.enabled || self.rank > 0",
        "rank must be > 0 when LoRA is enabled (typical: 8 or 16)",
        ".rank",
        lambda lo: not lo.enabled or lo.rank > 0,
    ),
    Rule(
        "DistributedSpec",
        "!has(self.zeroStage) || self.strategy == 'deepspeed'",
        "zeroStage applies only to strategy: deepspeed; remove it or set strategy: deepspeed",
        ".zeroStage",
        lambda d: not _set(d.zero_stage) or d.strategy == "deepspeed",
    ),
    Rule(
        "OutputSpec",
        "!(self.ephemeral && has(self.pvc))",
        "set pvc or ephemeral, not both: pvc keeps the output on that claim, ephemeral throws it away with the pod",
        ".ephemeral",
        lambda o: not (o.ephemeral and _set(o.pvc)),
    ),
    Rule(
        "OutputSpec",
        "!(has(self.size) || has(self.storageClassName)) || (!has(self.pvc) && !self.ephemeral)",
        "size and storageClassName apply only to the PersistentVolumeClaim the operator creates: remove them, "
        "or unset pvc and ephemeral",
        ".size",
        lambda o: not (_set(o.size) or _set(o.storage_class_name)) or (not _set(o.pvc) and not o.ephemeral),
    ),
    Rule(
        "OutputSpec",
        "!has(self.credentialsSecret) || has(self.uri)",
        "credentialsSecret applies only to an object-store upload: set uri or remove it",
        ".credentialsSecret",
        lambda o: not _set(o.credentials_secret) or _set(o.uri),
    ),
    Rule(
        "OutputSpec",
        "!self.uploadCheckpoints || has(self.uri)",
        "uploadCheckpoints needs uri (where to upload them)",
        ".uploadCheckpoints",
        lambda o: not o.upload_checkpoints or _set(o.uri),
    ),
    Rule(
        "DatasetSpec",
        "!(has(self.validationSource) && has(self.validationFraction))",
        "set validationSource or validationFraction, not both",
        ".validationFraction",
        lambda d: not (_set(d.validation_source) and _set(d.validation_fraction)),
    ),
    Rule(
        "DatasetSpec",
        "!(has(self.testSource) && has(self.testFraction))",
        "set testSource or testFraction, not both",
        ".testFraction",
        lambda d: not (_set(d.test_source) and _set(d.test_fraction)),
    ),
    Rule(
        "DatasetSpec",
        "!has(self.testFraction) || has(self.validationSource) || "
        "(has(self.validationFraction) ? self.validationFraction : 0.1) + self.testFraction < 0.95",
        "testFraction plus validationFraction (0.1 when unset) must stay below 0.95, so that training data remains: "
        "lower one of them, or set validationSource",
        ".testFraction",
        lambda d: not _set(d.test_fraction) or _set(d.validation_source)
        or (d.validation_fraction if _set(d.validation_fraction) else 0.1) + d.test_fraction < 0.95,
    ),
    Rule(
        "EarlyStoppingSpec",
        "self.mode == 'auto' || (self.metric in " + repr(MAX_METRICS) + ") == (self.mode == 'max')",
        "mode contradicts the metric: use max for accuracy/f1/recall, min for losses and perplexity, or auto",
        ".mode",
        lambda e: e.mode == "auto" or (e.metric in MAX_METRICS) == (e.mode == "max"),
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.hyperparameters) || !has(self.hyperparameters.loss) || !has(self.hyperparameters.loss.name)"
        " || (self.task == 'embedding') == (self.hyperparameters.loss.name in ['contrastive', 'triplet'])",
        "loss does not fit the task: embedding takes contrastive or triplet; "
        "sequence-classification and causal-lm take cross-entropy or focal",
        ".hyperparameters.loss.name",
        lambda s: _loss(s) is None or (s.task == "embedding") == (_loss(s) in ("contrastive", "triplet")),
    ),
    Rule(
        # On the spec, not LossSpec: without a loss name the task decides (embedding's default is contrastive).
        "FineTuneJobSpec",
        "!has(self.hyperparameters) || !has(self.hyperparameters.loss) || !has(self.hyperparameters.loss.temperature)"
        " || (has(self.hyperparameters.loss.name) ? self.hyperparameters.loss.name == 'contrastive' : self.task == 'embedding')",
        "temperature applies only to loss contrastive (the default for task embedding): remove it or set name: contrastive",
        ".hyperparameters.loss.temperature",
        lambda s: s.hyperparameters.loss is None
        or not _set(s.hyperparameters.loss.temperature)
        or (s.hyperparameters.loss.name == "contrastive" if s.hyperparameters.loss.name else s.task == "embedding"),
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.hyperparameters) || !has(self.hyperparameters.mixupAlpha) || self.hyperparameters.mixupAlpha == 0.0"
        " || self.task == 'sequence-classification'",
        "mixupAlpha applies only to task sequence-classification: remove it or set 0",
        ".hyperparameters.mixupAlpha",
        lambda s: not s.hyperparameters.mixup_alpha or s.task == "sequence-classification",
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.hyperparameters) || !has(self.hyperparameters.labelSmoothing) || self.hyperparameters.labelSmoothing == 0.0"
        " || self.task != 'embedding'",
        "labelSmoothing does not apply to task embedding: remove it",
        ".hyperparameters.labelSmoothing",
        lambda s: not s.hyperparameters.label_smoothing or s.task != "embedding",
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.earlyStopping) || (self.task == 'sequence-classification' ? self.earlyStopping.metric in "
        + repr(CLASSIFICATION_METRICS)
        + " : self.task == 'causal-lm' ? self.earlyStopping.metric in "
        + repr(CAUSAL_LM_METRICS)
        + " : self.earlyStopping.metric in "
        + repr(EMBEDDING_METRICS)
        + ")",
        "earlyStopping.metric is not reported for this task: sequence-classification reports val_loss, val_accuracy, "
        "val_f1; causal-lm val_loss, val_perplexity; embedding val_loss, val_recall_at_1 (all: train_loss)",
        ".earlyStopping.metric",
        lambda s: s.early_stopping.metric in _metrics_for(s.task),
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.env) || self.env.all(k, !self.env[k].matches('" + SECRET_VALUE + "'))",
        SECRET_VALUE_MESSAGE,
        ".env",
        lambda s: not any(re.search(SECRET_VALUE, v) for v in s.env.values()),
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.dataset.credentialsSecret) || !has(self.output) || !has(self.output.credentialsSecret)"
        " || self.dataset.credentialsSecret == self.output.credentialsSecret",
        "dataset.credentialsSecret and output.credentialsSecret name different Secrets, but both become the same "
        "environment variables (AWS_ACCESS_KEY_ID, ...): use one Secret for both, or drop one",
        ".dataset.credentialsSecret",
        lambda s: not (_set(s.dataset.credentials_secret) and _set(s.output.credentials_secret))
        or s.dataset.credentials_secret == s.output.credentials_secret,
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.sft) || self.task == 'causal-lm'",
        "sft (formats, loss masking, packing) applies only to task causal-lm: remove it or set task: causal-lm",
        ".sft",
        lambda s: s.sft is None or s.task == "causal-lm",
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.model.quantization) || self.model.quantization == 'none'"
        " || (has(self.lora) && has(self.lora.enabled) && self.lora.enabled)",
        "model.quantization trains LoRA adapters on frozen quantized weights (QLoRA): set lora.enabled: true, "
        "or quantization: none",
        ".model.quantization",
        lambda s: s.model.quantization == "none" or s.lora.enabled,
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.model.quantization) || self.model.quantization == 'none'"
        " || (has(self.resources) && has(self.resources.gpu) && self.resources.gpu)",
        "model.quantization needs a GPU (bitsandbytes runs on CUDA only): set resources.gpu: true, or quantization: none",
        ".model.quantization",
        lambda s: s.model.quantization == "none" or s.resources.gpu,
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.model.quantization) || self.model.quantization == 'none'"
        " || !has(self.distributed) || !has(self.distributed.strategy) || self.distributed.strategy == 'ddp'",
        "model.quantization trains with strategy ddp only (quantized weights cannot be sharded by deepspeed or fsdp "
        "here): set distributed.strategy: ddp, or quantization: none",
        ".distributed.strategy",
        lambda s: s.model.quantization == "none" or s.distributed.strategy == "ddp",
    ),
    Rule(
        "FineTuneJobSpec",
        "!has(self.dataset.textPairField) || self.task == 'embedding'",
        "dataset.textPairField applies only to task embedding: remove it",
        ".dataset.textPairField",
        lambda s: s.dataset.text_pair_field is None or s.task == "embedding",
    ),
]

# Job names become Service names and pod hostnames, so they must be RFC 1035 labels (a Service
# name must start with a letter), at most 50 characters because children append suffixes.
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 50

# Rules on the whole object (metadata is only reachable from the root; the API server lets CEL
# see metadata.name and metadata.generateName only).
ROOT_RULES: list[dict[str, str]] = [
    {
        "rule": f"self.metadata.name.size() <= {NAME_MAX_LENGTH}",
        "message": f"metadata.name must be at most {NAME_MAX_LENGTH} characters (children add suffixes to it)",
        "fieldPath": ".metadata.name",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must start with a lowercase letter and contain only lowercase letters, digits and '-' "
        "(it names the job's Service and pods), e.g. bbc-news-classifier",
        "fieldPath": ".metadata.name",
    },
]


def cel_rules_for(owner: str) -> list[Rule]:
    return [r for r in RULES if r.owner == owner]
