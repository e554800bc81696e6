"""Losses (focal, label smoothing, causal LM, InfoNCE, triplet mining) and the regularisers (mixup, dropout).

The regularisers live here too: they act on the same logits/targets the losses consume.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from finetune_trainer.losses import (
    causal_lm_loss,
    classification_loss,
    contrastive_loss,
    cosine_distances,
    mine_triplets,
    triplet_loss,
)
from finetune_trainer.regularization import mixup, set_dropout


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g) * 3, torch.randint(0, 5, (8,), generator=g)


# ---- cross-entropy / focal ------------------------------------------------------------------------------


def test_cross_entropy_is_torchs(batch):
    logits, y = batch
    assert classification_loss(logits, y, name="cross-entropy") == pytest.approx(F.cross_entropy(logits, y).item())


def test_focal_gamma_zero_without_alpha_is_cross_entropy(batch):
    logits, y = batch
    ce = classification_loss(logits, y, name="cross-entropy")
    focal = classification_loss(logits, y, name="focal", focal_gamma=0.0, focal_alpha=None)
    torch.testing.assert_close(focal, ce)
    ce_ls = classification_loss(logits, y, name="cross-entropy", label_smoothing=0.2)
    focal_ls = classification_loss(logits, y, name="focal", focal_gamma=0.0, label_smoothing=0.2)
    torch.testing.assert_close(focal_ls, ce_ls)


def test_focal_down_weights_easy_examples_more_than_hard_ones():
    y = torch.tensor([0])
    easy, hard = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])

    def ratio(logits):
        return (classification_loss(logits, y, name="focal", focal_gamma=2.0) / F.cross_entropy(logits, y)).item()

    p_easy = F.softmax(easy, -1)[0, 0].item()
    assert ratio(easy) == pytest.approx((1 - p_easy) ** 2, rel=1e-5)  # the (1 - p_t)^gamma factor
    assert ratio(easy) < 0.01 < ratio(hard) < 1.0


def test_focal_alpha_weights_the_loss(batch):
    logits, y = batch
    base = classification_loss(logits, y, name="focal", focal_gamma=2.0)
    weighted = classification_loss(logits, y, name="focal", focal_gamma=2.0, focal_alpha=0.25)
    torch.testing.assert_close(weighted, 0.25 * base)


def test_label_smoothing_follows_torchs_formula(batch):
    logits, y = batch
    eps, c = 0.1, logits.shape[1]
    log_p = F.log_softmax(logits, -1)
    expected = ((1 - eps) * -log_p.gather(1, y[:, None]).squeeze(1) + eps * -log_p.mean(1)).mean()
    smoothed = classification_loss(logits, y, name="cross-entropy", label_smoothing=eps)
    torch.testing.assert_close(smoothed, expected)
    assert smoothed != classification_loss(logits, y, name="cross-entropy")
    # soft (mixup) targets: smoothing mixes in the uniform distribution the same way
    soft = F.one_hot(y, c).float() * 0.7 + F.one_hot((y + 1) % c, c).float() * 0.3
    q = soft * (1 - eps) + eps / c
    torch.testing.assert_close(
        classification_loss(logits, soft, name="cross-entropy", label_smoothing=eps), -(q * log_p).sum(1).mean()
    )
    torch.testing.assert_close(
        classification_loss(logits, soft, name="focal", focal_gamma=0.0, label_smoothing=eps), -(q * log_p).sum(1).mean()
    )


def test_unknown_classification_loss_names_the_field(batch):
    with pytest.raises(ValueError, match="loss.name"):
        classification_loss(*batch, name="triplet")


def test_causal_lm_loss_shifts_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss = causal_lm_loss(logits, labels, name="cross-entropy", label_smoothing=0.0, focal_alpha=None, focal_gamma=None)
    torch.testing.assert_close(loss, expected)
    # mean over the 6 counted tokens exactly
    counted = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    manual = sum(-F.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b, t in counted) / len(counted)
    torch.testing.assert_close(loss, manual)
    focal0 = causal_lm_loss(logits, labels, name="focal", label_smoothing=0.0, focal_alpha=None, focal_gamma=0.0)
    torch.testing.assert_close(focal0, expected)
    focal2 = causal_lm_loss(logits, labels, name="focal", label_smoothing=0.0, focal_alpha=None, focal_gamma=2.0)
    assert focal2 < expected


# ---- contrastive (InfoNCE) --------------------------------------------------------------------------------


def test_contrastive_loss_value_on_hand_built_embeddings():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    # row 0: sims (1, 0.6); row 1: sims (0, 0.8)
    row0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0.6 / t)))
    row1 = -math.log(math.exp(0.8 / t) / (math.exp(0.0 / t) + math.exp(0.8 / t)))
    loss = contrastive_loss(anchors, positives, temperature=t)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_contrastive_same_label_pairs_are_not_negatives():
    anchors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    positives = anchors.clone()
    unlabeled = contrastive_loss(anchors, positives, temperature=0.1)
    labeled = contrastive_loss(anchors, positives, temperature=0.1, labels=torch.tensor([0, 0, 1]))
    assert labeled < unlabeled
    # with rows 0 and 1 masked from each other, each row competes only with row 2
    s = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / 0.1
    expected = torch.stack(
        [
            -F.log_softmax(s[0, [0, 2]], -1)[0],
            -F.log_softmax(s[1, [1, 2]], -1)[0],
            -F.log_softmax(s[2], -1)[2],
        ]
    ).mean()
    torch.testing.assert_close(labeled, expected)


def test_contrastive_temperature_sharpens():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert contrastive_loss(anchors, anchors, temperature=0.05) < contrastive_loss(anchors, anchors, temperature=1.0)


# ---- triplet mining -------------------------------------------------------------------------------------


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


@pytest.fixture
def triplet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor 0 at 0 deg; positives at 20 and 60 deg; negatives at 40, 70 and 150 deg.

    Cosine distances from the anchor: 1-cos20=0.060, 1-cos60=0.5; 1-cos40=0.234, 1-cos70=0.658, 1-cos150=1.866.
    """
    emb = torch.tensor([unit(0), unit(20), unit(60), unit(40), unit(70), unit(150)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    return emb, labels


def test_all_miner_uses_every_valid_triplet(triplet_batch):
    emb, labels = triplet_batch
    a, p, n = mine_triplets(cosine_distances(emb), labels, margin=0.2, miner="all")
    assert len(a) == 6 * 2 * 3  # each of 6 anchors: 2 positives x 3 negatives
    assert all(labels[a] == labels[p]) and all(labels[a] != labels[n]) and all(a != p)
    d = cosine_distances(emb)
    expected = F.relu(d[a, p] - d[a, n] + 0.2).mean()
    torch.testing.assert_close(triplet_loss(emb, labels, margin=0.2, miner="all"), expected)


def test_hard_miner_picks_farthest_positive_and_nearest_negative(triplet_batch):
    emb, labels = triplet_batch
    a, p, n = mine_triplets(cosine_distances(emb), labels, margin=0.2, miner="hard")
    choice = {int(x): (int(y), int(z)) for x, y, z in zip(a, p, n, strict=True)}
    assert choice[0] == (2, 3)  # positive at 60 deg, negative at 40 deg
    expected = (1 - math.cos(math.radians(60))) - (1 - math.cos(math.radians(40))) + 0.2
    d = cosine_distances(emb)
    assert d[0, 2] - d[0, 3] + 0.2 == pytest.approx(expected, rel=1e-5)


def test_semi_hard_miner_picks_negative_inside_the_margin_else_the_farthest(triplet_batch):
    emb, labels = triplet_batch
    a, p, n = mine_triplets(cosine_distances(emb), labels, margin=0.2, miner="semi-hard")
    choice = {(int(x), int(y)): int(z) for x, y, z in zip(a, p, n, strict=True)}
    # (0, pos 20deg): d_ap 0.060; negatives in (0.060, 0.260): only 40deg (0.234) -> semi-hard
    assert choice[(0, 1)] == 3
    # (0, pos 60deg): d_ap 0.5; in (0.5, 0.7): 70deg (0.658) -> chosen, although 40deg is nearer (hard)
    assert choice[(0, 2)] == 4
    # margin too small for any semi-hard negative of (0, pos 20deg): falls back to the farthest (150deg)
    a, p, n = mine_triplets(cosine_distances(emb), labels, margin=0.01, miner="semi-hard")
    choice = {(int(x), int(y)): int(z) for x, y, z in zip(a, p, n, strict=True)}
    assert choice[(0, 1)] == 5


def test_triplet_loss_differs_by_miner_and_is_zero_when_well_separated(triplet_batch):
    emb, labels = triplet_batch
    losses = {m: triplet_loss(emb, labels, margin=0.2, miner=m).item() for m in ("all", "hard", "semi-hard")}
    assert losses["hard"] > losses["semi-hard"] and losses["hard"] > losses["all"]
    separated = torch.tensor([unit(0), unit(5), unit(180), unit(175)])
    assert triplet_loss(separated, torch.tensor([0, 0, 1, 1]), margin=0.2, miner="hard").item() == 0.0


def test_triplet_loss_without_positives_is_zero_with_gradient():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(emb, torch.tensor([0, 1, 2]), margin=0.2, miner="semi-hard")
    loss.backward()
    assert loss.item() == 0.0 and emb.grad is not None


# ---- mixup and dropout --------------------------------------------------------------------------------


def test_mixup_alpha_zero_is_identity():
    x, y = torch.randn(4, 3, 8), F.one_hot(torch.arange(4), 4).float()
    mx, my = mixup(x, y, 0.0, torch.Generator().manual_seed(0))
    assert mx is x and my is y


def test_mixup_is_a_convex_mix_of_batch_pairs_with_the_same_weight_for_targets():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 4, generator=g)
    y = F.one_hot(torch.arange(6), 6).float()
    mx, my = mixup(x, y, 0.4, torch.Generator().manual_seed(7))
    assert not torch.equal(mx, x)
    torch.testing.assert_close(my.sum(1), torch.ones(6))
    for i in range(6):
        (nonzero,) = torch.nonzero(my[i] > 1e-6, as_tuple=True)
        lam = my[i, i].item() if len(nonzero) == 2 else 1.0
        j = next((int(k) for k in nonzero if k != i), i)
        torch.testing.assert_close(mx[i], lam * x[i] + (1 - lam) * x[j])
    # reproducible under the same generator seed
    again, _ = mixup(x, y, 0.4, torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, mx)


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )


def test_set_dropout_overrides_modules_and_config():
    model = tiny_bert()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and {m.p for m in dropouts} == {0.1}
    assert set_dropout(model, 0.3) == len(dropouts)
    assert {m.p for m in dropouts} == {0.3}
    assert model.config.hidden_dropout_prob == 0.3 and model.config.attention_probs_dropout_prob == 0.3


def test_set_dropout_zero_makes_training_forward_deterministic():
    model = tiny_bert().train()
    ids = torch.randint(0, 64, (2, 6))
    set_dropout(model, 0.0)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_set_dropout_none_leaves_the_model_alone():
    model = tiny_bert()
    assert set_dropout(model, None) == 0
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert model.config.hidden_dropout_prob == 0.1
