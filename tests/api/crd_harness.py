"""Validate a custom object against a CRD the way the Kubernetes API server does, offline.

There is no API server on these machines (../shared/FACTS.md), and `kubernetes-validate` does not
check custom objects against their CRD. This harness reproduces the steps of the apiextensions
server for one create request, using only the CRD's own `openAPIV3Schema`:

1. routing: `apiVersion` must name a served version of the CRD's group and `kind` its kind;
2. object meta: `metadata.name` is required and must be a DNS-1123 subdomain (the server checks
   this for every custom resource, whatever the schema says);
3. nulls in non-nullable fields are dropped, then unknown fields are pruned; with strict field
   validation (kubectl's default since 1.27) every pruned field is an error;
4. structural defaults are applied, top-down, so a defaulted `{}` gets its own nested defaults;
5. OpenAPI v3 validation (types, enums, ranges, lengths, required) with jsonschema's Draft 4,
   which reads the boolean `exclusiveMinimum` Kubernetes writes (FACTS.md: plain `validate` does not);
6. every `x-kubernetes-validations` rule is compiled and evaluated with cel-python at its schema
   node, `self` bound to that node's value converted by the node's type (a `number` is a CEL double
   even when the JSON says `0`), skipping nodes whose value is absent. Like the server, CEL runs
   only when step 5 found no type errors.

Each problem comes back as a `Violation(path, message, source)` with the path in the same form the
Python validation uses (`spec.hyperparameters.learningRate`, `spec.tolerations[0].key`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "finetunejobs.finetune.dev.yaml"

# apimachinery's IsDNS1123Subdomain, which the server applies to every custom resource's name.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class Violation:
    path: str
    message: str
    source: str  # "request" (apiVersion/kind/metadata), "unknown-field", "schema" or "cel"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Result:
    obj: dict[str, Any]  # the object as it would be stored: pruned and defaulted
    violations: list[Violation]

    @property
    def paths(self) -> set[str]:
        return {v.path for v in self.violations}


def load_crd(path: Path = CRD_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def storage_schema(crd: dict[str, Any]) -> dict[str, Any]:
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


# --- steps 3 and 4: nulls, pruning, defaults --------------------------------------------------


def _prune(value: Any, schema: dict[str, Any], path: str, out: list[Violation]) -> Any:
    """Drop nulls the schema does not allow and fields it does not know; report the unknown ones."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and extra is None:
            return value  # a bare `type: object` (metadata): the server handles it elsewhere
        kept = {}
        for key, item in value.items():
            sub = (props or {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                out.append(Violation(_join(path, key), f'unknown field "{_join(path, key)}"', "unknown-field"))
                continue
            if item is None and not sub.get("nullable"):
                continue  # the server drops nulls before defaulting, so a default can apply
            if not path and key == "metadata":
                kept[key] = item  # ObjectMeta is the server's: a schema may restrict name, never prune it
                continue
            kept[key] = _prune(item, sub, _join(path, key), out)
        return kept
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(item, schema["items"], _join(path, i), out) for i, item in enumerate(value)]
    return value


def _default(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _default(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not schema.get("properties"):
            for key in value:
                value[key] = _default(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_default(item, schema["items"]) for item in value]
    return value


# --- step 5: OpenAPI schema ---------------------------------------------------------------


def _with_int_or_string(node: Any) -> Any:
    """The server validates `x-kubernetes-int-or-string` as anyOf integer/string; Draft 4 needs it spelled out."""
    if isinstance(node, dict):
        out = {k: _with_int_or_string(v) for k, v in node.items()}
        if node.get("x-kubernetes-int-or-string"):
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(node, list):
        return [_with_int_or_string(v) for v in node]
    return node


def _schema_violations(obj: dict[str, Any], schema: dict[str, Any]) -> tuple[list[Violation], bool]:
    """Draft 4 validation; returns the violations and whether any of them is a type error."""
    validator = jsonschema.Draft4Validator(_with_int_or_string(schema))
    out: list[Violation] = []
    type_error = False
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = ""
        for part in err.absolute_path:
            path = _join(path, part)
        if err.validator == "required":
            # The server names the missing field itself: "spec.model: Required value".
            missing = re.search(r"'([^']+)' is a required property", err.message)
            path = _join(path, missing.group(1)) if missing else path
            message = "Required value"
        else:
            message = err.message
        type_error = type_error or err.validator in ("type", "anyOf")
        out.append(Violation(path or "(root)", message, "schema"))
    return out, type_error


# --- step 6: CEL --------------------------------------------------------------------------


def _to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """JSON value -> CEL value typed by the schema, as the server's CEL type adapter does."""
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    kind = schema.get("type")
    if kind == "object" or isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celtypes.MapType(
            {celtypes.StringType(k): _to_cel(v, props.get(k, extra)) for k, v in value.items()}
        )
    if kind == "array" or isinstance(value, list):
        return celtypes.ListType([_to_cel(v, schema.get("items") or {}) for v in value])
    if kind == "number":
        return celtypes.DoubleType(value)
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    return celtypes.StringType(value)


_ENV = celpy.Environment()


@lru_cache(maxsize=512)
def compile_rule(rule: str) -> celpy.Runner:
    """Compile once; raises celpy.CELParseError for a rule the CEL grammar rejects."""
    return _ENV.program(_ENV.compile(rule))


def _cel_nodes(value: Any, schema: dict[str, Any], path: str):
    """Yield (value, schema, path) for every present node, top-down."""
    yield value, schema, path
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _cel_nodes(item, sub, _join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _cel_nodes(item, schema["items"], _join(path, i))


def _root_view(obj: dict[str, Any]) -> dict[str, Any]:
    # CEL rules at the root see only metadata.name and metadata.generateName.
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in ("name", "generateName")}
    return {**obj, "metadata": meta}


# --- memoised evaluation ------------------------------------------------------------------
# cel-python walks the parse tree on every evaluation (~2 ms a rule), and the generated-input suite
# (tests/property) evaluates tens of thousands. A rule that reads `self` only through field chains
# (`self.a.b`, `has(self.a.b)`) depends on nothing but the values at the ends of those chains, so its
# verdict is memoised on them; any other use of `self` keys on the whole value.
# tests/property/test_harness_memo.py checks memoised and direct verdicts agree.
_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_SELF_CHAIN = re.compile(r"\bself((?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\s*\()?")
_ABSENT = "\x00absent"


@lru_cache(maxsize=512)
def _chains(rule: str) -> tuple[tuple[bool, tuple[str, ...]], ...] | None:
    """(presence only?, field chain) for each way a rule reads `self`; None when it uses `self` otherwise.

    `has(self.a.b)` observes only whether a and a.b exist; any other `self.a.b` observes the value.
    """
    text = _STRING_LITERAL.sub("''", rule)
    chains = set()
    for m in _SELF_CHAIN.finditer(text):
        parts = m.group(1).split(".")[1:]
        if m.group(2) and parts:
            parts = parts[:-1]  # `self.name.size()`: size is a method, not a field
        if not parts or text[m.end(1):m.end(1) + 1] == "[":
            return None
        presence = text[:m.start()].rstrip().endswith("has(") and text[m.end(1):].lstrip().startswith(")")
        chains.add((presence, tuple(parts)))
    return tuple(sorted(chains))


def _projection(value: Any, chains: tuple[tuple[bool, tuple[str, ...]], ...]) -> list[Any]:
    out = []
    for presence, chain in chains:
        cur: Any = value
        for depth, part in enumerate(chain):
            if not isinstance(cur, dict) or part not in cur:
                cur = [_ABSENT, depth]
                break
            cur = cur[part]
        else:
            cur = "\x00present" if presence else cur
        out.append(cur)
    return out


_MEMO: dict[tuple[str, int, str], tuple[str, str]] = {}
_MEMO_NODES: dict[int, dict[str, Any]] = {}  # keeps each node alive, so its id is never reused


def evaluate_rule(rule: str, value: Any, node: dict[str, Any]) -> tuple[str, str]:
    """("ok" | "fail" | "error", error text) of one rule on one value."""
    chains = _chains(rule)
    seen = _projection(value, chains) if chains is not None else value
    key = (rule, id(node), json.dumps(seen, sort_keys=True, default=repr))
    if key not in _MEMO:
        _MEMO_NODES[id(node)] = node
        _MEMO[key] = _evaluate_directly(rule, value, node)
    return _MEMO[key]


def _evaluate_directly(rule: str, value: Any, node: dict[str, Any]) -> tuple[str, str]:
    try:
        ok = compile_rule(rule).evaluate({"self": _to_cel(value, node)})
    except celpy.CELEvalError as err:
        return "error", str(err)
    except ValueError as err:
        # cel-python raises a bare ValueError("overflow") where cel-go returns an "integer overflow"
        # evaluation error; the API server rejects the object either way.
        if "overflow" not in str(err):
            raise
        return "error", f"integer overflow evaluating rule: {err}"
    if isinstance(ok, celpy.CELEvalError):
        return "error", str(ok)
    return ("ok", "") if ok else ("fail", "")


def _cel_violations(obj: dict[str, Any], schema: dict[str, Any], memo: bool = True) -> list[Violation]:
    out = []
    evaluate = evaluate_rule if memo else _evaluate_directly
    for value, node, path in _cel_nodes(_root_view(obj), schema, ""):
        for rule in node.get("x-kubernetes-validations") or []:
            field = rule.get("fieldPath", "")
            where = (path + field) if path else field.lstrip(".")
            verdict, error = evaluate(rule["rule"], value, node)
            if verdict == "error":
                out.append(Violation(where or path or "(root)", f"rule {rule['rule']!r} failed to evaluate: {error}", "cel"))
            elif verdict == "fail":
                out.append(Violation(where or path or "(root)", rule.get("message") or f"failed rule: {rule['rule']}", "cel"))
    return out


# --- the whole request --------------------------------------------------------------------


def _request_violations(obj: dict[str, Any], crd: dict[str, Any]) -> list[Violation]:
    out = []
    group = crd["spec"]["group"]
    served = [f"{group}/{v['name']}" for v in crd["spec"]["versions"] if v.get("served")]
    if obj.get("apiVersion") not in served:
        out.append(Violation("apiVersion", f"no matches for {obj.get('apiVersion')!r}: served {served}", "request"))
    kind = crd["spec"]["names"]["kind"]
    if obj.get("kind") != kind:
        out.append(Violation("kind", f"no matches for kind {obj.get('kind')!r} (want {kind})", "request"))
    name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), dict) else None
    if not isinstance(name, str) or not name:
        out.append(Violation("metadata.name", "Required value: name or generateName is required", "request"))
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        out.append(Violation("metadata.name", f"Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain", "request"))
    return out


def validate(obj: Any, crd: dict[str, Any] | None = None, *, memo: bool = True) -> Result:
    """Everything a `kubectl apply --validate=strict` of `obj` would be told, in one list."""
    crd = crd if crd is not None else load_crd()
    if not isinstance(obj, dict):
        return Result({}, [Violation("(root)", "must be an object", "request")])
    schema = storage_schema(crd)
    violations = _request_violations(obj, crd)
    stored = _default(_prune(copy.deepcopy(obj), schema, "", violations), schema)
    schema_errors, blocking = _schema_violations(stored, schema)
    violations += schema_errors
    unroutable = any(v.path in ("apiVersion", "kind") for v in violations)
    if not blocking and not unroutable:
        violations += _cel_violations(stored, schema, memo)
    return Result(stored, violations)


def all_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, str]]]:
    """Every (schema path, rule) in the schema, for tests that compile them all."""
    found = [(path or "(root)", r) for r in schema.get("x-kubernetes-validations") or []]
    for key, sub in (schema.get("properties") or {}).items():
        found += all_rules(sub, _join(path, key))
    if isinstance(schema.get("items"), dict):
        found += all_rules(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += all_rules(schema["additionalProperties"], path + "[*]")
    return found
