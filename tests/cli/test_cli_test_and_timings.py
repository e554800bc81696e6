"""`finetune status` and `finetune run` show the held-out test figures and the stage timings (issue 13)."""

from __future__ import annotations

from finetune_operator.cli.render import held_out_line, status_text, timings_line


def _obj(**status):
    return {"metadata": {"name": "bbc-news", "namespace": "ml", "creationTimestamp": "2026-12-01T10:00:00Z"},
            "spec": {"earlyStopping": {"metric": "val_accuracy"}}, "status": {"phase": "Succeeded", **status}}


def test_status_shows_test_metrics_and_timings():
    text = status_text(_obj(
        testMetrics={"test_accuracy": 0.935, "test_loss": 0.21, "test_f1": 0.93}, testExamples=200, testEpoch=2,
        timings={"podStartSeconds": 4.2, "setupSeconds": 6.0, "dataSeconds": 0.8, "dataCached": True,
                 "modelLoadSeconds": 1.1, "firstStepSeconds": 0.9, "firstStepTime": "2026-12-01T10:00:13.500Z"}),
        curves=False)
    assert "Test:        accuracy 0.935   f1 0.93   loss 0.21   (200 held-out examples, best checkpoint of epoch 2)" in text
    assert ("Timings:     pod start 4.2 s, setup 6.0 s, data 0.8 s (cached), model load 1.1 s, first step 0.9 s; "
            "apply to first step 13.5 s") in text


def test_status_without_a_test_split_says_nothing_of_it():
    text = status_text(_obj(), curves=False)
    assert "Test:" not in text and "Timings:" not in text


def test_run_prints_the_test_line():
    line = held_out_line({"metrics": {"test_loss": 0.2, "test_accuracy": 0.9351}, "examples": 200, "epoch": 2})
    assert line == "held-out test (200 examples, best checkpoint of epoch 2): loss 0.2000, accuracy 0.9351"


def test_timings_without_the_first_step_have_no_total():
    assert timings_line({"podStartSeconds": 3.0}, "2026-12-01T10:00:00Z") == "pod start 3.0 s"
