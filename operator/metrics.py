"""The operator's own Prometheus metrics, in a private registry served by `lorafleet operator --metrics-port`.

A private registry (not the global default) keeps two operators in one test process from colliding and keeps the
endpoint free of unrelated collectors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.placements = Gauge(
            "lorafleet_operator_placements", "Adapters placed on each worker", ["basemodel", "worker"], registry=r
        )
        self.workers_ready = Gauge("lorafleet_operator_workers_ready", "Ready workers", ["basemodel"], registry=r)
        self.solve_seconds = Histogram(
            "lorafleet_operator_solve_seconds",
            "Placement solve time",
            ["basemodel", "kind"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.migrations = Counter(
            "lorafleet_operator_migrations_total", "Adapter replica handoffs", ["basemodel", "reason"], registry=r
        )
        self.loads = Counter("lorafleet_operator_adapter_loads_total", "Load calls sent", ["basemodel"], registry=r)
        self.unloads = Counter(
            "lorafleet_operator_adapter_unloads_total", "Unload calls sent", ["basemodel"], registry=r
        )
        self.worker_errors = Counter(
            "lorafleet_operator_worker_errors_total", "Worker API errors", ["basemodel", "op"], registry=r
        )
        self.reconcile_errors = Counter(
            "lorafleet_operator_reconcile_errors_total", "Reconcile cycles that raised", ["kind"], registry=r
        )
        self.reconcile_seconds = Histogram(
            "lorafleet_operator_reconcile_seconds",
            "Reconcile cycle latency",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
