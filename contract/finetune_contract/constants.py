"""Names of the FineTuneJob API that every layer shares (one place, so nothing drifts)."""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune"]
CRD_NAME = f"{PLURAL}.{GROUP}"

# Children get "<job>-<suffix>" names; a DNS label is 63 chars and pod hostnames add "-<index>-<hash>".
MAX_JOB_NAME_LENGTH = 50

FIELD_MANAGER = "finetune-operator"


class Phase:
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    TERMINAL = frozenset({"Succeeded", "Failed"})
    ALL = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


class Condition:
    """Condition types (the `type` field of status.conditions)."""

    VALID = "Valid"
    READY = "Ready"  # children exist and match the spec
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    EARLY_STOP_REQUESTED = "EarlyStopRequested"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    STALLED = "Stalled"
    OUTPUT_EPHEMERAL = "OutputEphemeral"  # Warning: spec.output.ephemeral, the model does not survive the pod


class Reason:
    """CamelCase reasons for conditions and Events."""

    VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    CREATED = "ChildrenCreated"
    JOB_PENDING = "PodsPending"
    JOB_RUNNING = "PodsRunning"
    JOB_SUSPENDED = "JobSuspended"
    JOB_RESUMED = "JobResumed"
    COMPLETED = "TrainingCompleted"
    EARLY_STOPPED = "EarlyStopped"
    STOPPED_BY_USER = "StoppedByUser"
    STOP_ENFORCED = "StopEnforced"
    PATIENCE_EXHAUSTED = "PatienceExhausted"
    USER_REQUESTED = "UserRequested"
    NAN_LOSS = "LossIsNaN"
    METRIC_MISSING = "MetricMissing"
    STALLED = "Stalled"
    OOM_KILLED = "OOMKilled"
    IMAGE_PULL = "ImagePullBackOff"
    BACKOFF_LIMIT = "BackoffLimitExceeded"
    DEADLINE = "DeadlineExceeded"
    POD_FAILED = "PodFailed"
    JOB_DELETED = "JobDeleted"
    IMMUTABLE_FIELD = "ImmutableFieldChanged"
    NO_CHANGE_REFUSED = "NoRefusedChange"
    CHILD_NOT_OWNED = "ChildNotOwned"  # an object with a child's name exists and another owner made it
    OUTPUT_CLAIM_IN_USE = "OutputClaimInUse"  # the retained output claim is an earlier job's of the same name
    EPHEMERAL_OUTPUT = "EphemeralOutput"
    DURABLE_OUTPUT = "DurableOutput"
    # Group restarts (docs/multi-node.md): the Event of each, and the causes in status.lastRestart.reason.
    GROUP_RESTARTED = "GroupRestarted"
    DISRUPTED = "Disrupted"  # the pod had DisruptionTarget: preemption, drain, eviction, lost node (not charged)
    EVICTED = "Evicted"  # the kubelet evicted the pod (node pressure)
    POD_ERROR = "Error"  # the trainer exited non-zero (the job's own code)
    REPEATED_FAILURE = "RepeatedFailure"  # the same rank failed the same way spec-many times in a row
    FAILED_BY_POLICY = "PodFailurePolicy"  # an exit code no restart can fix (the Job's podFailurePolicy FailJob)


class Label:
    NAME = "app.kubernetes.io/name"
    INSTANCE = "app.kubernetes.io/instance"
    COMPONENT = "app.kubernetes.io/component"
    PART_OF = "app.kubernetes.io/part-of"
    MANAGED_BY = "app.kubernetes.io/managed-by"
    JOB_NAME = f"{GROUP}/job-name"


class Annotation:
    CONFIG_HASH = f"{GROUP}/config-hash"
    STOP = f"{GROUP}/stop"  # alternative to spec.stop for tools that must not touch the spec
