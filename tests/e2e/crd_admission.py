"""CustomResourceDefinition admission as kube-apiserver does it, offline: a CRD in, the server's errors out.

A real v1.36.2 API server refused our CRD while this emulation accepted it (issue 10). This module
reproduces the checks of apiextensions-apiserver that a generated CRD can fail, from its source
(`pkg/apis/apiextensions/validation/validation.go`, `pkg/apiserver/schema/validation.go`,
`schema/defaulting/validation.go`, `schema/cel/validation.go`, `schema/cel/compilation.go`):

1. the object: apiVersion/kind, `metadata.name == <plural>.<group>`, names, scope, versions (exactly one
   storage version, unique names), a schema per version (v1 requires one);
2. where the schema sits: identical schemas for every version are reported under
   `spec.validation.openAPIV3Schema` (the server converts them to its internal top-level validation),
   differing ones under `spec.versions[i].schema.openAPIV3Schema`;
3. the root: not nullable; with the status subresource only the allowed keywords at the root;
4. structural schema (`ValidateStructural`): every specified field has a `type` (unless int-or-string or
   preserve-unknown-fields), arrays have `items`, int-or-string has no `type`, value validations (`anyOf`,
   `allOf`, `oneOf`, `not`) carry no type/default/description/nullable/x-kubernetes-*, and every field they
   mention is specified outside them; `metadata` at the root restricts `name`/`generateName` only;
5. defaults (`ValidateDefaults`), only when 4 passed: every `default` must be pruned (no unknown fields),
   validate against its own node's schema (types, enum, bounds, lengths, pattern, required) and pass its
   node's CEL rules and those of the nested nodes the default contains, AS WRITTEN: nested defaults are
   NOT applied first, so `default: {}` under a rule reading `self.enabled` fails with
   `no such key: enabled evaluating rule: <message>`; no default in top-level metadata/apiVersion/kind;
6. the OpenAPI walk (`ValidateCustomResourceDefinitionOpenAPISchema`): `uniqueItems` forbidden,
   properties/additionalProperties exclusive, `x-kubernetes-preserve-unknown-fields: false` refused,
   list types (`atomic`/`set`/`map` on arrays only; `map` needs object items and non-empty scalar,
   existing, unique map keys that are required or defaulted and not nullable; `set` items not nullable
   and scalar or atomic), `x-kubernetes-map-type`, each rule's `rule`/`message`/`fieldPath` (a fieldPath
   must name a property declared in the schema, with field and map accessors only);
7. CEL, only when 4-6 found no schema error at that node or below: every rule parses (cel-python's
   grammar), selects only declared fields of `self` (the server type-checks against the schema), calls
   only functions of the Kubernetes 1.30 CEL environment, and fits the static cost budget: per rule
   `StaticEstimatedCostLimit` (10,000,000) after multiplying by the node's cardinality (product of the
   maxItems/maxProperties of the lists and maps above it), and 100,000,000 for all rules together.

The cost estimate follows the shape of cel-go's checker (each node 1, string traversal x0.1, regex
length x0.25, comprehensions x the size of what they iterate) with the apiserver's size bounds:
maxLength/maxItems/maxProperties where declared, otherwise what a 3 MiB request can hold. It is built to
over-estimate, never under-estimate (an emulation may be stricter than the server, never looser).
What it cannot check is listed in tests/e2e/README.md ("CRD admission").

`admit(crd)` returns the errors as the server prints them (`field: Invalid value: ...: message`), an
empty list when the server would accept the CRD. Pure: no I/O, no emulator state.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import celpy
from api.crd_harness import _to_cel  # the same JSON -> CEL typing the custom-object checks use
from celpy import celtypes
from lark import Token, Tree

STATIC_ESTIMATED_COST_LIMIT = 10_000_000  # apiextensions validation.StaticEstimatedCostLimit
STATIC_ESTIMATED_CRD_COST_LIMIT = 100_000_000  # validation.StaticEstimatedCRDCostLimit
MAX_REQUEST_BYTES = 3 * 1024 * 1024  # apiserver's default max request body: the bound of anything unbounded
STRING_TRAVERSAL_FACTOR = 0.1  # cel-go common.StringTraversalCostFactor
REGEX_LENGTH_FACTOR = 0.25  # cel-go common.RegexStringLengthCostFactor

CRD_API_VERSION = "apiextensions.k8s.io/v1"
LIST_TYPES = ["atomic", "set", "map"]
MAP_TYPES = ["atomic", "granular"]
REASONS = ["FieldValueDuplicate", "FieldValueForbidden", "FieldValueInvalid", "FieldValueRequired"]

# Root keywords allowed when the status subresource is on (validation.go allowedFieldsAtRootSchema).
ROOT_KEYWORDS_WITH_STATUS = {
    "description", "type", "format", "title", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "required",
    "items", "properties", "externalDocs", "example", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
}
VALUE_VALIDATION_KEYS = ("anyOf", "allOf", "oneOf", "not")
# Keywords value validations may not carry (schema/validation.go validateNestedValueValidation).
FORBIDDEN_IN_VALUE_VALIDATION = {
    "type": "must be empty to be structural",
    "additionalProperties": "must be undefined to be structural",
    "default": "must be undefined to be structural",
    "title": "must be empty to be structural",
    "description": "must be empty to be structural",
    "nullable": "must be false to be structural",
    "x-kubernetes-preserve-unknown-fields": "must be false to be structural",
    "x-kubernetes-embedded-resource": "must be false to be structural",
    "x-kubernetes-int-or-string": "must be false to be structural",
    "x-kubernetes-list-map-keys": "must be empty to be structural",
    "x-kubernetes-list-type": "must be undefined to be structural",
    "x-kubernetes-map-type": "must be undefined to be structural",
    "x-kubernetes-validations": "must be empty to be structural",
}

# Functions and macros of the CRD CEL environment in Kubernetes 1.30 (apiserver/pkg/cel/environment
# base.go at compatibility version 1.29, which 1.30 uses for new expressions): standard CEL, the
# strings extension, and the Kubernetes lists, regex, URL, quantity and optional libraries. Not yet
# there: ip/cidr, format, semver, two-variable comprehensions.
CEL_GLOBALS_1_30 = {
    "has", "size", "int", "uint", "double", "string", "bytes", "bool", "duration", "timestamp", "type", "dyn",
    "matches", "url", "isURL", "quantity", "isQuantity", "optional.of", "optional.ofNonZeroValue",
    "optional.none", "strings.quote",
}
CEL_METHODS_1_30 = {
    "size", "matches", "contains", "startsWith", "endsWith", "all", "exists", "exists_one", "map", "filter",
    "charAt", "indexOf", "lastIndexOf", "lowerAscii", "upperAscii", "replace", "split", "substring", "trim",
    "join", "find", "findAll", "isSorted", "sum", "min", "max", "getScheme", "getHost", "getHostname",
    "getPort", "getEscapedPath", "getQuery", "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear",
    "getFullYear", "getHours", "getMilliseconds", "getMinutes", "getMonth", "getSeconds", "isInteger",
    "asInteger", "asApproximateFloat", "sign", "add", "sub", "isGreaterThan", "isLessThan", "compareTo",
    "hasValue", "value", "orValue", "or",
}
COMPREHENSIONS = {"all", "exists", "exists_one", "map", "filter"}


# --- field paths and error strings, as apimachinery's field.Path / field.Error print them -------------


def child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def key(path: str, name: str) -> str:
    return f"{path}[{name}]"


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _go(value: Any) -> str:
    """A bad value the way field.Error prints it: strings quoted, scalars plain, the rest as JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def invalid(path: str, value: Any, detail: str, *, printed: bool = False) -> str:
    return f"{path}: Invalid value: {value if printed else _go(value)}: {detail}"


def required(path: str, detail: str = "") -> str:
    return f"{path}: Required value" + (f": {detail}" if detail else "")


def forbidden(path: str, detail: str) -> str:
    return f"{path}: Forbidden: {detail}"


def not_supported(path: str, value: Any, supported: list[str]) -> str:
    return f"{path}: Unsupported value: {_go(value)}: supported values: " + ", ".join(json.dumps(s) for s in supported)


def _rule_value(rule: dict[str, Any]) -> str:
    """The server prints the offending rule as a Go struct (%#v of apiextensions.ValidationRule)."""
    return ("apiextensions.ValidationRule{" + f"Rule:{json.dumps(rule.get('rule', ''))}, "
            f"Message:{json.dumps(rule.get('message', ''))}, "
            f"MessageExpression:{json.dumps(rule.get('messageExpression', ''))}, "
            f"FieldPath:{json.dumps(rule.get('fieldPath', ''))}" + "}")


_REASONS = {"Invalid value": "FieldValueInvalid", "Required value": "FieldValueRequired", "Forbidden": "FieldValueForbidden",
            "Unsupported value": "FieldValueNotSupported", "Duplicate value": "FieldValueDuplicate",
            "Too long": "FieldValueTooLong", "Too many": "FieldValueTooMany"}


def causes(errors: list[str]) -> list[dict[str, str]]:
    """The Status `details.causes` of a 422 for these errors (reason, message, field), as the server sends them."""
    out = []
    for error in errors:
        field, _, body = error.partition(": ")
        kind = body.split(":", 1)[0]
        out.append({"reason": _REASONS.get(kind, "FieldValueInvalid"), "message": body, "field": field})
    return out


# --- the CRD as a whole -------------------------------------------------------------------------------


def admit(crd: Any) -> list[str]:
    """Every error a kube-apiserver (1.30 and later) gives when this CRD is created; [] when accepted."""
    if not isinstance(crd, dict):
        return ["(root): Invalid value: the body of the request was in an unknown format"]
    errors: list[str] = []
    if crd.get("apiVersion") != CRD_API_VERSION:
        errors.append(not_supported("apiVersion", crd.get("apiVersion"), [CRD_API_VERSION]))
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural = spec.get("group") or "", names.get("plural") or ""
    name = (crd.get("metadata") or {}).get("name") or ""
    if name != f"{plural}.{group}":
        errors.append(invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    if not group:
        errors.append(required("spec.group"))
    elif "." not in group:
        errors.append(invalid("spec.group", group, "should be a domain with at least one dot"))
    if spec.get("scope") not in ("Cluster", "Namespaced"):
        errors.append(not_supported("spec.scope", spec.get("scope"), ["Cluster", "Namespaced"]))
    for field in ("plural", "kind", "listKind") if "listKind" in names else ("plural", "kind"):
        if not names.get(field):
            errors.append(required(f"spec.names.{field}"))
    versions = spec.get("versions") or []
    if not versions:
        errors.append(invalid("spec.versions", versions, "must have exactly one version marked as storage version"))
        return errors
    if sum(1 for v in versions if v.get("storage")) != 1:
        errors.append(invalid("spec.versions", [v.get("name") for v in versions],
                              "must have exactly one version marked as storage version"))
    seen: set[str] = set()
    for i, version in enumerate(versions):
        if version.get("name") in seen:
            errors.append(f"spec.versions[{i}].name: Duplicate value: {_go(version.get('name'))}")
        seen.add(version.get("name"))
    schemas = [((v.get("schema") or {}).get("openAPIV3Schema")) for v in versions]
    status_on = [bool((v.get("subresources") or {}).get("status") is not None) for v in versions]
    for i, schema in enumerate(schemas):
        if schema is None:
            errors.append(required(f"spec.versions[{i}].schema.openAPIV3Schema", "schemas are required"))
    if errors and any(s is None for s in schemas):
        return errors
    if all(s == schemas[0] for s in schemas) and all(s == status_on[0] for s in status_on):
        errors += admit_schema(schemas[0], "spec.validation.openAPIV3Schema", status_on[0])
    else:
        for i, schema in enumerate(schemas):
            errors += admit_schema(schema, f"spec.versions[{i}].schema.openAPIV3Schema", status_on[i])
    return errors


def admit_schema(schema: Any, path: str, status_subresource: bool = False) -> list[str]:
    """validateCustomResourceDefinitionValidation for one openAPIV3Schema at `path`."""
    if not isinstance(schema, dict):
        return [invalid(path, schema, "must be an object")]
    errors: list[str] = []
    base = path.removesuffix(".openAPIV3Schema")
    if status_subresource:
        if schema.get("type", "object") != "object":
            errors.append(invalid(f"{base}.openAPIV3Schema.type", schema.get("type"),
                                  'only "object" is allowed as the type at the root of the schema if the status '
                                  "subresource is enabled"))
        extra = sorted(k for k in schema if k not in ROOT_KEYWORDS_WITH_STATUS)
        if extra:
            errors.append(invalid(path, {k: schema[k] for k in extra},
                                  f"only {sorted(ROOT_KEYWORDS_WITH_STATUS)} fields are allowed at the root of the "
                                  "schema if the status subresource is enabled"))
    if schema.get("nullable"):
        errors.append(forbidden(f"{path}.nullable", "nullable cannot be true at the root"))
    structural = structural_errors(schema, path)
    errors += structural
    cel_on = False
    if not structural:
        defaults = default_errors(schema, path)
        errors += defaults
        cel_on = not defaults
    costs: list[tuple[str, int]] = []
    schema_errs, cel_errs = _openapi_walk(schema, path, root=True, top_meta=False, cel_on=cel_on,
                                          cardinality=1, costs=costs)
    errors += schema_errs + cel_errs
    total = sum(c for _, c in costs)
    if cel_on and total > STATIC_ESTIMATED_CRD_COST_LIMIT:
        for where, _ in sorted(costs, key=lambda x: -x[1])[:4]:
            errors.append(forbidden(where, "contributed to estimated rule cost total exceeding cost limit for "
                                    "entire OpenAPIv3 schema"))
        errors.append(forbidden(path, _cost_message("x-kubernetes-validations estimated rule cost total for entire "
                                                    "OpenAPIv3 schema", total, STATIC_ESTIMATED_CRD_COST_LIMIT)))
    return errors


# --- 4. structural schema -------------------------------------------------------------------------------


def _int_or_string_pattern(node: dict[str, Any]) -> bool:
    """anyOf: [{type: integer}, {type: string}] is the one union a structural schema may spell out."""
    options = node.get("anyOf")
    return (isinstance(options, list) and len(options) == 2
            and sorted(o.get("type", "") for o in options if isinstance(o, dict)) == ["integer", "string"])


def structural_errors(node: Any, path: str, level: str = "root") -> list[str]:
    """ValidateStructural: structural invariants plus completeness of value validations."""
    if not isinstance(node, dict):
        return [invalid(path, node, "must be a schema object")]
    errors: list[str] = []
    kind = node.get("type", "")
    if kind == "array" and "items" not in node:
        errors.append(required(f"{path}.items", "must be specified"))
    if isinstance(node.get("items"), list):
        errors.append(forbidden(f"{path}.items", "items must be a schema object and not an array"))
    elif isinstance(node.get("items"), dict):
        errors += structural_errors(node["items"], f"{path}.items", "item")
    for name, sub in (node.get("properties") or {}).items():
        errors += structural_errors(sub, key(f"{path}.properties", name), "field")
    if isinstance(node.get("additionalProperties"), dict):
        errors += structural_errors(node["additionalProperties"], f"{path}.additionalProperties", "field")
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    embedded = bool(node.get("x-kubernetes-embedded-resource"))
    if int_or_string and preserve:
        errors.append(invalid(f"{path}.x-kubernetes-preserve-unknown-fields", True,
                              "must be false if x-kubernetes-int-or-string is true"))
    if int_or_string and embedded:
        errors.append(invalid(f"{path}.x-kubernetes-embedded-resource", True,
                              "must be false if x-kubernetes-int-or-string is true"))
    if int_or_string and kind:
        errors.append(invalid(f"{path}.type", kind, "must be empty if x-kubernetes-int-or-string is true"))
    for vv in VALUE_VALIDATION_KEYS:
        if vv not in node:
            continue
        options = node[vv] if vv != "not" else [node[vv]]
        for i, option in enumerate(options if isinstance(options, list) else []):
            where = f"{path}.{vv}" if vv == "not" else index(f"{path}.{vv}", i)
            skip_type = vv == "anyOf" and int_or_string and _int_or_string_pattern(node)
            errors += _value_validation_errors(option, where, skip_type)
            errors += _completeness_errors(option, node, path, where)
    if embedded and kind != "object":
        errors.append(required(f"{path}.type", "must be object if x-kubernetes-embedded-resource is true") if not kind
                      else invalid(f"{path}.type", kind, "must be object if x-kubernetes-embedded-resource is true"))
    elif not kind and not int_or_string and not preserve:
        where = {"root": "must not be empty at the root", "item": "must not be empty for specified array items",
                 "field": "must not be empty for specified object fields"}[level]
        errors.append(required(f"{path}.type", where))
    if embedded and not preserve and not node.get("properties"):
        errors.append(required(f"{path}.properties", "must not be empty if x-kubernetes-embedded-resource is true "
                               "without x-kubernetes-preserve-unknown-fields"))
    if (level == "root" or embedded) and "metadata" in (node.get("properties") or {}):
        meta = node["properties"]["metadata"]
        if meta.get("type") != "object":
            errors.append(invalid(key(f"{path}.properties", "metadata") + ".type", meta.get("type", ""), "must be object"))
        if level == "root":
            rest = {k: v for k, v in meta.items() if k not in ("type", "default")}
            props = rest.pop("properties", None) or {}
            if rest or set(props) - {"name", "generateName"}:
                errors.append(forbidden(key(f"{path}.properties", "metadata"), "must not specify anything other than "
                                        "name and generateName, but metadata is implicitly specified"))
    return errors


def _value_validation_errors(node: Any, path: str, skip_type: bool = False) -> list[str]:
    if not isinstance(node, dict):
        return []
    errors: list[str] = []
    for name, detail in FORBIDDEN_IN_VALUE_VALIDATION.items():
        if name in node and not (skip_type and name == "type") and node[name] not in (False, None, "", [], {}):
            errors.append(forbidden(f"{path}.{name}", detail))
    if "metadata" in (node.get("properties") or {}):
        errors.append(forbidden(key(f"{path}.properties", "metadata"), "must not be specified in a nested context"))
    for name, sub in (node.get("properties") or {}).items():
        errors += _value_validation_errors(sub, key(f"{path}.properties", name))
    if isinstance(node.get("items"), dict):
        errors += _value_validation_errors(node["items"], f"{path}.items")
    for vv in VALUE_VALIDATION_KEYS:
        options = node.get(vv)
        for i, option in enumerate([options] if vv == "not" and options else options or []):
            errors += _value_validation_errors(option, f"{path}.{vv}" if vv == "not" else index(f"{path}.{vv}", i))
    return errors


def _completeness_errors(vv: Any, s: dict[str, Any] | None, s_path: str, v_path: str) -> list[str]:
    """Every field or items a value validation mentions must be specified in the structural part."""
    if not isinstance(vv, dict):
        return []
    if s is None:
        return [required(s_path, f"because it is defined in {v_path}")]
    errors: list[str] = []
    for name, sub in (vv.get("properties") or {}).items():
        s_sub = (s.get("properties") or {}).get(name)
        if s_sub is None and isinstance(s.get("additionalProperties"), dict):
            s_sub = s["additionalProperties"]
        if s_sub is None and not s.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(required(key(f"{s_path}.properties", name),
                                   f"because it is defined in {key(v_path + '.properties', name)}"))
        elif s_sub is not None:
            errors += _completeness_errors(sub, s_sub, key(f"{s_path}.properties", name), key(f"{v_path}.properties", name))
    if isinstance(vv.get("items"), dict):
        if not isinstance(s.get("items"), dict):
            errors.append(required(f"{s_path}.items", f"because it is defined in {v_path}.items"))
        else:
            errors += _completeness_errors(vv["items"], s["items"], f"{s_path}.items", f"{v_path}.items")
    for sub_vv in VALUE_VALIDATION_KEYS:
        options = vv.get(sub_vv)
        for i, option in enumerate([options] if sub_vv == "not" and options else options or []):
            errors += _completeness_errors(option, s, s_path, f"{v_path}.{sub_vv}" if sub_vv == "not"
                                           else index(f"{v_path}.{sub_vv}", i))
    return errors


# --- 5. defaults ------------------------------------------------------------------------------------------


def default_errors(schema: dict[str, Any], path: str) -> list[str]:
    """ValidateDefaults(isResourceRoot=true, requirePrunedDefaults=true): each default, as written."""
    errors: list[str] = []
    for node, where, is_root, inside_meta in _default_nodes(schema, path):
        if "default" not in node or inside_meta:
            continue  # defaults in top-level metadata are refused by the OpenAPI walk instead
        value = node["default"]
        if _pruned(value, node) != value:
            errors.append(invalid(f"{where}.default", value, "must not have unknown fields"))
        found = value_errors(value, node, f"{where}.default")
        if found:
            errors += found
            continue
        errors += cel_value_errors(value, node, f"{where}.default", root=is_root)
    return errors


def _default_nodes(node: dict[str, Any], path: str, root: bool = True,
                   inside_meta: bool = False) -> Iterator[tuple[dict[str, Any], str, bool, bool]]:
    # Declared order (the server walks a Go map, so its order varies; the set of errors does not).
    yield node, path, root, inside_meta
    if isinstance(node.get("items"), dict):
        yield from _default_nodes(node["items"], f"{path}.items", False, inside_meta)
    for name, sub in (node.get("properties") or {}).items():
        if isinstance(sub, dict):
            meta = inside_meta or (root and name in ("metadata", "apiVersion", "kind"))
            yield from _default_nodes(sub, key(f"{path}.properties", name), False, meta)
    # additionalProperties are not followed: defaults are forbidden there (defaulting/validation.go).


def _pruned(value: Any, node: dict[str, Any]) -> Any:
    if node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string"):
        return value
    if isinstance(value, dict):
        props, extra = node.get("properties") or {}, node.get("additionalProperties")
        if not props and not isinstance(extra, dict):
            return {} if node.get("type") == "object" else value
        return {k: _pruned(v, props.get(k) or extra) for k, v in value.items()
                if k in props or isinstance(extra, dict)}
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_pruned(v, node["items"]) for v in value]
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def value_errors(value: Any, node: dict[str, Any], path: str) -> list[str]:
    """The OpenAPI (kube-openapi) validation of one value against one schema node, no defaulting."""
    errors: list[str] = []
    if value is None:
        if not node.get("nullable") and (node.get("type") or node.get("x-kubernetes-int-or-string")):
            errors.append(invalid(path, None, f'{path} in body must be of type {node.get("type") or "integer-or-string"}: "null"'))
        return errors
    got = _json_type(value)
    want = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        if got not in ("integer", "string"):
            errors.append(invalid(path, value, f'{path} in body must be of type integer-or-string: "{got}"'))
        return errors
    if want and not (got == want or (want == "number" and got == "integer")):
        return [invalid(path, value, f'{path} in body must be of type {want}: "{got}"')]
    if "enum" in node and value not in node["enum"]:
        errors.append(not_supported(path, value, [v if isinstance(v, str) else json.dumps(v) for v in node["enum"]]))
    if got in ("integer", "number"):
        low, high = node.get("minimum"), node.get("maximum")
        if low is not None and (value <= low if node.get("exclusiveMinimum") else value < low):
            errors.append(invalid(path, value, f"{path} in body should be greater than "
                                  f"{'' if node.get('exclusiveMinimum') else 'or equal to '}{_go(low)}"))
        if high is not None and (value >= high if node.get("exclusiveMaximum") else value > high):
            errors.append(invalid(path, value, f"{path} in body should be less than "
                                  f"{'' if node.get('exclusiveMaximum') else 'or equal to '}{_go(high)}"))
    if got == "string":
        if "minLength" in node and len(value) < node["minLength"]:
            errors.append(invalid(path, value, f"{path} in body should be at least {node['minLength']} chars long"))
        if "maxLength" in node and len(value) > node["maxLength"]:
            errors.append(f"{path}: Too long: may not be more than {node['maxLength']} bytes")
        if "pattern" in node and not re.search(node["pattern"], value):
            errors.append(invalid(path, value, f"{path} in body should match '{node['pattern']}'"))
    if got == "array":
        if "minItems" in node and len(value) < node["minItems"]:
            errors.append(invalid(path, len(value), f"{path} in body should have at least {node['minItems']} items"))
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(f"{path}: Too many: {len(value)}: must have at most {node['maxItems']} items")
        if isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                errors += value_errors(item, node["items"], index(path, i))
    if got == "object":
        if "minProperties" in node and len(value) < node["minProperties"]:
            errors.append(invalid(path, len(value), f"{path} in body should have at least {node['minProperties']} properties"))
        if "maxProperties" in node and len(value) > node["maxProperties"]:
            errors.append(f"{path}: Too many: {len(value)}: must have at most {node['maxProperties']} items")
        for name in node.get("required") or []:
            if name not in value:
                errors.append(required(child(path, name)))
        props, extra = node.get("properties") or {}, node.get("additionalProperties")
        for name, item in value.items():
            sub = props.get(name) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += value_errors(item, sub, child(path, name))
    return errors


_ENV = celpy.Environment()


@functools.lru_cache(maxsize=1024)
def _compiled(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


def _eval_error(err: Any) -> str:
    """cel-python's error text -> cel-go's (`no such key: enabled` is what the server prints)."""
    text = str(err)
    missing = re.search(r"no such (?:member in mapping|key): \\*'?([^'\\\s,)]+)", text)
    if missing:
        return f"no such key: {missing.group(1)}"
    return text


def _root_view(value: Any) -> Any:
    if not isinstance(value, dict) or not isinstance(value.get("metadata"), dict):
        return value
    meta = {k: v for k, v in value["metadata"].items() if k in ("name", "generateName")}
    return {**value, "metadata": meta}


def cel_value_errors(value: Any, node: dict[str, Any], path: str, root: bool = False) -> list[str]:
    """cel.Validator.Validate: this node's rules on `value`, then the rules of the nodes `value` contains."""
    if value is None:
        return []
    errors: list[str] = []
    kind = node.get("type", "")
    seen = _root_view(value) if root else value
    for rule in node.get("x-kubernetes-validations") or []:
        text = rule.get("rule", "")
        shown = (rule.get("message") or "").strip() or text.strip()
        try:
            program = _compiled(text)
            result = program.evaluate({"self": _to_cel(seen, node), "oldSelf": _to_cel(seen, node)})
        except celpy.CELParseError:
            continue  # reported by the rule checks
        except celpy.CELEvalError as err:
            errors.append(invalid(path, kind, f"{_eval_error(err)} evaluating rule: {shown}"))
            continue
        if isinstance(result, celpy.CELEvalError):
            errors.append(invalid(path, kind, f"{_eval_error(result)} evaluating rule: {shown}"))
        elif result is not True and result != celtypes.BoolType(True):
            where = path + (rule.get("fieldPath") or "") if (rule.get("fieldPath") or "").startswith(".") else path
            message = (rule.get("message") or "").strip() or f"failed rule: {text.strip()}"
            reason = rule.get("reason") or "FieldValueInvalid"
            if reason == "FieldValueRequired":
                errors.append(required(where, message))
            elif reason == "FieldValueForbidden":
                errors.append(forbidden(where, message))
            elif reason == "FieldValueDuplicate":
                errors.append(f"{where}: Duplicate value: {_go(kind)}")
            else:
                errors.append(invalid(where, kind, message))
    if isinstance(value, dict):
        props, extra = node.get("properties") or {}, node.get("additionalProperties")
        for name, item in value.items():
            if name in props:
                errors += cel_value_errors(item, props[name], child(path, name))
            elif isinstance(extra, dict):
                errors += cel_value_errors(item, extra, key(path, name))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_value_errors(item, node["items"], index(path, i))
    return errors


# --- 6. the OpenAPI walk ----------------------------------------------------------------------------------


def valid_field_path(field_path: str, node: dict[str, Any]) -> bool:
    """cel.ValidFieldPath: `.a.b` / `['a.b']` field and map accessors over declared properties only."""
    rest = field_path.strip()
    if not rest:
        return False
    current = node
    while rest:
        if rest.startswith("."):
            match = re.match(r"\.([A-Za-z_][A-Za-z0-9_]*)", rest)
        elif rest.startswith("["):
            match = re.match(r"\[\s*'((?:[^'\\]|\\.)*)'\s*\]", rest)
        else:
            return False
        if not match:
            return False
        name, rest = match.group(1), rest[match.end():]
        props = current.get("properties") or {}
        if name in props:
            current = props[name]
        elif isinstance(current.get("additionalProperties"), dict):
            current = current["additionalProperties"]
        else:
            return False
    return True


def _list_type_errors(node: dict[str, Any], path: str) -> list[str]:
    errors: list[str] = []
    list_type, keys = node.get("x-kubernetes-list-type"), node.get("x-kubernetes-list-map-keys") or []
    items = node.get("items") if isinstance(node.get("items"), dict) else None
    map_type = node.get("x-kubernetes-map-type")
    if map_type is not None and node.get("type") != "object":
        errors.append(required(f"{path}.type", "must be object if x-kubernetes-map-type is specified")
                      if not node.get("type") else
                      invalid(f"{path}.type", node["type"], "must be object if x-kubernetes-map-type is specified"))
    if map_type is not None and map_type not in MAP_TYPES:
        errors.append(not_supported(f"{path}.x-kubernetes-map-type", map_type, MAP_TYPES))
    if list_type is not None and node.get("type") != "array":
        errors.append(required(f"{path}.type", "must be array if x-kubernetes-list-type is specified")
                      if not node.get("type") else
                      invalid(f"{path}.type", node["type"], "must be array if x-kubernetes-list-type is specified"))
    elif list_type == "set" and items is not None:
        if items.get("type") == "array" and items.get("x-kubernetes-list-type", "atomic") != "atomic":
            errors.append(invalid(f"{path}.items.x-kubernetes-list-type", items.get("x-kubernetes-list-type"),
                                  "must be atomic as item of a list with x-kubernetes-list-type=set"))
        if items.get("type") == "object" and items.get("x-kubernetes-map-type") != "atomic":
            errors.append(invalid(f"{path}.items.x-kubernetes-map-type", items.get("x-kubernetes-map-type"),
                                  "must be atomic as item of a list with x-kubernetes-list-type=set"))
    if list_type is not None and list_type not in LIST_TYPES:
        errors.append(not_supported(f"{path}.x-kubernetes-list-type", list_type, LIST_TYPES))
    if keys:
        if list_type is None:
            errors.append(required(f"{path}.x-kubernetes-list-type", "must be map if x-kubernetes-list-map-keys is non-empty"))
        elif list_type != "map":
            errors.append(invalid(f"{path}.x-kubernetes-list-type", list_type,
                                  "must be map if x-kubernetes-list-map-keys is non-empty"))
    if list_type == "map":
        if not keys:
            errors.append(required(f"{path}.x-kubernetes-list-map-keys", "must not be empty if x-kubernetes-list-type is map"))
        if items is None:
            errors.append(required(f"{path}.items", "must have a schema if x-kubernetes-list-type is map"))
        elif items.get("type") != "object":
            errors.append(invalid(f"{path}.items.type", items.get("type", ""),
                                  "must be object if parent array's x-kubernetes-list-type is map"))
        else:
            seen: set[str] = set()
            for k in keys:
                prop = (items.get("properties") or {}).get(k)
                if prop is None:
                    errors.append(invalid(f"{path}.x-kubernetes-list-map-keys", keys, "entries must all be names of item properties"))
                elif prop.get("type") in ("array", "object"):
                    errors.append(invalid(key(f"{path}.items.properties", k) + ".type", items.get("type"),
                                          "must be a scalar type if parent array's x-kubernetes-list-type is map"))
                if k in seen:
                    errors.append(invalid(f"{path}.x-kubernetes-list-map-keys", keys, "must not contain duplicate entries"))
                seen.add(k)
    # validateMapListKeysMapSet (required for every CRD created since 1.21's requireMapListKeysMapSetValidation)
    if items is not None and list_type in ("set", "map"):
        if items.get("nullable"):
            errors.append(forbidden(f"{path}.items.nullable", f"cannot be nullable when x-kubernetes-list-type is {list_type}"))
        if list_type == "set" and items.get("type") not in ("array", "object") and not items.get("type"):
            pass  # typeless set items are reported by the structural checks
        if list_type == "map":
            required_keys = set(items.get("required") or [])
            for k in keys:
                prop = (items.get("properties") or {}).get(k)
                if prop is None:
                    continue
                if k not in required_keys and "default" not in prop:
                    errors.append(required(key(f"{path}.items.properties", k) + ".default",
                                           "this property is in x-kubernetes-list-map-keys, so it must have a default "
                                           "or be a required property"))
                if prop.get("nullable"):
                    errors.append(forbidden(key(f"{path}.items.properties", k) + ".nullable",
                                            "this property is in x-kubernetes-list-map-keys, so it cannot be nullable"))
    return errors


def _openapi_walk(node: dict[str, Any], path: str, *, root: bool, top_meta: bool, cel_on: bool, cardinality: int,
                  costs: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """ValidateCustomResourceDefinitionOpenAPISchema: (schema errors, CEL errors) for `node` and below."""
    schema_errs: list[str] = []
    cel_errs: list[str] = []
    if not isinstance(node, dict):
        return schema_errs, cel_errs
    if "default" in node and top_meta:
        schema_errs.append(forbidden(f"{path}.default", f"must not be set in top-level {top_meta}"))
    for unsupported in ("id", "additionalItems", "patternProperties", "definitions", "dependencies", "$ref"):
        if unsupported in node:
            schema_errs.append(forbidden(f"{path}.{unsupported}", f"{unsupported} is not supported"))
    if node.get("type") == "null":
        schema_errs.append(forbidden(f"{path}.type", "type cannot be set to null, use nullable as an alternative"))
    if node.get("uniqueItems"):
        schema_errs.append(forbidden(f"{path}.uniqueItems", "uniqueItems cannot be set to true since the runtime "
                                     "complexity becomes quadratic"))
    extra = node.get("additionalProperties")
    if extra is not None and node.get("properties") and extra is not True:
        schema_errs.append(forbidden(f"{path}.additionalProperties", "additionalProperties and properties are mutual exclusive"))
    if isinstance(extra, dict):
        s, c = _openapi_walk(extra, f"{path}.additionalProperties", root=False, top_meta=top_meta, cel_on=cel_on,
                             cardinality=cardinality * _max_entries(node), costs=costs)
        schema_errs += s
        cel_errs += c
    for name, sub in (node.get("properties") or {}).items():
        meta = name if root and name in ("metadata", "apiVersion", "kind") else top_meta
        s, c = _openapi_walk(sub, key(f"{path}.properties", name), root=False, top_meta=meta, cel_on=cel_on,
                             cardinality=cardinality, costs=costs)
        schema_errs += s
        cel_errs += c
    for vv in VALUE_VALIDATION_KEYS:
        options = node.get(vv)
        for i, option in enumerate([options] if vv == "not" and options else options or []):
            s, _ = _openapi_walk(option, f"{path}.{vv}" if vv == "not" else index(f"{path}.{vv}", i), root=False,
                                 top_meta=top_meta, cel_on=False, cardinality=cardinality, costs=[])
            schema_errs += s
    if isinstance(node.get("items"), dict):
        s, c = _openapi_walk(node["items"], f"{path}.items", root=False, top_meta=top_meta, cel_on=cel_on,
                             cardinality=cardinality * _max_entries(node), costs=costs)
        schema_errs += s
        cel_errs += c
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        schema_errs.append(invalid(f"{path}.x-kubernetes-preserve-unknown-fields", False, "must be true or undefined"))
    schema_errs += _list_type_errors(node, path)
    rules = node.get("x-kubernetes-validations") or []
    for i, rule in enumerate(rules):
        where = index(f"{path}.x-kubernetes-validations", i)
        text, message = (rule.get("rule") or "").strip(), (rule.get("message") or "")
        if not text:
            schema_errs.append(required(f"{where}.rule", "rule is not specified"))
        elif message and not message.strip():
            schema_errs.append(invalid(f"{where}.message", message, "message must be non-empty if specified"))
        elif re.search(r"[\n\r]", message.strip()):
            schema_errs.append(invalid(f"{where}.message", message, "message must not contain line breaks"))
        elif re.search(r"[\n\r]", text) and not message.strip():
            schema_errs.append(required(f"{where}.message", "message must be specified if rule contains line breaks"))
        if rule.get("reason") is not None and rule["reason"] not in REASONS:
            schema_errs.append(not_supported(f"{where}.reason", rule["reason"], REASONS))
        field_path = rule.get("fieldPath") or ""
        if field_path and not field_path.strip():
            schema_errs.append(invalid(f"{where}.fieldPath", field_path, "fieldPath must be non-empty if specified"))
        if re.search(r"[\n\r]", field_path):
            schema_errs.append(invalid(f"{where}.fieldPath", field_path, "fieldPath must not contain line breaks"))
        if field_path and not valid_field_path(field_path, node):
            schema_errs.append(invalid(f"{where}.fieldPath", field_path, "fieldPath must be a valid path"))
    # Like the server: CEL only where this node and everything below it is schema-valid.
    if rules and cel_on and not schema_errs:
        self_type = _root_cel_type(node) if root else node
        for i, rule in enumerate(rules):
            where = index(f"{path}.x-kubernetes-validations", i)
            try:
                cost = rule_cost(rule.get("rule") or "", self_type)
            except CompileError as err:
                cel_errs.append(invalid(f"{where}.rule", _rule_value(rule), f"compilation failed: {err}", printed=True))
                continue
            total = cost * cardinality
            costs.append((f"{where}.rule", total))
            if total > STATIC_ESTIMATED_COST_LIMIT:
                cel_errs.append(forbidden(f"{where}.rule", _cost_message("estimated rule cost", total,
                                                                         STATIC_ESTIMATED_COST_LIMIT)))
    return schema_errs, cel_errs


def _cost_message(name: str, cost: int, limit: int) -> str:
    factor = cost / limit
    shown = "more than 100x" if factor > 100 else f"{factor:f}x" if factor < 1.5 else f"{factor:.1f}x"
    return (f"{name} exceeds budget by factor of {shown} (try simplifying the rule, or adding maxItems, "
            "maxProperties, and maxLength where arrays, maps, and strings are declared)")


def _root_cel_type(node: dict[str, Any]) -> dict[str, Any]:
    """At a resource root, CEL sees apiVersion, kind, and of metadata only name and generateName."""
    props = dict(node.get("properties") or {})
    props["metadata"] = {"type": "object", "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}}}
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    return {**node, "properties": props}


# --- 7. CEL: compile (parse + field and function checks) and estimate cost ------------------------------


class CompileError(Exception):
    """A rule the server's CEL compiler refuses; the text follows cel-go's `ERROR: <input>:...` form."""


def _min_size(node: dict[str, Any] | None) -> int:
    """Smallest JSON serialisation of a value of this schema (the apiserver's size estimator uses it)."""
    kind = (node or {}).get("type")
    return {"string": 2, "integer": 1, "number": 1, "boolean": 4, "array": 2, "object": 2}.get(kind or "", 1)


def _max_entries(node: dict[str, Any]) -> int:
    """Bound of a list's items or a map's entries: declared, else what a 3 MiB request can hold."""
    if node.get("type") == "array":
        if "maxItems" in node:
            return int(node["maxItems"])
        return MAX_REQUEST_BYTES // (_min_size(node.get("items")) + 1)
    if "maxProperties" in node:
        return int(node["maxProperties"])
    return MAX_REQUEST_BYTES // (_min_size(node.get("additionalProperties")) + 4)  # `"":v,`


def _max_length(node: dict[str, Any] | None) -> int:
    node = node or {}
    if "_literal" in node:
        return len(node["_literal"])
    if "maxLength" in node:
        return int(node["maxLength"])
    if "enum" in node:
        return max((len(str(v)) for v in node["enum"]), default=0)
    if node.get("type") == "string" and node.get("format") in ("date-time", "date", "duration"):
        return 64
    return MAX_REQUEST_BYTES


def _size_of(node: dict[str, Any] | None) -> int:
    node = node or {}
    if node.get("type") in ("array", "object") and "_literal" not in node:
        return _max_entries(node)
    if "_items" in node:
        return node["_items"]
    return _max_length(node)


def _traverse(size: int, factor: float) -> int:
    return max(1, math.ceil(size * factor))


STRING = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
DYN: dict[str, Any] = {}


def _select(node: dict[str, Any], name: str, text: str) -> dict[str, Any]:
    if node is DYN or not node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields") \
            and not node.get("properties"):
        return DYN
    props = node.get("properties") or {}
    if name in props:
        return props[name]
    if isinstance(node.get("additionalProperties"), dict):
        return node["additionalProperties"]
    if node.get("type") == "object":
        raise CompileError(f"ERROR: <input>: undefined field '{name}' in {text!r}")
    raise CompileError(f"ERROR: <input>: type '{node.get('type', 'dyn')}' does not support field selection in {text!r}")


def _ident(tree: Any) -> str | None:
    """The identifier an expression tree is made of, if it is only an identifier (a comprehension variable)."""
    while isinstance(tree, Tree) and len(tree.children) == 1 and tree.data != "ident":
        tree = tree.children[0]
    if isinstance(tree, Tree) and tree.data == "ident":
        return str(tree.children[0])
    return None


def _args(tree: Any) -> list[Any]:
    return [c for c in tree.children if isinstance(c, Tree)] if isinstance(tree, Tree) else []


def rule_cost(rule: str, self_type: dict[str, Any]) -> int:
    """Parse, check and estimate the worst-case cost of one rule with `self` of schema `self_type`."""
    try:
        tree = _ENV.compile(rule)
    except celpy.CELParseError as err:
        raise CompileError(f"ERROR: <input>: Syntax error: {str(err).splitlines()[0] if str(err) else rule}") from err
    cost, _ = _estimate(tree, {"self": self_type, "oldSelf": self_type}, rule)
    return cost


def _estimate(tree: Any, scope: dict[str, dict[str, Any]], text: str) -> tuple[int, dict[str, Any]]:
    """(worst-case cost, schema of the result) of a cel-python parse tree."""
    if isinstance(tree, Token):
        return 0, DYN
    kind, kids = tree.data, tree.children
    trees = [k for k in kids if isinstance(k, Tree)]
    if kind in ("expr",) and len(trees) == 3:  # c ? a : b
        c0, _ = _estimate(trees[0], scope, text)
        c1, t1 = _estimate(trees[1], scope, text)
        c2, t2 = _estimate(trees[2], scope, text)
        return c0 + max(c1, c2), t1 if _size_of(t1) >= _size_of(t2) else t2
    if len(trees) == 1 and len(kids) == 1 and kind in ("expr", "conditionalor", "conditionaland", "relation",
                                                      "addition", "multiplication", "unary", "member", "primary",
                                                      "paren_expr"):
        return _estimate(trees[0], scope, text)
    if kind in ("conditionalor", "conditionaland"):
        c0, _ = _estimate(trees[0], scope, text)
        c1, _ = _estimate(trees[1], scope, text)
        return c0 + c1, BOOL
    if kind in ("relation", "addition", "multiplication"):
        op, right = trees[0], trees[1]
        cl, tl = _estimate(op.children[0], scope, text)
        cr, tr = _estimate(right, scope, text)
        name = op.data
        if name == "relation_in":
            n = _size_of(tr)
            return cl + cr + n * (1 + _traverse(_max_length(tl), STRING_TRAVERSAL_FACTOR)), BOOL
        if name in ("relation_eq", "relation_ne"):
            if tl.get("type") in ("array", "object") or tr.get("type") in ("array", "object"):
                return cl + cr + max(_size_of(tl), _size_of(tr)), BOOL
            if tl.get("type") == "string" or tr.get("type") == "string":
                return cl + cr + _traverse(min(_max_length(tl), _max_length(tr)), STRING_TRAVERSAL_FACTOR), BOOL
            return cl + cr + 1, BOOL
        if name.startswith("relation_"):
            return cl + cr + 1, BOOL
        if name == "addition_add" and (tl.get("type") == "string" or tr.get("type") == "string"):
            size = min(_max_length(tl) + _max_length(tr), MAX_REQUEST_BYTES)
            return cl + cr + _traverse(size, STRING_TRAVERSAL_FACTOR), {"type": "string", "maxLength": size}
        if name == "addition_add" and (tl.get("type") == "array" or tr.get("type") == "array"):
            n = _size_of(tl) + _size_of(tr)
            return cl + cr + n, {"type": "array", "items": tl.get("items") or tr.get("items"), "_items": n, "_literal": True}
        return cl + cr + 1, tl if tl is not DYN else tr
    if kind == "unary":
        c, t = _estimate(trees[-1], scope, text)
        return c + 1, t
    if kind == "member_dot":
        c, t = _estimate(trees[0], scope, text)
        return c + 1, _select(t, str(kids[1]), text)
    if kind == "member_index":
        c0, t = _estimate(trees[0], scope, text)
        c1, _ = _estimate(trees[1], scope, text)
        elem = t.get("items") if t.get("type") == "array" else t.get("additionalProperties") if isinstance(
            t.get("additionalProperties"), dict) else DYN
        return c0 + c1 + 1, elem or DYN
    if kind == "member_dot_arg":
        return _method(tree, scope, text)
    if kind == "ident":
        name = str(kids[0])
        if name not in scope and name not in ("true", "false", "null"):
            raise CompileError(f"ERROR: <input>: undeclared reference to '{name}' (in container '')")
        return 1, scope.get(name, DYN)
    if kind == "ident_arg":
        return _function(str(kids[0]), _args(trees[0]) if trees else [], scope, text)
    if kind in ("dot_ident", "dot_ident_arg"):
        raise CompileError(f"ERROR: <input>: undeclared reference to '.{kids[0]}' (in container '')")
    if kind == "literal":
        token = kids[0]
        if token.type in ("STRING_LIT", "MLSTRING_LIT", "BYTES_LIT"):
            return 1, {"type": "string", "_literal": _unquote(str(token))}
        if token.type == "BOOL_LIT":
            return 1, BOOL
        if token.type in ("INT_LIT", "UINT_LIT"):
            return 1, INT
        if token.type == "FLOAT_LIT":
            return 1, {"type": "number"}
        return 1, DYN
    if kind == "list_lit":
        items = _args(trees[0]) if trees else []
        cost, elem = 1, DYN
        for item in items:
            c, elem = _estimate(item, scope, text)
            cost += c
        longest = max((_max_length(_estimate(i, scope, text)[1]) for i in items), default=0)
        return cost, {"type": "array", "items": {**elem, "maxLength": longest} if elem.get("type") == "string" else elem,
                      "_items": len(items), "_literal": True}
    if kind in ("map_lit", "member_object", "fieldinits", "mapinits"):
        cost = 1
        for sub in trees:
            cost += _estimate(sub, scope, text)[0]
        return cost, {"type": "object"}
    cost = 1
    for sub in trees:
        cost += _estimate(sub, scope, text)[0]
    return cost, DYN


def _unquote(literal: str) -> str:
    body = literal.lstrip("rRbB")
    for quote in ('"""', "'''", '"', "'"):
        if body.startswith(quote) and body.endswith(quote) and len(body) >= 2 * len(quote):
            return body[len(quote):-len(quote)]
    return body


def _function(name: str, args: list[Any], scope: dict[str, dict[str, Any]], text: str) -> tuple[int, dict[str, Any]]:
    if name not in CEL_GLOBALS_1_30:
        raise CompileError(f"ERROR: <input>: undeclared reference to '{name}' (in container '')")
    if name == "has":
        # has(self.a.b): a presence test; the selection must still name declared fields.
        c, _ = _estimate(args[0], scope, text) if args else (0, DYN)
        return c + 1, BOOL
    costs = [_estimate(a, scope, text) for a in args]
    total = 1 + sum(c for c, _ in costs)
    if name == "size":
        return total, INT
    if name == "matches" and len(costs) == 2:
        return total + _traverse(_max_length(costs[0][1]), STRING_TRAVERSAL_FACTOR) * _traverse(
            _max_length(costs[1][1]), REGEX_LENGTH_FACTOR), BOOL
    if name in ("string", "url", "isURL", "quantity", "isQuantity", "timestamp", "duration"):
        size = max((_max_length(t) for _, t in costs), default=1)
        return total + _traverse(size, STRING_TRAVERSAL_FACTOR), STRING if name == "string" else DYN
    return total, DYN


def _method(tree: Tree, scope: dict[str, dict[str, Any]], text: str) -> tuple[int, dict[str, Any]]:
    target_tree, name = tree.children[0], str(tree.children[1])
    args = _args(tree.children[2]) if len(tree.children) > 2 and isinstance(tree.children[2], Tree) else []
    qualified = _ident(target_tree)
    if qualified in ("optional", "strings") and f"{qualified}.{name}" in CEL_GLOBALS_1_30 and qualified not in scope:
        total = 1 + sum(_estimate(a, scope, text)[0] for a in args)
        return total, DYN
    if name not in CEL_METHODS_1_30:
        raise CompileError(f"ERROR: <input>: undeclared reference to '{name}' (in container '')")
    ct, target = _estimate(target_tree, scope, text)
    if name in COMPREHENSIONS and args:
        var = _ident(args[0])
        if var is None:
            raise CompileError(f"ERROR: <input>: {name}() variable name must be a simple identifier")
        if target.get("type") == "array":
            elem = target.get("items") or DYN
        elif target.get("type") == "object":
            elem = {"type": "string", "maxLength": MAX_REQUEST_BYTES}  # map comprehensions range over keys
        else:
            elem = DYN
        n = _size_of(target)
        inner = {**scope, var: elem}
        body = sum(_estimate(a, inner, text)[0] for a in args[1:])
        result = BOOL if name in ("all", "exists", "exists_one") else {"type": "array", "items": elem, "_items": n, "_literal": True}
        return ct + n * (body + 2) + 1, result
    costs = [_estimate(a, scope, text) for a in args]
    total = ct + 1 + sum(c for c, _ in costs)
    size = _max_length(target)
    if name == "size":
        return total, INT
    if name in ("matches", "find", "findAll"):
        regex = _max_length(costs[0][1]) if costs else 1
        return total + _traverse(size, STRING_TRAVERSAL_FACTOR) * _traverse(regex, REGEX_LENGTH_FACTOR), \
            BOOL if name == "matches" else STRING
    if name in ("contains", "startsWith", "endsWith", "indexOf", "lastIndexOf"):
        if target.get("type") == "array":
            return total + _size_of(target), INT if "ndex" in name else BOOL
        sub = _max_length(costs[0][1]) if costs else 1
        return total + _traverse(size, STRING_TRAVERSAL_FACTOR) * _traverse(sub, STRING_TRAVERSAL_FACTOR), \
            INT if "ndex" in name else BOOL
    if name in ("isSorted", "sum", "min", "max"):
        return total + _size_of(target), target.get("items") or DYN
    if name in ("lowerAscii", "upperAscii", "replace", "split", "substring", "trim", "join", "charAt"):
        return total + _traverse(size if target.get("type") != "array" else _size_of(target) * 64,
                                 STRING_TRAVERSAL_FACTOR), {"type": "string", "maxLength": size}
    return total + _traverse(size, STRING_TRAVERSAL_FACTOR), DYN
