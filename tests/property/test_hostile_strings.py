"""Hostile strings in every user string the operator passes on: they never reach a shell, never expand
in the pod, never break a child's name limits, and arrive in the trainer's config as written."""

from __future__ import annotations

import copy
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_contract.rules import SECRET_NAME
from finetune_contract.spec import FineTuneJobSpec
from finetune_operator.plan import names
from finetune_operator.plan.children import desired_children

from . import pipeline as p
from . import strategies as s
from .pipeline import examples

HOSTILE_EXAMPLES = 500
NAME_EXAMPLES = 300


@st.composite
def hostile(draw, max_size: int = 253) -> str:
    """A hostile string: metacharacters, $(VAR)/${VAR}, unicode, up to the field's length limit."""
    parts = draw(st.lists(st.sampled_from(s.HOSTILE + s.SHELL) | st.text(min_size=1, max_size=6), min_size=1, max_size=6))
    text = "".join(parts)
    if draw(st.booleans()):
        text = (text * (max_size // max(1, len(text)) + 1))[:max_size]  # as long as the field allows
    return text[:max_size]


@st.composite
def hostile_manifests(draw) -> dict:
    manifest = draw(s.valid_manifests())
    spec = manifest["spec"]
    spec["model"] = {**(spec.get("model") or {}), "name": draw(hostile(1024)), "revision": draw(hostile())}
    spec["dataset"] = {**(spec.get("dataset") or {}), "source": draw(hostile(1024)), "textField": draw(hostile())}
    spec["dataset"].pop("validationFraction", None)
    spec["dataset"]["validationSource"] = draw(hostile(1024))
    spec["env"] = draw(st.dictionaries(s.ENV_NAMES, hostile(), min_size=1, max_size=4))
    for name in spec.get("secretEnv") or {}:  # a variable in both env and secretEnv is refused (a valid rule)
        spec["env"].pop(name, None)
    for name in [n for n in spec["env"] if re.search(SECRET_NAME, n)]:  # a clear-text credential is refused too
        del spec["env"][name]
    spec["output"] = {**(spec.get("output") or {}), "path": "/out/" + draw(hostile(1000))}
    return manifest


@settings(max_examples=examples(HOSTILE_EXAMPLES))
@given(hostile_manifests())
def test_hostile_strings_pass_through_literally(manifest):
    verdict = p.check(manifest)  # no shell, env literal after $(VAR) expansion, names and schemas valid
    assert not verdict.python, verdict.python
    config = json.loads(next(c for c in verdict.children if c["kind"] == "ConfigMap")["data"]["config.json"])
    # The config carries only fields that differ from their defaults (an older trainer sees only what a job
    # sets), so compare what the trainer will read: the config parsed back, defaults filled.
    received = FineTuneJobSpec.model_validate(config["spec"]).model_dump(by_alias=True)
    def unset_nulls(obj):  # null means unset (as the API server prunes it)
        if isinstance(obj, dict):
            return {k: unset_nulls(v) for k, v in obj.items() if v is not None}
        return obj

    sent = FineTuneJobSpec.model_validate(unset_nulls(manifest["spec"])).model_dump(by_alias=True)  # defaults filled
    for field in ("model", "dataset"):
        for key, val in manifest["spec"][field].items():
            if val is not None:
                assert received[field][key] == sent[field][key], f"{field}.{key} changed on its way to the trainer"
                if isinstance(val, str):
                    assert received[field][key] == val, f"{field}.{key} changed on its way to the trainer"


def test_dollar_references_are_escaped_in_the_pod():
    manifest = copy.deepcopy(p.REFERENCE)
    manifest["spec"]["env"] = {"A": "$(MASTER_ADDR)", "B": "$$", "C": "${HOME}", "D": "$(A)", "E": "x$"}
    manifest["spec"]["output"] = {"path": "/out/$(FINETUNE_JOB_NAME)"}
    children = desired_children(p.validate_manifest(manifest), p.SETTINGS)
    seen = p.container_env_as_seen(p.trainer_container(children))
    assert {k: seen[k] for k in "ABCDE"} == manifest["spec"]["env"]
    assert seen["FINETUNE_OUTPUT_DIR"] == "/out/$(FINETUNE_JOB_NAME)"
    assert p.env_problems(manifest, children) == []


def test_the_trainer_starts_without_a_shell():
    container = p.trainer_container(desired_children(p.validate_manifest(p.REFERENCE), p.SETTINGS))
    assert container["command"] == ["finetune-trainer"] and "args" not in container


@settings(max_examples=examples(NAME_EXAMPLES))
@given(s.job_names(), s.job_names())
def test_child_names_fit_and_never_collide(a, b):
    for job in (a, b):
        for fn, limit in ((names.batch_job_name, names.DNS_LABEL_MAX - 10), (names.service_name, 63),
                          (names.config_map_name, 63), (names.service_account_name, 63)):
            name = fn(job)
            assert len(name) <= limit and p.DNS1123_LABEL.fullmatch(name), name
            if not name.startswith(job + "-"):  # cut: a hash of the full name keeps it unique
                assert re.fullmatch(r".+-[0-9a-f]{8}", name), name
    if a != b:
        for fn in (names.batch_job_name, names.service_name, names.config_map_name, names.service_account_name):
            assert fn(a) != fn(b)


def test_longest_names_are_cut_with_a_hash():
    a, b = "a" * 49 + "x", "a" * 49 + "y"  # the longest allowed job names, one character apart
    assert names.batch_job_name(a) != names.batch_job_name(b)
    assert all(len(names.batch_job_name(n)) == names.DNS_LABEL_MAX - 10 for n in (a, b))
