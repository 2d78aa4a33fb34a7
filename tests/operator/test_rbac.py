"""The shipped ClusterRole against what the operator calls (operator/rbac.py).

The lifecycle suite additionally runs the operator *as* the manifests' ServiceAccount, so a missing rule fails there
with a 403; this test names the gap (or the surplus) precisely: the role must equal USED.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from lorafleet.operator.rbac import USED

ROOT = Path(__file__).resolve().parents[2]


def granted() -> set[tuple[str, str, str]]:
    role = yaml.safe_load((ROOT / "manifests/clusterrole.yaml").read_text())
    out = set()
    for rule in role["rules"]:
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    out.add((g, r, v))
    return out


def test_every_call_the_operator_makes_is_granted() -> None:
    missing = USED - granted()
    assert not missing, sorted(missing)


def test_no_wildcards_and_secrets_are_not_enumerable() -> None:
    g = granted()
    assert not any("*" in part for rule in g for part in rule)
    assert not {("", "secrets", v) for v in ("list", "watch", "delete")} & g
    assert not {("", "pods", v) for v in ("create", "update", "delete")} & g  # patch: pod-deletion-cost only


def test_the_role_grants_exactly_what_the_operator_uses() -> None:
    """No surplus: every grant beyond USED would be privilege nobody exercises (and nobody reviews)."""
    surplus = granted() - USED
    assert not surplus, sorted(surplus)
    assert granted() == USED
