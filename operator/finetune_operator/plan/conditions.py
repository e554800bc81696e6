"""Standard Kubernetes conditions (metav1.Condition shape) kept as plain dicts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def find(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    cond = find(conditions, type_)
    return bool(cond and cond.get("status") == "True")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime moves only when the status itself changes."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = find(conditions, type_)
    cond = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == value else rfc3339(now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return [cond if c.get("type") == type_ else c for c in conditions] if old else [*conditions, cond]
