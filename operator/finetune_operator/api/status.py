"""The FineTuneJob status: written by the operator (phase, conditions) and by the trainer's
rank 0 (training progress). Both sides use merge patches on disjoint fields."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from .spec import ApiModel, ShortStr

# Status is written by our own trainer and operator, never typed by users; reading it leniently
# (ints where floats are expected, strings for enums) keeps an old trainer's report readable.
LENIENT = ConfigDict(strict=False)

HISTORY_LIMIT = 200  # one point per epoch; enough for any sane run, bounded so the object stays small


class StatusCondition(ApiModel):
    """A condition in the standard Kubernetes shape (metav1.Condition)."""

    model_config = LENIENT


    type: ShortStr
    status: ShortStr = Field(description="`True`, `False` or `Unknown`.")
    reason: ShortStr = Field(description="CamelCase reason.")
    message: str = Field("", max_length=32768)
    last_transition_time: ShortStr = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int | None = None


class HistoryPoint(ApiModel):
    """One epoch's results (for loss curves)."""

    model_config = LENIENT


    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_metric: float | None = None
    learning_rate: float | None = None
    time: ShortStr | None = None


class StageTimings(ApiModel):
    """How long each stage from `kubectl apply` to the first optimizer step took, in seconds (issue 13). The operator
    writes podStartSeconds; the trainer's rank 0 the rest, each stage measured from the end of the one before."""

    model_config = LENIENT

    pod_start_seconds: float | None = Field(
        None, description="FineTuneJob created to the first trainer container running, as the operator saw it "
        "(children, scheduling, image pull, container start)."
    )
    setup_seconds: float | None = Field(None, description="Trainer process start to its data stage (interpreter, imports, process group).")
    data_seconds: float | None = Field(None, description="Reading, splitting and tokenising the data (or reading the tokenised cache).")
    data_cached: bool | None = Field(None, description="True when every split came from the tokenised cache (nothing tokenised).")
    model_load_seconds: float | None = Field(None, description="Loading the base model's weights.")
    first_step_seconds: float | None = Field(
        None, description="Model loaded to the first optimizer step done (optimizer, batch plan, resume, the step itself)."
    )
    first_step_time: ShortStr | None = Field(None, description="RFC 3339 time the first optimizer step ended.")


class RestartRecord(ApiModel):
    """The latest group restart: which pod failed, how, and whether it was charged to spec.backoffLimit."""

    model_config = LENIENT


    time: ShortStr | None = Field(None, description="RFC 3339 time the pod ended.")
    reason: ShortStr | None = Field(None, description="OOMKilled, Disrupted (preemption, drain, eviction, lost node: not "
                                    "charged to backoffLimit), Evicted or Error (the trainer exited non-zero).")
    pod: ShortStr | None = Field(None, description="The pod that failed.")
    node_rank: int | None = Field(None, description="Its node rank (the Indexed Job's completion index).")
    exit_code: int | None = Field(None, description="The trainer container's exit code (137: killed).")
    charged: bool | None = Field(None, description="True when the failure counts towards spec.backoffLimit.")
    repeats: int | None = Field(None, description="Consecutive restarts with this same rank and cause.")
    message: str | None = Field(None, max_length=4096, description="The failure in words.")


class FineTuneJobStatus(ApiModel):
    """Observed state. Operator-owned: phase, reason, message, conditions, jobName, times, earlyStop*.
    Trainer-owned: the training progress fields and history."""

    model_config = LENIENT


    observed_generation: int | None = Field(None, description="metadata.generation the operator last acted on.")
    phase: ShortStr | None = Field(None, description="Pending, Running, Suspended, Succeeded or Failed.")
    reason: ShortStr | None = Field(None, description="CamelCase reason of the phase (e.g. EarlyStopped, OOMKilled).")
    message: str | None = Field(None, max_length=32768, description="The phase's reason in words.")
    conditions: list[StatusCondition] = Field(default_factory=list, max_length=32)
    job_name: ShortStr | None = Field(None, description="The child batch/v1 Job running the trainer.")
    start_time: ShortStr | None = None
    completion_time: ShortStr | None = None
    epoch: int | None = Field(None, description="Epochs completed.")
    total_epochs: int | None = None
    step: int | None = Field(None, description="Optimizer steps completed.")
    train_loss: float | None = None
    val_loss: float | None = None
    val_metric: float | None = Field(None, description="Value of earlyStopping.metric (or the task's main metric).")
    val_metric_name: ShortStr | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    batch_size: int | None = Field(None, description="Resolved per-device batch size (found automatically when unset).")
    gradient_accumulation_steps: int | None = None
    best_epoch: int | None = None
    best_metric: float | None = None
    epochs_saved: int | None = Field(None, description="Epochs not run because of early stopping.")
    history: list[HistoryPoint] = Field(default_factory=list, max_length=HISTORY_LIMIT)
    last_heartbeat_time: ShortStr | None = Field(None, description="Trainer's last progress report (stall watchdog).")
    trainer_phase: ShortStr | None = Field(None, description="Trainer's own view: Starting, Training, Stopping, Finished.")
    trainer_stop_time: ShortStr | None = Field(None, description="When the trainer decided to stop early (the policy, applied after its evaluation).")
    trainer_stop_reason: ShortStr | None = Field(None, description="CamelCase reason of the trainer's early-stopping decision (e.g. PatienceExhausted).")
    trainer_stop_message: str | None = Field(None, max_length=4096, description="The trainer's early-stopping decision in words.")
    trainer_stop_epoch: int | None = Field(None, description="The epoch after whose evaluation the trainer decided to stop.")
    stop_requested_time: ShortStr | None = Field(None, description="When the stop was decided (by the trainer, the operator or the user).")
    stop_decided_by: ShortStr | None = Field(None, description="Who decided the stop: `trainer`, `operator` (the same policy, for trainers that cannot decide), `user` or `sweep` (its pruner).")
    stop_reason: str | None = Field(None, max_length=4096, description="Why the stop was requested, in words.")
    stop_enforced: bool | None = Field(None, description="True when the operator had to suspend the Job itself.")
    stop_enforced_reason: str | None = Field(None, max_length=1024, description="Why the operator suspended the Job itself, in words.")
    spec_hash: ShortStr | None = Field(None, description="Hash of the spec fields fixed once training started.")
    test_metrics: dict[str, float] = Field(
        default_factory=dict, max_length=16,
        description="The best checkpoint's metrics on the held-out test split (dataset.testSource or testFraction), "
        "evaluated once at the end: test_loss and the task's metrics (test_accuracy, test_f1, test_perplexity, "
        "test_recall_at_1). Empty: no test split.",
    )
    test_examples: int | None = Field(None, description="Examples in the test split.")
    test_epoch: int | None = Field(None, description="The epoch whose checkpoint (the best) was tested.")
    timings: StageTimings | None = Field(None, description="Seconds per stage from apply to the first optimizer step.")


    restarts: int | None = Field(None, description="Group restarts: times a training pod failed or was disrupted while "
                                 "the job ran, and every rank resumed from the last complete checkpoint.")
    last_restart: RestartRecord | None = Field(None, description="The latest group restart.")
    restarted_pods: list[ShortStr] = Field(default_factory=list, max_length=32,
                                           description="Failed pods already counted in restarts (the latest 32).")
