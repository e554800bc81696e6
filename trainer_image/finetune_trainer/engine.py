"""Two ways to run the optimizer, one interface for the loop: accelerate (DDP or one process) and DeepSpeed ZeRO.

accelerate's DeepSpeed plugin does not work on CPU (with `cpu=True` it silently runs plain DDP), so
the DeepSpeed engine calls `deepspeed.initialize` itself with our torch optimizer and scheduler; the
same code runs on GPUs. Data loaders, triggers and gathering stay accelerate's in both cases.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor

_DS_TAG = "deepspeed"


class AccelerateEngine:
    """Plain accelerate: DDP across processes, autocast for mixed precision, `save_state` checkpoints."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any | None, max_grad_norm: float):
        self.accelerator = accelerator
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = None
        self.max_grad_norm = max_grad_norm
        if scheduler is not None:
            self.attach_scheduler(scheduler)

    def attach_scheduler(self, scheduler: Any) -> None:
        """The schedule needs the step count, which needs the batch size, which the probe finds on the prepared
        model: so it comes after `prepare`. Not prepared: accelerate would step it once per process per step."""
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(scheduler)

    def probe_step(self, loss_fn: Any, before_step: Any | None = None, before_forward: Any | None = None) -> None:
        """One real training step that leaves no trace (the batch-size probe).

        Forward and backward through the prepared model (DDP wrapper, autocast at the training precision), then
        a real optimizer step, which allocates the optimizer state (AdamW's two moments: often more memory than
        the weights), with every learning rate at 0: SGD, Adam and AdamW scale both the update and the decoupled
        weight decay by the learning rate, so the weights do not move. Then the gradients and the optimizer state
        are dropped, so training starts as if no probe had run. `no_sync`: no gradient all-reduce, so a rank
        that runs out of memory cannot leave the others waiting in a collective; the ranks agree afterwards.
        """
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        lrs = [g["lr"] for g in inner.param_groups]
        try:
            if before_forward is not None:
                before_forward()
            with self.accelerator.no_sync(self.model):
                with self.autocast():
                    loss = loss_fn(self.model)
                self.accelerator.backward(loss)
            if before_step is not None:
                before_step()
            for g in inner.param_groups:
                g["lr"] = 0.0
            inner.step()
        finally:
            for g, lr in zip(inner.param_groups, lrs, strict=True):
                g["lr"] = lr
            inner.state.clear()
            self.model.zero_grad(set_to_none=True)

    def accumulate(self) -> contextlib.AbstractContextManager:
        return self.accelerator.accumulate(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def grad_norm(self) -> float:
        """Global norm of this rank's current gradients (diagnostics; call only on a boundary). Under FSDP each
        rank holds a shard of every gradient: the norm of the whole one is gathered (every rank must call it)."""
        grads = [_full(p.grad.detach()).float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def step(self) -> bool:
        """Clip, step and zero on an accumulation boundary; returns whether an optimizer step happened."""
        if not self.accelerator.sync_gradients:
            return False
        if self.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, path: str) -> None:
        self.accelerator.save_state(path)

    def load_state(self, path: str) -> None:
        self.accelerator.load_state(path)

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def full_state_dict(self) -> dict[str, Any]:
        """The whole model's weights (every rank must call it).

        FSDP2: torch's own gather into full tensors on CPU (rank 0 receives them); accelerate's get_state_dict
        returned the DTensor shards there when FSDP runs on CPU (enable_fsdp_on_cpu)."""
        if any(isinstance(p, DTensor) for p in self.model.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.accelerator.get_state_dict(self.model)

    def param_checksum(self) -> float:
        """Sum of every parameter (diagnostics: equal on all ranks when they hold the same model; under FSDP the
        shards are gathered first, so every rank must call it)."""
        return _checksum(_full(p) for p in self.unwrapped().parameters())

    def sharding(self) -> dict[str, int]:
        """Parameter elements this rank holds against the model's total (FSDP: about total / world size)."""
        params = list(self.unwrapped().parameters())
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        return {"local": int(local), "total": int(sum(p.numel() for p in params))}


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; gathering is a collective), else the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _checksum(params: Any) -> float:
    return sum(float(p.detach().double().sum()) for p in params)


def fsdp_plugin(mixed_precision: str) -> Any:
    """accelerate's FSDP plugin, FSDP2 (torch's fully_shard): each transformer block its own shard unit (the
    model's `_no_split_modules`, as transformers declares them, read by accelerate at `prepare`), weights
    resharded after the forward, and a full (unsharded) state dict for the best model, which then loads with
    plain transformers."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    if mixed_precision != "no":
        # What accelerate does for GPUs itself; on CPU (enable_fsdp_on_cpu) it never gets there.
        plugin.set_mixed_precision(mixed_precision)
    return plugin


def fsdp_wrap_blocks(plugin: Any, model: nn.Module) -> list[str]:
    """The block classes FSDP shards as units: the model's `_no_split_modules`, less any that holds the input
    embeddings. accelerate shards the input embeddings on their own after the blocks, and a module sharded twice
    fails (`Invariant encountered: value was None`, seen with BERT, whose `BertEmbeddings` is a no-split module)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holding = {type(m).__name__ for m in model.modules()
               if type(m).__name__ in names and embeddings is not None and any(x is embeddings for x in m.modules())}
    plugin.transformer_cls_names_to_wrap = [n for n in names if n not in holding]
    return plugin.transformer_cls_names_to_wrap


def enable_fsdp_on_cpu(accelerator: Accelerator, plugin: Any) -> None:
    """accelerate applies the FSDP plugin only to GPU-like distributed types: with `cpu=True` it silently runs
    plain DDP (MULTI_CPU), as its DeepSpeed plugin does. torch's fully_shard itself works on CPU with gloo, so the
    state is switched to FSDP here, before anything is prepared; on GPUs accelerate has done so already."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        # Both singletons: every later AcceleratorState() copies PartialState's attributes over its own, and
        # save_state then took the non-FSDP path with the DTensor shards.
        PartialState().distributed_type = DistributedType.FSDP
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin


def deepspeed_config(*, micro_batch: int, accumulation: int, max_grad_norm: float, zero_stage: int, mixed_precision: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        # Our AdamW/SGD is a plain torch optimizer: allowed with ZeRO once declared.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if max_grad_norm > 0:
        config["gradient_clipping"] = max_grad_norm
    return config


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1-3 through `deepspeed.initialize` with a client torch optimizer (works on CPU with gloo).

    Built before the batch size is known (the probe runs on this engine, issue 11): the micro batch and the
    accumulation are set afterwards with `configure_batch`, and the schedule (which needs the step count)
    with `attach_scheduler`."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any | None, config: dict[str, Any]):
        # The first DeepSpeed run compiles its shm communication op; keep the build cache between runs.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
        import deepspeed

        self.accelerator = accelerator
        self.zero_stage = config["zero_optimization"]["stage"]
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)  # reuses the process group accelerate created
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self._boundary = True

    def configure_batch(self, micro_batch: int, accumulation: int) -> None:
        """The batch plan the probe chose (DeepSpeed's own setters: the micro batch, then the accumulation)."""
        engine = self.model
        engine.set_train_micro_batch_size(micro_batch)
        engine.set_train_batch_size(micro_batch * accumulation * engine.dp_world_size)

    def attach_scheduler(self, scheduler: Any) -> None:
        """DeepSpeed steps `lr_scheduler` on each boundary and saves/loads it with its checkpoints; the schedule is
        built on the client optimizer, whose param groups the ZeRO optimizer steps (it wraps, not copies, them)."""
        self.model.lr_scheduler = self.scheduler = scheduler

    def probe_step(self, loss_fn: Any, before_step: Any | None = None, before_forward: Any | None = None) -> None:
        """One real training step through the ZeRO engine that leaves no trace (the batch-size probe).

        Forward, backward (ZeRO's gradient partitioning and reduction, the bf16/fp16 casts of the training
        precision) and a real optimizer step with every learning rate at 0 (it allocates AdamW's moments on this
        rank's partition; the fp32 master weights and the bf16 copies do not move), then the optimizer state, the
        gradients and the engine's step counters are put back, so training starts as if no probe had run.

        ZeRO runs collectives inside these phases, so a rank must not leave the others waiting in one: every phase
        ends with an all-reduce of "did it fit here", and when any rank ran out of memory every rank raises it, so
        all ranks probe the same sizes in the same order and the search ends alike everywhere.
        """
        engine = self.model
        basic = engine.basic_optimizer
        lrs = [g["lr"] for g in basic.param_groups]
        counters = (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps)
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        scaler_state = dict(vars(scaler)) if scaler is not None else None  # fp16's dynamic scale (GPU only)
        engine.set_gradient_accumulation_boundary(True)  # one micro batch is a whole step
        loss: list[torch.Tensor] = []
        try:
            self._agreed(before_forward)
            self._agreed(lambda: loss.append(loss_fn(engine)))
            self._agreed(lambda: engine.backward(loss[0]))
            self._agreed(before_step)
            for g in basic.param_groups:
                g["lr"] = 0.0
            self._agreed(engine.step)
        finally:
            loss.clear()
            for g, lr in zip(basic.param_groups, lrs, strict=True):
                g["lr"] = lr
            basic.state.clear()  # AdamW allocates it lazily at the first step: empty is the state before any step
            if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
                engine.optimizer._hp_optimizer_states_linked = False  # relinked to the new state at the first step
            engine.optimizer.zero_grad(set_to_none=True)
            engine.zero_grad()
            engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps = counters
            if scaler_state is not None:
                vars(scaler).update(scaler_state)
            engine._is_gradient_accumulation_boundary = None  # back to DeepSpeed's own micro-step count

    def _agreed(self, phase: Any | None) -> None:
        """Run one probe phase on every rank, then agree on its outcome (see probe_step)."""
        from .batch_size import is_out_of_memory

        error: BaseException | None = None
        if phase is not None:
            try:
                phase()
            except Exception as err:  # judged below, after the ranks have agreed
                error = err
        world = self.accelerator.num_processes
        if world == 1:
            if error is not None:
                raise error
            return
        oom = error is not None and is_out_of_memory(error)
        flags = torch.tensor([float(oom), float(error is not None and not oom)], device=self.accelerator.device)
        torch.distributed.all_reduce(flags)
        if error is not None and not oom:
            raise error
        if flags[1] > 0:
            raise RuntimeError("another rank failed in the batch-size probe (its log names the error)")
        if error is not None:
            raise error
        if flags[0] > 0:
            raise torch.OutOfMemoryError(
                "CUDA out of memory on another rank in the batch-size probe (every rank steps down together)")

    def accumulate(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed casts the model itself (bf16/fp16 sections)

    @property
    def sync_gradients(self) -> bool:
        return self.model.is_gradient_accumulation_boundary()

    def backward(self, loss: torch.Tensor) -> None:
        self._boundary = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)

    def grad_norm(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def step(self) -> bool:
        self.model.step()  # steps optimizer and scheduler on the boundary only
        return self._boundary

    def learning_rate(self) -> float:
        return float(self.model.get_lr()[0])

    def save_state(self, path: str) -> None:
        self.model.save_checkpoint(path, tag=_DS_TAG)

    def load_state(self, path: str) -> None:
        self.model.load_checkpoint(path, tag=_DS_TAG)

    def unwrapped(self) -> nn.Module:
        return self.model.module

    def effective_zero_stage(self) -> int:
        """The stage DeepSpeed itself runs (read back from the engine, not from our config)."""
        return int(self.model.zero_optimization_stage())

    def param_checksum(self) -> float:
        """Sum of every parameter; under ZeRO-3 each rank holds a shard, so gather them first (every rank must call it)."""
        params = list(self.model.module.parameters())
        if self.zero_stage != 3:
            return _checksum(params)
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return _checksum(params)

    def full_state_dict(self) -> dict[str, Any]:
        if self.zero_stage == 3:
            # Parameters are partitioned across ranks: gather them (every rank must take part).
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.model.module.state_dict()
