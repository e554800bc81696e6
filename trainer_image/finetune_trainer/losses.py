"""Training losses: cross-entropy / focal (classification, causal LM), InfoNCE and triplet (embeddings).

Cross-entropy and label smoothing come from `torch.nn.functional.cross_entropy`, the triplet margin from
`F.triplet_margin_with_distance_loss`. What no installed library provides is written here: the focal
weighting (torchvision's `sigmoid_focal_loss` is one-vs-rest sigmoid, not softmax, and torchvision is not
installed), InfoNCE with in-batch negatives that skips same-label pairs, and batch-wise triplet mining
(sentence-transformers / pytorch-metric-learning are not installed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' convention for label positions that carry no loss (padding, prompt)


def _smoothed_targets(targets: torch.Tensor, num_classes: int, label_smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    """Target distribution as torch's cross_entropy defines it: (1 - eps) * q + eps / C."""
    q = F.one_hot(targets, num_classes).to(dtype) if targets.dtype in (torch.long, torch.int) else targets.to(dtype)
    return q * (1.0 - label_smoothing) + label_smoothing / num_classes


def _focal(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, alpha: float | None, gamma: float
) -> torch.Tensor:
    """Per-example softmax focal loss: -alpha * sum_c q_c (1 - p_c)^gamma log p_c.

    q is the (smoothed or mixup-soft) target distribution. With gamma 0 and alpha None this is exactly
    torch's cross-entropy with the same label smoothing; gamma > 0 scales each class term down by how
    confidently it is already predicted. alpha is a constant weight on the loss (the softmax form of
    Lin et al.'s alpha; with one softmax over classes there is no separate negative term to balance).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    q = _smoothed_targets(targets, logits.shape[-1], label_smoothing, log_p.dtype)
    weight = (1.0 - log_p.exp()).clamp_min(0.0).pow(gamma) if gamma else torch.ones_like(log_p)
    loss = -(q * weight * log_p).sum(dim=-1)
    return loss * alpha if alpha is not None else loss


def _check_name(name: str | None) -> str:
    name = (name or "cross-entropy").lower()
    if name not in ("cross-entropy", "focal"):
        raise ValueError(f"spec.hyperparameters.loss.name: {name!r} is not a classification loss (cross-entropy, focal)")
    return name


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    name: str | None,
    label_smoothing: float | None = 0.0,
    focal_alpha: float | None = None,
    focal_gamma: float | None = None,
) -> torch.Tensor:
    """Mean loss over the batch. `targets`: class indices (N,) or probabilities (N, C) (mixup)."""
    name = _check_name(name)
    smoothing = label_smoothing or 0.0
    if name == "cross-entropy":
        soft = targets.is_floating_point()
        return F.cross_entropy(logits.float(), targets.float() if soft else targets, label_smoothing=smoothing)
    return _focal(logits, targets, smoothing, focal_alpha, focal_gamma or 0.0).mean()


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    name: str | None,
    label_smoothing: float | None = 0.0,
    focal_alpha: float | None = None,
    focal_gamma: float | None = None,
) -> torch.Tensor:
    """Next-token loss: logits at position t predict labels at t+1; positions labelled -100 are skipped.

    The mean is over the counted tokens, as transformers' own causal-LM loss does.
    """
    name = _check_name(name)
    smoothing = label_smoothing or 0.0
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[..., 1:].reshape(-1)
    if name == "cross-entropy":
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    keep = shift_labels != IGNORE_INDEX
    if not keep.any():
        return shift_logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive
    per_token = _focal(shift_logits[keep], shift_labels[keep], smoothing, focal_alpha, focal_gamma or 0.0)
    return per_token.mean()


def contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    *,
    temperature: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives (the MultipleNegativesRankingLoss recipe).

    Row i's positive is positives[i]; every other positives[j] is a negative, except, when `labels` are
    given, those with labels[j] == labels[i]: they are the same class, so pushing them away would be wrong.
    Similarities are cosine, divided by `temperature`.
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    scores = a @ p.T / temperature
    if labels is not None:
        same = labels.view(-1, 1) == labels.view(1, -1)
        same.fill_diagonal_(False)
        scores = scores.masked_fill(same, float("-inf"))
    return F.cross_entropy(scores, torch.arange(len(a), device=a.device))


def cosine_distances(embeddings: torch.Tensor) -> torch.Tensor:
    e = F.normalize(embeddings.float(), dim=-1)
    return 1.0 - e @ e.T


def mine_triplets(
    distances: torch.Tensor, labels: torch.Tensor, *, margin: float, miner: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (anchor, positive, negative) chosen within the batch.

    - all: every valid triplet;
    - hard: per anchor, its farthest positive and its nearest negative (batch-hard, Hermans et al. 2017);
    - semi-hard: per (anchor, positive), the nearest negative farther than the positive but within the
      margin (FaceNet); when none exists, the farthest negative (as TensorFlow Addons' triplet_semihard_loss).
    Anchors without a positive or without a negative give no triplet.
    """
    d = distances.detach()
    n = len(labels)
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    if miner == "all":
        valid = pos_mask.unsqueeze(2) & neg_mask.unsqueeze(1)  # [a, p, n]
        a, p, q = valid.nonzero(as_tuple=True)
        return a, p, q
    if miner == "hard":
        has = pos_mask.any(1) & neg_mask.any(1)
        hardest_pos = d.masked_fill(~pos_mask, float("-inf")).argmax(1)
        hardest_neg = d.masked_fill(~neg_mask, float("inf")).argmin(1)
        a = has.nonzero(as_tuple=True)[0]
        return a, hardest_pos[a], hardest_neg[a]
    if miner == "semi-hard":
        a, p = (pos_mask & neg_mask.any(1, keepdim=True)).nonzero(as_tuple=True)
        d_ap = d[a, p].unsqueeze(1)
        d_an = d[a]  # [pairs, n]
        neg = neg_mask[a]
        semi = neg & (d_an > d_ap) & (d_an < d_ap + margin)
        nearest_semi = d_an.masked_fill(~semi, float("inf")).argmin(1)
        farthest = d_an.masked_fill(~neg, float("-inf")).argmax(1)
        return a, p, torch.where(semi.any(1), nearest_semi, farthest)
    raise ValueError(f"spec.hyperparameters.loss.miner: unknown miner {miner!r} (all, hard, semi-hard)")


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float, miner: str) -> torch.Tensor:
    """Mean of max(d(a, p) - d(a, n) + margin, 0) over the mined triplets, d = cosine distance."""
    miner = (miner or "semi-hard").lower()
    a, p, n = mine_triplets(cosine_distances(embeddings), labels, margin=margin, miner=miner)
    if len(a) == 0:
        return embeddings.sum() * 0.0  # no class with two members in this batch: nothing to learn from
    e = embeddings.float()
    return F.triplet_margin_with_distance_loss(
        e[a],
        e[p],
        e[n],
        distance_function=lambda x, y: 1.0 - F.cosine_similarity(x, y, dim=-1),
        margin=margin,
    )
