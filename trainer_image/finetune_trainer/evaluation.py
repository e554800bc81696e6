"""Validation at the end of each epoch: loss plus accuracy/F1, perplexity or retrieval recall@k."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .steps import forward

MAIN_METRIC = {"sequence-classification": "val_accuracy", "causal-lm": "val_perplexity", "embedding": "val_recall_at_1"}


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def recall_at_k(queries: torch.Tensor, corpus: torch.Tensor, query_labels: torch.Tensor, corpus_labels: torch.Tensor, k: int = 1, *, leave_one_out: bool) -> float:
    """Share of queries whose k nearest corpus items (cosine) include one with the query's label.

    leave_one_out: queries and corpus are the same texts, so a text may not retrieve itself.
    """
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(corpus.float(), dim=-1).T
    if leave_one_out:
        sims.fill_diagonal_(float("-inf"))
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    hits = (corpus_labels[top] == query_labels.view(-1, 1)).any(dim=1)
    return hits.float().mean().item()


@torch.no_grad()
def evaluate(engine: Any, loader: Any, task: str, hp: Any, *, num_labels: int = 0, paired: bool = False,
             on_batch: Any | None = None) -> dict[str, float]:
    """Metrics on the validation loader, gathered across ranks (duplicates from uneven sharding dropped).

    on_batch: called after every batch (liveness: a long evaluation is progress, not a stall)."""
    accelerator = engine.accelerator
    model = engine.model
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    batches = torch.zeros((), dtype=torch.float64)
    token_loss = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    logits_all, labels_all, anchors_all, positives_all = [], [], [], []
    try:
        for batch in loader:
            with engine.autocast():
                loss, out = forward(model, batch, task, hp, train=False)
            loss_sum += loss.double().cpu()
            batches += 1
            if on_batch is not None:
                on_batch()
            if task == "sequence-classification":
                logits, labels = accelerator.gather_for_metrics((out.float(), batch["labels"]))
                logits_all.append(logits.cpu())
                labels_all.append(labels.cpu())
            elif task == "causal-lm":
                n = (batch["labels"][:, 1:] != -100).sum().double().cpu()
                token_loss += loss.double().cpu() * n
                tokens += n
            else:
                anchors, positives, labels = accelerator.gather_for_metrics((out[0].float(), out[1].float(), batch["labels"]))
                anchors_all.append(anchors.cpu())
                positives_all.append(positives.cpu())
                labels_all.append(labels.cpu())
    finally:
        model.train()
    totals = accelerator.reduce(torch.stack([loss_sum, batches, token_loss, tokens]).to(accelerator.device), reduction="sum").cpu()
    metrics = {"val_loss": float(totals[0] / max(totals[1].item(), 1.0))}
    if task == "sequence-classification":
        logits, labels = torch.cat(logits_all), torch.cat(labels_all)
        preds = logits.argmax(-1)
        metrics["val_accuracy"] = (preds == labels).float().mean().item()
        metrics["val_f1"] = macro_f1(preds, labels, num_labels or int(logits.shape[-1]))
    elif task == "causal-lm":
        mean = float(totals[2] / max(totals[3].item(), 1.0))
        metrics["val_perplexity"] = math.exp(min(mean, 50.0))
    else:
        anchors, positives, labels = torch.cat(anchors_all), torch.cat(positives_all), torch.cat(labels_all)
        if paired:
            metrics["val_recall_at_1"] = recall_at_k(anchors, positives, labels, labels, leave_one_out=False)
        else:
            metrics["val_recall_at_1"] = recall_at_k(anchors, anchors, labels, labels, leave_one_out=True)
    return metrics
