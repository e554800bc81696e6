import math

import pytest

from finetune_operator.api import validate_manifest
from finetune_operator.policy.early_stopping import Settings, decide


def hist(values, key="valLoss", **extra):
    return [{"epoch": i + 1, key: v, **extra} for i, v in enumerate(values)]


def test_min_mode_stops_after_patience_epochs_without_improvement():
    d = decide(hist([0.9, 0.5, 0.41, 0.45, 0.44]), Settings(patience=2))
    assert d.stop and d.reason == "PatienceExhausted"
    assert (d.best_epoch, d.best_value, d.epochs_without_improvement) == (3, 0.41, 2)
    assert "val_loss has not decreased" in d.message and "best 0.41 at epoch 3" in d.message


def test_min_mode_continues_inside_patience():
    d = decide(hist([0.9, 0.5, 0.41, 0.45]), Settings(patience=2))
    assert d.action == "continue" and d.best_epoch == 3


def test_max_mode():
    h = hist([0.5, 0.8, 0.79, 0.78], key="valMetric")
    s = Settings(metric="val_accuracy", mode="max", patience=2)
    assert decide(h, s).stop
    assert decide(h[:3], s).action == "continue"
    # In max mode a falling value is never an improvement.
    assert decide(hist([0.9, 0.1, 0.05], key="valMetric"), s).best_epoch == 1


def test_min_delta_ignores_tiny_improvements():
    h = hist([1.0, 0.9995, 0.999, 0.9985])
    assert decide(h, Settings(patience=3, min_delta=0.0)).action == "continue"
    d = decide(h, Settings(patience=3, min_delta=0.01))
    assert d.stop and d.best_epoch == 1


@pytest.mark.parametrize("patience,stop_at", [(0, 2), (1, 2), (3, 4)])
def test_patience_0_1_n(patience, stop_at):
    values = [0.5] + [0.6] * 6
    for n in range(1, len(values) + 1):
        if decide(hist(values[:n]), Settings(patience=patience)).stop:
            assert n == stop_at
            return
    pytest.fail("never stopped")


def test_nan_loss_fails_with_a_clear_reason():
    d = decide(hist([0.5, math.nan]), Settings())
    assert d.fail and d.reason == "LossIsNaN" and "epoch 2" in d.message and "learningRate" in d.message
    d = decide([{"epoch": 1, "trainLoss": math.inf, "valLoss": 0.3}], Settings())
    assert d.fail and "train loss" in d.message


def test_metric_that_never_appears_fails_after_patience():
    h = hist([0.5, 0.4, 0.3])  # only valLoss, but the job watches accuracy
    s = Settings(metric="val_accuracy", mode="max", patience=2)
    assert decide(h[:2], s).action == "continue"
    d = decide(h, s)
    assert d.fail and d.reason == "MetricMissing" and "val_accuracy" in d.message


def test_disabled_never_stops():
    assert decide(hist([0.1, 0.9, 0.9, 0.9]), Settings(enabled=False, patience=1)).action == "continue"


def test_no_stop_once_all_epochs_ran():
    assert decide(hist([0.1, 0.9, 0.9]), Settings(patience=1, total_epochs=3)).action == "continue"


def test_train_loss_metric_and_unsorted_history():
    h = [{"epoch": 2, "trainLoss": 0.7}, {"epoch": 1, "trainLoss": 0.5}, {"epoch": 3, "trainLoss": 0.8}]
    d = decide(h, Settings(metric="train_loss", patience=2))
    assert d.stop and d.best_epoch == 1


def test_settings_from_resolved_spec():
    job = validate_manifest({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "a"},
        "spec": {"model": {"name": "m"}, "dataset": {"source": "d"}, "preset": "max-accuracy",
                 "earlyStopping": {"metric": "val_accuracy", "minDelta": 0.001}},
    })
    s = Settings.from_spec(job.spec)
    assert (s.metric, s.mode, s.patience, s.min_delta, s.total_epochs) == ("val_accuracy", "max", 3, 0.001, 10)


def test_auto_mode_is_rejected():
    with pytest.raises(ValueError):
        decide(hist([0.5, 0.6]), Settings(mode="auto"))
