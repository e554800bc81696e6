"""One forward pass per task: the model's output and the configured loss (shared by training and evaluation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .losses import causal_lm_loss, classification_loss, contrastive_loss, triplet_loss
from .regularization import mixup_pairs


def _loss_kwargs(hp: Any) -> dict[str, Any]:
    loss = hp.loss
    return {
        "name": loss.name if loss else None,
        "label_smoothing": hp.label_smoothing,
        "focal_alpha": loss.focal_alpha if loss else None,
        "focal_gamma": loss.focal_gamma if loss else None,
    }


def _side_by_side(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors and positives as one batch (one forward: DDP expects one forward per backward)."""
    a, am, p, pm = batch["input_ids"], batch["attention_mask"], batch["pair_input_ids"], batch["pair_attention_mask"]
    width = max(a.shape[1], p.shape[1])
    a, am, p, pm = (F.pad(t, (0, width - t.shape[1])) for t in (a, am, p, pm))
    return torch.cat([a, p]), torch.cat([am, pm])


def embed_pairs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _side_by_side(batch)
    vectors = model(input_ids=ids, attention_mask=mask)
    n = batch["input_ids"].shape[0]
    return vectors[:n], vectors[n:]


def embedding_loss(anchors: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor, hp: Any) -> torch.Tensor:
    loss = hp.loss
    if loss is not None and loss.name == "triplet":
        return triplet_loss(torch.cat([anchors, positives]), torch.cat([labels, labels]), margin=loss.margin or 0.2, miner=loss.miner or "semi-hard")
    return contrastive_loss(anchors, positives, temperature=(loss.temperature if loss else None) or 0.05, labels=labels)


def forward(model: Any, batch: dict[str, torch.Tensor], task: str, hp: Any, *, train: bool, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
    """(loss, output): logits for classification / causal LM, (anchors, positives) for embedding."""
    if task == "embedding":
        anchors, positives = embed_pairs(model, batch)
        return embedding_loss(anchors, positives, batch["labels"], hp), (anchors, positives)
    if task == "causal-lm":
        if "position_ids" in batch:  # packed rows: the position ids delimit the examples (sft.py)
            # use_cache=False: with a KV cache (the default, even in training) transformers skips deriving the
            # per-example mask from the position ids, and packed examples silently attend to each other.
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"], **_loss_kwargs(hp)), logits
    labels = batch["labels"]
    if train and hp.mixup_alpha:
        return _mixup_forward(model, batch, hp, generator)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return classification_loss(logits, labels, **_loss_kwargs(hp)), logits


def _mixup_forward(model: Any, batch: dict[str, torch.Tensor], hp: Any, generator: torch.Generator | None) -> tuple[torch.Tensor, Any]:
    """Mixup on input embeddings (token ids cannot be interpolated); the attention masks are united."""
    inner = model.module if hasattr(model, "module") else model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    num_labels = inner.config.num_labels
    targets = F.one_hot(batch["labels"], num_labels).to(embeds.dtype)
    lam, perm = mixup_pairs(embeds.shape[0], hp.mixup_alpha, generator)
    perm = perm.to(embeds.device)
    mixed = lam * embeds + (1.0 - lam) * embeds[perm]
    soft = lam * targets + (1.0 - lam) * targets[perm]
    mask = torch.maximum(batch["attention_mask"], batch["attention_mask"][perm])
    logits = model(inputs_embeds=mixed, attention_mask=mask).logits
    return classification_loss(logits, soft.float(), **_loss_kwargs(hp)), logits
