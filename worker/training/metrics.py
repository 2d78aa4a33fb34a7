"""Training metrics on the worker's Prometheus registry (names documented in docs/training-api.md).

Why on the worker's registry: one `/metrics` scrape shows serving and fine-tuning side by side, which is what the
operator and the co-serving benchmarks read.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TrainingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        a = ["adapter"]
        self.tokens = Counter("lorafleet_training_tokens", "Completion (loss) tokens trained on.", a, registry=r)
        self.tokens_per_second = Gauge(
            "lorafleet_training_tokens_per_second", "Training tokens/s over the last optimizer step.", a, registry=r
        )
        self.loss = Gauge("lorafleet_training_loss", "EMA of the training loss.", a, registry=r)
        self.steps = Counter("lorafleet_training_steps", "Optimizer steps.", a, registry=r)
        self.published_version = Gauge(
            "lorafleet_training_published_version", "Last published adapter version number.", a, registry=r
        )
        self.refused_versions = Counter(
            "lorafleet_training_refused_versions", "Candidate versions refused (NaN / loss spike).", a, registry=r
        )
        self.checkpoints = Counter(
            "lorafleet_training_checkpoints",
            "Training checkpoints; result = written / restored / corrupt (skipped, fell back) / failed (not written).",
            ["adapter", "result"],
            registry=r,
        )
        self.share = Gauge("lorafleet_finetune_share", "Fine-tuning share of the leftover budget.", a, registry=r)
        self.tpot_ratio = Gauge(
            "lorafleet_coserve_tpot_ratio",
            "The latency target's percentile of per-request TPOT / the target, as last observed by the job.",
            a,
            registry=r,
        )
        self.finetune_tokens = Histogram(
            "lorafleet_finetune_tokens_per_iteration",
            "Token units of fine-tuning work run per serving iteration.",
            buckets=(0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        self.stash_bytes = Gauge("lorafleet_stash_bytes", "Host bytes held by the activation stash.", registry=r)
        self.stash_events = Counter(
            "lorafleet_stash_events",
            "Activation stash events: recorded / reused / recomputed / dropped / evicted / skipped.",
            ["event"],
            registry=r,
        )
        self.feedback = Counter(
            "lorafleet_feedback", "Feedback requests; result = accepted / rejected.", ["adapter", "result"], registry=r
        )
