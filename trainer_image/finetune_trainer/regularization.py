"""Regularisers the loop applies around the model: mixup on input embeddings, and a dropout override."""

from __future__ import annotations

import logging
from numbers import Real

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def mixup_pairs(batch_size: int, alpha: float | None, generator: torch.Generator | None) -> tuple[float, torch.Tensor]:
    """One mixing weight lam ~ Beta(alpha, alpha) and a permutation pairing each example with a partner.

    torch's Beta distribution cannot take a Generator, so lam is drawn by numpy from a seed taken from
    `generator`: the draw stays reproducible under the job's seed. alpha 0/None gives (1.0, identity).
    The loop can use the permutation for anything else that must follow the pairing (attention masks).
    """
    if not alpha:
        return 1.0, torch.arange(batch_size)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(batch_size, generator=generator)
    return lam, perm


def mixup(
    inputs_embeds: torch.Tensor,
    targets_onehot: torch.Tensor,
    alpha: float | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) within the batch: lam * x + (1 - lam) * x[perm], same for the targets.

    Applied to embeddings because token ids cannot be interpolated. alpha 0 returns the inputs unchanged.
    """
    if not alpha:
        return inputs_embeds, targets_onehot
    lam, perm = mixup_pairs(inputs_embeds.shape[0], alpha, generator)
    perm = perm.to(inputs_embeds.device)
    mixed = lam * inputs_embeds + (1.0 - lam) * inputs_embeds[perm]
    mixed_targets = lam * targets_onehot + (1.0 - lam) * targets_onehot[perm]
    return mixed, mixed_targets


def set_dropout(model: nn.Module, p: float | None) -> int:
    """Set every dropout probability in `model` to `p`; None leaves the model alone.

    Changes both the built modules (every nn.Dropout-family layer; BERT's attention also reads its
    `self.dropout.p` at forward time) and the config's numeric `*dropout*` fields, so a model saved and
    re-loaded from the config keeps the override. Returns how many modules were changed.
    """
    if p is None:
        return 0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"spec.hyperparameters.dropout: {p} is not in [0, 1)")
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
            changed += 1
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, Real) and not isinstance(value, bool):
                setattr(config, key, p)
    return changed
