"""Parameter groups and optimizer construction on a tiny BERT built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from finetune_operator.api.spec import Hyperparameters
from finetune_trainer.optim import build_optimizer, head_prefixes_for, param_groups


@pytest.fixture(scope="module")
def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification(config)


def hp(**overrides) -> Hyperparameters:
    base = {
        "learningRate": 1e-3,
        "weightDecay": 0.01,
        "optimizer": {"name": "adamw", "betas": [0.8, 0.95], "eps": 1e-6},
        "headLearningRateMultiplier": 1.0,
        "layerwiseLrDecay": 1.0,
    }
    base.update(overrides)
    return Hyperparameters.model_validate(base)


def groups_by_name(groups) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def group_of(groups, param_name: str) -> dict:
    return next(g for g in groups if param_name in g["param_names"])


def test_every_trainable_parameter_is_in_exactly_one_group(bert):
    groups = param_groups(bert, learning_rate=1e-3, weight_decay=0.01, head_lr_multiplier=10, layerwise_lr_decay=0.5,
                          head_prefixes=("classifier",))
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(bert.parameters()))


def test_no_weight_decay_on_biases_and_norm_weights(bert):
    groups = param_groups(bert, learning_rate=1e-3, weight_decay=0.1, head_prefixes=("classifier",))
    for name, module in bert.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            expected = 0.0 if (isinstance(module, torch.nn.LayerNorm) or param.ndim == 1) else 0.1
            assert group_of(groups, full)["weight_decay"] == expected, full
    assert group_of(groups, "bert.encoder.layer.0.attention.output.LayerNorm.weight")["weight_decay"] == 0.0
    assert group_of(groups, "bert.encoder.layer.0.attention.self.query.weight")["weight_decay"] == 0.1


def test_rms_norm_weights_are_not_decayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.RMSNorm(4))
    groups = param_groups(model, learning_rate=1.0, weight_decay=0.5)
    assert group_of(groups, "1.weight")["weight_decay"] == 0.0
    assert group_of(groups, "0.weight")["weight_decay"] == 0.5


def test_head_gets_the_multiplied_learning_rate(bert):
    groups = param_groups(bert, learning_rate=1e-3, weight_decay=0.01, head_lr_multiplier=10.0, head_prefixes=("classifier",))
    assert group_of(groups, "classifier.weight")["lr"] == pytest.approx(1e-2)
    assert group_of(groups, "classifier.bias")["lr"] == pytest.approx(1e-2)
    assert group_of(groups, "bert.encoder.layer.1.output.dense.weight")["lr"] == pytest.approx(1e-3)
    assert set(groups_by_name(groups)) >= {"head/decay", "head/no_decay"}


def test_layerwise_decay_top_layer_full_rate_lower_layers_and_embeddings_decayed(bert):
    groups = param_groups(bert, learning_rate=1e-3, weight_decay=0.01, layerwise_lr_decay=0.5, head_prefixes=("classifier",))
    lr = lambda name: group_of(groups, name)["lr"]  # noqa: E731
    assert lr("bert.encoder.layer.1.attention.self.query.weight") == pytest.approx(1e-3)
    assert lr("bert.encoder.layer.0.attention.self.query.weight") == pytest.approx(5e-4)
    assert lr("bert.embeddings.word_embeddings.weight") == pytest.approx(2.5e-4)
    assert lr("bert.embeddings.LayerNorm.weight") == pytest.approx(2.5e-4)
    assert lr("bert.pooler.dense.weight") == pytest.approx(1e-3)
    assert lr("classifier.weight") == pytest.approx(1e-3)  # head multiplier 1, and no layer decay on the head
    assert "layer.0/decay" in groups_by_name(groups)


def test_layer_index_parsing_for_gpt2_names():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2))
    groups = param_groups(model, learning_rate=1.0, weight_decay=0.0, layerwise_lr_decay=0.5)
    assert group_of(groups, "transformer.h.2.attn.c_attn.weight")["lr"] == pytest.approx(1.0)
    assert group_of(groups, "transformer.h.0.attn.c_attn.weight")["lr"] == pytest.approx(0.25)
    assert group_of(groups, "transformer.wte.weight")["lr"] == pytest.approx(0.125)


def test_frozen_parameters_are_left_out(bert):
    bert.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    try:
        groups = param_groups(bert, learning_rate=1e-3, weight_decay=0.01)
        assert not any("bert.embeddings.word_embeddings.weight" in g["param_names"] for g in groups)
    finally:
        bert.bert.embeddings.word_embeddings.weight.requires_grad_(True)


def test_head_prefixes_from_missing_keys_and_from_structure(bert):
    assert head_prefixes_for(bert, {"classifier.weight", "classifier.bias"}) == ("classifier",)
    assert head_prefixes_for(bert, ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"]) == (
        "bert.pooler.dense",
        "classifier",
    )
    assert head_prefixes_for(bert) == ("classifier",)
    # a missing buffer or an unknown key is not a head
    assert head_prefixes_for(bert, ["bert.embeddings.position_ids", "nope.weight", "classifier.bias"]) == ("classifier",)


def test_lm_head_tied_or_not_is_not_a_new_head():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert head_prefixes_for(model) == ()
    untied = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert head_prefixes_for(untied) == ()


def test_adamw_receives_betas_eps_and_group_settings(bert):
    opt = build_optimizer(bert, hp(headLearningRateMultiplier=5.0), ("classifier",))
    assert type(opt) is torch.optim.AdamW
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-6
    head = next(g for g in opt.param_groups if g["name"] == "head/decay")
    assert head["lr"] == pytest.approx(5e-3)
    assert head["weight_decay"] == 0.01


def test_adam_is_torch_adam(bert):
    opt = build_optimizer(bert, hp(optimizer={"name": "adam", "betas": [0.7, 0.9], "eps": 1e-7}), ())
    assert type(opt) is torch.optim.Adam
    assert {g["betas"] for g in opt.param_groups} == {(0.7, 0.9)}
    assert {g["eps"] for g in opt.param_groups} == {1e-7}


@pytest.mark.parametrize("momentum,nesterov", [(0.9, True), (0.5, False)])
def test_sgd_receives_momentum_and_nesterov(bert, momentum, nesterov):
    opt = build_optimizer(bert, hp(optimizer={"name": "sgd", "momentum": momentum, "nesterov": nesterov}), ())
    assert type(opt) is torch.optim.SGD
    assert {g["momentum"] for g in opt.param_groups} == {momentum}
    assert {g["nesterov"] for g in opt.param_groups} == {nesterov}


def test_sgd_nesterov_without_momentum_names_the_field(bert):
    with pytest.raises(ValueError, match="optimizer.nesterov"):
        build_optimizer(bert, hp(optimizer={"name": "sgd", "momentum": 0.0, "nesterov": True}), ())


def test_weight_decay_changes_only_decayed_parameters():
    """One AdamW step with zero gradients: decay shrinks the matrix, never the bias."""
    model = torch.nn.Linear(3, 3)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(model, hp(weightDecay=0.5, learningRate=0.1), ())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), weight * (1 - 0.1 * 0.5))
    torch.testing.assert_close(model.bias.detach(), bias)
