"""Optimizer construction: parameter groups (weight decay, head multiplier, layer-wise decay) and the optimizer.

The training loop calls `head_prefixes_for(model, missing_keys)` once after loading the model, then
`build_optimizer(model, hp, head_prefixes)`. Every group carries a readable "name" so logs and tests can
show which learning rate and weight decay each part of the model got.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# `encoder.layer.3.` (BERT), `layers.3.` (Llama, Mistral), `h.3.` (GPT-2), `block.3.` (T5), `transformer.layer.3.`
# (DistilBERT): the number after one of these names is the transformer layer's index.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
# Token/position embeddings: `embeddings.` (BERT), `embed_tokens` (Llama), `wte`/`wpe` (GPT-2), `shared` (T5).
_EMBEDDING = re.compile(r"(?:^|\.)(?:embeddings?|embed_tokens|embed_positions|wte|wpe|shared)(?:\.|$)")

# torch's own norm layers; transformers' RMSNorm classes (LlamaRMSNorm, T5LayerNorm, ...) are not torch
# subclasses, so a class name ending in "Norm" also counts.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith(("norm", "layernorm"))


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that must not be decayed: every 1-D tensor (biases, norm scales) and all norm-layer weights."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param.ndim <= 1 or _is_norm(module):
                names.add(full)
    return names


def _matches_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """True when a prefix's dotted components appear contiguously in `name`.

    Matching anywhere (not only at the start) keeps head detection working through wrappers that
    rename parameters, e.g. peft's `base_model.model.classifier.modules_to_save.default.weight`.
    """
    parts = name.split(".")
    for prefix in prefixes:
        wanted = prefix.split(".")
        n = len(wanted)
        if any(parts[i : i + n] == wanted for i in range(len(parts) - n + 1)):
            return True
    return False


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _section(name: str, head_prefixes: tuple[str, ...]) -> tuple[str, int | None]:
    """("head", None) | ("layer", i) | ("embeddings", None) | ("body", None) for one parameter name."""
    if _matches_prefix(name, head_prefixes):
        return "head", None
    index = _layer_index(name)
    if index is not None:
        return "layer", index
    if _EMBEDDING.search(name):
        return "embeddings", None
    return "body", None


def param_groups(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    head_lr_multiplier: float = 1.0,
    layerwise_lr_decay: float = 1.0,
    head_prefixes: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Split trainable parameters into optimizer groups.

    - weight decay: `weight_decay` for matrices, 0 for biases and norm weights (decaying a LayerNorm scale
      towards 0 shrinks the activations instead of regularising);
    - head (`head_prefixes`, newly initialised layers): `learning_rate * head_lr_multiplier`;
    - layer-wise decay: the top transformer layer gets `learning_rate`, the layer k below it
      `learning_rate * decay**k`, embeddings `decay**num_layers` (the lowest); other base-model parameters
      (pooler, final norm) sit above the top layer and get `learning_rate`.
    Frozen parameters (requires_grad False, e.g. under LoRA) are left out.
    """
    no_decay = _no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    indices = [i for n, _ in named if (i := _section(n, head_prefixes)[1]) is not None]
    num_layers = max(indices) + 1 if indices else 0
    use_layer_decay = layerwise_lr_decay != 1.0 and num_layers > 0

    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in named:
        section, index = _section(name, head_prefixes)
        if section == "head":
            key, lr = "head", learning_rate * head_lr_multiplier
        elif use_layer_decay and section == "layer":
            assert index is not None
            key, lr = f"layer.{index}", learning_rate * layerwise_lr_decay ** (num_layers - 1 - index)
        elif use_layer_decay and section == "embeddings":
            key, lr = "embeddings", learning_rate * layerwise_lr_decay**num_layers
        else:
            key, lr = "body", learning_rate
        decays = name not in no_decay and weight_decay > 0
        group = groups.setdefault(
            (key, decays),
            {
                "name": f"{key}/{'decay' if decays else 'no_decay'}",
                "params": [],
                "param_names": [],
                "lr": lr,
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def head_prefixes_for(model: nn.Module, missing_keys: Iterable[str] | None = None) -> tuple[str, ...]:
    """Module names of the layers transformers initialised from scratch (the task head).

    Best source: `missing_keys` from `from_pretrained(..., output_loading_info=True)`, i.e. the weights the
    checkpoint did not have (buffers among them are ignored). Without it, a transformers model's children
    other than its base model (`base_model_prefix`) count as head, except a language model's output
    projection and anything sharing parameters with the base model: a causal LM's `lm_head` is pretrained.
    """
    if missing_keys is not None:
        # Only parameters count: a missing buffer (e.g. `embeddings.position_ids`) would otherwise turn the
        # whole embedding module into "head" and give it the head's learning rate.
        params = {name for name, _ in model.named_parameters()}
        modules = sorted({key.rsplit(".", 1)[0] if "." in key else key for key in missing_keys if key in params})
        # Keep the shortest prefixes: `classifier` already covers `classifier.dense`.
        kept: list[str] = []
        for module in modules:  # sorted, so a parent comes before its children
            if not any(module == k or module.startswith(k + ".") for k in kept):
                kept.append(module)
        return tuple(kept)
    base_prefix = getattr(model, "base_model_prefix", "")
    if not base_prefix or not hasattr(model, base_prefix):
        return ()
    base_params = {id(p) for p in getattr(model, base_prefix).parameters()}
    # A language model's output projection is pretrained even when it is not tied to the embeddings (Llama).
    get_output = getattr(model, "get_output_embeddings", None)
    output_embeddings = get_output() if callable(get_output) else None
    heads = []
    for child_name, child in model.named_children():
        if child_name == base_prefix or (output_embeddings is not None and child is output_embeddings):
            continue
        params = list(child.parameters())
        if params and not any(id(p) in base_params for p in params):
            heads.append(child_name)
    return tuple(heads)


def build_optimizer(model: nn.Module, hp: Any, head_prefixes: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """The optimizer named in `hp.optimizer` over `param_groups(...)` built from `hp`.

    `hp` is a resolved `finetune_operator.api.spec.Hyperparameters`. adamw: torch's AdamW (decoupled decay);
    adam: torch's Adam, whose weight decay is the classic L2 penalty added to the gradient (that is what
    distinguishes it from adamw); sgd: momentum and Nesterov as given.
    """
    spec = hp.optimizer
    name = (spec.name if spec is not None and spec.name else "adamw").lower()
    groups = param_groups(
        model,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay or 0.0,
        head_lr_multiplier=hp.head_learning_rate_multiplier or 1.0,
        layerwise_lr_decay=hp.layerwise_lr_decay or 1.0,
        head_prefixes=head_prefixes,
    )
    if not groups:
        raise ValueError("the model has no trainable parameters; nothing to optimise")
    if name in ("adamw", "adam"):
        betas = tuple(spec.betas) if spec is not None and spec.betas else (0.9, 0.999)
        eps = spec.eps if spec is not None and spec.eps is not None else 1e-8
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        optimizer: torch.optim.Optimizer = cls(groups, lr=hp.learning_rate, betas=betas, eps=eps)
    elif name == "sgd":
        momentum = spec.momentum if spec is not None and spec.momentum is not None else 0.0
        nesterov = bool(spec.nesterov) if spec is not None else False
        if nesterov and momentum <= 0:
            raise ValueError("spec.hyperparameters.optimizer.nesterov: Nesterov momentum needs momentum > 0")
        optimizer = torch.optim.SGD(groups, lr=hp.learning_rate, momentum=momentum, nesterov=nesterov)
    else:
        raise ValueError(f"spec.hyperparameters.optimizer.name: unknown optimizer {name!r} (adamw, adam, sgd)")
    lrs = [g["lr"] for g in groups]
    decayed = sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"])
    total = sum(p.numel() for g in groups for p in g["params"])
    log.info(
        "optimizer %s over %d parameter groups: learning rates %.3g..%.3g, weight decay %g on %d of %d parameters",
        name, len(groups), min(lrs), max(lrs), hp.weight_decay or 0.0, decayed, total,
    )
    log.debug("optimizer groups: %s", "; ".join(f"{g['name']} lr={g['lr']:.3g} wd={g['weight_decay']:g}" for g in groups))
    return optimizer


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """A log-friendly summary of each group: name, lr, weight decay and parameter count."""
    return [
        {
            "name": g.get("name", f"group{i}"),
            "lr": g["lr"],
            "weight_decay": g.get("weight_decay", 0.0),
            "params": sum(p.numel() for p in g["params"]),
        }
        for i, g in enumerate(optimizer.param_groups)
    ]
