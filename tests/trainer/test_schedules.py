"""Learning-rate curves of each schedule, and the warm-up error."""

from __future__ import annotations

import math

import pytest
import torch

from finetune_operator.api.spec import Hyperparameters
from finetune_trainer.optim import build_optimizer
from finetune_trainer.schedules import build_scheduler, warmup_steps_for

TOTAL = 20
PEAK = 1e-2


def hp(name: str, **scheduler) -> Hyperparameters:
    return Hyperparameters.model_validate(
        {
            "learningRate": PEAK,
            "weightDecay": 0.0,
            "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8},
            "scheduler": {"name": name, **scheduler},
        }
    )


def curve(params: Hyperparameters, total: int = TOTAL, model: torch.nn.Module | None = None) -> list[float]:
    """The learning rate in effect at each optimizer step."""
    model = model or torch.nn.Linear(2, 2)
    opt = build_optimizer(model, params, ())
    sched = build_scheduler(opt, params, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def rising(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


def falling(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:], strict=False))


def test_constant_warms_up_then_stays_flat():
    lrs = curve(hp("constant", warmupSteps=4))
    assert lrs[0] == 0.0
    assert rising(lrs[:5])
    assert lrs[4:] == pytest.approx([PEAK] * (TOTAL - 4))


def test_linear_warms_up_then_decays_linearly_to_zero():
    lrs = curve(hp("linear", warmupSteps=4))
    assert rising(lrs[:5]) and lrs[4] == pytest.approx(PEAK)
    assert lrs[4:] == pytest.approx([PEAK * (TOTAL - s) / (TOTAL - 4) for s in range(4, TOTAL)])


def test_cosine_follows_half_cosine_after_warmup():
    lrs = curve(hp("cosine", warmupSteps=4))
    assert rising(lrs[:5])
    expected = [PEAK * 0.5 * (1 + math.cos(math.pi * (s - 4) / (TOTAL - 4))) for s in range(4, TOTAL)]
    assert lrs[4:] == pytest.approx(expected)
    # cosine stays higher than linear early on and lower late
    linear = curve(hp("linear", warmupSteps=4))
    assert lrs[6] > linear[6] and lrs[-3] < linear[-3]


def test_warmup_ratio_is_a_fraction_of_total_steps():
    assert warmup_steps_for(hp("linear", warmupRatio=0.25), TOTAL) == 5
    lrs = curve(hp("linear", warmupRatio=0.25))
    assert lrs[5] == pytest.approx(PEAK) and rising(lrs[:6]) and falling(lrs[5:])


def test_onecycle_rises_during_warmup_then_anneals_far_below_start():
    lrs = curve(hp("onecycle", warmupSteps=6))
    top = max(range(TOTAL), key=lrs.__getitem__)
    assert lrs[top] == pytest.approx(PEAK)
    assert 4 <= top <= 6
    assert rising(lrs[: top + 1]) and falling(lrs[top:])
    assert lrs[0] == pytest.approx(PEAK / 25)  # torch's OneCycleLR div_factor
    assert lrs[-1] < lrs[0] / 10  # final_div_factor anneals below the starting rate


def test_onecycle_past_the_end_holds_the_final_rate():
    params = hp("onecycle", warmupSteps=6)
    opt = build_optimizer(torch.nn.Linear(2, 2), params, ())
    sched = build_scheduler(opt, params, TOTAL)
    for _ in range(TOTAL - 1):
        opt.step()
        sched.step()
    last = opt.param_groups[0]["lr"]
    for _ in range(3):  # torch's OneCycleLR raises "Tried to step ... times" here
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(last)


def test_onecycle_keeps_the_users_betas():
    params = hp("onecycle", warmupSteps=6)
    opt = build_optimizer(torch.nn.Linear(2, 2), params, ())
    build_scheduler(opt, params, TOTAL)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_schedules_keep_per_group_ratios():
    """The head's 10x learning rate stays 10x through the schedule."""
    params = hp("cosine", warmupSteps=2).model_copy(update={"head_learning_rate_multiplier": 10.0})
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(2, 2))
    model.add_module("classifier", torch.nn.Linear(2, 2))
    opt = build_optimizer(model, params, ("classifier",))
    sched = build_scheduler(opt, params, TOTAL)
    for _ in range(7):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head/no_decay"] == pytest.approx(10 * lrs["body/no_decay"])
    assert 0 < lrs["body/no_decay"] < PEAK


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "onecycle"])
def test_warmup_not_shorter_than_training_is_rejected_with_the_field(name):
    params = hp(name, warmupSteps=30)
    opt = build_optimizer(torch.nn.Linear(2, 2), params, ())
    with pytest.raises(ValueError) as info:
        build_scheduler(opt, params, TOTAL)
    assert str(info.value) == (
        "spec.hyperparameters.scheduler.warmupSteps: warm-up (30 steps) must be shorter than training "
        "(20 optimizer steps); lower it or add epochs"
    )


def test_warmup_equal_to_total_is_rejected():
    with pytest.raises(ValueError, match="warm-up \\(20 steps\\)"):
        warmup_steps_for(hp("linear", warmupSteps=20), TOTAL)
    assert warmup_steps_for(hp("linear", warmupSteps=19), TOTAL) == 19
