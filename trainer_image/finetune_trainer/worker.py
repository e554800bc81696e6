"""The training process: one per rank (torchrun starts them; world size 1 runs it in the launcher's process)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader

from finetune_contract.config import EXIT_PREEMPTED  # 128 + SIGTERM: its checkpoint lets the next pod resume
from finetune_contract.early_stopping import Settings, decide, metric_value

from . import checkpoints as ckpt
from . import failures
from .batch_size import is_out_of_memory
from .batching import (
    FAULT_OOM_AT_STEP_ENV,
    BatchPlan,
    SimulatedMemory,
    make_probe,
    plan_batch,
    simulated_oom,
    step_down,
)
from .config import DATA_PVC_MOUNT, Runtime, TrainerConfig
from .data import Collator, EpochSeededSampler, default_cache_dir, prepare
from .engine import (
    AccelerateEngine,
    DeepSpeedEngine,
    deepspeed_config,
    enable_fsdp_on_cpu,
    fsdp_plugin,
    fsdp_wrap_blocks,
)
from .evaluation import MAIN_METRIC, evaluate
from .metrics import TrainerMetrics
from .models import load_model, load_tokenizer, save_model
from .optim import build_optimizer
from .reporting import StatusReporter, now_rfc3339, now_rfc3339_micro, stall_timeout_in
from .schedules import build_scheduler
from .signals import TerminationFlag
from .steps import forward
from .timings import StageClock
from .upload import upload_results

log = logging.getLogger("finetune_trainer")

HISTORY_LIMIT = 200
LOSS_METRICS = ("val_loss", "train_loss")
GAUGE_EVERY_STEPS = 5  # step, loss, learning-rate and throughput gauges between epochs (cheap: rank 0 sets floats)
# Written after an out-of-memory error that this process cannot recover from in place (several ranks, DeepSpeed):
# the restarted pod reads it and trains the smaller batch instead of running out of memory again.
BATCH_PLAN_OVERRIDE = "batch_plan_override.json"
# Diagnostics (bench/resume.py): rank 0 appends each finished optimizer step's number to this file.
STEP_LOG_ENV = "FINETUNE_STEP_LOG"
# Fault injection: after this optimizer step the loop blocks (a hung collective) until SIGTERM.
FAULT_HANG_AT_STEP_ENV = "FINETUNE_FAULT_HANG_AT_STEP"
# Fault injection: every optimizer step takes this many seconds longer (a long epoch on a tiny model).
FAULT_SLOW_STEP_ENV = "FINETUNE_FAULT_SLOW_STEP_SECONDS"
# Fault injection: "RANK:STEP": the process of that global rank raises at that optimizer step (a bug in one rank).
FAULT_RANK_FAILS_ENV = "FINETUNE_FAULT_RANK_FAILS_AT_STEP"


class WorldMismatch(RuntimeError):
    pass


@dataclass
class Progress:
    """What survives a restart (saved as the checkpoint's trainer_state.json)."""

    epochs_completed: int = 0
    batch_in_epoch: int = 0  # > 0 only for a mid-epoch (SIGTERM) checkpoint
    global_step: int = 0
    best_epoch: int | None = None
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    partial_loss_sum: float = 0.0  # the interrupted epoch's running loss, so its mean stays exact
    partial_batches: int = 0
    examples_in_epoch: int = 0  # per rank: batch_in_epoch in examples, so a changed batch size skips exactly as much

    def to_json(self) -> dict[str, Any]:
        return {"epochsCompleted": self.epochs_completed, "batchInEpoch": self.batch_in_epoch, "globalStep": self.global_step,
                "bestEpoch": self.best_epoch, "bestMetric": self.best_metric, "history": self.history,
                "partialLossSum": self.partial_loss_sum, "partialBatches": self.partial_batches,
                "examplesInEpoch": self.examples_in_epoch}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Progress:
        return cls(d.get("epochsCompleted", 0), d.get("batchInEpoch", 0), d.get("globalStep", 0), d.get("bestEpoch"),
                   d.get("bestMetric"), list(d.get("history", [])), d.get("partialLossSum", 0.0), d.get("partialBatches", 0),
                   d.get("examplesInEpoch", 0))


def checkpoint_warning(skipped: list[dict[str, str]], resumed: str | None) -> str | None:
    """The status line for damaged checkpoints skipped at resume (None: none was)."""
    if not skipped:
        return None
    damaged = "; ".join(f"{os.path.basename(s['path'])}: {s['problem']}" for s in skipped)[:900]
    target = f"resumed from {os.path.basename(resumed)}" if resumed else "trained from the start"
    return f"skipped {len(skipped)} damaged checkpoint(s) ({damaged}); {target}"


def process_group_kwargs(spec: Any) -> list[InitProcessGroupKwargs]:
    """The job's process-group timeout instead of torch's 30 minutes (10 for NCCL): a collective whose peer hangs
    fails this rank within it, and the elastic agent restarts the group (docs/multi-node.md)."""
    return [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=spec.distributed.process_group_timeout_seconds))]


def configure_logging(job: str, rank: int) -> None:
    """One line per event naming the job; only rank 0 logs below WARNING (STYLE rule 7)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s job={job} rank={rank} %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    for noisy in ("transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-file load/save bars would drown the epoch bars
    import datasets

    datasets.disable_progress_bars()  # per-split generate/tokenise bars too; the data stage's time is logged once
    datasets.logging.set_verbosity_error()


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (x86 avx512_bf16/amx_bf16, Arm bf16). Without it torch emulates bf16
    autocast: measured on a 2-core AMD EPYC without avx512_bf16, a MiniLM step (batch 16 x 64 tokens) took ~20 s in
    bf16 against ~2.7 s in fp32. An unreadable cpuinfo (not Linux) keeps what was asked."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = set(f.read().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_mixed_precision(requested: str, on_gpu: bool, native_bf16: bool | None = None) -> str:
    if requested == "fp16" and not on_gpu:
        log.warning("mixedPrecision fp16 is not supported on CPU; training in full precision (use bf16 on CPU)")
        return "no"
    if requested == "bf16" and not on_gpu and not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        log.warning("mixedPrecision bf16: this CPU has no native bf16 (avx512_bf16/amx_bf16), where emulated bf16 "
                    "is several times slower than full precision; training in full precision")
        return "no"
    return requested


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; a second run in one process (tests, notebooks) needs them cleared."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _is_better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Trainer:
    def __init__(self, cfg: TrainerConfig, rt: Runtime, *, progress: bool = False):
        self.cfg = cfg
        self.rt = rt
        self.spec = cfg.spec
        self.hp = cfg.spec.hyperparameters
        self.task = str(cfg.spec.task)
        self.job = rt.job_name or cfg.name
        self.namespace = rt.namespace or cfg.namespace
        self.output_dir = rt.output_dir or cfg.spec.output.path
        self.show_progress = progress
        self.es = Settings.from_spec(cfg.spec)
        self.term = TerminationFlag()

    # --- set-up ------------------------------------------------------------------------------------
    def _accelerator(self) -> Accelerator:
        on_gpu = torch.cuda.is_available()
        self.strategy = str(self.spec.distributed.strategy)
        self.deepspeed = self.strategy == "deepspeed"
        self.mixed_precision = resolve_mixed_precision(str(self.hp.mixed_precision or "no"), on_gpu)
        plugin = fsdp_plugin(self.mixed_precision) if self.strategy == "fsdp" else None
        accelerator = Accelerator(
            cpu=not on_gpu,  # without cpu=True, torchrun ranks on a CPU machine each train alone, silently
            mixed_precision="no" if self.deepspeed else self.mixed_precision,
            kwargs_handlers=process_group_kwargs(self.spec),
            fsdp_plugin=plugin,
        )
        if plugin is not None:
            enable_fsdp_on_cpu(accelerator, plugin)
        self.fsdp = plugin
        expected = self.rt.expected_world_size or self.rt.world_size or 1
        if accelerator.num_processes != expected or (self.rt.world_size or 1) != expected:
            raise WorldMismatch(
                f"job {self.job}: accelerate sees {accelerator.num_processes} processes, WORLD_SIZE is "
                f"{self.rt.world_size}, the job asks for {expected}; refusing to train a different configuration"
            )
        return accelerator

    def _data(self) -> None:
        """Read, split and tokenise (datasets' Arrow cache): rank 0 first, so the other ranks read its cache files
        instead of writing the same ones at once."""
        spec = self.spec
        self.tokenizer, self.model_source = load_tokenizer(spec)
        try:
            with self.accelerator.main_process_first():
                data = prepare(spec, self.tokenizer, pvc_mount=DATA_PVC_MOUNT if spec.dataset.pvc else None,
                               cache_dir=default_cache_dir(self.output_dir))
        except failures.DATA_ERRORS as err:
            # DatasetUnreadable (exit 5, the Job fails at once): the termination message names the source and why.
            field, source = failures.culprit(spec.dataset, err)
            raise failures.dataset_unreadable(err, field, source, self.job) from err
        self.labels = data.labels if self.task != "causal-lm" else []
        self.train_set, self.val_set, self.test_set = data.train, data.validation, data.test
        self.data_cached = data.cached
        self.paired = data.paired
        self.collate = Collator(self.tokenizer.pad_token_id or 0, self.task)

    def _loaders(self, per_device: int) -> None:
        seed = self.hp.seed or 0
        self.sampler = EpochSeededSampler(len(self.train_set), seed)
        # A private generator: creating a DataLoader iterator draws a base seed from the global torch RNG
        # otherwise, so a resumed run (one more iterator than the uninterrupted run at that point) got other
        # dropout masks from there on (issue 11: epoch-2 val_loss 0.8421 resumed vs 0.8400 uninterrupted).
        train = DataLoader(self.train_set, batch_size=per_device, sampler=self.sampler, collate_fn=self.collate,
                           generator=torch.Generator().manual_seed(seed))
        val = DataLoader(self.val_set, batch_size=max(per_device, 32), shuffle=False, collate_fn=self.collate)
        self.train_loader, self.val_loader = self.accelerator.prepare(train, val)
        self.test_loader = None
        if self.test_set is not None:
            test = DataLoader(self.test_set, batch_size=max(per_device, 32), shuffle=False, collate_fn=self.collate)
            self.test_loader = self.accelerator.prepare(test)

    # --- run -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.accelerator = acc = self._accelerator()
        self.is_main = acc.is_main_process
        configure_logging(self.job, acc.process_index)
        os.makedirs(self.output_dir, exist_ok=True)
        set_seed(self.hp.seed or 0)
        self.clock = StageClock.from_env()
        self.clock.mark("setup")
        self._data()
        self.clock.mark("data")
        loaded = load_model(self.spec, self.labels, self.tokenizer, self.model_source)
        model = loaded.model.to(acc.device)
        self.clock.mark("modelLoad")
        self.unwrapped_for_save = loaded.model
        self.memory = SimulatedMemory.from_env({**os.environ, "FINETUNE_FAULT_OOM_ABOVE": self.rt.fault_oom_above or ""},
                                               acc.process_index)
        optimizer = build_optimizer(model, self.hp, loaded.head_prefixes)
        max_norm = self.hp.max_grad_norm or 0.0
        if self.fsdp is not None:
            log.info("job %s: FSDP shards %s blocks", self.job, fsdp_wrap_blocks(self.fsdp, model) or "no")
        if self.deepspeed:
            # The engine first (a provisional micro batch; DeepSpeed only checks it against the accumulation and the
            # world size), so the probe runs through ZeRO at the training precision; the plan is set on it afterwards.
            config = deepspeed_config(micro_batch=self.hp.batch_size or 1, accumulation=self.hp.gradient_accumulation_steps or 1,
                                      max_grad_norm=max_norm, zero_stage=self.spec.distributed.zero_stage or 2,
                                      mixed_precision=self.mixed_precision)
            self.engine: Any = DeepSpeedEngine(acc, model, optimizer, None, config)
        else:
            self.engine = AccelerateEngine(acc, model, optimizer, None, max_norm)
        plan = self._plan(self.engine)  # on the prepared model, with its optimizer (issue 11)
        self.plan = plan
        set_seed(self.hp.seed or 0)  # probes consumed randomness; training starts from the seed either way
        self._loaders(plan.per_device)
        batches = len(self.train_loader)
        steps_per_epoch = max(1, batches // plan.accumulation if self.deepspeed else math.ceil(batches / plan.accumulation))
        self.total_steps = steps_per_epoch * self.hp.epochs
        scheduler = build_scheduler(optimizer, self.hp, self.total_steps)
        if self.deepspeed:
            self.engine.configure_batch(plan.per_device, plan.accumulation)
        else:
            acc.gradient_accumulation_steps = plan.accumulation
        self.engine.attach_scheduler(scheduler)
        # Mixup's draws: its state is checkpointed with the other RNGs, so a resumed run draws what it would have.
        self.mix_generator = torch.Generator().manual_seed((self.hp.seed or 0) + 7)
        self.progress = Progress()
        resumed = self._resume()
        self.metrics = TrainerMetrics(self.job, self.namespace)
        self.reporter: StatusReporter | None = None
        if self.is_main:
            self.metrics.stall_timeout.set(self.spec.watchdog.stall_timeout_seconds)  # before the first poll updates it
            if self.rt.metrics_port is not None:
                self.metrics.serve(self.rt.metrics_port)
            self.reporter = StatusReporter(self.job, self.namespace, enabled=self.rt.status_enabled,
                                           poll_seconds=self.rt.stop_poll_seconds, stop_file=self.rt.stop_file,
                                           kubeconfig=self.rt.kubeconfig, heartbeat_seconds=self.spec.watchdog.heartbeat_seconds,
                                           on_heartbeat=lambda t, _step: self.metrics.last_progress.set(t),
                                           on_job=self._follow_job).start()
            self.metrics.batch_size.set(plan.per_device)
            self.metrics.gradient_accumulation_steps.set(plan.accumulation)
            for stage, seconds in self.clock.seconds().items():
                self.metrics.stage(stage, seconds)
        log.info(
            "training %s on %d process(es): %d train / %d validation examples, batch %d x %d accumulation, %d steps, "
            "strategy %s, precision %s%s%s",
            self.task, acc.num_processes, len(self.train_set), len(self.val_set), plan.per_device, plan.accumulation,
            self.total_steps, self.strategy, self.mixed_precision,
            f", resumed from {resumed}" if resumed else "",
            f" (group restart {self.rt.restart_count} of this pod's agent)" if self.rt.restart_count else "",
        )
        self._report({"trainerPhase": "Training", "totalEpochs": self.hp.epochs, "batchSize": plan.per_device,
                      "gradientAccumulationSteps": plan.accumulation, "timings": self._timings(),
                      "resumedFrom": resumed,
                      "checkpointWarning": checkpoint_warning(self.skipped_checkpoints, resumed)})
        self.engine.model.train()  # from_pretrained returns eval mode: dropout would silently be off
        self.term.install()
        try:
            outcome = self._train_loop()
        finally:
            self.term.uninstall()
        return self._finish(outcome, resumed)

    def _follow_job(self, obj: dict[str, Any]) -> None:
        """The FineTuneJob as the reporter last read it: a stall timeout changed after start reaches the alert's gauge."""
        self.metrics.stall_timeout.set(stall_timeout_in(obj, self.spec.watchdog.stall_timeout_seconds))

    def _timings(self) -> dict[str, Any]:
        return {**self.clock.status(), "dataCached": self.data_cached}

    def _first_step(self) -> None:
        seconds = self.clock.mark("firstStep")
        if self.is_main:
            self.metrics.stage("firstStep", seconds)
            total = sum(self.clock.seconds().values())
            log.info("first optimizer step done %.1f s after the process started (setup %.1f s, data %.1f s%s, model "
                     "load %.1f s, first step %.1f s)", total, *(self.clock.seconds()[k] for k in ("setup", "data")),
                     ", tokenised cache" if self.data_cached else "", self.clock.seconds()["modelLoad"], seconds)
        self._report({"timings": self._timings()})

    def _plan(self, prober: Any) -> BatchPlan:
        """The batch plan: the resumed checkpoint's (read before any probe, so a restarted pod keeps the batch its
        checkpoint was made with), a smaller one left by an out-of-memory error, else a search on `prober`."""
        acc = self.accelerator
        found = ckpt.latest(self.output_dir)
        saved = BatchPlan.from_checkpoint(found[1]) if found else None
        override = self._read_override()
        if override is not None and (saved is None or override.per_device < saved.per_device):
            log.warning("job %s: training %d x %d accumulation steps, as the out-of-memory step-down of a previous pod "
                        "decided (%s)", self.job, override.per_device, override.accumulation, BATCH_PLAN_OVERRIDE)
            return override
        if saved is not None:
            log.info("job %s: keeping the batch plan of checkpoint %s: %d x %d accumulation steps",
                     self.job, found[0], saved.per_device, saved.accumulation)
            return saved
        probe = make_probe(prober, self.train_set, self.collate, self.task, self.hp, memory=self.memory)
        return plan_batch(self.hp, probe=probe, examples_per_rank=math.ceil(len(self.train_set) / acc.num_processes),
                          on_gpu=torch.cuda.is_available() or self.memory is not None, job=self.job,
                          headroom=self.spec.batch_search.headroom_fraction)

    def _read_override(self) -> BatchPlan | None:
        path = os.path.join(self.output_dir, BATCH_PLAN_OVERRIDE)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            return BatchPlan(int(d["batchSize"]), int(d["gradientAccumulationSteps"]), bool(d.get("automatic")),
                             True, source="stepped-down")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _resume(self) -> str | None:
        """Load the newest checkpoint that loads; a damaged one is skipped for the one before (on every rank alike)."""
        acc = self.accelerator
        skipped: list[dict[str, str]] = []
        candidates = ckpt.usable_checkpoints(self.output_dir, skipped)
        for path, state in candidates:
            ok = True
            try:
                self.engine.load_state(path)
                ckpt.load_rng(path, acc.process_index, {"mixup": self.mix_generator})
            except Exception as err:  # a torn or corrupt file: the previous checkpoint is still whole
                problem = f"{type(err).__name__}: {str(err)[:200]}"
                log.warning("job %s: checkpoint %s does not load (%s); trying the previous one", self.job, path, problem)
                skipped.append({"path": path, "problem": f"does not load ({problem})"})
                ok = False
            flag = torch.tensor([float(ok)], device=acc.device)
            if acc.num_processes > 1:
                flag = acc.reduce(flag, reduction="sum")
            if int(flag[0]) != acc.num_processes:
                if ok:
                    skipped.append({"path": path, "problem": "does not load on another rank"})
                continue
            self.skipped_checkpoints = skipped  # reported in status (checkpointWarning) and result.json
            self.progress = Progress.from_json(state)
            by_rank = state.get("partialLossSumByRank")
            if isinstance(by_rank, list) and len(by_rank) == acc.num_processes:
                self.progress.partial_loss_sum = float(by_rank[acc.process_index])
            self._align_to_plan(state)
            self.resumed_at_step = self.progress.global_step
            log.info("resuming from %s: %d epochs done, %d batches into the next, step %d",
                     path, self.progress.epochs_completed, self.progress.batch_in_epoch, self.progress.global_step)
            return path
        self.skipped_checkpoints = skipped
        if candidates:
            raise RuntimeError(f"job {self.job}: no checkpoint in {ckpt.checkpoints_dir(self.output_dir)} loads, and the "
                               "model may hold part of one; delete the checkpoints to start over")
        if skipped:  # every checkpoint is damaged: training starts over from the base model
            log.warning("job %s: no intact checkpoint (%d damaged); training from the start", self.job, len(skipped))
        return None

    def _align_to_plan(self, state: dict[str, Any]) -> None:
        """Count the batches already seen in this epoch in the current batch size (the checkpoint's may differ)."""
        p = self.progress
        saved = state.get("batchSize")
        examples = p.examples_in_epoch or (p.batch_in_epoch * saved if isinstance(saved, int) else 0)
        if not p.batch_in_epoch or saved == self.plan.per_device:
            return
        p.batch_in_epoch = examples // self.plan.per_device
        if examples % self.plan.per_device:
            log.warning("job %s: %d examples of this epoch seen in batches of %s; resuming at batch %d of %d",
                        self.job, examples, saved, p.batch_in_epoch, self.plan.per_device)

    def _report(self, patch: dict[str, Any]) -> None:
        if self.reporter is not None:
            self.reporter.report({**patch, "lastHeartbeatTime": now_rfc3339_micro()})

    # --- the loop ------------------------------------------------------------------------------------
    def _step_flags(self) -> tuple[bool, bool, bool]:
        """At a step boundary: (stop requested, SIGTERM, checkpoint due), the same on every rank.

        One all-reduce of three flags per step, what accelerate's set_trigger/check_trigger costs for one;
        the checkpoint clock is rank 0's, so every rank saves at the same step."""
        acc = self.accelerator
        local_stop = self.reporter is not None and self.reporter.stop_requested
        local_term = self.term.requested
        fault = self.rt_fault_sigterm_step
        if fault and self.progress.global_step == fault and not local_term:
            os.kill(os.getpid(), signal.SIGTERM)  # fault injection: goes through the real handler
            local_term = True
        due = (self.is_main and self.checkpoint_seconds > 0
               and time.monotonic() - self.last_checkpoint >= self.checkpoint_seconds)
        flags = torch.tensor([float(local_stop), float(local_term), float(due)], device=acc.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)

    def _tick(self) -> None:
        """Progress for the heartbeat (steps, evaluation batches, saves); rank 0 only, never blocks."""
        if self.reporter is not None:
            self.reporter.progress(self.progress.global_step)

    def _train_loop(self) -> str:
        self.rt_fault_sigterm_step = int(os.environ.get("FINETUNE_FAULT_SIGTERM_AT_STEP", "0") or 0)
        self.fault_hang_step = int(os.environ.get(FAULT_HANG_AT_STEP_ENV, "0") or 0)
        self.fault_oom_step = int(os.environ.get(FAULT_OOM_AT_STEP_ENV, "0") or 0)
        self.fault_slow_step = float(os.environ.get(FAULT_SLOW_STEP_ENV, "0") or 0)
        rank_fails = (os.environ.get(FAULT_RANK_FAILS_ENV) or "").partition(":")
        self.fault_rank_fails = (int(rank_fails[0]), int(rank_fails[2])) if rank_fails[2] else None
        self.fault_oom_batch: int | None = None  # the batch that stopped fitting at fault_oom_step
        step_log = os.environ.get(STEP_LOG_ENV) if self.is_main else None
        self.step_log = open(step_log, "a", buffering=1, encoding="utf-8") if step_log else None  # noqa: SIM115
        self.checkpoint_seconds = float(self.spec.checkpointing.interval_minutes) * 60.0
        self.last_checkpoint = time.monotonic()
        self.first_grad_norm: float | None = None
        self.samples_per_second = 0.0
        self.oom_recoveries = 0
        try:
            while True:
                try:
                    return self._epochs()
                except Exception as err:
                    if not is_out_of_memory(err):
                        raise
                    self._recover_from_oom(err)
        finally:
            if self.step_log is not None:
                self.step_log.close()

    def _recover_from_oom(self, err: BaseException) -> None:
        """Out of memory in a training step: step the batch down (keeping the effective batch through accumulation)
        and continue from the last checkpoint instead of failing the pod (which would run out of memory again)."""
        from accelerate.utils import release_memory

        p = self.progress
        self.engine.optimizer.zero_grad(set_to_none=True)
        release_memory()
        smaller = step_down(self.plan)
        if smaller is None:
            raise RuntimeError(f"job {self.job}: out of memory at batch size 1 (step {p.global_step + 1}): lower "
                               "dataset.maxLength, enable LoRA, or use a larger machine") from err
        log.warning("job %s: out of memory at step %d with batch %d x %d (%s); stepping down to %d x %d accumulation steps "
                    "(the same effective batch of %d)", self.job, p.global_step + 1, self.plan.per_device, self.plan.accumulation,
                    str(err).splitlines()[0][:160], smaller.per_device, smaller.accumulation, smaller.per_device * smaller.accumulation)
        ckpt.write_json_atomic(os.path.join(self.output_dir, BATCH_PLAN_OVERRIDE), smaller.as_dict())
        if self.deepspeed or self.accelerator.num_processes > 1 or ckpt.latest(self.output_dir) is None:
            # The other ranks are inside a collective (or DeepSpeed's micro batch is fixed at initialize, or there is
            # no checkpoint to go back to): leave; the restarted pod reads the override and resumes from the checkpoint.
            raise err
        self.oom_recoveries += 1
        self.plan = smaller
        self.accelerator.gradient_accumulation_steps = smaller.accumulation
        self._loaders(smaller.per_device)
        resumed = self._resume()
        if self.is_main:
            self.metrics.batch_size.set(smaller.per_device)
            self.metrics.gradient_accumulation_steps.set(smaller.accumulation)
        self._report({"batchSize": smaller.per_device, "gradientAccumulationSteps": smaller.accumulation})
        log.info("job %s: continuing from %s at step %d", self.job, resumed, self.progress.global_step)

    def _fault_oom(self, stepping: bool) -> None:
        pd = self.plan.per_device
        if self.memory is not None:
            self.memory.check(pd, optimizer_step=stepping)
        if self.fault_oom_step and self.progress.global_step + 1 >= self.fault_oom_step:
            if self.fault_oom_batch is None:
                self.fault_oom_batch = pd
            if pd >= self.fault_oom_batch:
                raise simulated_oom(pd, pd, self.fault_oom_batch - 1, f"step {self.progress.global_step + 1}")

    def _hang(self) -> None:
        log.warning("fault injection: step %d hangs (%s) until SIGTERM", self.progress.global_step + 1, FAULT_HANG_AT_STEP_ENV)
        while not self.term.requested:
            time.sleep(0.05)

    def _epochs(self) -> str:
        acc, engine, hp, p = self.accelerator, self.engine, self.hp, self.progress
        crash_after = int(os.environ.get("FINETUNE_FAULT_EXIT_AFTER_EPOCH", "0") or 0)
        generator = self.mix_generator
        if p.epochs_completed and not p.batch_in_epoch and self._early_stop() is not None:
            return "early_stopped"  # resumed after the decision was taken (the pod was replaced before it exited)
        while p.epochs_completed < hp.epochs:
            epoch = p.epochs_completed + 1
            self.train_loader.set_epoch(epoch)
            loader = self.train_loader
            skip = p.batch_in_epoch
            if skip:
                loader = skip_first_batches(self.train_loader, skip)
                loader.set_epoch(epoch)
            loss_sum = torch.zeros((), dtype=torch.float64)
            loss_sum += p.partial_loss_sum
            seen = p.partial_batches
            bar = self._bar(epoch, len(self.train_loader), skip)
            rows = 0
            start = time.perf_counter()
            batch_index = skip
            for batch in loader:
                if self.fault_hang_step and p.global_step == self.fault_hang_step:
                    self._hang()
                if self.fault_rank_fails == (acc.process_index, p.global_step):
                    raise RuntimeError(f"fault injection ({FAULT_RANK_FAILS_ENV}): rank {acc.process_index} fails "
                                       f"at step {p.global_step}")
                with engine.accumulate():
                    self._fault_oom(stepping=False)
                    with engine.autocast():
                        loss, _ = forward(engine.model, batch, self.task, hp, train=True, generator=generator)
                    engine.backward(loss)
                    if self.first_grad_norm is None and engine.sync_gradients and not self.deepspeed:
                        self.first_grad_norm = engine.grad_norm()
                    if engine.sync_gradients:
                        self._fault_oom(stepping=True)
                    stepped = engine.step()
                loss_sum += loss.detach().double()
                seen += 1
                batch_index += 1
                rows += batch["input_ids"].shape[0]
                if not stepped:
                    continue
                if self.fault_slow_step:
                    time.sleep(self.fault_slow_step)
                p.global_step += 1
                self._tick()
                if not self.clock.has("firstStep"):
                    self._first_step()
                if self.step_log is not None:
                    self.step_log.write(f"{p.global_step}\n")
                if self.is_main and p.global_step % GAUGE_EVERY_STEPS == 0:
                    rate = rows * acc.num_processes / max(time.perf_counter() - start, 1e-9)
                    m = self.metrics
                    m.step.set(p.global_step)
                    m.train_loss.set(float(loss_sum) / max(seen, 1))
                    m.learning_rate.set(engine.learning_rate())
                    m.samples_per_second.set(rate)
                if bar is not None:
                    bar.update(batch_index - bar.n)
                    if p.global_step % 5 == 0:
                        rate = rows * acc.num_processes / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", samples_s=f"{rate:.1f}", refresh=False)
                stop, term, due = self._step_flags()
                due = due and batch_index < len(self.train_loader)  # the epoch's own checkpoint follows at once
                if term or due:
                    p.batch_in_epoch, p.partial_loss_sum, p.partial_batches = batch_index, float(loss_sum), seen
                    p.examples_in_epoch = batch_index * self.plan.per_device
                    self._save_checkpoint(epoch, batch_index)
                    p.batch_in_epoch, p.partial_loss_sum, p.partial_batches, p.examples_in_epoch = 0, 0.0, 0, 0
                if term:
                    if bar is not None:
                        bar.close()
                    return "preempted"
                if stop:
                    if bar is not None:
                        bar.close()
                    self.stop_reason = self.reporter.stop_reason if self.reporter is not None else "stop requested"
                    return "stopped"
            elapsed = time.perf_counter() - start
            if bar is not None:
                bar.close()
            self.samples_per_second = rows * acc.num_processes / max(elapsed, 1e-9)
            train_loss = float(acc.reduce(torch.tensor([float(loss_sum) / max(seen, 1)], device=acc.device), reduction="mean")[0])
            decision = self._end_epoch(epoch, train_loss)
            if crash_after and epoch == crash_after:
                log.warning("fault injection: exiting abruptly after epoch %d", epoch)
                os._exit(137)
            if decision is not None:
                return "early_stopped"
        return "completed"

    def _bar(self, epoch: int, total: int, initial: int) -> Any:
        if not (self.show_progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{self.hp.epochs}", unit="batch", mininterval=0.5, leave=True)

    def _end_epoch(self, epoch: int, train_loss: float) -> Any:
        """Evaluate, keep the best model, checkpoint, and apply the early-stopping policy here, where the metric is
        computed: the decision goes into the same status patch as the epoch's results (issue 11)."""
        p = self.progress
        metrics = evaluate(self.engine, self.val_loader, self.task, self.hp, num_labels=len(self.labels), paired=self.paired,
                           on_batch=self._tick)
        metrics["train_loss"] = train_loss
        es_metric = str(self.spec.early_stopping.metric)
        metric_name = es_metric if es_metric not in LOSS_METRICS else MAIN_METRIC[self.task]
        point = {"epoch": epoch, "trainLoss": train_loss, "valLoss": metrics["val_loss"], "valMetric": metrics[metric_name],
                 "learningRate": self.engine.learning_rate(), "time": now_rfc3339(), "samplesPerSecond": self.samples_per_second}
        point.update({k: v for k, v in metrics.items() if k not in ("val_loss", "train_loss")})
        p.history = (p.history + [point])[-HISTORY_LIMIT:]
        value = metric_value(point, es_metric)
        improved = value is not None and math.isfinite(value) and _is_better(value, p.best_metric, self.es.mode, self.es.min_delta)
        if improved:
            p.best_epoch, p.best_metric = epoch, value
            self._save_best()
        p.epochs_completed, p.batch_in_epoch, p.partial_loss_sum, p.partial_batches, p.examples_in_epoch = epoch, 0, 0.0, 0, 0
        self._save_checkpoint(epoch, None)
        log.info("epoch %d/%d: train_loss %.4f val_loss %.4f %s %.4f lr %.3g %.1f samples/s%s", epoch, self.hp.epochs, train_loss,
                 metrics["val_loss"], metric_name, metrics[metric_name], point["learningRate"], self.samples_per_second,
                 " (best)" if improved else "")
        m = self.metrics
        if self.is_main:
            m.epoch.set(epoch)
            m.step.set(p.global_step)
            m.train_loss.set(train_loss)
            m.val_loss.set(metrics["val_loss"])
            m.val_metric(metric_name, metrics[metric_name])
            m.learning_rate.set(point["learningRate"])
            m.samples_per_second.set(self.samples_per_second)
            if p.best_metric is not None:
                m.best_metric.set(p.best_metric)
        decision = self._early_stop()
        patch = {
            "epoch": epoch, "step": p.global_step, "trainLoss": train_loss, "valLoss": metrics["val_loss"],
            "valMetric": metrics[metric_name], "valMetricName": metric_name, "learningRate": point["learningRate"],
            "samplesPerSecond": self.samples_per_second, "bestEpoch": p.best_epoch, "bestMetric": p.best_metric,
            "history": [{k: h[k] for k in ("epoch", "trainLoss", "valLoss", "valMetric", "learningRate", "time")} for h in p.history],
        }
        if decision is not None:
            patch.update({"trainerStopTime": now_rfc3339(), "trainerStopReason": decision.reason,
                          "trainerStopMessage": decision.message, "trainerStopEpoch": epoch})
        self._report(patch)
        return decision

    def _early_stop(self) -> Any:
        """The shared policy (finetune_contract.early_stopping) on this trainer's history, decided on rank 0 and
        followed by every rank. The operator applies the same function to the same history in status, so both
        sides reach one decision at one epoch; the trainer acts on it at once, before starting another epoch."""
        decision = decide(self.progress.history, self.es) if self.is_main else None
        flag = torch.tensor([float(decision is not None and decision.stop)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag[0] > 0:
            decision = decision or decide(self.progress.history, self.es)
            log.info("early stopping: %s", decision.message)
            self.stop_reason = decision.message
            return decision
        return None

    def _save_best(self) -> None:
        state = self.engine.full_state_dict()  # every rank takes part (ZeRO-3 gathers)
        if self.is_main:
            path = os.path.join(self.output_dir, "best")
            with failures.saving(path, "the best model", self.job):
                save_model(self.engine.unwrapped(), self.tokenizer, path, state_dict=state)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, epoch: int, batch: int | None) -> None:
        """Every rank writes into a temporary directory; rank 0 renames it once all are done (checkpoints.py)."""
        acc = self.accelerator
        final = ckpt.epoch_dir(self.output_dir, epoch, batch)
        tmp = ckpt.tmp_dir(final)
        self._tick()
        if self.is_main:
            with failures.saving(final, "a checkpoint", self.job):
                ckpt.prepare(final)
        acc.wait_for_everyone()
        with failures.saving(tmp, "a checkpoint", self.job):
            self.engine.save_state(tmp)
            ckpt.save_rng(tmp, acc.process_index, {"mixup": self.mix_generator})
        acc.wait_for_everyone()  # a rank must not read (or rename) a half-written checkpoint
        # Each rank's running loss of the interrupted epoch is its own (its shard of the data): keep them all, so a
        # group restart resumes every rank's epoch mean exactly (rank 0's alone made epoch 1's train loss of a
        # restarted 2-rank job differ by 1.8e-3; tests/e2e/test_group_restart_e2e.py).
        partial = torch.tensor([self.progress.partial_loss_sum], device=acc.device, dtype=torch.float64)
        partial_by_rank = acc.gather(partial).tolist() if acc.num_processes > 1 else [self.progress.partial_loss_sum]
        if self.is_main:
            state = self.progress.to_json()
            state["partialLossSumByRank"] = partial_by_rank
            state.update(batchSize=self.plan.per_device, gradientAccumulationSteps=self.plan.accumulation,
                         batchAutomatic=self.plan.automatic, worldSize=acc.num_processes, samplerSeed=self.sampler.seed)
            with failures.saving(tmp, "a checkpoint", self.job):
                failures.inject_disk_full(os.path.join(tmp, ckpt.STATE_FILE))
                ckpt.commit(tmp, final, state)
            ckpt.prune(self.output_dir, self.spec.output.keep_checkpoints)
            if getattr(self, "step_log", None) is not None:
                self.step_log.write(f"checkpoint {self.progress.global_step} {'epoch' if batch is None else 'mid'}\n")
        acc.wait_for_everyone()
        self.last_checkpoint = time.monotonic()
        self._tick()

    def _test(self, outcome: str) -> dict[str, Any] | None:
        """The best checkpoint, evaluated once on the held-out test split (dataset.testSource / testFraction)."""
        if self.test_loader is None or outcome == "preempted":
            return None
        p = self.progress
        engine: Any = self.engine
        # The weights in memory are the best ones only right after the best epoch's end; otherwise read best/.
        if not (p.best_epoch is not None and p.best_epoch == p.epochs_completed and outcome in ("completed", "early_stopped")):
            engine = _BestModel(self.accelerator, self._load_best(), self.engine)
        metrics = evaluate(engine, self.test_loader, self.task, self.hp, num_labels=len(self.labels), paired=self.paired,
                           on_batch=self._tick)
        test = {"test_" + k.removeprefix("val_"): v for k, v in metrics.items()}
        if self.is_main:
            for name, value in test.items():
                self.metrics.test_metric(name, value)
            log.info("test (best checkpoint, epoch %s, %d examples): %s", p.best_epoch, len(self.test_set),
                     " ".join(f"{k} {v:.4f}" for k, v in test.items()))
        return {"metrics": test, "examples": len(self.test_set), "epoch": p.best_epoch}

    def _load_best(self) -> Any:
        """best/ as saved (a LoRA run's merged model), loaded like the base model, for evaluation only."""
        import copy

        best_spec = self.spec.model_copy(update={"model": self.spec.model.model_copy(
            update={"name": os.path.join(self.output_dir, "best"), "pvc": None, "revision": None}),
            "lora": self.spec.lora.model_copy(update={"enabled": False})})
        path = os.path.join(self.output_dir, "best")
        model = load_model(copy.deepcopy(best_spec), self.labels, self.tokenizer, path).model
        return model.to(self.accelerator.device).eval()

    def _finish(self, outcome: str, resumed: str | None) -> dict[str, Any]:
        acc, p = self.accelerator, self.progress
        if outcome == "stopped" and p.best_epoch is None:
            # Stopped before any epoch ended: the current weights are all there is; keep them as the model.
            self._save_best()
        test = self._test(outcome)
        step = torch.tensor([p.global_step], device=acc.device)
        rank_steps = acc.gather(step).tolist() if acc.num_processes > 1 else [p.global_step]
        checksum = torch.tensor([self.engine.param_checksum()], device=acc.device, dtype=torch.float64)
        checksums = acc.gather(checksum).tolist() if acc.num_processes > 1 else [float(checksum[0])]
        gn = torch.tensor([self.first_grad_norm or 0.0], device=acc.device, dtype=torch.float64)
        grad_norms = acc.gather(gn).tolist() if acc.num_processes > 1 else [float(gn[0])]
        es_metric = str(self.spec.early_stopping.metric)
        result = {
            "outcome": outcome, "epochsRun": p.epochs_completed, "totalEpochs": self.hp.epochs, "bestEpoch": p.best_epoch,
            "bestMetric": p.best_metric, "metric": es_metric, "mainMetric": MAIN_METRIC[self.task], "history": p.history,
            "batchSize": self.plan.per_device, "gradientAccumulationSteps": self.plan.accumulation, "batchPlan": self.plan.as_dict(),
            "globalStep": p.global_step, "totalSteps": self.total_steps, "worldSize": acc.num_processes,
            "strategy": self.strategy, "rankSharding": self._rank_sharding(),
            "zeroStage": self.engine.effective_zero_stage() if self.deepspeed else None, "mixedPrecision": self.mixed_precision,
            "samplesPerSecond": self.samples_per_second, "resumedFrom": resumed, "rankSteps": rank_steps,
            "rankParamChecksums": checksums, "rankFirstGradNorms": grad_norms,
            "stopReason": getattr(self, "stop_reason", None), "modelPath": os.path.join(self.output_dir, "best"),
            "resumedAtStep": getattr(self, "resumed_at_step", None), "oomRecoveries": getattr(self, "oom_recoveries", 0),
            "skippedCheckpoints": getattr(self, "skipped_checkpoints", []),
            "test": test, "timings": self._timings(),
            "elasticRestarts": self.rt.restart_count,
        }
        if outcome == "preempted":
            self._report({"trainerPhase": "Preempted", "step": p.global_step})
        else:
            final: dict[str, Any] = {"trainerPhase": "Finished", "step": p.global_step}
            if test is not None:
                final.update(testMetrics=test["metrics"], testExamples=test["examples"], testEpoch=test["epoch"])
            self._report(final)
            if outcome in ("early_stopped", "stopped") and self.is_main:
                self.metrics.early_stops.inc()
            if self.is_main:
                with failures.saving(self.output_dir, "result.json", self.job):
                    ckpt.write_json_atomic(os.path.join(self.output_dir, "result.json"), result)
                upload_results(self.spec.output, self.output_dir, self.job)  # spec.output.uri, if set
        if self.reporter is not None:
            self.reporter.close()
        acc.wait_for_everyone()
        best = f"{p.best_metric:.4f}" if isinstance(p.best_metric, float) else p.best_metric
        log.info("%s after %d epochs (step %d); best %s=%s at epoch %s", outcome, p.epochs_completed, p.global_step,
                 es_metric, best, p.best_epoch)
        return result


    def _rank_sharding(self) -> list[dict[str, int]] | None:
        """Parameter elements each rank holds (FSDP: a shard each); None for the other strategies."""
        if self.strategy != "fsdp":
            return None
        acc = self.accelerator
        mine = self.engine.sharding()
        t = torch.tensor([mine["local"], mine["total"]], device=acc.device)
        rows = acc.gather(t.unsqueeze(0)).tolist() if acc.num_processes > 1 else [t.tolist()]
        return [{"local": int(a), "total": int(b)} for a, b in rows]


class _BestModel:
    """The evaluation's view of an engine whose model is the reloaded best checkpoint."""

    def __init__(self, accelerator: Accelerator, model: Any, engine: Any):
        self.accelerator, self.model, self._engine = accelerator, model, engine

    def autocast(self) -> Any:
        return self._engine.autocast()


def train(cfg: TrainerConfig, rt: Runtime, *, progress: bool = False) -> dict[str, Any]:
    """Run one training process to its end; returns the result (rank 0 also writes result.json)."""
    return Trainer(cfg, rt, progress=progress).run()


def main() -> int:
    rt = Runtime.from_env()
    cfg = TrainerConfig.load(rt.config_path)
    progress = os.environ.get("FINETUNE_PROGRESS", "0") == "1"
    trainer = None
    try:
        trainer = Trainer(cfg, rt, progress=progress)
        result = trainer.run()
        if result["outcome"] != "preempted" and getattr(trainer, "metrics", None) is not None:
            trainer.metrics.linger(float(os.environ.get("FINETUNE_METRICS_LINGER_SECONDS") or 60))
    except WorldMismatch as err:
        print(json.dumps({"level": "error", "message": str(err)}), file=sys.stderr)
        return 2
    except failures.FatalError as err:
        # No traceback: the message names the path, the reason and the fix; the exit code fails the Job at once.
        print(json.dumps({"level": "error", "reason": err.reason, "message": str(err)}), file=sys.stderr)
        failures.write_termination_message(err)
        if trainer is not None and getattr(trainer, "reporter", None) is not None:
            trainer.reporter.close()
        return err.exit_code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return EXIT_PREEMPTED if result["outcome"] == "preempted" else 0


def exit_process(code: int) -> None:
    """Leave without interpreter finalization. Everything is written and the process group destroyed by
    now, but gloo's worker threads can still hold tensors whose release during finalization aborts the
    process ("terminate called without an active exception", seen once in ~20 two-process runs here;
    pytorch/pytorch#179291 describes the mechanism). An abort would turn a finished run into a failed pod."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # Under torchrun, an uncaught exception is written to the agent's error file (TORCHELASTIC_ERROR_FILE), which
    # the launcher (__main__.run_torchrun) puts, with the rank, into the pod's termination message.
    exit_process(record(main)())
