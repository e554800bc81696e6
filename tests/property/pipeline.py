"""One manifest through every layer that judges it, and the properties that must hold across them.

Layers, in the order a manifest meets them:
1. `finetune validate FILE` (the CLI, called in-process on a YAML file),
2. the API server's admission of the object: request checks, the CRD's OpenAPI schema, its CEL rules
   (tests/api/crd_harness.py, which the e2e emulation also uses for custom objects),
3. the operator's reconcile planning: `validate_manifest` (parse + resolve against the preset) and
   `desired_children`, whose output is validated like `kubernetes-validate --strict` would, for
   Kubernetes 1.30 and the newest version that package ships, and checked against name limits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from api import crd_harness as h  # tests/ is on sys.path (pytest's rootdir-relative import, and report.py)
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from finetune_operator import cli
from finetune_operator.api import InvalidFineTuneJob, validate_manifest
from finetune_operator.api.rules import RULES
from finetune_operator.plan.children import desired_children
from finetune_operator.settings import Settings

SETTINGS = Settings(trainer_image="registry.example/finetune-trainer:1.0")
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD = h.load_crd()
RULE_MESSAGES = {r.message for r in RULES}

# Checks the CRD cannot express, so only the operator's validation makes them: a manifest the CRD
# accepts and the Python validation rejects is a failure unless every problem's path matches here.
# Key: a regular expression on the problem's path; value: why the CRD cannot check it.
# Every other check the operator makes (types, ranges, rules re-run after the preset fills the hyperparameters)
# has a CRD twin, and 5,000 generated manifests found no disagreement.
OPERATOR_ONLY: dict[str, str] = {
    # rules.credential_problems: a credential's name with a literal value, a variable in both env and secretEnv.
    # A CEL rule reading map keys is beyond the CRD's cost budget (keys have no maxLength).
    r"spec\.env\.[A-Za-z_][A-Za-z0-9_]*": "credential name with a clear-text value",
    r"spec\.secretEnv\.[A-Za-z_][A-Za-z0-9_]*": "variable in both env and secretEnv",
}

# Outcome names, in layer order (docs/reliability.md reports them).
REQUEST, SCHEMA, CEL, OPERATOR, ACCEPTED = (
    "rejected: API server request checks (apiVersion, kind, metadata.name)",
    "rejected: CRD OpenAPI schema (types, ranges, enums, required, unknown fields)",
    "rejected: CRD CEL rules",
    "rejected: operator validation only (allowlisted checks the CRD cannot express)",
    "accepted: children rendered and validated",
)
STATS: Counter[str] = Counter()


def examples(n: int) -> int:
    """`n` examples under the "ci" profile (hypothesis' default of 100 max_examples), n/20 under "dev"."""
    from hypothesis import settings

    return max(5, n * settings().max_examples // 100)


@dataclass
class Expectation:
    """What a mutation must cause: a rejection naming `path`, by one of `layers` (crd_harness sources)."""

    kind: str
    path: str
    layers: tuple[str, ...]  # "request", "unknown-field", "schema", "cel", or "operator"
    detail: str = ""


@dataclass
class Verdict:
    manifest: dict[str, Any]
    python: dict[str, list[str]]  # problem path -> messages
    crd: list[h.Violation]
    cli_rc: int
    cli_out: str
    children: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        sources = {v.source for v in self.crd}
        if "request" in sources:
            return REQUEST
        if sources & {"schema", "unknown-field"}:
            return SCHEMA
        if "cel" in sources:
            return CEL
        return OPERATOR if self.python else ACCEPTED


# --- layer 1: the CLI --------------------------------------------------------------------------

_TMP = tempfile.mkdtemp(prefix="ftj-property-")


def run_cli(manifest: dict[str, Any]) -> tuple[int, str]:
    """`finetune validate FILE` in-process: the same argv parsing, file reading and YAML loading."""
    path = os.path.join(_TMP, "job.yaml")
    text = yaml.dump(manifest, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    if yaml.load(text, Loader=yaml.CSafeLoader) != manifest:  # the suite's own guard: what the CLI reads is what the others get
        raise AssertionError(f"YAML round trip changed the manifest: {text!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        # cmd_validate is what `finetune validate FILE` dispatches to; argparse itself is left out (it
        # costs more than validating), and test_cli_main_dispatches_to_cmd_validate pins the dispatch.
        rc = cli.cmd_validate(argparse.Namespace(file=path, show_resolved=False))
    return rc, out.getvalue()


# --- layer 3: children as the API server's OpenAPI validation sees them ---------------------------

# kubernetes-validate reads its schema files on every call (~25 ms a child); this builds each validator
# once from the same files, the same way (kubernetes_validate.utils.validate), and caches verdicts by
# child hash. It also checks `format: int32/int64`, which the API server enforces when it decodes the
# JSON into Go types (a ttlSecondsAfterFinished of 2**31 is refused) and jsonschema ignores by default.
_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(v: object) -> bool:
    return not isinstance(v, int) or isinstance(v, bool) or -(2**31) <= v < 2**31


@_FORMATS.checks("int64")
def _int64(v: object) -> bool:
    return not isinstance(v, int) or isinstance(v, bool) or -(2**63) <= v < 2**63


def _inline(node: Any, defs: dict[str, Any], memo: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """The schema with every `$ref` into _definitions.json replaced by its target (shared, not copied):
    the same validation without a registry lookup per reference (a third faster). A recursive reference
    (none in the kinds the operator creates) stays a `$ref`, which the registry still resolves."""
    if isinstance(node, dict):
        if "$ref" in node and node["$ref"].split("/")[-1] not in stack:
            name = node["$ref"].split("/")[-1]
            if name not in memo:
                memo[name] = _inline(defs[name], defs, memo, (*stack, name))
            rest = {k: _inline(v, defs, memo, stack) for k, v in node.items() if k != "$ref"}
            return {**memo[name], **rest} if rest else memo[name]
        return {k: _inline(v, defs, memo, stack) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs, memo, stack) for v in node]
    return node


@lru_cache(maxsize=64)
def _validator(version: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    schema_dir = f"v{version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group_version}.json", version)
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    inlined = _inline(schema, defs["$defs"], {})
    return jsonschema.validators.Draft202012Validator(inlined, registry=registry, format_checker=_FORMATS)


_CHILD_VERDICTS: dict[str, str | None] = {}


def child_errors(child: dict[str, Any]) -> list[str]:
    """Strict OpenAPI errors of a child for every version in K8S_VERSIONS (cached by content)."""
    out = []
    for version in K8S_VERSIONS:
        key = hashlib.sha256(json.dumps([version, child], sort_keys=True).encode()).hexdigest()
        if key not in _CHILD_VERDICTS:
            err = jsonschema.exceptions.best_match(_validator(version, child["kind"], child["apiVersion"]).iter_errors(child))
            _CHILD_VERDICTS[key] = None if err is None else f"{version}: {err.json_path}: {err.message}"
        if _CHILD_VERDICTS[key]:
            out.append(f"{child['kind']} {_CHILD_VERDICTS[key]}")
    return out


# apimachinery's validation of names and labels (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def _qualified_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(QUALIFIED_NAME.fullmatch(name))


def name_problems(children: list[dict[str, Any]], nodes: int) -> list[str]:
    """Name and label limits of every child, and of the pods and hostnames the Job will create."""
    out = []
    for child in children:
        meta = child["metadata"]
        name, kind = meta["name"], child["kind"]
        # The house rule (STYLE.md 4): every child name is a DNS-1123 label; a Service name is DNS-1035.
        pattern = DNS1035_LABEL if kind == "Service" else DNS1123_LABEL
        if len(name) > 63 or not pattern.fullmatch(name):
            out.append(f"{kind} name {name!r} ({len(name)} chars) is not a DNS label")
        for key, val in (meta.get("labels") or {}).items():
            if not _qualified_key_ok(key):
                out.append(f"{kind} label key {key!r} is invalid")
            if len(val) > 63 or not LABEL_VALUE.fullmatch(val):
                out.append(f"{kind} label {key}={val!r} is not a valid label value")
        for key in (meta.get("annotations") or {}):
            if not _qualified_key_ok(key):
                out.append(f"{kind} annotation key {key!r} is invalid")
        if kind == "Job":
            pod = child["spec"]["template"]
            for key, val in (pod["metadata"].get("labels") or {}).items():
                if len(val) > 63 or not LABEL_VALUE.fullmatch(val):
                    out.append(f"pod label {key}={val!r} is not a valid label value")
            # Indexed Job pods: hostname `<job>-<index>` (a DNS label), name `<job>-<index>-<5 random>`.
            hostname = f"{name}-{nodes - 1}"
            if len(hostname) > 63 or not DNS1123_LABEL.fullmatch(hostname):
                out.append(f"pod hostname {hostname!r} ({len(hostname)} chars) is not a DNS label")
            if len(f"{hostname}-abcde") > 63:
                out.append(f"pod name {hostname}-xxxxx is longer than 63 characters")
            sub = pod["spec"].get("subdomain")
            if sub and (len(sub) > 63 or not DNS1123_LABEL.fullmatch(sub)):
                out.append(f"pod subdomain {sub!r} is not a DNS label")
    return out


# --- Kubernetes' $(VAR) expansion (k8s.io/kubernetes/third_party/forked/golang/expansion) --------


def kube_expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet makes of a container's command, args or env value: `$(VAR)` of a defined variable
    is replaced, `$$` becomes `$`, anything else stays. A port of expansion.Expand + MappingFuncFor."""
    out = []
    i, checkpoint = 0, 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            out.append(text[checkpoint:i])
            rest = text[i + 1:]
            if rest[0] == "$":
                read, is_var, advance = "$", False, 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:
                    read, is_var, advance = "$(", False, 1
                else:
                    read, is_var, advance = rest[1:close], True, close + 1
            else:
                read, is_var, advance = "$" + rest[0], False, 1
            out.append(env.get(read, f"$({read})") if is_var else read)
            i += advance
            checkpoint = i + 1
        i += 1
    return "".join(out) + text[checkpoint:]


def container_env_as_seen(container: dict[str, Any]) -> dict[str, str]:
    """The environment the trainer process gets: each value expanded against the ones before it (kubelet)."""
    seen: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            seen[item["name"]] = kube_expand(item["value"], seen)
    return seen


def trainer_container(children: list[dict[str, Any]]) -> dict[str, Any]:
    job = next(c for c in children if c["kind"] == "Job")
    return job["spec"]["template"]["spec"]["containers"][0]


REFERENCE = {
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "reference"},
    "spec": {"model": {"name": "m"}, "dataset": {"source": "d"}},
}


@lru_cache(maxsize=1)
def reference_argv() -> tuple[str, ...]:
    c = trainer_container(desired_children(validate_manifest(REFERENCE), SETTINGS))
    return tuple(c.get("command") or []) + tuple(c.get("args") or [])


SHELLS = {"sh", "bash", "dash", "zsh", "ash", "ksh", "busybox", "env"}


def shell_problems(children: list[dict[str, Any]]) -> list[str]:
    """The trainer starts without a shell, and its command line is the same whatever the user wrote."""
    c = trainer_container(children)
    argv = tuple(c.get("command") or []) + tuple(c.get("args") or [])
    out = []
    if any(a.rsplit("/", 1)[-1] in SHELLS for a in argv) or "-c" in argv:
        out.append(f"the trainer is started through a shell: {argv}")
    if argv != reference_argv():
        out.append(f"user input reaches the trainer's command line: {argv} (a minimal job has {reference_argv()})")
    return out


def env_problems(manifest: dict[str, Any], children: list[dict[str, Any]]) -> list[str]:
    """Every user string in the pod's environment reaches the trainer literally (no $(VAR) expansion)."""
    spec = manifest["spec"]
    seen = container_env_as_seen(trainer_container(children))
    out = []
    for key, val in (spec.get("env") or {}).items():
        if val is None or key not in seen:
            continue  # a name the operator owns: its own value wins (children.trainer_env)
        if seen[key] != val:
            out.append(f"env {key}: the trainer would see {seen[key]!r} instead of {val!r}")
    path = (spec.get("output") or {}).get("path")
    if path is not None and seen.get("FINETUNE_OUTPUT_DIR") != path:
        out.append(f"FINETUNE_OUTPUT_DIR: the trainer would see {seen.get('FINETUNE_OUTPUT_DIR')!r} instead of {path!r}")
    return out


# --- the whole trip ---------------------------------------------------------------------------


def judge(manifest: dict[str, Any]) -> Verdict:
    """Run every layer. Any exception other than the intended InvalidFineTuneJob propagates: a crash."""
    snapshot = copy.deepcopy(manifest)
    rc, out = run_cli(manifest)
    crd = h.validate(manifest, CRD).violations
    python: dict[str, list[str]] = {}
    children: list[dict[str, Any]] = []
    try:
        job = validate_manifest(manifest)
    except InvalidFineTuneJob as err:
        for p in err.problems:
            python.setdefault(p.path, []).append(p.message)
    else:
        children = desired_children(job, SETTINGS)
    if manifest != snapshot:
        raise AssertionError("a layer changed the manifest it was given")
    return Verdict(manifest, python, crd, rc, out, children)


def _operator_only(path: str) -> bool:
    return any(re.fullmatch(p, path) for p in OPERATOR_ONLY)


def check(manifest: dict[str, Any], expect: Expectation | None = None) -> Verdict:
    """Judge `manifest` and assert every cross-layer property; count the outcome."""
    v = judge(manifest)
    crd_paths = {x.path for x in v.crd}
    crd_text = "\n".join(map(str, v.crd))

    # The CLI says what the operator's validation says, naming every field.
    if v.python:
        assert v.cli_rc == 1, f"`finetune validate` accepted what validate_manifest rejects: {v.python}\n{v.cli_out}"
        for path in v.python:
            assert f"  - {path}: " in v.cli_out, f"`finetune validate` does not name {path}:\n{v.cli_out}"
    else:
        assert v.cli_rc == 0 and "valid FineTuneJob" in v.cli_out, f"`finetune validate` rejected a valid manifest:\n{v.cli_out}"

    # The layers agree: a manifest the CRD accepts and Python rejects (or the reverse) is a failure,
    # unless every Python problem is an allowlisted check the CRD cannot express.
    if not v.crd:
        unexplained = [p for p in v.python if not _operator_only(p)]
        assert not unexplained, f"the CRD accepts but the operator rejects {[(p, v.python[p]) for p in unexplained]}"
    if v.crd:
        assert v.python, f"the CRD rejects but the operator accepts:\n{crd_text}"
        # Every field the operator names, the CRD names too (unless it is operator-only) ...
        crd_skipped_cel = bool(crd_paths & {"apiVersion", "kind"}) or any(
            x.source == "schema" and ("is not of type" in x.message or "is not valid under any" in x.message) for x in v.crd
        )
        for path, messages in v.python.items():
            if path in crd_paths or _operator_only(path):
                continue
            # The server does not run CEL on an unroutable object or after a type error; Python still does.
            if crd_skipped_cel and all(m in RULE_MESSAGES for m in messages):
                continue
            raise AssertionError(f"the operator rejects {path} ({messages}); the CRD does not:\n{crd_text}")
        # ... and every field the CRD names, the operator names, except CEL rules Python skips after
        # a schema error (it checks cross-field rules only on a spec that parsed).
        python_parsed = all(m in RULE_MESSAGES for ms in v.python.values() for m in ms)
        for x in v.crd:
            if x.path in v.python or (x.source == "cel" and not python_parsed):
                continue
            raise AssertionError(f"the CRD rejects {x} but the operator does not name {x.path}: {v.python}")

    # An intended invalid manifest is rejected at the earliest layer able to, naming its field.
    if expect is not None:
        assert v.python, f"{expect.kind} {expect.detail}: the operator accepted it"
        assert expect.path in v.python, f"{expect.kind}: the operator does not name {expect.path}: {v.python}"
        if expect.layers == ("operator",):
            assert expect.path not in crd_paths, f"{expect.kind}: the CRD checks {expect.path}; remove it from OPERATOR_ONLY"
        else:
            hits = [x for x in v.crd if x.path == expect.path]
            assert hits, f"{expect.kind} {expect.detail}: the CRD does not name {expect.path}:\n{crd_text or 'accepted'}"
            assert {x.source for x in hits} & set(expect.layers), (
                f"{expect.kind}: {expect.path} rejected by {[x.source for x in hits]}, expected {expect.layers}"
            )
            assert all(expect.path in str(x) for x in hits)

    # A valid manifest's children are valid Kubernetes objects, within name limits, with no shell and
    # no $(VAR) expansion of user strings.
    if not v.python:
        nodes = (manifest["spec"].get("distributed") or {}).get("nodes") or 1
        problems = [e for c in v.children for e in child_errors(c)]
        problems += name_problems(v.children, nodes)
        problems += shell_problems(v.children)
        problems += env_problems(manifest, v.children)
        assert not problems, "\n".join(problems)

    STATS["manifests"] += 1
    STATS["invalid" if v.python else "valid"] += 1
    STATS[v.outcome] += 1
    if expect is not None:
        STATS[f"mutation: {expect.kind}"] += 1
    return v
