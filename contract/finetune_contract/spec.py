"""The FineTuneJob spec: the one definition the CRD, docs, operator and trainer are built from.

Hyperparameters have no defaults here on purpose: an unset field is filled by the preset
(see presets.py), and an explicit value always wins. A CRD default would make "unset" and
"explicitly set to the default" indistinguishable, so the CRD carries none for them.
"""

from __future__ import annotations

import functools
import re
from enum import StrEnum
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from .rules import cel_rules_for

# Bounded strings and lists keep the CRD's CEL cost estimate under the API server's budget.
Name = Annotated[str, Field(min_length=1, max_length=253)]
Path = Annotated[str, Field(min_length=1, max_length=1024)]
ShortStr = Annotated[str, Field(max_length=253)]
# PyYAML reads YAML 1.1, where `5e-5` (no dot) and `1.0e5` (no exponent sign) are strings, while
# kubectl's parser reads them as numbers. Number fields accept exactly those spellings so a manifest
# that kubectl applies also passes `finetune run`; any other string in a number field is an error.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _takes_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    return any(_takes_float(a) for a in get_args(annotation))


@functools.cache
def _float_fields(model: type[BaseModel]) -> tuple[tuple[str | None, str], ...]:
    """(alias, name) of each number field of a model. Cached: walking the annotations on every validation
    was 8% of the operator's CPU while creating jobs (bench/profile_operator.py)."""
    return tuple((f.alias, name) for name, f in model.model_fields.items() if _takes_float(f.annotation))


def _int_or_string(value: Any) -> int | str:
    # One validator instead of pydantic's `int | str` union, whose errors carry the member names
    # (`requests.cpu.int`, `requests.cpu.str`) instead of the field's path.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be an integer or a quantity string such as 500m, 2 or 4Gi")
    return value


Quantity = Annotated[
    int | str,
    PlainValidator(_int_or_string),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]


class ApiModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        # The API server does not coerce: "3" is not an integer and "true" not a boolean. Strict
        # validation keeps `finetune run` and the operator rejecting what `kubectl apply` rejects.
        # Enum fields opt out (strict=False) because strict enums refuse their own string values.
        strict=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _yaml11_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for alias, name in _float_fields(cls):
            key = alias if alias in data else name
            value = data.get(key)
            if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
                fixed[key] = float(value)
            elif isinstance(value, list):
                fixed[key] = [float(v) if isinstance(v, str) and _EXPONENT_NUMBER.fullmatch(v.strip()) else v for v in value]
        return fixed

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):  # noqa: D105
        schema = handler(core_schema)
        schema = handler.resolve_ref_schema(schema)
        for name, field in cls.model_fields.items():
            factory = field.default_factory
            if isinstance(factory, type) and issubclass(factory, BaseModel):
                # `default: {}` lets the API server apply the nested defaults when the object is omitted.
                schema["properties"][field.alias or name]["default"] = {}
        rules = cel_rules_for(cls.__name__)
        if rules:
            schema["x-kubernetes-validations"] = [r.crd() for r in rules]
        return schema


class Task(StrEnum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    CAUSAL_LM = "causal-lm"
    EMBEDDING = "embedding"


class Preset(StrEnum):
    FAST = "fast"
    BALANCED = "balanced"
    MAX_ACCURACY = "max-accuracy"


class DataFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"
    ARROW = "arrow"
    SAVE_TO_DISK = "save-to-disk"
    HUB = "hub"
    TEXT_FOLDERS = "text-folders"


class OptimizerName(StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"


class SchedulerName(StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"
    ONECYCLE = "onecycle"


class LossName(StrEnum):
    CROSS_ENTROPY = "cross-entropy"
    FOCAL = "focal"
    CONTRASTIVE = "contrastive"
    TRIPLET = "triplet"


class Miner(StrEnum):
    ALL = "all"
    HARD = "hard"
    SEMI_HARD = "semi-hard"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Strategy(StrEnum):
    DDP = "ddp"
    DEEPSPEED = "deepspeed"
    FSDP = "fsdp"


class SftFormat(StrEnum):
    AUTO = "auto"
    TEXT = "text"
    PROMPT_COMPLETION = "prompt-completion"
    MESSAGES = "messages"


class Quantization(StrEnum):
    NONE = "none"
    BITS_8 = "8bit"
    BITS_4 = "4bit"


class Mode(StrEnum):
    AUTO = "auto"
    MIN = "min"
    MAX = "max"


class Metric(StrEnum):
    VAL_LOSS = "val_loss"
    VAL_ACCURACY = "val_accuracy"
    VAL_F1 = "val_f1"
    VAL_PERPLEXITY = "val_perplexity"
    VAL_RECALL_AT_1 = "val_recall_at_1"
    TRAIN_LOSS = "train_loss"


MAXIMIZED_METRICS = frozenset({Metric.VAL_ACCURACY, Metric.VAL_F1, Metric.VAL_RECALL_AT_1})
TASK_METRICS = {
    Task.SEQUENCE_CLASSIFICATION: {"val_loss", "val_accuracy", "val_f1", "train_loss"},
    Task.CAUSAL_LM: {"val_loss", "val_perplexity", "train_loss"},
    Task.EMBEDDING: {"val_loss", "val_recall_at_1", "train_loss"},
}


class SecretKeyRef(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: Name = Field(description="Name of the Secret.")
    key: ShortStr = Field("HF_TOKEN", min_length=1, description="Key in the Secret whose value is used. Default `HF_TOKEN`.")


class ModelSource(ApiModel):
    """Where the base model comes from."""

    name: Path = Field(
        description=(
            "The base model: a Hugging Face hub id (e.g. `distilbert-base-uncased`, needs network), "
            "an absolute path inside the pod (or inside `pvc` when set), or `package:<python_package>[/subdir]` "
            "for a model shipped inside an installed Python package (offline tests and demos)."
        )
    )
    pvc: Name | None = Field(
        None, description="PersistentVolumeClaim holding the model, mounted read-only at /models; `name` is then a path inside it."
    )
    revision: ShortStr | None = Field(
        None, description="Hub revision (branch, tag or commit hash) when `name` is a hub id. Unset: the hub's `main`. "
        "A commit hash pins exactly the files trained on.",
    )
    token_secret: SecretKeyRef | None = Field(
        None, description="Secret in the job's namespace holding a Hugging Face access token, for private or gated "
        "models (and datasets) on the hub: the trainer gets it as HF_TOKEN through a secretKeyRef, so the token never "
        "appears in the spec, the ConfigMap or the operator's logs. Unset: anonymous access.",
    )
    trust_remote_code: bool = Field(
        False, description="Run the Python code a hub model ships for its own architecture (transformers' "
        "`trust_remote_code`). Default false: only architectures transformers itself implements load; set true only "
        "for a repository you trust, ideally with `revision` pinned to a commit.",
    )
    quantization: Quantization = Field(
        strict=False, default=Quantization.NONE,
        description="Load the base model's weights quantized with bitsandbytes: `4bit` (NF4, bf16 compute, double "
        "quantization: QLoRA) or `8bit` (LLM.int8). Needs `lora.enabled` (quantized weights are frozen; the adapters "
        "train) and `resources.gpu` (bitsandbytes runs on CUDA only). Default `none`.",
    )
    cache_pvc: Name | None = Field(
        None, description="PersistentVolumeClaim shared by jobs as the Hugging Face cache (HF_HOME, mounted at "
        "/cache/huggingface): the first job of a base model downloads it there, later jobs of the same model and "
        "revision load it from the claim without downloading (ReadWriteMany when jobs run on several nodes at "
        "once). Unset: the operator's default (chart value `modelCache.claimName`), else no shared cache.",
    )


class DatasetSpec(ApiModel):
    """The training data and how to read it (through Hugging Face `datasets`: memory-mapped Arrow, so a dataset larger
    than the pod's memory trains). See docs/data.md for every kind of source."""

    source: Path = Field(
        description=(
            "Training data: a hub dataset id (`owner/name`, with `revision`, `config`, `split`); a file (.json, .jsonl, "
            ".csv, .parquet, .arrow) or a directory written by `save_to_disk`, as a path inside the pod (or inside "
            "`pvc`); an object-store URI (`s3://bucket/key`, `gs://bucket/key`, credentials from `credentialsSecret`); "
            "a folder of text files with one sub-folder per label; or `package:<python_package>[/subdir]`."
        )
    )
    pvc: Name | None = Field(None, description="PersistentVolumeClaim holding the data, mounted read-only at /data.")
    format: DataFormat = Field(
        strict=False, default=DataFormat.AUTO,
        description="How to read the sources: `json`, `jsonl`, `csv`, `parquet`, `arrow`, `save-to-disk`, `hub`, "
        "`text-folders`. Default `auto`: from the file extension; a directory written by `save_to_disk` or a folder "
        "of label sub-folders by its content; a name that is neither a local path nor a URI is a hub id.",
    )
    revision: ShortStr | None = Field(
        None, description="Hub dataset revision (branch, tag or commit) of every hub source. Unset: the default branch."
    )
    config: ShortStr | None = Field(None, description="Hub dataset configuration (subset) name. Unset: the dataset's default.")
    split: ShortStr = Field(
        "train", description="Split of `source` to train on (hub datasets and `save_to_disk` dataset dicts). Default `train`."
    )
    validation_split: ShortStr = Field(
        "validation", description="Split read from `validationSource` when it is a hub dataset or a dataset dict. "
        "Default `validation`.",
    )
    test_split: ShortStr = Field(
        "test", description="Split read from `testSource` when it is a hub dataset or a dataset dict. Default `test`."
    )
    credentials_secret: Name | None = Field(
        None, description="Secret in the job's namespace whose keys become the trainer's environment variables, for "
        "object-store sources (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...) and private hub "
        "datasets (`HF_TOKEN`). Never put credentials in the spec. Unset: none. When `output.credentialsSecret` is set "
        "too, it must be the same Secret (both become the same variables).",
    )
    text_field: ShortStr = Field("text", description="Field (column) holding the input text. Default `text`.")
    text_pair_field: ShortStr | None = Field(
        None, description="For `embedding`: field holding the positive text paired with `textField`. Unset: texts with the same label are positives."
    )
    label_field: ShortStr = Field("label", description="Field holding the label (classification, embedding). Default `label`.")
    validation_source: Path | None = Field(None, description="Separate validation data (any kind of source). Unset: split off `validationFraction`.")
    validation_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="Fraction of `source` held out for validation. Unset: 0.1, or none when `validationSource` is set."
    )
    test_source: Path | None = Field(
        None, description="Held-out test data (any kind of source), never trained on nor used to pick the best epoch: the "
        "best checkpoint is evaluated on it once at the end (status.testMetrics, result.json). Unset: no test "
        "evaluation, unless `testFraction`.",
    )
    test_fraction: float | None = Field(
        None, gt=0.0, le=0.5, description="Fraction of `source` held out as the test set (before validation is split off), "
        "in (0, 0.5]. Unset: no test split, unless `testSource`.",
    )
    max_length: int = Field(128, ge=8, le=32768, description="Maximum sequence length in tokens; longer texts are truncated. Default 128.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training examples (quick experiments). Unset: all.")
    max_validation_samples: int | None = Field(None, ge=1, description="Use at most this many validation examples. Unset: all.")
    max_test_samples: int | None = Field(None, ge=1, description="Use at most this many test examples. Unset: all.")


class SftSpec(ApiModel):
    """Supervised fine-tuning of a causal LM (task causal-lm): how rows become training tokens, and which tokens
    carry the loss."""

    format: SftFormat = Field(
        strict=False, default=SftFormat.AUTO,
        description="Row format: `text` (dataset.textField, every token is a target), `prompt-completion` "
        "(promptField + completionField, strings or lists of messages), `messages` (a conversation in messagesField, "
        "rendered with the model's own chat template). Default `auto`: `messages` when the rows have messagesField, "
        "else `prompt-completion` when they have both promptField and completionField, else `text`.",
    )
    prompt_field: ShortStr = Field("prompt", min_length=1, description="Field holding the prompt. Default `prompt`.")
    completion_field: ShortStr = Field("completion", min_length=1, description="Field holding the completion. Default `completion`.")
    messages_field: ShortStr = Field(
        "messages", min_length=1, description="Field holding the conversation, a list of {role, content}. Default `messages`."
    )
    completion_only_loss: bool = Field(
        True, description="Compute the loss on the completion (prompt-completion) or the assistant's tokens (messages) "
        "only; the prompt, system and user turns are context. false: train on every token. Default true.",
    )
    packing: bool = Field(
        False, description="Concatenate short training examples into rows of up to dataset.maxLength tokens (fewer "
        "padding tokens, faster epochs). Attention never crosses an example boundary (position ids restart per "
        "example). Default false.",
    )


class OptimizerSpec(ApiModel):
    """Optimizer and its coefficients. Unset fields come from the preset."""

    name: OptimizerName | None = Field(strict=False, default=None, description="`adamw`, `adam` or `sgd`. Preset default: `adamw`.")
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, min_length=2, max_length=2, description="Adam(W) coefficients [beta1, beta2], each in [0, 1). Preset default: [0.9, 0.999]."
    )
    eps: float | None = Field(None, gt=0.0, le=1.0, description="Adam(W) epsilon. Preset default: 1e-8.")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="SGD momentum in [0, 1). Preset default: 0.9 (sgd only).")
    nesterov: bool | None = Field(None, description="SGD Nesterov momentum (needs momentum > 0). Preset default: false.")


class SchedulerSpec(ApiModel):
    """Learning-rate schedule. Set `warmupRatio` or `warmupSteps`, not both."""

    name: SchedulerName | None = Field(strict=False, default=None, description="`constant`, `linear`, `cosine` or `onecycle`. Preset default: `linear`.")
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Warm-up as a fraction of all optimizer steps, in [0, 1).")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up in optimizer steps; must be fewer than the run's total steps.")


class LossSpec(ApiModel):
    """Training loss. Classification and causal LM: `cross-entropy` or `focal`; embedding: `contrastive` or `triplet`."""

    name: LossName | None = Field(strict=False, default=None, description="Preset default: `cross-entropy` (`contrastive` for embedding).")
    focal_alpha: float | None = Field(None, ge=0.0, le=1.0, description="Focal loss class weight alpha in [0, 1]. Default 0.25 (focal only).")
    focal_gamma: float | None = Field(None, ge=0.0, le=10.0, description="Focal loss focusing gamma; 0 equals cross-entropy. Default 2.0 (focal only).")
    temperature: float | None = Field(None, gt=0.0, le=10.0, description="Contrastive (InfoNCE) softmax temperature. Default 0.05 (contrastive only).")
    margin: float | None = Field(None, gt=0.0, le=10.0, description="Triplet margin in cosine distance. Default 0.2 (triplet only).")
    miner: Miner | None = Field(strict=False, default=None, description="Triplet negatives: `all`, `hard` or `semi-hard`. Default `semi-hard` (triplet only).")


class Hyperparameters(ApiModel):
    """Training hyperparameters. Every unset field is filled by the preset; explicit values win."""

    epochs: int | None = Field(None, ge=1, le=1000, description="Passes over the training data.")
    batch_size: int | None = Field(
        None, ge=1, le=65536, description="Examples per device per step. Unset: the largest batch that fits in memory is found before training."
    )
    gradient_accumulation_steps: int | None = Field(None, ge=1, le=4096, description="Steps whose gradients are summed before an optimizer step.")
    learning_rate: float | None = Field(None, gt=0.0, le=10.0, description="Peak learning rate (after warm-up).")
    optimizer: OptimizerSpec | None = Field(None, description="Optimizer and its coefficients.")
    weight_decay: float | None = Field(None, ge=0.0, le=1.0, description="Decoupled weight decay; never applied to biases and norm weights.")
    scheduler: SchedulerSpec | None = Field(None, description="Learning-rate schedule and warm-up.")
    max_grad_norm: float | None = Field(None, ge=0.0, le=1000.0, description="Clip the global gradient norm to this value; 0 disables clipping.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Override the model's dropout probabilities. Unset: keep the model's own.")
    loss: LossSpec | None = Field(None, description="Loss function and its parameters.")
    label_smoothing: float | None = Field(None, ge=0.0, lt=1.0, description="Label smoothing for cross-entropy/focal, in [0, 1).")
    mixup_alpha: float | None = Field(None, ge=0.0, le=10.0, description="Mixup on embeddings (sequence-classification); Beta(alpha, alpha), 0 disables.")
    head_learning_rate_multiplier: float | None = Field(
        None, ge=0.01, le=1000.0, description="Newly initialised layers (the task head) learn this many times faster than the base model."
    )
    layerwise_lr_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="Each transformer layer below the top gets this factor times the learning rate of the layer above; 1 disables."
    )
    mixed_precision: MixedPrecision | None = Field(strict=False, default=None, description="`no`, `fp16` or `bf16`.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed; one seed gives identical losses run to run.")


class LoraSpec(ApiModel):
    """Low-rank adaptation through peft: trains small adapter matrices instead of the whole model."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights. Default false.")
    rank: int = Field(8, ge=0, le=1024, description="Adapter rank r; must be > 0 when enabled. Default 8.")
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="Scaling alpha (effective scale alpha/r). Default 16.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input. Default 0.05.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=64, description="Module names to adapt. Empty: peft's defaults for the architecture, else all linear layers."
    )


class EarlyStoppingSpec(ApiModel):
    """Patience-based early stopping, decided by the operator from the status history."""

    enabled: bool = Field(True, description="Stop when the metric stops improving. Default true.")
    metric: Metric = Field(strict=False, default=Metric.VAL_LOSS, description="Metric watched at the end of each epoch. Default `val_loss`.")
    mode: Mode = Field(strict=False, default=Mode.AUTO, description="`min` or `max`; `auto`: max for accuracy/f1/recall, min otherwise. Default `auto`.")
    patience: int | None = Field(None, ge=0, le=1000, description="Epochs without improvement before stopping. Preset default (balanced: 2).")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement. Default 0.")
    stop_grace_period_seconds: int = Field(
        300, ge=0, le=86400, description="After a stop request, seconds the trainer has to stop by itself before the operator suspends its Job. Default 300."
    )


class DistributedSpec(ApiModel):
    """How many processes train, and how they share the model."""

    nodes: int = Field(1, ge=1, le=256, description="Pods (one per node). Default 1.")
    processes_per_node: int = Field(1, ge=1, le=16, description="Training processes per pod (GPUs per node when `resources.gpu`). Default 1.")
    strategy: Strategy = Field(
        strict=False, default=Strategy.DDP,
        description="`ddp` (data parallel), `deepspeed` (ZeRO) or `fsdp` (PyTorch fully sharded data parallel through "
        "accelerate's FSDP plugin: weights, gradients and optimizer state sharded across processes). Default `ddp`.",
    )
    zero_stage: int | None = Field(None, ge=1, le=3, description="DeepSpeed ZeRO stage 1-3 (deepspeed only). Default 2 with deepspeed.")
    process_group_timeout_seconds: int = Field(
        180, ge=10, le=3600,
        description="Seconds a collective (all-reduce, barrier) or a rendezvous store read may wait for a peer before "
        "the rank fails and the group restarts from the last checkpoint. Default 180: a lost peer is noticed within "
        "minutes, not torch's 30 minutes; raise it only for steps or checkpoint saves longer than that.",
    )
    max_restarts: int = Field(
        10, ge=0, le=1000,
        description="Group restarts each pod's torch elastic agent performs in place (the surviving ranks rejoin the "
        "replacement pod at a new rendezvous and resume from the last checkpoint) before its own pod fails. Multi-node "
        "only. Default 10.",
    )


class ResourcesSpec(ApiModel):
    """Compute for each training pod."""

    gpu: bool = Field(False, description="Request `gpuResourceName: processesPerNode` for each pod. Default false.")
    gpu_resource_name: ShortStr = Field("nvidia.com/gpu", description="Extended resource that names a GPU. Default `nvidia.com/gpu`.")
    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16, description="Container resource requests (cpu, memory, ...).")
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16, description="Container resource limits.")
    shm_size: ShortStr | None = Field("1Gi", description="Size of the /dev/shm memory volume (data loader workers, NCCL). Default 1Gi.")


class OutputSpec(ApiModel):
    """Where checkpoints and the final model go. Default: a PersistentVolumeClaim the operator creates for the job,
    kept after the job is deleted, so the model, checkpoints and result.json outlive the pods."""

    path: Path = Field("/output", description="Directory for checkpoints, the best model and result.json. Default /output.")
    pvc: Name | None = Field(
        None, description="Existing PersistentVolumeClaim mounted at `path` (ReadWriteMany for more than one node). "
        "Unset: the operator creates `<job>-output` (see `size`, `storageClassName`, `retain`), unless `ephemeral`."
    )
    size: ShortStr | None = Field(
        None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description="Size of the PersistentVolumeClaim the operator creates, a Kubernetes quantity (`50Gi`). "
        "Unset: the operator's default (chart value `output.defaultSize`, 20Gi).",
    )
    storage_class_name: ShortStr | None = Field(
        None, description="StorageClass of the PersistentVolumeClaim the operator creates. Unset: the operator's default "
        "(chart value `output.storageClassName`), else the cluster's default StorageClass.",
    )
    retain: bool = Field(
        True, description="Keep the PersistentVolumeClaim the operator created when the FineTuneJob is deleted (it gets "
        "no ownerReference; delete it with `kubectl delete pvc -l finetune.dev/job-name=<job>`). false: it is "
        "garbage-collected with the job. Default true.",
    )
    reuse_retained_claim: bool = Field(
        False, description="Use the retained `<job>-output` claim of an earlier FineTuneJob of the same name: this job "
        "resumes from its checkpoints and writes over its model. Default false: such a claim is left alone and the "
        "job waits (condition Ready=False, reason OutputClaimInUse) until the claim is deleted or this is set. "
        "May be set after the job was created.",
    )
    ephemeral: bool = Field(
        False, description="Write output to an emptyDir instead of a PersistentVolumeClaim: the model, checkpoints and "
        "result.json are lost with the pod (condition OutputEphemeral says so) unless `uri` uploads them. Default false.",
    )
    uri: ShortStr | None = Field(
        None, pattern=r"^(s3|gs|gcs)://[^/]+(/.*)?$",
        description="Object-store prefix (`s3://bucket/prefix`, `gs://bucket/prefix`) the trainer uploads the best model "
        "(`best/`) and result.json to when training ends, through fsspec (s3fs; gcsfs for gs://). Credentials come from "
        "`credentialsSecret`, never from the spec. Unset: no upload.",
    )
    credentials_secret: Name | None = Field(
        None, description="Secret in the job's namespace holding the object-store credentials: each key becomes an "
        "environment variable of the trainer (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...) "
        "and a file under /var/run/secrets/finetune/output (e.g. for `GOOGLE_APPLICATION_CREDENTIALS`). Needs `uri`.",
    )
    upload_checkpoints: bool = Field(
        False, description="Also upload the checkpoints directory to `uri` at the end. Default false (the best model "
        "and result.json only).",
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Resumable epoch checkpoints to keep besides the best model. Default 2.")


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: ShortStr | None = Field(None, description="Taint key the toleration applies to; empty with `Exists` matches every taint.")
    operator: ShortStr | None = Field(None, description="`Exists` or `Equal`. Default `Equal`.")
    value: ShortStr | None = Field(None, description="Taint value to match (with `Equal`).")
    effect: ShortStr | None = Field(None, description="`NoSchedule`, `PreferNoSchedule` or `NoExecute`. Empty: all effects.")
    toleration_seconds: int | None = Field(
        None, ge=0, le=2**63 - 1, description="With `NoExecute`: seconds the pod stays bound after the taint appears. Unset: forever."
    )


# --- issue 11 (liveness, checkpoints, batch headroom): the trainer's resilience settings -----------------

class WatchdogSpec(ApiModel):
    """Catches a job whose pods run but make no progress (hung collective, dead data loader)."""

    stall_timeout_seconds: int = Field(
        900, ge=0, le=7 * 86400,
        description=(
            "Fail the job when the trainer's step counter (training steps, evaluation batches and checkpoint saves "
            "all count) has not advanced for this long while pods run; 0 disables. Default 900: longer than the "
            "slowest single operation that publishes no progress (loading a multi-GB model from a volume plus the "
            "first step, one sharded checkpoint save) and than NCCL's own 10-minute collective timeout."
        ),
    )
    heartbeat_seconds: float = Field(
        30.0, ge=0.1, le=3600.0,
        description=(
            "Seconds between the trainer's heartbeats (status.lastHeartbeatTime and status.step), sent only while "
            "the step counter advances. Default 30; keep it well below stallTimeoutSeconds."
        ),
    )


class CheckpointingSpec(ApiModel):
    """When the trainer writes resumable checkpoints (besides one at every epoch's end)."""

    interval_minutes: float = Field(
        30.0, ge=0.0, le=10080.0,
        description=(
            "Also checkpoint mid-epoch when this many minutes have passed since the last checkpoint, so a pod "
            "killed without warning (SIGKILL, node loss) redoes at most this much training; 0: only at epoch "
            "ends and on SIGTERM. Default 30."
        ),
    )


class BatchSearchSpec(ApiModel):
    """How the automatic batch size (hyperparameters.batchSize unset, on a GPU) keeps room for the unexpected."""

    headroom_fraction: float = Field(
        0.1, ge=0.0, le=0.9,
        description=(
            "Train with this fraction fewer examples per device than the largest batch whose full training step "
            "(forward, backward, optimizer step) fitted: floor(largest x (1 - fraction)), at most largest - 1 when "
            "the fraction is above 0 and at least 1; 0 keeps the largest. "
            "Default 0.1: activation memory grows with the batch, so the fraction leaves that much of it free "
            "for longer-than-probed batches and allocator fragmentation."
        ),
    )


# --- end of issue 11's block ------------------------------------------------------------------------------


class SecretRef(ApiModel):
    """A Secret in the job's namespace, by name."""

    name: Name = Field(description="Name of the Secret.")


class SecretKeySelector(ApiModel):
    """One key of a Secret in the job's namespace (Kubernetes' `secretKeyRef`)."""

    name: Name = Field(description="Name of the Secret.")
    key: ShortStr = Field(pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret whose value becomes the variable.")


class SecretEnvSource(ApiModel):
    """A Secret whose every key becomes an environment variable of the trainer (Kubernetes' `envFrom.secretRef`)."""

    secret_ref: SecretRef = Field(description="The Secret, by name.")


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, and on which compute."""

    model: ModelSource = Field(description="The base model.")
    task: Task = Field(strict=False, default=Task.SEQUENCE_CLASSIFICATION, description="`sequence-classification`, `causal-lm` or `embedding`. Default `sequence-classification`.")
    dataset: DatasetSpec = Field(description="Training and validation data.")
    sft: SftSpec | None = Field(
        None, description="Supervised fine-tuning formats, loss masking and packing (task causal-lm only). Unset: "
        "the defaults of each field (format auto, completion-only loss, no packing).",
    )
    preset: Preset = Field(strict=False, default=
        Preset.BALANCED, description="Fills unset hyperparameters: `fast`, `balanced` or `max-accuracy`. Default `balanced`."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training hyperparameters; unset fields come from the preset.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapters (peft).")
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec, description="Early stopping on a validation metric.")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="Nodes, processes and the parallel strategy.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute per pod.")
    image: ShortStr | None = Field(None, description="Trainer image. Unset: the operator's default trainer image.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Checkpoints and final model.")
    watchdog: WatchdogSpec = Field(default_factory=WatchdogSpec, description="Stall detection and the trainer's heartbeat.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Time-based checkpoints (issue 11).")
    batch_search: BatchSearchSpec = Field(default_factory=BatchSearchSpec, description="Headroom of the automatic batch size (issue 11).")
    suspend: bool = Field(False, description="Suspend the training Job (pods are deleted; resuming continues from the last checkpoint). Default false.")
    stop: bool = Field(False, description="Request a graceful stop: the trainer finishes the current step, keeps the best checkpoint and exits. Default false.")
    backoff_limit: int = Field(3, ge=0, le=100, description="Pod failures tolerated before the job fails (each restart resumes from a checkpoint). Default 3.")
    # Upper bounds: the Job's fields are int32/int64, and the API server refuses a larger number when it
    # decodes the Job, after this FineTuneJob was accepted.
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=2**31 - 1, description="Delete the finished training Job after this many seconds. Unset: keep it.")
    active_deadline_seconds: int | None = Field(None, ge=1, le=2**63 - 1, description="Fail the training Job when it runs longer than this. Unset: no limit.")
    node_selector: dict[str, ShortStr] = Field(default_factory=dict, max_length=32, description="Node labels the training pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Tolerations of the training pods.")
    priority_class_name: ShortStr | None = Field(None, description="PriorityClass of the training pods.")
    service_account_name: ShortStr | None = Field(
        None, description="Existing ServiceAccount for the pods. Unset: the operator creates one that may only report this job's status."
    )
    env: dict[str, ShortStr] = Field(
        default_factory=dict, max_length=64,
        description="Extra environment variables for the trainer, as literal values. Never credentials: a value that "
        "looks like a token or key, or a name such as `HF_TOKEN`, `*_SECRET`, `*_PASSWORD`, `*_KEY` with a value, is "
        "refused; put those in a Secret and use `secretEnv` or `envFrom`. Default none.",
    )
    secret_env: dict[str, SecretKeySelector] = Field(
        default_factory=dict, max_length=64,
        description="Environment variables of the trainer taken from Secret keys (`HF_TOKEN: {name: hf, key: token}`, "
        "Kubernetes' `valueFrom.secretKeyRef`): how private models and data get their credentials, which then never "
        "pass through the spec, the ConfigMap or the operator. Default none.",
    )
    env_from: list[SecretEnvSource] = Field(
        default_factory=list, max_length=16,
        description="Secrets whose every key becomes an environment variable of the trainer (`- secretRef: {name: hf}`, "
        "Kubernetes' `envFrom`). Default none.",
    )
    termination_grace_period_seconds: int = Field(
        600, ge=0, le=86400,
        description="Seconds a training pod has after SIGTERM (suspend, preemption, node drain, stop enforcement) to "
        "write its checkpoint before it is killed. Default 600: Kubernetes' own 30 s cuts short a sharded (ZeRO-3) save "
        "of a billion-parameter model, whose weights and optimizer state are about 16 bytes per parameter.",
    )


def spec_schema_extra() -> dict[str, Any]:
    return FineTuneJobSpec.model_json_schema(by_alias=True)
