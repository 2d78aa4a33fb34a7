"""Kubernetes-style status conditions, computed purely.

`lastTransitionTime` moves only when a condition's status flips, so a reconcile loop that re-asserts the same
truth every second never produces a status write (keeps the API server and watchers quiet).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

Condition = dict[str, Any]


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[Condition] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """Returns a new condition list with `type_` set; other conditions are kept in order."""
    out: list[Condition] = []
    found = False
    value = "True" if status else "False"
    for cond in conditions or []:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        moved = cond.get("status") != value
        new = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": (now or now_iso()) if moved else cond.get("lastTransitionTime", now or now_iso()),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now or now_iso(),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    return out


def get_condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: list[Condition] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond and cond.get("status") == "True")


def same_ignoring_time(a: list[Condition] | None, b: list[Condition] | None) -> bool:
    """True when two condition lists say the same thing; used to skip no-op status patches."""

    def strip(conds: list[Condition] | None) -> list[tuple]:
        return sorted(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
            for c in conds or []
        )

    return strip(a) == strip(b)
