"""Load the base model and tokenizer for a task, with the dropout override and LoRA (peft)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import MODEL_PVC_MOUNT
from .lora_export import is_peft_model, save_lora
from .optim import head_prefixes_for
from .paths import resolve_path
from .regularization import set_dropout

log = logging.getLogger("finetune_trainer")

_PEFT_TASK = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "embedding": "FEATURE_EXTRACTION"}


class EmbeddingModel(nn.Module):
    """A transformer encoder with mean pooling: one vector per text (the sentence-transformers recipe)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = getattr(encoder, "config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-6)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def save_pretrained(self, path: str, state_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state_dict is not None:
            prefix = "encoder."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.encoder.save_pretrained(path, state_dict=state_dict, **kwargs)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    head_prefixes: tuple[str, ...]
    source: str


class QuantizationUnavailable(RuntimeError):
    """model.quantization asked for what this pod cannot do (no CUDA device, no bitsandbytes)."""


def hub_kwargs(spec: Any) -> dict[str, Any]:
    """What every from_pretrained of the base model takes: the pinned revision and trustRemoteCode.

    The token (model.tokenSecret) arrives as HF_TOKEN and the shared cache (model.cachePvc) as HF_HOME, both read
    by huggingface_hub itself, so neither is passed here (nor logged)."""
    kwargs: dict[str, Any] = {"trust_remote_code": bool(spec.model.trust_remote_code)}
    if spec.model.revision:
        kwargs["revision"] = spec.model.revision
    return kwargs


def quantization_config(spec: Any, *, cuda: bool | None = None) -> Any | None:
    """transformers' BitsAndBytesConfig for model.quantization (QLoRA's recipe for 4bit), None for `none`.

    Refused with a message that says what to change when the pod has no CUDA device or no bitsandbytes:
    bitsandbytes' kernels are CUDA only, and a CPU fallback would silently train something else."""
    import torch
    from transformers import BitsAndBytesConfig

    q = str(spec.model.quantization)
    if q == "none":
        return None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        raise QuantizationUnavailable(
            f"model.quantization {q} needs a CUDA GPU (bitsandbytes kernels run on CUDA only) and this pod has none: "
            "set resources.gpu: true (and schedule onto a GPU node), or model.quantization: none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            f"model.quantization {q} needs the bitsandbytes package, which this trainer image lacks: build the image "
            "with `pip install bitsandbytes` (spec.image), or set model.quantization: none")
    if q == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(spec: Any) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    source = resolve_path(spec.model.name, pvc_mount=MODEL_PVC_MOUNT if spec.model.pvc else None)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(spec))
    if tokenizer.pad_token_id is None:
        # GPT-style tokenizers have no pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def load_model(spec: Any, labels: list[str], tokenizer: Any, source: str) -> LoadedModel:
    """The task's model from `source`, its newly initialised layers (the head), dropout and LoRA applied."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    task = str(spec.task)
    # Weights load straight into their final place (transformers 5 always builds the model on the meta device and
    # fills it from the checkpoint, safetensors first when the repository has them: no second copy in memory).
    kwargs = hub_kwargs(spec)
    quantized = quantization_config(spec)
    if quantized is not None:
        import torch

        # Each process loads onto its own GPU; bitsandbytes quantizes while loading.
        kwargs.update(quantization_config=quantized, device_map={"": torch.cuda.current_device()})
    if task == "sequence-classification":
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # a checkpoint fine-tuned on other labels gets a new head
            **kwargs,
        )
    elif task == "causal-lm":
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model, info = AutoModel.from_pretrained(source, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys", [])) + [k for k, *_ in info.get("mismatched_keys", [])]
    heads = head_prefixes_for(model, missing) if task != "embedding" else ()
    if quantized is not None:
        from peft import prepare_model_for_kbit_training

        # Norms in fp32, input gradients on, gradient checkpointing: the QLoRA recipe (peft's helper).
        model = prepare_model_for_kbit_training(model)
    changed = set_dropout(model, spec.hyperparameters.dropout)
    if changed:
        log.info("dropout set to %s in %d modules", spec.hyperparameters.dropout, changed)
    if spec.lora.enabled:
        model = _with_lora(model, spec, task)
    if task == "embedding":
        model = EmbeddingModel(model)
    return LoadedModel(model=model, tokenizer=tokenizer, head_prefixes=heads, source=source)


def _with_lora(model: nn.Module, spec: Any, task: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = spec.lora

    def config(targets: Any) -> Any:
        return LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=_PEFT_TASK[task]
        )

    try:
        wrapped = get_peft_model(model, config(list(lora.target_modules) or None))
    except ValueError:
        if lora.target_modules:
            raise
        # peft knows default targets only for architectures it lists; otherwise adapt every linear layer.
        wrapped = get_peft_model(model, config("all-linear"))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d: %d of %d parameters trainable", lora.rank, trainable, total)
    return wrapped


def save_model(model: nn.Module, tokenizer: Any, path: str, state_dict: dict[str, Any] | None = None) -> None:
    """`save_pretrained` + tokenizer: the directory loads with plain transformers for every task.

    Embedding models are saved as their encoder (mean pooling is the reader's job, as in sentence-transformers).
    LoRA runs save the merged model here and the adapter in `adapter/` (see lora_export).
    """
    os.makedirs(path, exist_ok=True)
    if isinstance(model, EmbeddingModel):
        prefix = "encoder."
        model = model.encoder
        if state_dict is not None:
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if is_peft_model(model):
        save_lora(model, path, state_dict)
    else:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)
