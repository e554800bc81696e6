"""The json module's sorted encodings, byte for byte, through orjson where orjson writes the same bytes.

Two encodings are stored or hashed where a change would show: kube/diff.py's compact digests (kept in annotations
and compared across operator versions) and the trainer's config.json (its hash is in the ConfigMap and the pod
template, so other bytes would roll every pending job's children after an upgrade). The json module's encoder was
~10% of the operator's CPU while creating jobs in those digests, and its indented form runs in pure Python (the
C encoder serves only `indent=None`): ~4% more (py-spy --gil samples of bench/operator_throughput.py).

orjson writes the same bytes as the json module for printable ASCII output, string keys, no float below 1e-4 and
no NaN or infinity (json writes NaN, orjson null; a Kubernetes object has none). Anything else takes the json
module: `not isascii()` or DEL (json escapes them), `_small_float` (orjson `0.00001`, json `1e-05`), a TypeError
(a non-string key, which json converts, or a type orjson does not know). tests/operator/test_operator_diff_json.py
checks both encodings on generated documents.
"""

from __future__ import annotations

import json
import re
from typing import Any

try:
    import orjson
except ImportError:  # the API types alone need only pydantic and PyYAML (pyproject.toml): the json module then
    orjson = None  # type: ignore[assignment]

_SORT, _INDENT = (orjson.OPT_SORT_KEYS, orjson.OPT_INDENT_2) if orjson is not None else (0, 0)

# A literal first, so the search runs at memchr speed (~2 us per Job manifest; a pattern with alternatives took
# 60 us, twenty times orjson's encoding). A match inside a string only sends that object down the exact path.
_EXPONENT = re.compile(rb"e-[0-9](?![0-9])")


def _small_float(out: bytes) -> bool:
    """A float below 1e-4 may be in `out`."""
    return b"0.0000" in out or any(m.start() and out[m.start() - 1] in b"0123456789." for m in _EXPONENT.finditer(out))


def _orjson(obj: Any, option: int) -> bytes | None:
    if orjson is None:
        return None
    try:
        out = orjson.dumps(obj, option=option)
    except TypeError:
        return None
    if not out.isascii() or b"\x7f" in out or _small_float(out):
        return None
    return out


def compact_sorted(obj: Any) -> bytes:
    """`json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()`."""
    out = _orjson(obj, _SORT)
    return out if out is not None else json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _json_floats(obj: Any) -> Any:
    """`obj` with every float as the json module writes it (float.__repr__: `1e-08`, where orjson writes `1e-8`),
    as a pre-encoded orjson.Fragment: the trainer's config always has such floats (Adam's epsilon), and without
    this it always took the json module's pure-Python indented encoder (~0.18 ms per new job)."""
    if isinstance(obj, float):
        return orjson.Fragment(_float(obj))
    if isinstance(obj, dict):
        return {k: _json_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_floats(v) for v in obj]
    return obj


def _float(value: float) -> bytes:
    if value != value or value in (float("inf"), float("-inf")):
        return b"NaN" if value != value else (b"Infinity" if value > 0 else b"-Infinity")
    return float.__repr__(value).encode()


def indented_sorted(obj: Any) -> str:
    """`json.dumps(obj, sort_keys=True, indent=2)`."""
    out = _orjson(_json_floats(obj), _SORT | _INDENT) if orjson is not None else None
    return out.decode() if out is not None else json.dumps(obj, sort_keys=True, indent=2)


def equality_key(obj: Any) -> bytes:
    """A sorted encoding for comparing values in this process only (never stored or hashed, so any encoder
    will do): orjson, or the json module without it. Non-JSON values are compared as their str()."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return json.dumps(obj, sort_keys=True, default=str).encode()
