"""The suite's own shortcuts, pinned against the real thing they stand in for."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest

from finetune_operator import cli
from finetune_operator.plan.children import desired_children

from . import pipeline as p


def _children():
    return desired_children(p.validate_manifest(p.REFERENCE), p.SETTINGS)


@pytest.mark.parametrize("version", p.K8S_VERSIONS)
def test_cached_validators_agree_with_kubernetes_validate(version):
    for child in _children():
        kubernetes_validate.validate(child, version, strict=True)
        assert p.child_errors(child) == []
        broken = {**copy.deepcopy(child), "surplus": 1}  # strict validation refuses unknown fields
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, version, strict=True)
        assert p.child_errors(broken), f"{child['kind']}: the cached validator accepts what kubernetes-validate refuses"


def test_int32_fields_are_checked_where_kubernetes_validate_does_not():
    job = next(c for c in _children() if c["kind"] == "Job")
    job["spec"]["ttlSecondsAfterFinished"] = 2**31
    kubernetes_validate.validate(job, "1.30.0", strict=True)  # passes there: jsonschema ignores `format`
    assert any("int32" in e for e in p.child_errors(job))


def test_cli_main_dispatches_validate_to_cmd_validate(tmp_path, capsys):
    # run_cli calls cmd_validate directly; this pins that `finetune validate FILE` is exactly that.
    args = cli.parser().parse_args(["validate", str(tmp_path / "x.yaml")])
    assert args.fn is cli.cmd_validate and args.show_resolved is False
    rc, out = p.run_cli(p.REFERENCE)
    assert rc == 0 and "valid FineTuneJob reference" in out
    (tmp_path / "job.yaml").write_text(Path(p._TMP, "job.yaml").read_text())
    assert cli.main(["validate", str(tmp_path / "job.yaml")]) == 0


def test_kube_expand_follows_kubernetes():
    env = {"A": "1", "B": "x$(A)"}
    assert p.kube_expand("$(A)", env) == "1"
    assert p.kube_expand("$$(A)", env) == "$(A)"  # escaped
    assert p.kube_expand("$(UNKNOWN)", env) == "$(UNKNOWN)"  # unknown: left as written
    assert p.kube_expand("$(A", env) == "$(A"  # unterminated
    assert p.kube_expand("a$", env) == "a$" and p.kube_expand("$$", env) == "$" and p.kube_expand("$x", env) == "$x"
    assert p.kube_expand("${A}", env) == "${A}"  # the shell's syntax means nothing to Kubernetes
    for s in ["$(A)", "$$(A)", "a$$b$", "$(", "$$$(A)"]:
        assert p.kube_expand(s.replace("$", "$$"), env) == s  # doubling every $ is exactly an escape
