"""What `GET /metrics` shows, in Prometheus' text format (prometheus_client, one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from balcony_edge.runtime.core.engine import GeneratedToken

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Tokens per exit, token latency, catch-up positions, requests by status, queue depth and device signals."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "balcony_tokens", "Generated tokens, by the exit that computed them", ["exit"], registry=self.registry
        )
        self.latency = Histogram(
            "balcony_token_latency_seconds",
            "Time to compute one token (catch-up included)",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.catch_up = Counter(
            "balcony_catch_up_positions", "Positions recomputed when a sequence deepened", registry=self.registry
        )
        self.requests = Counter(
            "balcony_requests",
            "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.running = Gauge("balcony_running_requests", "Generations running now", registry=self.registry)
        self.queued = Gauge("balcony_queued_requests", "Generations waiting for a slot", registry=self.registry)
        self.batched = Histogram(
            "balcony_batch_size",
            "Sequences per batched decode step",
            buckets=(2, 3, 4, 6, 8, 12, 16),
            registry=self.registry,
        )
        self.prefix_hits = Counter(
            "balcony_prefix_cache_hits", "Requests that started from a kept prompt prefix", registry=self.registry
        )
        self.prefix_tokens = Counter(
            "balcony_prefix_cache_reused_tokens", "Prompt tokens not computed again", registry=self.registry
        )
        self.prefix_bytes = Gauge("balcony_prefix_cache_bytes", "Bytes of the kept caches", registry=self.registry)
        self.signals = Gauge(
            "balcony_signal", "Last device reading, by signal (units in the name)", ["signal"], registry=self.registry
        )

    def observe(self, token: GeneratedToken) -> None:
        """Called by the scheduler for every token."""
        self.tokens.labels(exit=str(token.exit)).inc()
        self.latency.observe(token.latency_ms / 1000)
        self.catch_up.inc(token.catch_up_tokens)
        for name, value in token.signals.items():
            if isinstance(value, (int, float)):
                self.signals.labels(signal=name).set(float(value))

    def render(self, running: int, queued: int, prefix_bytes: int = 0) -> bytes:
        self.running.set(running)
        self.queued.set(queued)
        self.prefix_bytes.set(prefix_bytes)
        return generate_latest(self.registry)
