"""Operator settings: read once from FTO_* variables, with clear errors."""

import pytest

from finetune_operator.settings import from_env


def test_defaults_and_overrides():
    s = from_env({})
    assert (s.metrics_port, s.health_port, s.clusterwide, s.peering) == (8080, 8081, True, "")
    s = from_env({"FTO_NAMESPACES": "a, b", "FTO_METRICS_PORT": "9000", "FTO_LOG_FORMAT": "text"})
    assert s.namespaces == ("a", "b") and not s.clusterwide and s.metrics_port == 9000 and s.log_format == "text"


def test_peering_priorities_differ_between_replicas_and_can_be_set():
    # kopf pauses every replica when two peers share a priority: pods must never tie by default.
    a, b = from_env({"HOSTNAME": "fto-7d9-abcde"}), from_env({"HOSTNAME": "fto-7d9-fghij"})
    assert a.peering_priority != b.peering_priority
    assert from_env({"HOSTNAME": "fto-7d9-abcde"}).peering_priority == a.peering_priority  # stable per pod
    assert from_env({"FTO_PEERING_PRIORITY": "7"}).peering_priority == 7


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="FTO_LOG_FORMAT"):
        from_env({"FTO_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="FTO_METRICS_PORT"):
        from_env({"FTO_METRICS_PORT": "eighty"})


def test_unknown_variables_are_reported():
    assert "FTO_NAMESAPCES" in from_env({"FTO_NAMESAPCES": "x"}).extra
