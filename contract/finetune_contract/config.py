"""The trainer config on the wire (the ConfigMap's `config.json`) and the names both sides agree on.

The operator writes `TrainerConfig` with `schemaVersion` = `SCHEMA_VERSION`; the trainer reads it with
`read_trainer_config`. Compatibility rule (docs/contracts.md, "Versions"):

- `schemaVersion` is `MAJOR.MINOR`. A config without one was written before versioning: it is `1.0`.
- The trainer reads a config whose MAJOR equals its own and whose MINOR is at least `OLDEST_READABLE_MINOR`
  (same major): the same minor, any newer minor (a newer operator) and the older minors it still knows.
- Fields it does not know (from a newer minor, at any depth) are dropped before validation and listed in one
  warning; the spec types themselves stay strict (`extra="forbid"`), exactly as the CRD and the operator
  validate them. A minor version only adds fields whose absence keeps the old behaviour; anything an older
  trainer must not ignore needs a new MAJOR.
- Anything else (another MAJOR, an older minor it cannot read, no parseable version) is refused with a
  message that names both versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from .constants import API_VERSION
from .spec import FineTuneJobSpec

SCHEMA_VERSION = "1.3"
"""This contract's config schema. 1.0: the unversioned config of release 0.1.0. 1.1: adds `schemaVersion`,
`output.{size, storageClassName, retain, ephemeral, uri, credentialsSecret, uploadCheckpoints}` and
`terminationGracePeriodSeconds` (all optional, defaults keep 1.0's behaviour in the trainer). 1.2 (issue 13):
adds `sft`, `model.{tokenSecret, trustRemoteCode, quantization, cachePvc}`, `distributed.strategy: fsdp` and
`dataset.{revision, config, split, validationSplit, testSplit, credentialsSecret, testSource, testFraction,
maxTestSamples}` (unset, they keep 1.1's behaviour; a 1.1 trainer refuses `fsdp` as an unknown strategy, and
drops the dataset fields: no test evaluation, the hub and object stores unreadable). 1.3 (issue 15): adds
`distributed.{processGroupTimeoutSeconds, maxRestarts}` (group restart; an older trainer ignores them and keeps its
static rendezvous and torch's 30-minute timeout)."""

OLDEST_READABLE_MINOR = 0
"""The oldest minor of this major that this trainer still reads (missing fields take their defaults)."""

LEGACY_SCHEMA_VERSION = "1.0"  # what a config without `schemaVersion` is
KIND = "TrainerConfig"

_VERSION = re.compile(r"^(\d+)\.(\d+)$")


class Env:
    """Environment variables of the trainer container (the operator sets the first group)."""

    CONFIG = "FINETUNE_CONFIG"
    OUTPUT_DIR = "FINETUNE_OUTPUT_DIR"
    JOB_NAME = "FINETUNE_JOB_NAME"
    JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
    NNODES = "FINETUNE_NNODES"
    NPROC_PER_NODE = "FINETUNE_NPROC_PER_NODE"
    MASTER_ADDR = "MASTER_ADDR"
    MASTER_PORT = "MASTER_PORT"
    METRICS_PORT = "FINETUNE_METRICS_PORT"
    NODE_RANK = "JOB_COMPLETION_INDEX"  # set by Kubernetes for Indexed Jobs
    # The rendezvous id of torch elastic: the batch Job's uid (downward API from the label the Job controller puts on
    # its pods), so a re-created Job never joins a previous Job's rendezvous.
    RDZV_ID = "FINETUNE_RDZV_ID"
    # Set by local runs and tests, never by the operator.
    WORLD_SIZE = "FINETUNE_WORLD_SIZE"
    STATUS = "FINETUNE_STATUS"
    STOP_POLL_SECONDS = "FINETUNE_STOP_POLL_SECONDS"
    STOP_FILE = "FINETUNE_STOP_FILE"
    PROGRESS = "FINETUNE_PROGRESS"
    FAULT_OOM_ABOVE = "FINETUNE_FAULT_OOM_ABOVE"
    METRICS_LINGER_SECONDS = "FINETUNE_METRICS_LINGER_SECONDS"
    # Hugging Face's own variables, set by the operator when the job asks for them.
    HF_TOKEN = "HF_TOKEN"  # model.tokenSecret, through a secretKeyRef
    HF_HOME = "HF_HOME"  # model.cachePvc's mount

    OPERATOR_SET = (CONFIG, OUTPUT_DIR, JOB_NAME, JOB_NAMESPACE, NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, METRICS_PORT,
                    RDZV_ID)


class Paths:
    """Paths inside the trainer pod."""

    CONFIG_DIR = "/etc/finetune"
    CONFIG_KEY = "config.json"
    CONFIG_FILE = f"{CONFIG_DIR}/{CONFIG_KEY}"
    MODEL_PVC_MOUNT = "/models"
    DATA_PVC_MOUNT = "/data"
    OUTPUT_DIR = "/output"  # spec.output.path's default
    OUTPUT_SECRET_MOUNT = "/var/run/secrets/finetune/output"  # output.credentialsSecret as files
    MODEL_CACHE_MOUNT = "/cache/huggingface"  # model.cachePvc: HF_HOME, shared by jobs
    # Under the output directory:
    BEST_MODEL = "best"
    CHECKPOINTS = "checkpoints"
    RESULT = "result.json"


class Ports:
    RENDEZVOUS = 29500  # MASTER_PORT: torch.distributed rendezvous on pod 0
    METRICS = 9400  # rank 0's Prometheus exporter


TRAINER_COMMAND = ("finetune-trainer",)
"""The container command; also what `finetune run` starts locally."""

EXIT_PREEMPTED = 143  # SIGTERM handled: a checkpoint was written and the run resumes from it
EXIT_WORLD_MISMATCH = 2
EXIT_INCOMPATIBLE_CONFIG = 3  # the config's schemaVersion (or content) is one this trainer cannot read
# Exit codes that no restart can fix (the Job's podFailurePolicy fails the Job at once on them, sorted ascending as
# the API server requires): another world than the job asks for, a config this trainer cannot read.
EXIT_NOT_RETRYABLE = (EXIT_WORLD_MISMATCH, EXIT_INCOMPATIBLE_CONFIG)


class Metric:
    """Prometheus metric names the trainer exports (rank 0); labels `finetune_job`, `namespace`."""

    EPOCH = "finetune_trainer_epoch"
    STEP = "finetune_trainer_step"
    LAST_PROGRESS = "finetune_trainer_last_progress_timestamp_seconds"  # the heartbeat: time of the last progress
    # spec.watchdog.stallTimeoutSeconds as the job has it now: the FineTuneJobStalled alert's per-job threshold
    STALL_TIMEOUT = "finetune_trainer_stall_timeout_seconds"
    TRAIN_LOSS = "finetune_train_loss"
    VALIDATION_LOSS = "finetune_validation_loss"
    VALIDATION_METRIC = "finetune_validation_metric"  # + label `metric`
    LEARNING_RATE = "finetune_learning_rate"
    SAMPLES_PER_SECOND = "finetune_samples_per_second"
    BATCH_SIZE = "finetune_batch_size"
    GRADIENT_ACCUMULATION_STEPS = "finetune_gradient_accumulation_steps"
    BEST_METRIC = "finetune_best_metric"
    STAGE_SECONDS = "finetune_trainer_stage_seconds"  # + label `stage`: setup, data, modelLoad, firstStep
    TEST_METRIC = "finetune_test_metric"  # + label `metric`: test_loss, test_accuracy, ...
    EARLY_STOPS = "finetune_trainer_early_stops_total"

    LABELS = ("finetune_job", "namespace")


class TrainerConfig(BaseModel):
    """The resolved job as the trainer receives it: every hyperparameter filled by the operator."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", strict=True)

    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = Field(KIND, pattern=f"^{KIND}$")
    schema_version: str = Field(SCHEMA_VERSION, alias="schemaVersion", pattern=_VERSION.pattern)
    name: str
    namespace: str = "default"
    spec: FineTuneJobSpec

    def to_wire(self) -> dict[str, Any]:
        """The JSON the operator writes. Spec fields equal to their default are left out: the reader fills the same
        defaults, and a field this release added stays invisible to an older trainer unless the job sets it (trainer
        images of release 0.1.0 predate schemaVersion and refuse any field they do not know)."""
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "schemaVersion": self.schema_version,
            "name": self.name,
            "namespace": self.namespace,
            "spec": self.spec.model_dump(by_alias=True, mode="json", exclude_none=True, exclude_defaults=True),
        }


def trainer_config(name: str, namespace: str, spec: FineTuneJobSpec) -> dict[str, Any]:
    """What the operator writes into the ConfigMap (and `finetune run` into config.json)."""
    return TrainerConfig(name=name, namespace=namespace, spec=spec).to_wire()


class IncompatibleConfig(ValueError):
    """The config's schemaVersion is one this trainer cannot read."""


def parse_version(text: Any) -> tuple[int, int]:
    m = _VERSION.match(text) if isinstance(text, str) else None
    if not m:
        raise IncompatibleConfig(f"trainer config schemaVersion {text!r} is not MAJOR.MINOR; this trainer reads "
                                 f"schema {SCHEMA_VERSION}")
    return int(m.group(1)), int(m.group(2))


def check_compatible(config_version: str, reader: str = SCHEMA_VERSION, oldest_minor: int = OLDEST_READABLE_MINOR) -> None:
    """Raise IncompatibleConfig (naming both versions) unless a `reader` trainer can read `config_version`."""
    major, minor = parse_version(config_version)
    r_major, r_minor = parse_version(reader)
    if major != r_major:
        raise IncompatibleConfig(
            f"trainer config schemaVersion {config_version} is incompatible with this trainer, which reads schema "
            f"{reader} (major {r_major}.x only): use a trainer image built for schema {major}.x (spec.image) or an "
            f"operator that writes {r_major}.x")
    if minor < oldest_minor:
        raise IncompatibleConfig(
            f"trainer config schemaVersion {config_version} is older than this trainer (schema {reader}) can read "
            f"(oldest {r_major}.{oldest_minor}): upgrade the operator, or pin an older trainer image with spec.image")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: X, X | None, list[X], dict[str, X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found += _models_in(arg)
    return found


def _strip(value: Any, annotation: Any, path: str, ignored: list[str]) -> Any:
    models = _models_in(annotation)
    if not models:
        return value
    origin = get_origin(annotation)
    if isinstance(value, list) and (origin is list or any(get_origin(a) is list for a in get_args(annotation))):
        return [_strip(v, models[0], f"{path}[{i}]", ignored) for i, v in enumerate(value)]
    if isinstance(value, dict):
        dict_of_models = origin is dict or any(get_origin(a) is dict for a in get_args(annotation))
        if dict_of_models:
            return {k: _strip(v, models[0], f"{path}.{k}", ignored) for k, v in value.items()}
        return strip_unknown(value, models[0], path, ignored)
    return value


def strip_unknown(raw: dict[str, Any], model: type[BaseModel], path: str = "", ignored: list[str] | None = None) -> dict[str, Any]:
    """`raw` without the keys `model` (and its nested models) does not declare, by alias or name.

    The names come from the spec types themselves, so there is one source of truth; the dropped paths
    are appended to `ignored`. Only the trainer reads with it: the API validation stays strict.
    """
    ignored = [] if ignored is None else ignored
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    out: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else key
        field = fields.get(key)
        if field is None:
            ignored.append(where)
            continue
        out[key] = _strip(value, field.annotation, where, ignored)
    return out


@dataclass(frozen=True)
class ReadConfig:
    config: TrainerConfig
    version: str  # the config's schemaVersion (LEGACY_SCHEMA_VERSION when it had none)
    ignored: tuple[str, ...]  # paths of fields this trainer does not know, dropped

    def warning(self) -> str | None:
        if not self.ignored:
            return None
        return (f"trainer config schemaVersion {self.version} (this trainer reads {SCHEMA_VERSION}): ignoring "
                f"{len(self.ignored)} field(s) this trainer does not know: {', '.join(self.ignored)}")


def read_trainer_config(raw: Any) -> ReadConfig:
    """Parse a config.json document; raises IncompatibleConfig or pydantic's ValidationError."""
    if not isinstance(raw, dict):
        raise IncompatibleConfig("trainer config: expected a JSON object")
    if raw.get("kind") != KIND:
        raise IncompatibleConfig(f"trainer config: kind must be {KIND} (got {raw.get('kind')!r})")
    version = raw.get("schemaVersion", LEGACY_SCHEMA_VERSION)
    check_compatible(version)
    ignored: list[str] = []
    cleaned = strip_unknown(raw, TrainerConfig, "", ignored)
    cleaned["schemaVersion"] = version
    return ReadConfig(TrainerConfig.model_validate(cleaned), version, tuple(ignored))
