"""Export a LoRA-trained model: the adapter (peft) plus a merged full model (transformers).

best/ must be directly usable as "the final model" (contracts.md) whatever the task, so for LoRA runs
it holds the base model with the adapters merged in (`W + B @ A * scaling`), loadable with plain
transformers; the adapter alone goes to best/adapter/ (small; loads with peft onto the base model).

peft's own `merge_and_unload()` mutates the live model, and merging then unmerging would leave
float round-off in the weights still being trained (and only on the rank that saves, so DDP ranks
would drift apart). The merge here is computed from a state dict instead, which also works for
DeepSpeed ZeRO-3, whose live parameters are partitioned but whose consolidated state dict is whole.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

ADAPTER_DIR = "adapter"
_PEFT_PREFIX = "base_model.model."


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_state_dict(peft_model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict (its own key names) with every LoRA adapter folded into its weight.

    `state_dict` has the peft model's key names (`base_model.model.<module>.base_layer.weight`,
    `...lora_A.default.weight`, `...modules_to_save.default.weight`). Raises when a LoRA variant this
    does not know how to fold (embedding or DoRA adapters) is present, rather than saving it unmerged.
    """
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    sd = dict(state_dict)
    merged: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        weight_key, a_key, b_key = f"{name}.base_layer.weight", f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
        weight, a, b = sd.pop(weight_key), sd.pop(a_key), sd.pop(b_key)
        delta = (b.float() @ a.float()) * module.scaling[adapter]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T  # GPT-2's Conv1D stores weights as (in, out)
        merged[_base_key(weight_key.replace(".base_layer.", "."))] = (weight.float() + delta).to(weight.dtype)
    for key, value in sd.items():
        if ".original_module." in key:
            continue  # the frozen copy of a fully trained module (the head); its trained copy is kept below
        if ".lora_" in key:
            raise ValueError(f"cannot merge LoRA weight {key}: only linear LoRA adapters are supported")
        key = key.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        merged[_base_key(key)] = value
    return merged


def _base_key(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def save_lora(peft_model: Any, path: str, state_dict: dict[str, torch.Tensor] | None) -> None:
    """best/adapter/ (peft) and best/ (merged, transformers)."""
    sd = state_dict if state_dict is not None else peft_model.state_dict()
    peft_model.save_pretrained(os.path.join(path, ADAPTER_DIR), state_dict=sd, safe_serialization=True)
    base: nn.Module = peft_model.get_base_model()
    base.save_pretrained(path, state_dict=merged_state_dict(peft_model, sd), safe_serialization=True)
