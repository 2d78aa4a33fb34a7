"""The operator's listen address for /healthz: all addresses unless told otherwise (kubelet probes the pod IP)."""

from __future__ import annotations

import pytest
from lorafleet.operator.main import build_parser


def test_liveness_host_defaults_to_all_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFLEET_LIVENESS_HOST", raising=False)
    assert build_parser().parse_args([]).liveness_host == "0.0.0.0"


def test_liveness_host_from_env_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_LIVENESS_HOST", "::")
    assert build_parser().parse_args([]).liveness_host == "::"
    assert build_parser().parse_args(["--liveness-host", "127.0.0.1"]).liveness_host == "127.0.0.1"
